"""Multihead attention pooling (MAP): one learned query attends over all tokens (SigLIP)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..determinism import batch_invariant_call
from .mlp import Mlp


class AttentionPoolHead(nn.Module):
    """Pool `(B, T, D)` tokens to `(B, D)` with a learned query, then a residual MLP.

    Matches SigLIP's `MultiheadAttentionPoolingHead` (HF) and timm's `AttentionPoolLatent`:
    `h = attn(query, x, x)`, `h = h + mlp(LN(h))`.

    Args:
        dim: Token width `D`.
        num_heads: Attention heads.
        mlp_dim: Hidden width of the MLP.
        act: MLP activation name.
        norm_eps: LayerNorm epsilon.
    """

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, act: str, norm_eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_dim, act)
        nn.init.trunc_normal_(self.latent, std=dim**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        H, d = self.num_heads, self.head_dim
        # One learned query, projected once and shared by every image.
        q = self.q(self.latent).reshape(1, 1, H, d).transpose(1, 2).expand(B, -1, -1, -1)  # (B, H, 1, d)
        k, v = self.kv(x).reshape(B, T, 2, H, d).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, d)
        pooled = batch_invariant_call(F.scaled_dot_product_attention, q, k, v)  # (B, H, 1, d)
        pooled = pooled.transpose(1, 2).reshape(B, D)  # (B, D)
        # Linears over one pooled row per image: batch-variant on the CPU (see `determinism`).
        pooled = batch_invariant_call(self.proj, pooled)
        return pooled + batch_invariant_call(self.mlp, self.norm(pooled))  # (B, D)
