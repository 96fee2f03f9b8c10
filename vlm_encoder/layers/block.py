"""The pre-norm transformer block: `x + attn(LN(x))`, then `x + mlp(LN(x))` (with `sandwich_norm`,
`x + LN(attn(LN(x)))`, then `x + LN(mlp(LN(x)))`)."""

from __future__ import annotations

import torch
from torch import nn

from .attention import Attention, SegmentMask, WindowMask
from .mlp import build_mlp
from .norm import NormKind, build_norm
from .rope import RopeTable


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch (CaiT, DINOv2)."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample while training."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class Block(nn.Module):
    """Pre-norm transformer block.

    Args:
        dim: Token width `D`.
        num_heads: Attention heads.
        mlp_dim: MLP hidden width.
        mlp_type: `mlp` or `swiglu`.
        act: MLP activation name.
        qkv_bias: Bias on the fused qkv projection.
        norm_eps: LayerNorm epsilon.
        layer_scale_init: LayerScale initial value, or `None` for no LayerScale.
        drop_path: Stochastic-depth rate of this block.
        qk_norm: LayerNorm over each head's queries and keys.
        attn_norm: LayerNorm on the attended tokens before the output projection.
        mlp_norm: LayerNorm on the MLP's hidden activations.
        norm_type: `layernorm` or `rmsnorm` for `norm1`, `norm2` and the qk-norm.
        qk_norm_scope: qk-norm per `head` or over the whole `width` (InternViT).
        v_norm: RMS-normalise each head's values (no weight; Gemma 4).
        sandwich_norm: Also normalise each branch's output before the residual add
            (`post_attn_norm`, `post_mlp_norm`; Gemma 4's post-attention / post-feedforward norms).
        clipped_linears: Every Linear of the block is a `ClippedLinear` (Gemma 4 E2B / E4B).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        mlp_type: str = "mlp",
        act: str = "gelu",
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        layer_scale_init: float | None = None,
        drop_path: float = 0.0,
        qk_norm: bool = False,
        attn_norm: bool = False,
        mlp_norm: bool = False,
        norm_type: NormKind = "layernorm",
        qk_norm_scope: str = "head",
        v_norm: bool = False,
        sandwich_norm: bool = False,
        clipped_linears: bool = False,
    ) -> None:
        super().__init__()
        self.norm1 = build_norm(norm_type, dim, norm_eps)
        self.attn = Attention(
            dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, inner_norm=attn_norm, norm_eps=norm_eps,
            qk_norm_type=norm_type, qk_norm_scope=qk_norm_scope, v_norm=v_norm, clipped=clipped_linears,
        )
        # Created only when used, so that the state dicts of other towers are unchanged.
        self.post_attn_norm = build_norm(norm_type, dim, norm_eps) if sandwich_norm else nn.Identity()
        self.post_mlp_norm = build_norm(norm_type, dim, norm_eps) if sandwich_norm else nn.Identity()
        self.ls1 = LayerScale(dim, layer_scale_init) if layer_scale_init is not None else nn.Identity()
        self.norm2 = build_norm(norm_type, dim, norm_eps)
        self.mlp = build_mlp(mlp_type, dim, mlp_dim, act, norm_eps if mlp_norm else None, clipped_linears)
        self.ls2 = LayerScale(dim, layer_scale_init) if layer_scale_init is not None else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | SegmentMask | WindowMask | None = None, return_weights: bool = False,
        causal: bool = False, rope: RopeTable | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(B, T, D) -> (B, T, D)`, plus attention weights `(B, heads, T, T)` when asked
        (`causal`: each token attends to itself and the tokens before it; `rope`: the rotary
        table of the tokens)."""
        attended, weights = self.attn(
            self.norm1(x), attn_mask=attn_mask, return_weights=return_weights, causal=causal, rope=rope
        )
        x = x + self.drop_path(self.ls1(self.post_attn_norm(attended)))
        x = x + self.drop_path(self.ls2(self.post_mlp_norm(self.mlp(self.norm2(x)))))
        return x, weights
