"""`ExtractConfig`: one validated, frozen description of a feature-extraction run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# What can be stored per image: per requested layer `cls` `(D,)`, `patch` `(N, D)` and
# `registers` `(R, D)`; once per image `pooled` `(D,)` and `embeds` `(E,)` (the projection of
# pooled, CLIP's image features; equal to pooled without a projection).
LAYER_KINDS: tuple[str, ...] = ("cls", "patch", "registers")
IMAGE_KINDS: tuple[str, ...] = ("pooled", "embeds")
KINDS: tuple[str, ...] = LAYER_KINDS + IMAGE_KINDS
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_SHARD_SIZE = 1024
RESOLUTIONS: tuple[str, ...] = ("fixed", "native")


@dataclass(frozen=True)
class ExtractConfig:
    """A feature-extraction run.

    Attributes:
        model: `preset:NAME` (or a bare preset name; random weights from `seed` and
            `overrides`), a directory written by `save_pretrained`, or any source
            `vlm_encoder.load_encoder` accepts (hub repo id, `open_clip:ARCH`, `timm:NAME`).
        dataset: A folder of image files, a text file listing image paths (one a line,
            relative to the file's folder), a saved `datasets` dataset
            (`save_to_disk`), a `.parquet` file, `imagefolder:DIR`, or a hub dataset name.
        out: Output directory (created; resumed when it holds a run with equal arguments).
        layers: Block indices (negatives count from the end).
        select: Kinds to store, from `KINDS`.
        checkpoint: Weight file loaded into `model`.
        overrides: `(field, value)` changes of a preset's `VisionConfig`.
        seed: Seed of a preset's random initialisation.
        dtype: `fp32`, `bf16` or `fp16`: the encoder's dtype and the stored features'.
        image_size: `(H, W)` to resize to instead of the processor's size.
        resolution: `fixed` (every image at one size) or `native` (each image at its own
            aspect ratio, at most `max_patches` patches, encoded alone; see `resolution.py`).
        max_patches: Patch budget per image with `native` (default: the patches of the
            model's input size); images are only shrunk to fit, never enlarged.
        anyres: LLaVA-NeXT tiling over these `(H, W)` pinpoints (or `"336x672,672x336"`):
            patches are each image's assembled token sequence.
        norm: Apply the final LayerNorm to the stored tokens.
        split: Split of a `datasets` source (default `train`, or the only one).
        image_column: Image column of a `datasets` source (default: the first `Image` feature).
        max_pixels: Images with more pixels are failures (decompression bombs); default PIL's limit.
        shard_size: Rows per shard: shard `k` holds rows `[k*S, (k+1)*S)`.
        batch_size: Images per forward pass (does not change the output).
        num_workers: DataLoader worker processes decoding images (does not change the output).
        device: Torch device; default the process's accelerator (`accelerate.PartialState`).
        progress: Show a progress bar on the main process.
        sleep_per_batch: Seconds to sleep after each batch (only to test interruption).
    """

    model: str
    dataset: str
    out: Path
    layers: tuple[int, ...] = (-1,)
    select: tuple[str, ...] = ("cls", "patch")
    checkpoint: str | None = None
    overrides: tuple[tuple[str, Any], ...] = ()
    seed: int = 0
    dtype: str = "fp32"
    image_size: tuple[int, int] | None = None
    norm: bool = False
    resolution: str = "fixed"
    max_patches: int | None = None
    anyres: tuple[tuple[int, int], ...] | None = None
    split: str | None = None
    image_column: str | None = None
    max_pixels: int | None = None
    shard_size: int = DEFAULT_SHARD_SIZE
    batch_size: int = 32
    num_workers: int = 2
    device: str | None = None
    progress: bool = True
    sleep_per_batch: float = 0.0

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)
        for name in ("model", "dataset"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        set_("out", Path(self.out))
        layers = tuple(self.layers)
        if not layers or not all(isinstance(v, int) and not isinstance(v, bool) for v in layers):
            raise ValueError(f"layers must be one or more block indices (ints, e.g. -2 -1), got {self.layers!r}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers {list(layers)} repeat an index")
        set_("layers", layers)
        select = tuple(self.select.split(",")) if isinstance(self.select, str) else tuple(self.select)
        select = tuple(s.strip() for s in select if s.strip())
        unknown = [s for s in select if s not in KINDS]
        if not select or unknown:
            raise ValueError(f"select {list(select)} is not allowed; choose one or more of {', '.join(KINDS)}")
        if len(set(select)) != len(select):
            raise ValueError(f"select {list(select)} repeats a kind")
        set_("select", select)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
        if self.image_size is not None:
            size = (self.image_size, self.image_size) if isinstance(self.image_size, int) else tuple(self.image_size)
            if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
                raise ValueError(f"image_size must be a positive int or (H, W), got {self.image_size!r}")
            set_("image_size", size)
        if self.resolution not in RESOLUTIONS:
            raise ValueError(f"resolution={self.resolution!r} is not supported; allowed: {', '.join(RESOLUTIONS)}")
        if self.max_patches is not None:
            if self.resolution != "native":
                raise ValueError("max_patches applies to resolution='native' only")
            if isinstance(self.max_patches, bool) or not isinstance(self.max_patches, int) or self.max_patches < 1:
                raise ValueError(f"max_patches must be a positive int, got {self.max_patches!r}")
        if self.anyres is not None:
            from .resolution import parse_pinpoints

            set_("anyres", parse_pinpoints(self.anyres))
            if self.resolution != "fixed":
                raise ValueError("anyres and resolution='native' exclude each other: choose one")
        if self.mode != "fixed" and self.image_size is not None:
            raise ValueError(f"image_size does not apply to {self.mode} resolution (each image keeps its own size)")
        set_("overrides", tuple((str(k), v) for k, v in self.overrides))
        for name, low in (("shard_size", 1), ("batch_size", 1), ("num_workers", 0), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if self.max_pixels is not None and (not isinstance(self.max_pixels, int) or self.max_pixels <= 0):
            raise ValueError(f"max_pixels must be a positive int or None, got {self.max_pixels!r}")
        if self.sleep_per_batch < 0:
            raise ValueError(f"sleep_per_batch must be >= 0, got {self.sleep_per_batch!r}")

    @property
    def mode(self) -> str:
        """`fixed`, `native` or `anyres`."""
        return "anyres" if self.anyres is not None else self.resolution

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def replace(self, **changes: Any) -> ExtractConfig:
        """A copy with `changes` applied and validated again."""
        return dataclasses.replace(self, **changes)
