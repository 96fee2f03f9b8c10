"""The token norms a tower may use: LayerNorm (most ViTs) or RMSNorm (AIMv2, InternViT-6B)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

NormKind = Literal["layernorm", "rmsnorm"]


class RMSNorm(nn.Module):
    """`weight * x / sqrt(mean(x^2) + eps)` over the last dim, computed in float32 and cast
    back before the scale (T5 / LLaMA; HF's `Aimv2RMSNorm`, `InternVLVisionRMSNorm`).

    Args:
        dim: Normalised width.
        eps: Added to the mean square.
        affine: Learn the per-channel `weight`; without it the norm has no parameters (Gemma 4's
            value norm, `with_scale=False`).
    """

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x.to(dtype) if self.weight is None else self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}" + ("" if self.weight is not None else ", affine=False")


def build_norm(kind: NormKind, dim: int, eps: float) -> nn.Module:
    """The norm module for `VisionConfig.norm_type`."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    raise ValueError(f"unknown norm_type {kind!r}; allowed: layernorm, rmsnorm")
