"""Multihead attention pooling (MAP): one learned query attends over all tokens (SigLIP)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
        q = self.q(self.latent.expand(B, -1, -1)).reshape(B, 1, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv(x).reshape(B, T, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # each (B, heads, T, head_dim)
        pooled = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, 1, D)
        pooled = self.proj(pooled)
        pooled = pooled + self.mlp(self.norm(pooled))
        return pooled[:, 0]  # (B, D)
