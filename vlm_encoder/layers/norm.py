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
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def build_norm(kind: NormKind, dim: int, eps: float) -> nn.Module:
    """The norm module for `VisionConfig.norm_type`."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    raise ValueError(f"unknown norm_type {kind!r}; allowed: layernorm, rmsnorm")
