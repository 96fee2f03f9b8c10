"""Variable-resolution extraction: `--resolution native` and `--anyres PINPOINTS`.

Each image's patch count differs, so a shard stores each layer's patches as one
concatenated `(sum N_i, D)` tensor, with `num_patches` `(n,)` (the rows of each image) and
`grid` `(n, 2)` (its patch grid `(h, w)`); the other kinds keep one row per image.

* `native`: each image keeps its aspect ratio, sides multiples of the patch stride, shrunk
  only to fit `max_patches` (`packing.navit_size`), or, for a tower with a NaFlex processor
  (SigLIP2), resized by its rule to fill its budget (`packing.naflex_size`, as
  `Siglip2ImageProcessor`, with its filter and mean/std), or, for a Qwen tower with its
  `smart_resize` processor, sized by that processor (`--max-patches` replaces its
  `max_pixels` by `max_patches * stride**2`); it is encoded **alone**
  (`encode_packed([image])`), so the result never depends on which images share a batch
  and a resumed run is bitwise equal on the CPU. `N_i = h * w`.
* `anyres`: LLaVA-NeXT tiling over `pinpoints` (base image first, unpad): the patches are
  the assembled token sequence (`encode_anyres(...).tokens`: the base image's `s*s` tokens,
  then the unpadded map `h x w` row by row, no newline tokens), so `N_i = s*s + h*w` and
  `grid` is the map's `(h, w)`. `cls`, `pooled` and `embeds` come from the base image (the
  first tile). Every requested layer comes from one pass over the image's tiles.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..anyres import AnyresConfig, LlavaNextAnyres
from ..anyres.assemble import assemble_tokens, assembled_map_size
from ..anyres.tiling import tile_with
from ..encoder import VisionEncoder
from ..processing import ImageProcessor

GRID = "grid"
NUM_PATCHES = "num_patches"
Pinpoints = tuple[tuple[int, int], ...]


def parse_pinpoints(value: str | Sequence[Sequence[int]]) -> Pinpoints:
    """`"336x672,672x336,672x672"` (H x W pairs) or a sequence of `(H, W)` -> `((H, W), ...)`.

    Raises:
        ValueError: Not a non-empty list of positive `HxW` pairs.
    """
    example = "e.g. 336x672,672x336,672x672 (H x W pairs, multiples of the encoder's image size)"
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",") if part.strip()]
        pairs = []
        for item in items:
            parts = item.lower().split("x")
            try:
                pairs.append(tuple(int(p) for p in parts))
            except ValueError:
                raise ValueError(f"anyres pinpoint {item!r} is not HxW; {example}") from None
    else:
        pairs = [tuple(p) for p in value]
    if not pairs or any(len(p) != 2 or not all(isinstance(v, int) and v > 0 for v in p) for p in pairs):
        raise ValueError(f"anyres pinpoints {value!r} must be one or more positive HxW pairs; {example}")
    return tuple((int(h), int(w)) for h, w in pairs)


def smart_resize_native(processor: ImageProcessor, stride: int,
                        max_patches: int | None) -> tuple[ImageProcessor, str, int]:
    """A Qwen `smart_resize` processor at native resolution: `(processor, 'smart_resize', budget)`,
    each image at the processor's own size; `max_patches` (if given) replaces its `max_pixels`
    by `max_patches * stride**2` (`min_pixels` lowered to it if larger)."""
    cfg = processor.config
    if max_patches is not None:
        limit = max_patches * stride**2
        cfg = cfg.replace(max_pixels=limit, min_pixels=min(cfg.min_pixels, limit))
    return ImageProcessor(cfg), "smart_resize", cfg.max_pixels // stride**2


def anyres_config(encoder: VisionEncoder, pinpoints: Pinpoints) -> AnyresConfig:
    """LLaVA-NeXT tiling at the encoder's (square) input size over `pinpoints`."""
    height, width = encoder.config.image_size
    if height != width:
        raise ValueError(f"--anyres needs a square encoder input, got image_size={encoder.config.image_size}")
    return LlavaNextAnyres(tile_size=height, pinpoints=pinpoints)


