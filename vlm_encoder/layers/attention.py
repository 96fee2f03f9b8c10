"""Multi-head self-attention through `scaled_dot_product_attention`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention with a fused query/key/value projection.

    Args:
        dim: Token width `D`.
        num_heads: Number of heads; `D` must be divisible by it.
        qkv_bias: Bias on the fused `qkv` projection.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, return_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend over the tokens.

        Args:
            x: Tokens `(B, T, D)`.
            attn_mask: Optional boolean mask `(B, 1, T, T)` or `(T, T)`, True where attention
                is allowed (block-diagonal masks for packed sequences).
            return_weights: Also return the attention probabilities. This takes the explicit
                softmax path; the default path stays on the fused SDPA kernel.

        Returns:
            The attended tokens `(B, T, D)` and the weights `(B, heads, T, T)` or `None`.
        """
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, T, head_dim)
        weights = None
        if return_weights:
            scores = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)  # (B, heads, T, T)
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            weights = scores.softmax(dim=-1)
            x = weights @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.proj(x), weights
