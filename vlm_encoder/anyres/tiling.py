"""Images -> encoder-sized tiles (plus a downscaled whole image), as normalized pixel tensors.

- `tile_image` (LLaVA-NeXT / LLaVA-OneVision): resize the image to fit the best pinpoint
  with its aspect ratio kept, pad it to the pinpoint (centred, the odd pixel right/bottom,
  `pad_fill`), cut it into `rows x cols` tiles row by row; the base image (the whole image
  squashed to one tile) comes first. Matches transformers' `LlavaNextImageProcessor` (backend
  `torchvision`) to float rounding.
- `tile_image_internvl`: squash the image onto InternVL's `rows x cols` grid, cut it, and
  append a thumbnail (the whole image squashed to one tile) last when there is more than one
  tile (transformers' `GotOcr2ImageProcessor(crop_to_patches=True)`, InternVL's
  `dynamic_preprocess`).

The `ImageProcessor` given supplies everything but the geometry: RGB conversion, the resize
filter and backend, `pad_fill`, rescale and mean/std. Its own resize/crop steps are not used
(the tiles are already at the tile size).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..processing import ImageProcessor
from ..processing.convert import to_rgb
from ..processing.loading import load_image
from ..processing.processor import ImageInput
from ..processing.transforms import center_crop_or_pad, rescale_and_normalize, resize
from ..validation import check_positive_int
from .config import AnyresConfig, TilePolicy
from .select import Size, fit_size, internvl_grid, select_best_resolution, validate_pinpoints


@dataclass(frozen=True)
class AnyresTiles:
    """One image cut into tiles.

    Attributes:
        pixel_values: `(T, 3, S, S)` normalized float32 tiles. `llava_next`: the base image
            first, then `rows * cols` tiles row by row (`T = 1 + rows * cols`). `internvl`: the
            tiles row by row, then the thumbnail when `rows * cols > 1`.
        image_size: The original image's `(height, width)`; the token layout depends on it.
        grid: `(rows, cols)` of tiles.
        resolution: The canvas `(rows * S, cols * S)` the image was fitted to.
        policy: `llava_next` or `internvl`.
    """

    pixel_values: torch.Tensor
    image_size: Size
    grid: Size
    resolution: Size
    policy: TilePolicy

    @property
    def num_tiles(self) -> int:
        """`T`, the tiles to encode, the base image or thumbnail included."""
        return int(self.pixel_values.shape[0])


def tile_size_of(processor: ImageProcessor, tile_size: int | None) -> int:
    """The tile side: `tile_size`, else the processor's square output size."""
    if tile_size is not None:
        check_positive_int(tile_size, "tile_size")
        return tile_size
    out = processor.config.output_size
    if out is None or out[0] != out[1]:
        raise ValueError(
            f"the processor's output size {out} is not a fixed square; pass tile_size= (the encoder's image size)"
        )
    return out[0]


def _rgb(image: ImageInput, processor: ImageProcessor) -> np.ndarray:
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        image = load_image(image)
    cfg = processor.config
    return to_rgb(image, cfg.background, cfg.exif_transpose)  # (H, W, 3)


def _normalize(tiles: list[torch.Tensor], processor: ImageProcessor) -> torch.Tensor:
    floating = any(t.is_floating_point() for t in tiles)
    stacked = torch.stack([t.float() if floating else t for t in tiles])  # (T, 3, S, S)
    cfg = processor.config
    return rescale_and_normalize(stacked, cfg.rescale_factor, cfg.mean, cfg.std)


def _cut(canvas: torch.Tensor, tile_size: int) -> list[torch.Tensor]:
    """`(3, rows*S, cols*S)` -> the `(3, S, S)` tiles row by row."""
    height, width = canvas.shape[-2:]
    return [
        canvas[:, top : top + tile_size, left : left + tile_size]
        for top in range(0, height, tile_size)
        for left in range(0, width, tile_size)
    ]


