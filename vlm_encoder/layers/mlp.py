"""Feed-forward networks of a transformer block, and the activations they use."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .clipped import build_linear


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's GELU approximation `x * sigmoid(1.702 x)`."""
    return x * torch.sigmoid(1.702 * x)


class _Activation(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], name: str) -> None:
        super().__init__()
        self.fn = fn
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


def get_activation(name: str) -> nn.Module:
    """The activation module for a `VisionConfig.act` name."""
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "quick_gelu":
        return _Activation(quick_gelu, "quick_gelu")
    raise ValueError(f"unknown activation {name!r}; allowed: gelu, quick_gelu, gelu_tanh")


def _hidden_norm(hidden_dim: int, norm_eps: float | None) -> nn.Module:
    """LayerNorm on the hidden activations before `fc2` (EVA02's sub-LN, timm `scale_mlp`)."""
    return nn.Identity() if norm_eps is None else nn.LayerNorm(hidden_dim, eps=norm_eps)


class Mlp(nn.Module):
    """Linear, activation, [LayerNorm], Linear: `(B, T, D) -> (B, T, D)`.

    Args:
        norm_eps: Epsilon of a LayerNorm on the hidden activations, or `None` for none.
        clipped: `fc1` / `fc2` are `ClippedLinear`s.
    """

    def __init__(self, dim: int, hidden_dim: int, act: str = "gelu", norm_eps: float | None = None, clipped: bool = False) -> None:
        super().__init__()
        self.fc1 = build_linear(dim, hidden_dim, True, clipped)
        self.act = get_activation(act)
        self.norm = _hidden_norm(hidden_dim, norm_eps)
        self.fc2 = build_linear(hidden_dim, dim, True, clipped)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.act(self.fc1(x))))


class SwiGLU(nn.Module):
    """Packed gated MLP: `fc2(gate_act(a) * b)` with `a, b = fc1(x).chunk(2)` (the gate first),
    with an optional LayerNorm before `fc2` (`norm_eps`, EVA02-CLIP). The gate is SiLU (SwiGLU,
    DINOv2 giant) unless `act` names another (`gated`: GELU-tanh for Gemma 4's GeGLU). `clipped`:
    `fc1` (bounds per gate / value) and `fc2` are `ClippedLinear`s."""

    def __init__(
        self, dim: int, hidden_dim: int, norm_eps: float | None = None, act: str | None = None, clipped: bool = False
    ) -> None:
        super().__init__()
        self.fc1 = build_linear(dim, 2 * hidden_dim, True, clipped, parts=2)
        self.gate_act = nn.SiLU() if act is None else get_activation(act)
        self.norm = _hidden_norm(hidden_dim, norm_eps)
        self.fc2 = build_linear(hidden_dim, dim, True, clipped)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.fc1(x).chunk(2, dim=-1)  # each (B, T, hidden)
        return self.fc2(self.norm(self.gate_act(a) * b))


def build_mlp(
    kind: str, dim: int, hidden_dim: int, act: str, norm_eps: float | None = None, clipped: bool = False
) -> nn.Module:
    """The block MLP for `VisionConfig.mlp_type` (`norm_eps`: a hidden LayerNorm, or `None`;
    `clipped`: `ClippedLinear`s): `mlp`, `swiglu` (SiLU gate) or `gated` (the gate through `act`)."""
    if kind == "mlp":
        return Mlp(dim, hidden_dim, act, norm_eps, clipped)
    if kind == "swiglu":
        return SwiGLU(dim, hidden_dim, norm_eps, clipped=clipped)
    if kind == "gated":
        return SwiGLU(dim, hidden_dim, norm_eps, act=act, clipped=clipped)
    raise ValueError(f"unknown mlp_type {kind!r}; allowed: mlp, swiglu, gated")
