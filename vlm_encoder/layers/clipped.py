"""`ClippedLinear`: a Linear that clamps its input and its output to bounds it holds (Gemma 4's
`Gemma4ClippableLinear`, the E2B / E4B towers' `use_clipped_linears`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ClippedLinear(nn.Module):
    """`clamp(clamp(x, in_min, in_max) @ W^T + b, out_min, out_max)`, with bounds per part: a fused
    projection of `parts` equal linears (q / k / v, a gate and its value) keeps each one's bounds,
    so each part clamps the input its own way. Not an `nn.Linear`, so that code treating Linears
    alike (LoRA, packed CPU kernels) never drops the clamps.

    Args:
        in_features: Input width.
        out_features: Output width, a multiple of `parts`.
        bias: Learn a bias.
        parts: Equal output slices with bounds of their own.

    Attributes:
        in_min, in_max, out_min, out_max: Bounds `(parts,)`, buffers saved with the weights;
            infinite (no clamp) until loaded.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, parts: int = 1) -> None:
        super().__init__()
        if out_features % parts:
            raise ValueError(f"out_features={out_features} is not a multiple of parts={parts}")
        self.in_features, self.out_features, self.parts = in_features, out_features, parts
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        for name, value in (("in_min", -1), ("in_max", 1), ("out_min", -1), ("out_max", 1)):
            self.register_buffer(name, torch.full((parts,), value * float("inf")))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.weight.chunk(self.parts)
        biases = self.bias.chunk(self.parts) if self.bias is not None else (None,) * self.parts
        outs = [
            F.linear(x.clamp(self.in_min[i], self.in_max[i]), weights[i], biases[i]).clamp(self.out_min[i], self.out_max[i])
            for i in range(self.parts)
        ]
        return outs[0] if self.parts == 1 else torch.cat(outs, dim=-1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, parts={self.parts}"


def build_linear(in_features: int, out_features: int, bias: bool = True, clipped: bool = False, parts: int = 1) -> nn.Module:
    """An `nn.Linear`, or a `ClippedLinear` of `parts` when `clipped`."""
    if clipped:
        return ClippedLinear(in_features, out_features, bias, parts)
    return nn.Linear(in_features, out_features, bias=bias)
