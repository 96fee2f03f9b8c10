"""Multi-head self-attention through `scaled_dot_product_attention`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Scaled dot-product attention `softmax(q k^T / sqrt(d)) v` over `(B, heads, T, d)`.

    On CUDA (and other accelerators) this is `F.scaled_dot_product_attention` (flash or
    memory-efficient kernels). On the CPU it is the explicit batched-matmul form instead:
    PyTorch's fused CPU kernel splits its work by batch size, so an image's features would
    change bitwise with the batch it is in; the explicit form keeps them identical whatever
    the batch (and costs ~2% of a ViT-B forward, the linears dominate).

    Args:
        q: Queries `(B, heads, Tq, d)`.
        k: Keys `(B, heads, Tk, d)`.
        v: Values `(B, heads, Tk, d)`.
        attn_mask: Optional boolean mask broadcastable to `(B, heads, Tq, Tk)`, True where
            attention is allowed.

    Returns:
        `(B, heads, Tq, d)`.
    """
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return attention_weights(q, k, attn_mask) @ v


def attention_weights(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention probabilities `softmax(q k^T / sqrt(d))` `(B, heads, Tq, Tk)`."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, heads, Tq, Tk)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores.softmax(dim=-1)


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
            return_weights: Also return the attention probabilities (explicit softmax path;
                the default path stays on the fused kernel where there is one).

        Returns:
            The attended tokens `(B, T, D)` and the weights `(B, heads, T, T)` or `None`.
        """
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, T, head_dim)
        weights = None
        if return_weights:
            weights = attention_weights(q, k, attn_mask)
            x = weights @ v
        else:
            x = attention(q, k, v, attn_mask)
        x = x.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.proj(x), weights
