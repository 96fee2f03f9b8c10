"""Sequence packing (NaViT): the tokens of several images in one sequence, with a
block-diagonal attention mask so that each image only attends to itself.

A pack is `(1, T, D)` with `T = sum T_i` over its images; each image's segment is its prefix
tokens (CLS, registers) then its patches, in row-major order. Packs are filled first-fit in
input order up to `max_tokens_per_pack` tokens (one pack when there is no budget), so that
the `(T, T)` mask and the attention work stay bounded for large batches; the packs then run
as one batch `(P, T, D)` (`PackedBatch.batched`), padded only at the end of short packs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..layers.attention import SegmentMask


@dataclass(frozen=True)
class Segment:
    """Where one image's tokens lie in the packs.

    Attributes:
        image: Index of the image in the input list.
        pack: Index of the pack that holds it.
        start: First token of the image in that pack.
        length: Tokens of the image (prefix tokens + `h * w` patches).
        grid: Patch grid `(h, w)`.
    """

    image: int
    pack: int
    start: int
    length: int
    grid: tuple[int, int]

    @property
    def stop(self) -> int:
        return self.start + self.length


def plan_packs(lengths: Sequence[int], max_tokens_per_pack: int | None = None) -> list[list[int]]:
    """Assign sequences to packs, first-fit in input order.

    Args:
        lengths: Tokens of each sequence.
        max_tokens_per_pack: Token budget of one pack, or `None` for a single pack.

    Returns:
        For each pack, the indices of its sequences in increasing order.

    Raises:
        ValueError: No sequences, a non-positive budget, or a sequence longer than the budget.
    """
    if not lengths:
        raise ValueError("nothing to pack: give at least one image")
    if max_tokens_per_pack is None:
        return [list(range(len(lengths)))]
    if isinstance(max_tokens_per_pack, bool) or not isinstance(max_tokens_per_pack, int) or max_tokens_per_pack <= 0:
        raise ValueError(f"max_tokens_per_pack must be a positive int or None, got {max_tokens_per_pack!r}")
    packs: list[list[int]] = []
    free: list[int] = []
    for index, length in enumerate(lengths):
        if length > max_tokens_per_pack:
            raise ValueError(
                f"image {index} needs {length} tokens, more than max_tokens_per_pack={max_tokens_per_pack}; "
                f"raise the budget to at least {max(lengths)} or encode the image smaller"
            )
        slot = next((p for p, room in enumerate(free) if room >= length), None)
        if slot is None:
            packs.append([])
            free.append(max_tokens_per_pack)
            slot = len(packs) - 1
        packs[slot].append(index)
        free[slot] -= length
    return packs


def block_diagonal_mask(lengths: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean mask `(1, 1, T, T)`, True where query and key belong to the same segment."""
    ids = segment_ids(lengths, device)  # (T,)
    return (ids[:, None] == ids[None, :])[None, None]  # (1, 1, T, T)