def tile_image(
    image: ImageInput,
    pinpoints: Sequence[Sequence[int]],
    processor: ImageProcessor,
    *,
    tile_size: int | None = None,
    base_only: bool = False,
) -> AnyresTiles:
    """LLaVA-NeXT tiling: base image + the tiles of the best pinpoint.

    Args:
        image: Any input `ImageProcessor` accepts (PIL, array, tensor, path).
        pinpoints: Candidate resolutions `[(H, W), ...]`, multiples of the tile size.
        processor: Supplies RGB conversion, resize filter/backend, `pad_fill`, mean/std.
        tile_size: The tile side (default: the processor's square output size).
        base_only: LLaVA-OneVision's image in a multi-image sample: only the base tile, the
            image padded to a square (centred, filled with the mean colour) then resized.

    Returns:
        `AnyresTiles` with `pixel_values (1 + rows * cols, 3, S, S)` (`(1, 3, S, S)` with
        `base_only`, grid `(0, 0)`).
    """
    size = tile_size_of(processor, tile_size)
    pinpoints = validate_pinpoints(pinpoints, size)
    cfg = processor.config
    rgb = _rgb(image, processor)
    image_size = (int(rgb.shape[0]), int(rgb.shape[1]))
    if base_only:
        side = max(image_size)
        fill = tuple(int(m * 255) for m in (cfg.mean or (0.0, 0.0, 0.0)))
        square = center_crop_or_pad(torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1), (side, side),
                                    "floor", fill)  # (3, m, m)
        base = resize(square.permute(1, 2, 0).numpy(), (size, size), cfg.interpolation, cfg.backend)
        return AnyresTiles(_normalize([base], processor), image_size, (0, 0), (size, size), "llava_next")
    best = select_best_resolution(image_size, pinpoints)
    fitted = resize(rgb, fit_size(image_size, best), cfg.interpolation, cfg.backend)  # (3, h, w)
    canvas = center_crop_or_pad(fitted, best, "floor", cfg.pad_fill)  # (3, H, W), padding only
    base = resize(rgb, (size, size), cfg.interpolation, cfg.backend)  # (3, S, S)
    pixels = _normalize([base, *_cut(canvas, size)], processor)
    return AnyresTiles(pixels, image_size, (best[0] // size, best[1] // size), best, "llava_next")


def tile_image_internvl(
    image: ImageInput,
    processor: ImageProcessor,
    *,
    min_tiles: int = 1,
    max_tiles: int = 12,
    use_thumbnail: bool = True,
    tile_size: int | None = None,
) -> AnyresTiles:
    """InternVL dynamic tiling: `rows x cols` tiles by aspect ratio, then a thumbnail.

    Args:
        image: Any input `ImageProcessor` accepts.
        processor: Supplies RGB conversion, resize filter/backend, mean/std.
        min_tiles: Fewest tiles.
        max_tiles: Most tiles (the thumbnail not counted).
        use_thumbnail: Append the whole image as one more tile when there are several.
        tile_size: The tile side (default: the processor's square output size).

    Returns:
        `AnyresTiles` with `pixel_values (rows * cols [+ 1], 3, S, S)`.
    """
    size = tile_size_of(processor, tile_size)
    cfg = processor.config
    rgb = _rgb(image, processor)
    image_size = (int(rgb.shape[0]), int(rgb.shape[1]))
    rows, cols = internvl_grid(image_size, size, min_tiles, max_tiles)
    canvas = resize(rgb, (rows * size, cols * size), cfg.interpolation, cfg.backend)  # (3, rows*S, cols*S)
    tiles = _cut(canvas, size)
    if use_thumbnail and len(tiles) > 1:
        tiles.append(resize(rgb, (size, size), cfg.interpolation, cfg.backend))
    return AnyresTiles(_normalize(tiles, processor), image_size, (rows, cols), (rows * size, cols * size), "internvl")


def tile_with(image: ImageInput, config: AnyresConfig, processor: ImageProcessor) -> AnyresTiles:
    """Tile an image by `config.policy` (`tile_image` or `tile_image_internvl`) at `config.tile_size`."""
    if config.policy == "llava_next":
        return tile_image(image, config.pinpoints, processor, tile_size=config.tile_size)
    return tile_image_internvl(
        image,
        processor,
        min_tiles=config.min_tiles,
        max_tiles=config.max_tiles,
        use_thumbnail=config.use_thumbnail,
        tile_size=config.tile_size,
    )


def stack_tiles(tiles: Sequence[AnyresTiles]) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch several images' tiles for one encoder pass.

    Returns:
        `pixel_values (sum T_i, 3, S, S)` (image 0's tiles first) and `image_sizes (I, 2)`
        `(height, width)` int64, the inputs of `VisionLanguageModel(..., image_sizes=...)`.
    """
    if not tiles:
        raise ValueError("no tiles given (an empty list)")
    pixel_values = torch.cat([t.pixel_values for t in tiles])
    image_sizes = torch.tensor([t.image_size for t in tiles], dtype=torch.long)
    return pixel_values, image_sizes