class ImagePreparer:
    """Decoded image -> what the encoder takes; runs in the DataLoader workers (picklable).

    `fixed`: pixels `(3, H, W)`. `native`: pixels `(3, H_i, W_i)` at the image's own size
    (`packing.target_size` under `policy`: `navit`, or `naflex` for a SigLIP2 tower, see
    `packing.native_sizing`). `anyres`: `(tiles (T, 3, S, S), (height, width))`.
    """

    def __init__(self, processor: ImageProcessor, mode: str, stride: int, max_patches: int | None,
                 anyres: AnyresConfig | None, policy: str = "navit") -> None:
        self.processor = processor
        self.mode = mode
        self.stride = stride
        self.max_patches = max_patches
        self.anyres = anyres
        self.policy = policy

    def __call__(self, image: Any) -> Any:
        if self.mode == "fixed":
            return self.processor(image)[0]
        if self.mode == "anyres":
            tiles = tile_with(image, self.anyres, self.processor)
            return tiles.pixel_values, tuple(tiles.image_size)
        if self.policy == "smart_resize":  # Qwen: the processor sizes each image itself
            return self.processor(image)[0]
        from ..packing import target_size
        from ..processing.convert import to_rgb

        cfg = self.processor.config
        height, width = to_rgb(image, cfg.background, cfg.exif_transpose).shape[:2]  # as the processor reads it
        size = target_size(height, width, self.stride, self.max_patches, self.policy)
        return self.processor.at_size(size)(image)[0]


class VariablePlan:
    """Per-image features of a variable-resolution run, combined into a shard batch.

    Wraps a `FeaturePlan` (for the blocks to run and the names); `__call__` takes the
    prepared images of a batch and returns `layer{b}.patch` `(sum N_i, D)`, `num_patches`
    `(n,)`, `grid` `(n, 2)` and the other kinds with one row per image.
    """

    def __init__(self, plan: Any, mode: str, anyres: AnyresConfig | None, stride: int) -> None:
        if mode == "anyres" and {"registers", "summary"} & set(plan.select):
            raise ValueError("select 'registers' / 'summary' is not available with --anyres; choose from cls, patch, pooled, embeds")
        self.plan = plan
        self.mode = mode
        self.anyres = anyres
        self.stride = stride

    @property
    def blocks(self) -> tuple[int, ...]:
        return self.plan.blocks

    @torch.inference_mode()
    def one(self, encoder: VisionEncoder, item: Any) -> dict[str, torch.Tensor]:
        """Features of one prepared image: patches `(N, D)`, cls `(D,)`, ..., grid `(2,)`."""
        plan = self.plan
        param = next(encoder.parameters())
        if self.mode == "native":
            from ..packing import encode_packed

            pixels = item.to(device=param.device, dtype=param.dtype)
            if encoder.config.attn_window is not None:  # windows (Qwen2.5-VL): not packed, the image alone
                out = encoder(pixels[None], layers=plan.run_blocks, norm=plan.norm)
            else:
                out = encode_packed(encoder, [pixels], layers=plan.run_blocks, norm=plan.norm)[0]
            grid = out.grid_size
            patches = {block: out.patches(block)[0] for block in plan.blocks}
        else:
            tiles, image_size = item
            out = encoder(tiles.to(device=param.device, dtype=param.dtype), layers=plan.run_blocks, norm=plan.norm)
            side = self.anyres.tile_size // self.stride
            flat = self.anyres.replace(newline=False)
            grid = assembled_map_size(image_size, self.anyres, side)
            patches = {block: assemble_tokens(out.patches(block), image_size, flat, side) for block in plan.blocks}
        features: dict[str, torch.Tensor] = {}
        for block in plan.blocks:
            if "cls" in plan.select:
                features[f"layer{block}.cls"] = out.cls(block)[0]
            if "patch" in plan.select:
                features[f"layer{block}.patch"] = patches[block]
            if "registers" in plan.select:
                features[f"layer{block}.registers"] = out.register_tokens[out.layers.index(block)][0]
            if "summary" in plan.select:
                features[f"layer{block}.summary"] = out.summary(block)[0]
        if "pooled" in plan.select:
            features["pooled"] = out.pooled[0]
        if "embeds" in plan.select:
            features["embeds"] = encoder.project(out.pooled[:1])[0]
        count = next(iter(patches.values())).shape[0]
        features[NUM_PATCHES] = torch.tensor(count, dtype=torch.int64)
        features[GRID] = torch.tensor(grid, dtype=torch.int64)
        return features

    def __call__(self, encoder: VisionEncoder, items: Sequence[Any]) -> dict[str, torch.Tensor]:
        rows = [{k: v.to("cpu") for k, v in self.one(encoder, item).items()} for item in items]
        return {
            key: torch.cat([r[key] for r in rows]) if key.endswith(".patch") else torch.stack([r[key] for r in rows])
            for key in rows[0]
        }
