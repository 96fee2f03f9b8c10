"""Multi-head self-attention through `scaled_dot_product_attention`."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..determinism import batch_invariant_call
from .clipped import build_linear
from .norm import NormKind, RMSNorm, build_norm
from .rope import RopeTable
from .train_attention import self_attention


@dataclass(frozen=True)
class SegmentMask:
    """Block-diagonal attention over packed sequences.

    Row `p` of a `(P, T, D)` batch holds consecutive segments of `lengths[p]` tokens (summing
    to `T`); a token attends only within its segment. `Attention` runs one fused
    `scaled_dot_product_attention` call per layer over all rows and segments, with the dense
    block-diagonal mask (built once per mask and device, shared by every layer). Measured on
    the CPU (`benchmarks/packed_attention.py`), that one call beats nested (jagged) tensors and
    segments padded into a batch; compiled FlexAttention skips the masked blocks and was up to
    1.7x faster in the attention alone, but needs an inductor compile per pack shape; a loop of
    one call per segment computes no masked block either, but costs a Python loop per layer.

    Attributes:
        lengths: Per row, the segment lengths in token order.
    """

    lengths: tuple[tuple[int, ...], ...]

    @functools.cached_property
    def _dense_by_device(self) -> dict[torch.device, torch.Tensor]:
        return {}  # `cached_property` writes the instance's __dict__, so a frozen mask may hold it

    def dense(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The equivalent boolean mask `(P, 1, T, T)`, True where attention is allowed (built
        once per device)."""
        key = torch.device(device) if device is not None else torch.device("cpu")
        if key not in self._dense_by_device:
            self._dense_by_device[key] = self._build_dense(key)
        return self._dense_by_device[key]

    def _build_dense(self, device: torch.device) -> torch.Tensor:
        rows = []
        for lengths in self.lengths:
            ids = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
            rows.append(ids[:, None] == ids[None, :])
        return torch.stack(rows)[:, None]


