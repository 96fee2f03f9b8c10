"""`ExtractConfig`: one validated, frozen description of a feature-extraction run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..specs.options import ConfigMixin, at_least, check_fields
from .resolution import parse_pinpoints

# What can be stored per image: per requested layer `cls` `(D,)`, `patch` `(N, D)`,
# `registers` `(R, D)` and `summary` `(S, D)` (the class tokens `summary_idxs` picks: RADIO); once per image `pooled` `(D,)` and `embeds` `(E,)` (the projection of
# pooled, CLIP's image features; equal to pooled without a projection).
LAYER_KINDS: tuple[str, ...] = ("cls", "patch", "registers", "summary")
IMAGE_KINDS: tuple[str, ...] = ("pooled", "embeds")
KINDS: tuple[str, ...] = LAYER_KINDS + IMAGE_KINDS
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_SHARD_SIZE = 1024
RESOLUTIONS: tuple[str, ...] = ("fixed", "native")


@dataclass(frozen=True)
class ExtractConfig(ConfigMixin):
    """A feature-extraction run.

    Attributes:
        model: A model spec (`vlm_encoder.specs.models`): a `save_pretrained` directory
            (encoder, contrastive model or VLM: its image tower), an HF directory or hub id,
            `open_clip:ARCH[:TAG]`, `timm:NAME`, or `preset:NAME` (random weights from `seed`
            and `overrides`).
        dataset: A data spec (`vlm_encoder.specs.data`): a folder of image files, a text file
            listing image paths (one a line, relative to the file's folder), a folder with a
            `metadata.jsonl` or `imagefolder:DIR`, a saved `datasets` dataset (`save_to_disk`),
            a `.parquet` / `.csv` / `.jsonl` / `.tar` file or glob, `builtin:NAME`, or a hub name.
        out: Output directory (created; resumed when it holds a run with equal arguments).
        layers: Block indices (negatives count from the end).
        select: Kinds to store, from `KINDS`.
        checkpoint: Weight file loaded into `model`.
        overrides: Changes of a preset's `VisionConfig` fields (`{"depth": 4}`).
        seed: Seed of a preset's random initialisation.
        patch_remainder: `error` or `drop` (floor the patch grid) for the image tower, instead
            of the source's own policy (`specs.models.load_model`).
        dtype: `fp32`, `bf16` or `fp16`: the encoder's dtype and the stored features'.
        fast_cpu: On the CPU, run the linears through oneDNN's prepacked GEMM
            (`vlm_encoder.cpu_speed.fast_cpu`: float32-exact to ~1e-6, batch-invariant); `False`
            keeps torch's default route.
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
        wait_lock: When another run holds `out` (its lock, see `vlm_encoder.locks`), wait for
            it to finish instead of refusing to start.
    """

    model: str
    dataset: str
    out: Path
    layers: tuple[int, ...] = (-1,)
    select: tuple[str, ...] = ("cls", "patch")
    checkpoint: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    seed: int = at_least(0, 0)
    patch_remainder: Literal["error", "drop"] | None = None
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    fast_cpu: bool = True
    image_size: tuple[int, int] | None = at_least(1, None)
    norm: bool = False
    resolution: Literal["fixed", "native"] = "fixed"
    max_patches: int | None = at_least(1, None)
    anyres: tuple[tuple[int, int], ...] | None = None
    split: str | None = None
    image_column: str | None = None
    max_pixels: int | None = at_least(1, None)
    shard_size: int = at_least(1, DEFAULT_SHARD_SIZE)
    batch_size: int = at_least(1, 32)
    num_workers: int = at_least(0, 2)
    device: str | None = None
    progress: bool = True
    wait_lock: bool = False

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        if isinstance(self.select, str):  # "cls,patch", as the command line gives it
            set_("select", tuple(s.strip() for s in self.select.split(",") if s.strip()))
        if isinstance(self.image_size, int) and not isinstance(self.image_size, bool):
            set_("image_size", (self.image_size, self.image_size))
        if isinstance(self.anyres, str):
            set_("anyres", parse_pinpoints(self.anyres))
        check_fields(self)
        for name in ("model", "dataset"):
            if not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string")
        if not self.layers:
            raise ValueError("layers must be one or more block indices (ints, e.g. -2 -1)")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers {list(self.layers)} repeat an index")
        unknown = [s for s in self.select if s not in KINDS]
        if not self.select or unknown:
            raise ValueError(f"select {list(self.select)} is not allowed; choose one or more of {', '.join(KINDS)}")
        if len(set(self.select)) != len(self.select):
            raise ValueError(f"select {list(self.select)} repeats a kind")
        if self.max_patches is not None and self.resolution != "native":
            raise ValueError("max_patches applies to resolution='native' only")
        if self.anyres is not None:
            set_("anyres", parse_pinpoints(self.anyres))  # each a positive (H, W)
            if self.resolution != "fixed":
                raise ValueError("anyres and resolution='native' exclude each other: choose one")
        if self.mode != "fixed" and self.image_size is not None:
            raise ValueError(f"image_size does not apply to {self.mode} resolution (each image keeps its own size)")

    @property
    def mode(self) -> str:
        """`fixed`, `native` or `anyres`."""
        return "anyres" if self.anyres is not None else self.resolution

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
