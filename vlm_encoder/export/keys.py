"""The converters' key tables run backwards: our state dict under a family's names.

Each `KeyTable` (`converters.hf_common`) says how a family's keys become ours; this module
applies its renames and transforms in reverse, so a family's layout lives in one table that
serves both directions. Every one of our keys must be consumed by exactly one entry: a key
the family has no place for is an error naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from ..converters import hf_common, hf_siglip
from ..converters.hf_common import KeyTable, Transform
from ..weights import WeightsError


def _join_position_table(cls_token: torch.Tensor, pos_embed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `split_position_table`: the HF table `(1+N, D)` with a zero CLS row (ours
    folded that row into `cls_token`, which becomes the class embedding), and the class embedding `(D,)`."""
    rows = pos_embed.reshape(-1, pos_embed.shape[-1])  # (N, D)
    table = torch.cat([torch.zeros_like(rows[:1]), rows], dim=0)  # (1+N, D)
    return table, cls_token.reshape(-1).clone()


def _join_in_proj(q_w: torch.Tensor, q_b: torch.Tensor, kv_w: torch.Tensor, kv_b: torch.Tensor) -> tuple:
    """Inverse of SigLIP's `_split_in_proj`: `nn.MultiheadAttention`'s packed projection."""
    return torch.cat([q_w, kv_w], dim=0), torch.cat([q_b, kv_b], dim=0)


# Inverses of the converters' transform functions (targets in, sources out). The fused-qkv
# transforms are lambdas: they are recognised by shape (one target, several sources) below.
INVERSES: dict[Callable, Callable] = {
    hf_common.split_position_table: _join_position_table,
    hf_common.as_rows: lambda table: table.clone(),  # reshaped to the family's shape by the caller
    hf_siglip._split_in_proj: _join_in_proj,
}


def _inverse(t: Transform, family: str) -> Callable:
    if t.fn in INVERSES:
        return INVERSES[t.fn]
    if len(t.targets) == 1 and len(t.sources) > 1:  # a concatenation on rows (fused qkv)
        return lambda fused: tuple(c.clone() for c in fused.chunk(len(t.sources), dim=0))
    raise NotImplementedError(f"{family}: no inverse for the transform producing {t.targets}")


def reverse(
    table: KeyTable,
    state_dict: Mapping[str, torch.Tensor],
    num_blocks: int,
    family: str,
    skip: tuple[str, ...] = (),
) -> dict:
    """A family's tensors (bare tower names, no wrapper prefix) from our `state_dict`.

    Args:
        table: The family's `KeyTable` (the converter's `TABLE`).
        state_dict: A `VisionEncoder`'s tensors.
        num_blocks: Depth, to expand the `{i}` entries.
        family: For messages.
        skip: The table's family names not to write (where two of them map to one of ours,
            such as DINOv2's `mlp.fc1` and SwiGLU's `mlp.weights_in`).

    Raises:
        WeightsError: Naming our keys the family has no place for.
    """
    ours = dict(state_dict)
    out: dict[str, torch.Tensor] = {}
    for t in table.transforms:
        for i in range(num_blocks) if "{i}" in "".join(t.targets) else [None]:
            targets = [name.format(i=i) for name in t.targets]
            present = [name in ours for name in targets]
            if not any(present) and t.optional:
                continue
            if not all(present):
                missing = [name for name, here in zip(targets, present) if not here]
                raise WeightsError(f"{family}: this model has no {', '.join(missing)}, which the format needs")
            values = _inverse(t, family)(*(ours.pop(name) for name in targets))
            values = values if isinstance(values, tuple) else (values,)
            for source, value in zip(t.sources, values):
                out[source.format(i=i)] = value
    # Our name -> theirs, longest first so that `blocks.0.attn.proj` wins over a shorter prefix.
    renames = sorted(((o, hf) for hf, o in table.renames.items() if hf not in skip), key=lambda p: -len(p[0]))
    unplaced = []
    for key, value in ours.items():
        for o, hf in renames:
            indices = range(num_blocks) if "{i}" in o else [None]
            hit = next((i for i in indices if key == o.format(i=i) or key.startswith(o.format(i=i) + ".")), -1)
            if hit != -1:
                name = o.format(i=hit)
                out[hf.format(i=hit) + key[len(name) :]] = value
                break
        else:
            unplaced.append(key)
    if unplaced:
        raise WeightsError(f"{family} has no place for these weights of ours: {', '.join(sorted(unplaced))}")
    return out
