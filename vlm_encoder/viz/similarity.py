"""Which patches a layer finds alike: cosine similarity of one patch to every patch.

The query patch is chosen in the first image, either by its grid position `(row, col)` or
by a point `(x, y)` in the pixels of the image file, mapped through the processor's resize
and crop onto the patch that covers it. Its feature is compared with every patch of every
image given (with one image: the classic self-similarity map; with several: where the
same part shows up in the others).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..processing.config import ProcessorConfig
from ..processing.transforms import resized_size


def patch_similarity(query: torch.Tensor, patch_tokens: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of one feature to every patch.

    Args:
        query: The chosen patch's feature `(D,)`.
        patch_tokens: Patch tokens `(B, N, D)` (or `(N, D)`).

    Returns:
        Similarities in `[-1, 1]`, shape `(B, N)` (or `(N,)`), float32 on the CPU.
    """
    if query.ndim != 1 or query.shape[0] != patch_tokens.shape[-1]:
        raise ValueError(
            f"query must be one feature (D,) with D={patch_tokens.shape[-1]} as the patches, got {tuple(query.shape)}"
        )
    q = F.normalize(query.detach().float().cpu(), dim=0)
    p = F.normalize(patch_tokens.detach().float().cpu(), dim=-1)
    return p @ q


def patch_index(row: int, col: int, grid: tuple[int, int]) -> int:
    """Row-major index of patch `(row, col)`; negatives count from the end, as Python's."""
    h, w = grid
    if not (-h <= row < h and -w <= col < w):
        raise ValueError(f"patch ({row}, {col}) is outside the {h}x{w} patch grid (rows 0..{h - 1}, cols 0..{w - 1})")
    return (row % h) * w + (col % w)


def point_in_processed_image(
    x: float, y: float, image_size: tuple[int, int], config: ProcessorConfig
) -> tuple[float, float]:
    """Map a point of the original image to the image the encoder sees.

    Follows the processor's geometry: resize (`config.resize_mode`) scales each axis, then
    the centre crop (or pad) shifts it, with the same offsets as `center_crop_or_pad`.

    Args:
        x: Column in the original image's pixels (0 = left edge).
        y: Row in the original image's pixels (0 = top edge).
        image_size: The original `(H, W)`.
        config: The processor's `ProcessorConfig`.

    Returns:
        `(x, y)` in the processed image's pixels.

    Raises:
        ValueError: A point outside the original image, or one the crop removes.
    """
    height, width = image_size
    if not (0 <= x < width and 0 <= y < height):
        raise ValueError(f"point ({x}, {y}) is outside the image of {width}x{height} pixels (x < {width}, y < {height})")
    new_h, new_w = resized_size(height, width, config.resize_mode, config.size)
    px, py = x * new_w / width, y * new_h / height
    if config.crop_size is not None:
        crop_h, crop_w = config.crop_size
        if crop_h > new_h or crop_w > new_w:  # padded first, the odd pixel right/bottom
            py += max(0, (crop_h - new_h) // 2)
            px += max(0, (crop_w - new_w) // 2)
            new_h, new_w = max(crop_h, new_h), max(crop_w, new_w)
        if config.crop_rounding == "round":
            top, left = round((new_h - crop_h) / 2.0), round((new_w - crop_w) / 2.0)
        else:
            top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
        px, py = px - left, py - top
        if not (0 <= px < crop_w and 0 <= py < crop_h):
            raise ValueError(
                f"point ({x}, {y}) is cut away by the processor's centre crop to {crop_w}x{crop_h}; pick a point nearer the centre"
            )
    return px, py


def patch_at_point(x: float, y: float, stride: int, grid: tuple[int, int]) -> tuple[int, int]:
    """The patch `(row, col)` covering point `(x, y)` of the processed image.

    Raises:
        ValueError: The point falls in the pixels past the last patch (`patch_remainder='drop'`).
    """
    row, col = int(y // stride), int(x // stride)
    if not (0 <= row < grid[0] and 0 <= col < grid[1]):
        raise ValueError(f"point ({x:.1f}, {y:.1f}) of the processed image is past the {grid[0]}x{grid[1]} patch grid")
    return row, col


def similarity_maps(
    patch_tokens: Sequence[torch.Tensor], query_image: int, index: int
) -> list[torch.Tensor]:
    """Similarity of patch `index` of image `query_image` to every patch of every image.

    Args:
        patch_tokens: One `(N_i, D)` per image (grids may differ).
        query_image: Which image the query patch is in.
        index: Its row-major patch index.

    Returns:
        One `(N_i,)` similarity vector per image.
    """
    tokens = patch_tokens[query_image]
    if not 0 <= index < tokens.shape[0]:
        raise ValueError(f"patch index {index} is outside the image's {tokens.shape[0]} patches")
    query = tokens[index]
    return [patch_similarity(query, t) for t in patch_tokens]
