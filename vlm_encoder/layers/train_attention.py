"""Self-attention for low-precision training on the CPU: explicit matmuls where the fused kernel's
backward is slow.

torch's CPU flash-attention backward in bf16 is 4-6x slower than the explicit route's backward
(matmuls and an fp32 softmax) at the shapes CLIP towers train at. Measured on 2 cores of an Intel
Xeon (AMX), torch 2.14.1, 1 thread, forward + backward per call: ViT-B/32 image tokens (32, 12, 50, 64)
58 against 14 ms, the causal text tower (32, 8, 77, 64) 61 against 21 ms, (8, 12, 197, 64) 52 against
36 ms; the fused kernel wins again from ~1,000 tokens ((1, 16, 1025, 64): 92 against 168 ms), and in
fp32 the two are close. So the explicit route serves only what gains: a CPU, bf16 / fp16, gradients
wanted, no mask other than causal, at most `EXPLICIT_MAX_TOKENS` tokens; everything else (inference
included, whose outputs stay those of the fused kernel) calls `F.scaled_dot_product_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EXPLICIT_MAX_TOKENS = 512
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def self_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
) -> torch.Tensor:
    """`F.scaled_dot_product_attention(q, k, v, attn_mask, is_causal=is_causal)` (default scale, no
    dropout), on the explicit route when `uses_explicit_route` says it is faster.

    Args:
        q, k, v: `(B, heads, T, head_dim)`.
        attn_mask: As the fused kernel takes it (a mask always takes the fused kernel).
        is_causal: Each token attends to itself and those before it.

    Returns:
        `(B, heads, T, head_dim)`.
    """
    if uses_explicit_route(q, k, v, attn_mask):
        return explicit_attention(q, k, v, is_causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask, is_causal=is_causal)


def uses_explicit_route(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None) -> bool:
    """Whether `self_attention` takes the explicit route (see the module's docstring)."""
    return (
        q.device.type == "cpu"
        and q.dtype in _LOW_PRECISION
        and attn_mask is None
        and q.shape[-2] <= EXPLICIT_MAX_TOKENS
        and torch.is_grad_enabled()
        and (q.requires_grad or k.requires_grad or v.requires_grad)
        and not torch.compiler.is_compiling()
    )


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with the scores and softmax in fp32 (as the fused kernel
    accumulates), the two matmuls in the inputs' dtype."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, heads, T, T)
    scores = scores.float()
    if is_causal:
        T = q.shape[-2]
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return scores.softmax(-1).to(v.dtype) @ v
