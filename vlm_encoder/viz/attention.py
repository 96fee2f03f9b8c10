"""Where a ViT looks: attention maps over the patch grid and attention rollout.

Three queries, because not every model has a CLS token:
  * `cls`: the CLS token's attention row (the attention-map analysis of the ViT paper).
    Only the patch columns are kept: the CLS column and the register columns (DINOv2 with
    registers) are dropped, so a map does not sum to 1; it is the share of the CLS
    token's attention that goes to each patch.
  * `map`: the learned query of the MAP pooling head (SigLIP, `pool='map'`) over the final,
    normed tokens of the last block: the attention that makes the pooled embedding.
  * `mean`: the mean attention each patch receives from all patch queries (any model).

Rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers"): per block,
average the heads, add the identity for the residual path, renormalise the rows, and
multiply the blocks' matrices from the first block up; the query's row of the product
says how much of its information comes from each input patch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

AttentionQuery = Literal["auto", "cls", "map", "mean"]
ATTENTION_QUERIES: tuple[str, ...] = ("auto", "cls", "map", "mean")

QUERY_DESCRIPTIONS = {
    "cls": "CLS token's attention over the patches",
    "map": "MAP pooling head's attention over the patches (its learned query, last block)",
    "mean": "mean attention each patch receives from all patches",
}


def resolve_query(config, query: AttentionQuery, last_layer: bool) -> str:
    """The query a picture uses: `auto` is `cls` with a CLS token, else `map` for a MAP head
    at the last block, else `mean`.

    Args:
        config: The encoder's `VisionConfig`.
        query: `auto`, `cls`, `map` or `mean`.
        last_layer: Whether the picture is of the last block (the MAP head reads only that).

    Raises:
        ValueError: An unknown query, `cls` without a CLS token, or `map` without a MAP
            head or for a block other than the last.
    """
    if query not in ATTENTION_QUERIES:
        raise ValueError(f"query={query!r} is not supported; allowed: {', '.join(ATTENTION_QUERIES)}")
    if query == "auto":
        if config.class_token:
            return "cls"
        return "map" if config.pool == "map" and last_layer else "mean"
    if query == "cls" and not config.class_token:
        allowed = "map or mean" if config.pool == "map" else "mean"
        raise ValueError(f"this encoder has no CLS token (pool={config.pool!r}); use query {allowed}")
    if query == "map":
        if config.pool != "map":
            raise ValueError(f"query 'map' needs a MAP pooling head (pool='map'), this encoder has pool={config.pool!r}")
        if not last_layer:
            raise ValueError("the MAP head attends over the last block's tokens; use layer -1, or query 'mean'")
    return query


def _check_attention(attention: torch.Tensor, num_prefix: int) -> None:
    if not isinstance(attention, torch.Tensor) or attention.ndim != 4 or attention.shape[-1] != attention.shape[-2]:
        shape = tuple(attention.shape) if isinstance(attention, torch.Tensor) else type(attention).__name__
        raise ValueError(f"attention must be probabilities (B, heads, T, T), got {shape}")
    if not 0 <= num_prefix < attention.shape[-1]:
        raise ValueError(f"num_prefix={num_prefix} must leave at least one patch of T={attention.shape[-1]} tokens")


def cls_attention(attention: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """The CLS token's attention to each patch.

    Args:
        attention: Probabilities `(B, heads, T, T)`, tokens CLS, registers, patches.
        num_prefix: Tokens before the patches (CLS plus registers).

    Returns:
        `(B, heads, N)`: row 0, patch columns only (CLS and register columns dropped).
    """
    _check_attention(attention, num_prefix)
    if num_prefix < 1:
        raise ValueError("cls_attention needs a CLS token (num_prefix >= 1)")
    return attention[:, :, 0, num_prefix:]


def mean_received_attention(attention: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """The mean attention each patch receives from the patch queries.

    Args:
        attention: Probabilities `(B, heads, T, T)`.
        num_prefix: Tokens before the patches.

    Returns:
        `(B, heads, N)`: column means over the patch rows, patch columns only.
    """
    _check_attention(attention, num_prefix)
    return attention[:, :, num_prefix:, num_prefix:].mean(dim=2)


def map_head_attention(head: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The attention of a MAP pooling head's learned query over the tokens.

    The same softmax as `AttentionPoolHead.forward` (one query per head, keys from the
    fused `kv` projection), returned instead of applied.

    Args:
        head: The encoder's `attn_pool` (`AttentionPoolHead`).
        tokens: The tokens the head pools: the last block's output after the final norm
            `(B, T, D)`.

    Returns:
        `(B, heads, T)`, each row summing to 1.
    """
    B, T, _ = tokens.shape
    H, d = head.num_heads, head.head_dim
    q = head.q(head.latent).reshape(H, d) * d**-0.5  # (H, d)
    k = head.kv(tokens).reshape(B, T, 2, H, d)[:, :, 0]  # (B, T, H, d)
    scores = torch.einsum("bthd,hd->bht", k, q)  # (B, H, T)
    return scores.softmax(dim=-1)


def attention_rollout(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """Attention rollout through consecutive blocks (Abnar & Zuidema 2020).

    Args:
        attentions: Probabilities `(B, heads, T, T)` of blocks `0..l` in order.

    Returns:
        `(B, T, T)`: `R = Â_l ... Â_1 Â_0` with `Â = rownorm(mean_heads(A) + I)`; row `t` says
        how much of token `t`'s output flows from each input token. Rows sum to 1.
    """
    if not attentions:
        raise ValueError("attention_rollout needs the attention of at least one block")
    rollout = None
    for attention in attentions:
        _check_attention(attention, 0)
        fused = attention.float().mean(dim=1)  # (B, T, T)
        fused = fused + torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
        fused = fused / fused.sum(dim=-1, keepdim=True)
        rollout = fused if rollout is None else fused @ rollout  # later blocks act on earlier ones
    return rollout


def query_maps(
    query: str,
    attention: torch.Tensor | None,
    rollout: torch.Tensor,
    num_prefix: int,
    map_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-head maps of one layer and the rollout map for a resolved query.

    Args:
        query: `cls`, `map` or `mean` (see `resolve_query`).
        attention: The layer's probabilities `(B, heads, T, T)` (unused for `map`).
        rollout: `attention_rollout` up to that layer `(B, T, T)`.
        num_prefix: Tokens before the patches.
        map_weights: `map_head_attention` output `(B, heads, T)`, for `map`.

    Returns:
        Per-head maps `(B, heads, N)` and the rollout map `(B, N)`, patch columns only.
    """
    if query == "cls":
        return cls_attention(attention, num_prefix), rollout[:, 0, num_prefix:]
    if query == "mean":
        return mean_received_attention(attention, num_prefix), rollout[:, num_prefix:, num_prefix:].mean(dim=1)
    if query == "map":
        if map_weights is None:
            raise ValueError("query 'map' needs map_weights from map_head_attention")
        # The MAP query reads the last block's tokens with no residual path of its own: its
        # mean-head row times the rollout of the blocks.
        flow = torch.einsum("bt,bts->bs", map_weights.float().mean(dim=1), rollout)  # (B, T)
        return map_weights[:, :, num_prefix:], flow[:, num_prefix:]
    raise ValueError(f"query={query!r} is not supported here; allowed: cls, map, mean")
