"""`EpochSampler`: the sample order of training, owned by the project so a run can resume at
the exact batch it stopped at.

Each epoch is a permutation drawn from a generator seeded by `(seed, epoch)`, cut into global
batches of `batch_size * world_size` (the incomplete last one is dropped: every contrastive
batch has the same size); rank `r` takes rows `[r * batch_size, (r + 1) * batch_size)` of
each global batch. The state is `(epoch, position)`: position counts the batches of the epoch
already handed out.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


class EpochSampler:
    """Batches of dataset indices for one rank, resumable mid-epoch.

    Args:
        num_samples: Size of the dataset.
        batch_size: Samples per batch on this rank.
        seed: Seed of the per-epoch permutations.
        rank: This process's rank.
        world_size: Number of processes.

    Raises:
        ValueError: The dataset holds less than one global batch.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if num_samples < batch_size * world_size:
            raise ValueError(
                f"the training set has {num_samples} samples, fewer than one global batch "
                f"({batch_size} x {world_size} processes); lower batch_size"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.position = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def permutation(self, epoch: int) -> torch.Tensor:
        """`(num_samples,)` order of the epoch (the same on every rank)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def batch(self, epoch: int, position: int) -> list[int]:
        """This rank's indices of batch `position` of `epoch`."""
        order = self.permutation(epoch)
        start = position * self.batch_size * self.world_size + self.rank * self.batch_size
        return order[start : start + self.batch_size].tolist()

    def __iter__(self) -> Iterator[tuple[int, int, list[int]]]:
        """Yield `(epoch, position, indices)` from the current state on, forever (epochs roll
        over); the state advances as each batch is handed out."""
        while True:
            order = self.permutation(self.epoch)
            global_batch = self.batch_size * self.world_size
            while self.position < self.batches_per_epoch:
                start = self.position * global_batch + self.rank * self.batch_size
                indices = order[start : start + self.batch_size].tolist()
                epoch, position = self.epoch, self.position
                self.position += 1
                yield epoch, position, indices
            self.epoch += 1
            self.position = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position; the dataset, batch and world size must match the saved ones."""
        for key in ("seed", "num_samples", "batch_size", "world_size"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"the checkpoint's sampler has {key}={state.get(key)!r} but this run has {getattr(self, key)!r}; "
                    "resuming exactly needs the same data, batch size, seed and number of processes"
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