@dataclass(frozen=True)
class WindowMask:
    """Attention within windows whose tokens need not be contiguous (Qwen2.5-VL's window blocks
    over a row-major patch grid).

    `Attention` gathers the tokens window by window, runs one fused call per window (windows are
    small next to the sequence, so a dense mask would compute mostly masked blocks) and scatters the result back, so the tokens stay in their own order.

    Attributes:
        order: `(T,)` token indices, grouped window by window.
        lengths: Tokens per window, in that order (summing to `T`).
    """

    order: torch.Tensor
    lengths: tuple[int, ...]

    @classmethod
    def grid(cls, grid: tuple[int, int], window: int, device: torch.device | str | None = None) -> WindowMask:
        """Square windows of `window x window` patches tiling a row-major grid `(h, w)` from its
        top-left corner (the last row / column of windows may be cut)."""
        h, w = grid
        ys, xs = torch.arange(h, device=device) // window, torch.arange(w, device=device) // window
        ids = (ys[:, None] * -(-w // window) + xs[None, :]).flatten()  # (h*w,) window of each patch
        order = torch.argsort(ids, stable=True)
        lengths = tuple(n for n in torch.bincount(ids).tolist() if n)
        return cls(order, lengths)

    def dense(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The equivalent boolean mask `(1, 1, T, T)`, True where attention is allowed."""
        order = self.order.to(device)
        ids = torch.empty_like(order)
        ids[order] = torch.repeat_interleave(torch.arange(len(self.lengths), device=device), torch.tensor(self.lengths, device=device))
        return (ids[:, None] == ids[None, :])[None, None]


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
        qk_norm: LayerNorm over each head's query and key (`q_norm`, `k_norm`), before RoPE.
        inner_norm: LayerNorm on the attended tokens before `proj` (`norm`; EVA02-CLIP's
            sub-LN, timm `scale_attn_inner`).
        norm_eps: Epsilon of those LayerNorms.
        qk_norm_type: `layernorm` or `rmsnorm` for `q_norm` / `k_norm`.
        qk_norm_scope: `head` (each head's `d` channels) or `width` (all `D` channels of a
            token at once, before the split into heads; InternViT).
        v_norm: RMS-normalise each head's values, without a weight (`v_norm`; Gemma 4).
        clipped: `qkv` and `proj` are `ClippedLinear`s (bounds per q / k / v; Gemma 4 E2B / E4B).
    """

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False, inner_norm: bool = False,
        norm_eps: float = 1e-6, qk_norm_type: NormKind = "layernorm", qk_norm_scope: str = "head",
        v_norm: bool = False,
        clipped: bool = False,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = build_linear(dim, 3 * dim, qkv_bias, clipped, parts=3)
        # Created only when used, so that the state dicts of other towers are unchanged.
        # qk-norm per head (EVA02, DINOv3) or over all heads at once (InternViT: `qk_norm_scope='width'`).
        self.qk_norm_scope = qk_norm_scope
        qk_dim = self.head_dim if qk_norm_scope == "head" else dim
        self.q_norm = build_norm(qk_norm_type, qk_dim, norm_eps) if qk_norm else None
        self.k_norm = build_norm(qk_norm_type, qk_dim, norm_eps) if qk_norm else None
        self.v_norm = RMSNorm(self.head_dim, norm_eps, affine=False) if v_norm else None
        self.norm = nn.LayerNorm(dim, eps=norm_eps) if inner_norm else nn.Identity()
        self.proj = build_linear(dim, dim, True, clipped)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, return_weights: bool = False,
        causal: bool = False, rope: RopeTable | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend over the tokens.

        Args:
            x: Tokens `(B, T, D)`.
            attn_mask: Optional boolean mask `(B, 1, T, T)` or `(T, T)`, True where attention
                is allowed, a `SegmentMask` for packed sequences (one call over all segments) or a
                `WindowMask` (one call per window of a grid).
            return_weights: Also return the attention probabilities (explicit softmax path;
                the default path stays on the fused kernel where there is one).
            causal: Each token attends to itself and the tokens before it (a text tower). Passed
                to the kernel as `is_causal`, so the flash kernel serves it (an explicit mask
                would rule it out); `attn_mask` must then be `None`.
            rope: Rotary table `(T, head_dim)` or `(B, T, head_dim)` applied to queries and keys
                (identity rows for tokens that are not rotated), or `None`.

        Returns:
            The attended tokens `(B, T, D)` and the weights `(B, heads, T, T)` or `None`.
        """
        B, T, D = x.shape
        if causal and attn_mask is not None:
            raise ValueError("causal=True takes no attn_mask (the causal mask is implied)")
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, T, head_dim)
        if self.q_norm is not None and self.qk_norm_scope == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        elif self.q_norm is not None:  # over the whole width: (B, heads, T, d) -> (B, T, D) and back
            q = self.q_norm(q.transpose(1, 2).reshape(B, T, D)).reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2)
            k = self.k_norm(k.transpose(1, 2).reshape(B, T, D)).reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        if self.v_norm is not None:
            v = self.v_norm(v)
        if rope is not None:
            q, k = rope.rotate(q), rope.rotate(k)
        weights = None
        if causal and return_weights:
            attn_mask, causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril(), False
        if isinstance(attn_mask, WindowMask) and not return_weights:
            order = attn_mask.order
            windows = SegmentMask(lengths=(attn_mask.lengths,) * B)
            grouped = _segment_attention(q[:, :, order], k[:, :, order], v[:, :, order], windows)  # (B, T, D) by window
            x = torch.empty_like(grouped)
            x[:, order] = grouped  # back to the tokens' own order
            return self.proj(self.norm(x)), None
        if isinstance(attn_mask, SegmentMask) and not return_weights:
            return self.proj(self.norm(_packed_attention(q, k, v, attn_mask))), None
        if isinstance(attn_mask, (SegmentMask, WindowMask)):
            attn_mask = attn_mask.dense(x.device)
        if return_weights:
            weights = attention_weights(q, k, attn_mask)
            x = weights @ v  # (B, heads, T, head_dim)
        else:
            if attn_mask is not None:  # batch first, one mask per image
                attn_mask = attn_mask.expand(B, -1, -1, -1) if attn_mask.ndim == 4 else attn_mask.expand(B, 1, T, T)
            x = batch_invariant_call(self_attention, q, k, v, attn_mask, is_causal=causal)  # see train_attention
        x = x.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.proj(self.norm(x)), weights


def _check_tiling(segments: SegmentMask, B: int, T: int) -> None:
    if len(segments.lengths) != B or any(sum(lengths) != T for lengths in segments.lengths):
        raise ValueError(f"SegmentMask lengths {segments.lengths} do not tile a batch of {B} rows of {T} tokens")


def _packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: SegmentMask) -> torch.Tensor:
    """One fused call over every row and segment (the block-diagonal mask), in the merged
    `(B, T, D)` layout. Rows are separate packs: no batch invariance is promised across them
    (an image's features from a pack equal the image alone to rounding, not bitwise)."""
    B, H, T, d = q.shape
    _check_tiling(segments, B, T)
    attended = F.scaled_dot_product_attention(q, k, v, segments.dense(q.device))  # (B, H, T, d)
    return attended.transpose(1, 2).reshape(B, T, H * d)


def _segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: SegmentMask) -> torch.Tensor:
    """One fused call per segment of each row (each window of a `WindowMask`: small windows
    over a long sequence, where a dense mask would compute mostly masked blocks), written
    into the merged `(B, T, D)` layout."""
    B, H, T, d = q.shape
    _check_tiling(segments, B, T)
    out = q.new_empty(B, T, H * d)
    for row, lengths in enumerate(segments.lengths):
        start = 0
        for n in lengths:
            part = slice(start, start + n)
            attended = F.scaled_dot_product_attention(q[row : row + 1, :, part], k[row : row + 1, :, part], v[row : row + 1, :, part])
            out[row, part].view(n, H, d).copy_(attended[0].transpose(0, 1))  # (n, H, d)
            start += n
    return out