def segment_ids(lengths: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Segment index of every token `(T,)`: `0` for the first sequence's tokens, then `1`, ..."""
    return torch.repeat_interleave(
        torch.arange(len(lengths), device=device), torch.as_tensor(list(lengths), device=device)
    )


def cu_seqlens(lengths: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Cumulative sequence starts `(n + 1,)` int32, as variable-length attention kernels take."""
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
    out[1:] = torch.as_tensor(list(lengths), device=device).cumsum(0)
    return out


@dataclass
class PackedBatch:
    """Tokens of several images packed into one or more sequences.

    Attributes:
        tokens: One `(1, T_p, D)` tensor per pack.
        segments: One `Segment` per image, in input order.
    """

    tokens: list[torch.Tensor]
    segments: tuple[Segment, ...]

    @property
    def num_packs(self) -> int:
        return len(self.tokens)

    @property
    def num_images(self) -> int:
        return len(self.segments)

    def pack_segments(self, pack: int) -> list[Segment]:
        """The segments of `pack`, in token order."""
        return sorted((s for s in self.segments if s.pack == pack), key=lambda s: s.start)

    def lengths(self, pack: int) -> list[int]:
        """Tokens of each image in `pack`, in token order."""
        return [s.length for s in self.pack_segments(pack)]

    def attention_mask(self, pack: int) -> torch.Tensor:
        """Block-diagonal boolean mask `(1, 1, T_p, T_p)` of `pack`, True = may attend."""
        return block_diagonal_mask(self.lengths(pack), self.tokens[pack].device)

    def segment_ids(self, pack: int) -> torch.Tensor:
        """Image slot of every token of `pack` `(1, T_p)` (0 for its first image, ...)."""
        return segment_ids(self.lengths(pack), self.tokens[pack].device)[None]

    def cu_seqlens(self, pack: int) -> torch.Tensor:
        """Segment boundaries of `pack` `(n_p + 1,)` int32."""
        return cu_seqlens(self.lengths(pack), self.tokens[pack].device)

    def batched(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All packs as one batch: tokens `(P, T, D)` with `T` the longest pack (shorter packs
        padded at the end with zeros) and the block-diagonal mask `(P, 1, T, T)`; each pack's
        padding forms its own segment, so it never touches an image (and no softmax row is
        empty)."""
        T = max(t.shape[1] for t in self.tokens)
        device = self.tokens[0].device
        rows, masks = [], []
        for p, tokens in enumerate(self.tokens):
            lengths = self.lengths(p)
            pad = T - tokens.shape[1]
            if pad:
                tokens = torch.cat([tokens, tokens.new_zeros(1, pad, tokens.shape[-1])], dim=1)
                lengths = lengths + [pad]
            rows.append(tokens)
            masks.append(block_diagonal_mask(lengths, device))
        return torch.cat(rows, dim=0), torch.cat(masks, dim=0)  # (P, T, D), (P, 1, T, T)

    def segment_mask(self) -> SegmentMask:
        """The block-diagonal structure of `batched()` as a `SegmentMask`: attention then runs
        once per image segment (and once over each pack's end padding), computing no masked
        block."""
        T = max(t.shape[1] for t in self.tokens)
        rows = []
        for p, tokens in enumerate(self.tokens):
            pad = T - tokens.shape[1]
            rows.append(tuple(self.lengths(p)) + ((pad,) if pad else ()))
        return SegmentMask(tuple(rows))

    def unpack(self, packs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Split per-pack tensors `(1, T_p, D)` (e.g. a block's output; rows of a `batched`
        tensor) into per-image tensors `(1, T_i, D)`, in input order."""
        if len(packs) != self.num_packs:
            raise ValueError(f"expected {self.num_packs} packs, got {len(packs)}")
        return [packs[s.pack][:, s.start : s.stop] for s in self.segments]


def pack_sequences(
    sequences: Sequence[torch.Tensor],
    grids: Sequence[tuple[int, int]],
    max_tokens_per_pack: int | None = None,
) -> PackedBatch:
    """Pack per-image token sequences `(1, T_i, D)` into `PackedBatch` packs.

    Args:
        sequences: One `(1, T_i, D)` tensor per image (prefix tokens first, then patches).
        grids: The patch grid `(h_i, w_i)` of each image.
        max_tokens_per_pack: Token budget of one pack (`None`: everything in one pack).

    Returns:
        The packs and where each image lies in them.
    """
    if len(sequences) != len(grids):
        raise ValueError(f"got {len(sequences)} sequences but {len(grids)} grids")
    for i, seq in enumerate(sequences):
        if seq.ndim != 3 or seq.shape[0] != 1:
            raise ValueError(f"sequence {i} must be (1, T, D), got {tuple(seq.shape)}")
    plan = plan_packs([int(s.shape[1]) for s in sequences], max_tokens_per_pack)
    segments: dict[int, Segment] = {}
    tokens = []
    for pack, members in enumerate(plan):
        start = 0
        for index in members:
            length = int(sequences[index].shape[1])
            segments[index] = Segment(index, pack, start, length, (int(grids[index][0]), int(grids[index][1])))
            start += length
        tokens.append(torch.cat([sequences[i] for i in members], dim=1))  # (1, T_p, D)
    return PackedBatch(tokens=tokens, segments=tuple(segments[i] for i in range(len(sequences))))
