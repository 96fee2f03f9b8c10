"""Counting the tensor memory an operation allocates, on any device (CPU included): a probe
of the tests (tests/test_contrastive_losses.py) and of benchmarks/loss_memory.py.

`track_tensor_memory()` follows every tensor created by a torch operator while it is active
(forward and backward), through a dispatch mode, and frees it from the count when its storage
is freed. It measures what a computation allocates, where `torch.cuda.max_memory_allocated`
does not exist (CPU).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass
class MemoryStats:
    """Allocations seen inside `track_tensor_memory`.

    Attributes:
        peak_bytes: Most bytes of tensors created inside and alive at the same time.
        largest_numel: Elements of the largest tensor created inside.
    """

    peak_bytes: int = 0
    largest_numel: int = 0


class _Tracker(TorchDispatchMode):
    def __init__(self, stats: MemoryStats) -> None:
        super().__init__()
        self.stats = stats
        self.live: dict[int, int] = {}  # id(storage) -> bytes
        self.live_bytes = 0

    def _release(self, key: int) -> None:
        self.live_bytes -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {
            id(t.untyped_storage())
            for t in tree_flatten((args, kwargs or {}))[0]
            if isinstance(t, torch.Tensor) and t.device.type != "meta"
        }
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            self.stats.largest_numel = max(self.stats.largest_numel, t.numel())
            storage = t.untyped_storage()
            key = id(storage)
            if key in inputs or key in self.live:
                continue
            self.live[key] = storage.nbytes()
            self.live_bytes += storage.nbytes()
            weakref.finalize(storage, self._release, key)
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.live_bytes)
        return out


@contextmanager
def track_tensor_memory() -> Iterator[MemoryStats]:
    """Measure the tensors created inside the block.

    Example:
        >>> with track_tensor_memory() as stats:
        ...     loss(img, txt, scale).backward()
        >>> stats.peak_bytes, stats.largest_numel
    """
    stats = MemoryStats()
    with _Tracker(stats):
        yield stats
