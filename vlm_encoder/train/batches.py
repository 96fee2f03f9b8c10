"""From sampler keys to tensors: image decoding and preprocessing, caption choice and
tokenization, and the skipping (and counting) of unreadable images."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..processing import ImageLoadError, ImageProcessor
from .augment import TrainAugment
from .sampler import EpochSampler
from .sources import PairSource


@dataclass
class PairBatch:
    """One rank's training batch.

    Attributes:
        epoch: Epoch of the batch.
        position: Index of the batch within its epoch.
        indices: `(B,)` dataset indices of the images kept.
        input_ids: `(B, L)` token ids of one caption per image.
        attention_mask: `(B, L)`.
        pixel_values: `(B, 3, H, W)`, or `None` when image features come from a cache.
        skipped: `(index, reason)` of each unreadable image left out.
    """

    epoch: int
    position: int
    indices: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None
    skipped: list[tuple[int, str]] = field(default_factory=list)


def choose_caption(captions: list[str], seed: int, epoch: int, index: int) -> str:
    """One caption of an image, drawn from a generator seeded by `(seed, epoch, index)`: the
    same on resume, and different images or epochs draw independently."""
    if len(captions) == 1:
        return captions[0]
    return captions[random.Random((seed * 1_000_003 + epoch) * 10_000_019 + index).randrange(len(captions))]


class CachedTokenizer:
    """Tokenizes each distinct caption once (captions repeat across epochs)."""

    def __init__(self, tokenizer: Callable) -> None:
        self.tokenizer = tokenizer
        self._rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [c for c in dict.fromkeys(captions) if c not in self._rows]
        if missing:
            tokens = self.tokenizer(missing)
            for i, caption in enumerate(missing):
                self._rows[caption] = (tokens.input_ids[i], tokens.attention_mask[i])
        return (
            torch.stack([self._rows[c][0] for c in captions]),
            torch.stack([self._rows[c][1] for c in captions]),
        )


class ImageReader:
    """Decoded, preprocessed images of a source; in-memory sources keep their tensors (not
    when augmenting: every epoch crops afresh).

    Args:
        source: The pairs.
        processor: Image preprocessing.
        augment: Training augmentation replacing the processor's resize and crop (`augment.py`).
    """

    def __init__(self, source: PairSource, processor: ImageProcessor, augment: TrainAugment | None = None) -> None:
        self.source = source
        self.processor = processor
        self.augment = augment
        self._memo: dict[int, torch.Tensor] = {}

    def read(self, indices: list[int], epoch: int = 0) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
        """`(kept indices, (B, 3, H, W) pixels or None if none kept, skipped (index, reason))`;
        `epoch` seeds the augmentation."""
        kept, pixels, skipped = [], [], []
        for index in indices:
            tensor = self._memo.get(index)
            if tensor is None:
                try:
                    image = self.source.image(index)
                    tensor = (self.augment(image, epoch, index) if self.augment is not None
                              else self.processor([image])[0])  # (3, H, W) normalised
                except (ImageLoadError, ValueError) as err:  # unreadable or unusable: skipped, counted
                    skipped.append((index, str(err)))
                    continue
                if getattr(self.source, "in_memory", False) and self.augment is None:
                    self._memo[index] = tensor
            kept.append(index)
            pixels.append(tensor)
        return kept, (torch.stack(pixels) if pixels else None), skipped


class PairBatches(Dataset):
    """Map-style dataset whose keys are `(epoch, position, indices)` from an `EpochSampler`.

    Args:
        source: The image-caption pairs.
        processor: Image preprocessing.
        tokenizer: Captions -> `TokenizedText`.
        seed: Seed of the caption choice.
        with_images: Read the images (False when their features are cached).
        augment: Training augmentation (`augment.py`), or `None`.
    """

    def __init__(
        self, source: PairSource, processor: ImageProcessor, tokenizer: Callable, seed: int, with_images: bool = True,
        augment: TrainAugment | None = None,
    ) -> None:
        self.source = source
        self.reader = ImageReader(source, processor, augment)
        self.tokenize = CachedTokenizer(tokenizer)
        self.seed = seed
        self.with_images = with_images

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int, list[int]]) -> PairBatch:
        epoch, position, indices = key
        pixels, skipped = None, []
        if self.with_images:
            indices, pixels, skipped = self.reader.read(indices, epoch)
        captions = [choose_caption(self.source.captions(i), self.seed, epoch, i) for i in indices]
        ids, mask = self.tokenize(captions) if captions else (torch.zeros(0, 1, dtype=torch.long),) * 2
        return PairBatch(epoch, position, torch.tensor(indices, dtype=torch.long), ids, mask, pixels, skipped)


class _Keys(Sampler):
    def __init__(self, sampler: EpochSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, int, list[int]]]:
        return iter(self.sampler)


def batch_loader(batches: PairBatches, sampler: EpochSampler, num_workers: int = 0) -> DataLoader:
    """An endless loader of `PairBatch`es from the sampler's current state. Workers may read
    ahead, so the loop records the position of the batches it consumed, never the sampler's."""
    return DataLoader(
        batches,
        sampler=_Keys(sampler),
        batch_size=None,
        collate_fn=_as_is,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(0),  # the global RNG is left untouched
    )


def _as_is(batch: PairBatch) -> PairBatch:
    return batch
