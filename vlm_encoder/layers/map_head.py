"""Multihead attention pooling (MAP): one learned query attends over all tokens (SigLIP)."""

from __future__ import annotations

import torch
from torch import nn

from .mlp import RowwiseMlp, rowwise_linear


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
        self.mlp = RowwiseMlp(dim, mlp_dim, act)
        nn.init.trunc_normal_(self.latent, std=dim**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        H, d = self.num_heads, self.head_dim
        # The query is the same for every image: project it once. Scores and the weighted sum
        # are written so that no matrix product has one row per image (CPU GEMMs round
        # differently for different small row counts; see `rowwise_linear`).
        q = self.q(self.latent).reshape(H, d, 1) * d**-0.5  # (H, d, 1)
        k, v = self.kv(x).reshape(B, T, 2, H, d).unbind(2)  # each (B, T, H, d)
        scores = torch.bmm(k.permute(2, 0, 1, 3).reshape(H, B * T, d), q)  # (H, B*T, 1)
        weights = scores.reshape(H, B, T).softmax(dim=-1)  # (H, B, T)
        pooled = (weights.permute(1, 2, 0).unsqueeze(-1) * v).sum(dim=1)  # (B, H, d)
        pooled = rowwise_linear(self.proj, pooled.reshape(B, 1, D))  # (B, 1, D)
        pooled = pooled + self.mlp(self.norm(pooled))
        return pooled[:, 0]  # (B, D)
