"""Shared by the LLaVA-NeXT and LLaVA-OneVision parity tests: random images and left-padded
prompt batches."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def random_images(sizes: Sequence[tuple[int, int]], seed: int = 0) -> list[np.ndarray]:
    """One random uint8 RGB image `(h, w, 3)` per size."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def left_padded(rows: Sequence[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths as `(ids, attention_mask)` `(B, L)`, padded on the left."""
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask
