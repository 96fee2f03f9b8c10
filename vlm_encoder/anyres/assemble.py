"""Tile features -> one variable-length token sequence per image.

`llava_next` (transformers' `LlavaNextModel.pack_image_features`, LLaVA's `spatial_unpad`):
the base image's `g*g` tokens, then the `rows x cols` tiles' grids reassembled into one
`(rows*g, cols*g)` feature map, the rows/columns that only saw padding removed (unpad to the
original aspect ratio), optionally downscaled to a token budget (LLaVA-OneVision), and read
row by row with a learned newline token after each row.

`internvl`: the tiles' tokens one after another (thumbnail last).

`num_image_tokens` gives the sequence length from the image size alone, before encoding, so
the prompt's placeholders can be expanded first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .config import AnyresConfig
from .select import Size, anyres_grid_shape, internvl_grid


def pooled_side(side: int, tile_pool: int) -> int:
    """Feature grid side after `tile_pool` (`ceil(side / 2)` for 2x2)."""
    return side if tile_pool == 1 else math.ceil(side / tile_pool)


def pool_tiles(features: torch.Tensor, side: int, tile_pool: int) -> torch.Tensor:
    """Bilinear downscale of each tile's `side x side` grid to `ceil(side / tile_pool)` per side
    (LLaVA-OneVision's `apply_pooling`).

    Args:
        features: `(T, side*side, D)`.

    Returns:
        `(T, s*s, D)` with `s = pooled_side(side, tile_pool)`.
    """
    if tile_pool == 1:
        return features
    tiles, _, dim = features.shape
    grid = features.view(tiles, side, side, dim).permute(0, 3, 1, 2)  # (T, D, g, g)
    new = pooled_side(side, tile_pool)
    grid = F.interpolate(grid, size=(new, new), mode="bilinear")
    return grid.permute(0, 2, 3, 1).reshape(tiles, new * new, dim)


def merge_tiles(features: torch.Tensor, grid: Size, side: int) -> torch.Tensor:
    """Reassemble row-major tiles into one feature map.

    Args:
        features: `(rows*cols, side*side, D)`, tiles row by row.
        grid: `(rows, cols)`.

    Returns:
        `(D, rows*side, cols*side)`.
    """
    rows, cols = grid
    dim = features.shape[-1]
    x = features.view(rows, cols, side, side, dim)  # (R, C, g, g, D)
    return x.permute(4, 0, 2, 1, 3).reshape(dim, rows * side, cols * side)  # (D, R*g, C*g)


def unpad_bounds(feature_size: Size, image_size: Sequence[int]) -> tuple[int, int, int, int]:
    """`(top, bottom, left, right)` of the part of a `feature_size` map that covers the image
    (not the padding), with transformers' `unpad_image` rounding: the padded side's image
    extent is `new = int(round(orig * scale, 7))` cells (rounded down), and `(cur - new) // 2`
    cells are cut from both ends (so an odd margin keeps one padding cell)."""
    height, width = int(image_size[0]), int(image_size[1])
    cur_h, cur_w = feature_size
    if width / height > cur_w / cur_h:
        new_h = int(round(height * (cur_w / width), 7))
        pad = (cur_h - new_h) // 2
        return (pad, cur_h - pad, 0, cur_w)
    new_w = int(round(width * (cur_h / height), 7))
    pad = (cur_w - new_w) // 2
    return (0, cur_h, pad, cur_w - pad)


def budget_size(feature_size: Size, budget_tiles: int | None, side: int) -> Size:
    """Map size after LLaVA-OneVision's `anyres_max_N` budget: unchanged unless
    `ratio = sqrt(h * w / (N * side^2)) > 1.1`, then `(int(h // ratio), int(w // ratio))`."""
    height, width = feature_size
    if budget_tiles is None:
        return feature_size
    ratio = math.sqrt(height * width / (budget_tiles * side**2))
    if ratio > 1.1:
        return (int(height // ratio), int(width // ratio))
    return feature_size


def tile_grid(image_size: Sequence[int], config: AnyresConfig) -> Size:
    """`(rows, cols)` of tiles for an image of `image_size` `(H, W)`."""
    image_size = (int(image_size[0]), int(image_size[1]))  # a tensor row works too
    if config.policy == "llava_next":
        return anyres_grid_shape(image_size, config.pinpoints, config.tile_size)
    return internvl_grid(image_size, config.tile_size, config.min_tiles, config.max_tiles)


def num_tiles(image_size: Sequence[int], config: AnyresConfig, base_only: bool = False) -> int:
    """`T`, the tiles encoded for an image, the base image or thumbnail included (`base_only`:
    an image of a multi-image sample under `multi_image='base'`, 1)."""
    if base_only:
        return 1
    rows, cols = tile_grid(image_size, config)
    if config.policy == "llava_next":
        return 1 + rows * cols
    return rows * cols + int(config.use_thumbnail and rows * cols > 1)


def assembled_map_size(image_size: Sequence[int], config: AnyresConfig, side: int) -> Size:
    """`llava_next`: `(h, w)` of the reassembled map after unpad and budget (newlines not counted).

    Args:
        side: One tile's feature grid side before `tile_pool` (e.g. 24 for a 336-px CLIP-L/14).
    """
    side = pooled_side(side, config.tile_pool)
    rows, cols = tile_grid(image_size, config)
    size = (rows * side, cols * side)
    if config.unpad:
        top, bottom, left, right = unpad_bounds(size, image_size)
        size = (bottom - top, right - left)
    return budget_size(size, config.budget_tiles, side)


def num_image_tokens(image_size: Sequence[int], config: AnyresConfig, side: int, base_only: bool = False) -> int:
    """The length of an image's token sequence, from its size alone (before encoding).

    Args:
        image_size: The original image's `(height, width)`.
        config: The tiling and assembly.
        side: One tile's feature grid side before `tile_pool` (tile size // patch size for
            a token-wise projector).

    Returns:
        `llava_next`: `s*s` base tokens + `h * (w + newline)`; `internvl`: `T * s*s`, with
        `s = pooled_side(side, tile_pool)`.
    """
    s = pooled_side(side, config.tile_pool)
    if base_only:  # the base tile, then one newline
        return s * s + int(config.newline)
    if config.policy == "internvl":
        return num_tiles(image_size, config) * s * s
    height, width = assembled_map_size(image_size, config, side)
    return s * s + height * (width + int(config.newline))


def assemble_tokens(
    features: torch.Tensor,
    image_size: Sequence[int],
    config: AnyresConfig,
    side: int,
    newline: torch.Tensor | None = None,
    base_only: bool = False,
) -> torch.Tensor:
    """One image's tile features as its token sequence.

    Args:
        features: `(T, side*side, D)` in tiling order (`llava_next`: base first).
        image_size: The original image's `(height, width)`.
        config: The tiling and assembly.
        side: One tile's feature grid side.
        newline: `(D,)`, the learned newline token (`llava_next` with `config.newline`).
        base_only: Only the base tile was encoded (`multi_image='base'`): its tokens, then one
            newline.

    Returns:
        `(L, D)`, `L = num_image_tokens(image_size, config, side, base_only)`.
    """
    expected = num_tiles(image_size, config, base_only)
    if features.ndim != 3 or features.shape[0] != expected or features.shape[1] != side * side:
        raise ValueError(
            f"an image of size {tuple(int(v) for v in image_size)} needs features ({expected}, {side * side}, D) "
            f"({expected} tiles of {side}x{side} tokens), got {tuple(features.shape)}"
        )
    features = pool_tiles(features, side, config.tile_pool)
    side = pooled_side(side, config.tile_pool)
    if config.policy == "internvl":
        return features.reshape(-1, features.shape[-1])
    if config.newline and newline is None:
        raise ValueError("config.newline is set but no newline token was given")
    if base_only:
        if not config.newline:
            return features[0]
        return torch.cat([features[0], newline.to(features.dtype)[None]], dim=0)  # (s*s + 1, D)
    base, tiles = features[0], features[1:]  # (s*s, D), (R*C, s*s, D)
    grid = merge_tiles(tiles, tile_grid(image_size, config), side)  # (D, R*s, C*s)
    if config.unpad:
        top, bottom, left, right = unpad_bounds(tuple(grid.shape[1:]), image_size)
        grid = grid[:, top:bottom, left:right]
    new_size = budget_size(tuple(grid.shape[1:]), config.budget_tiles, side)
    if new_size != tuple(grid.shape[1:]):
        grid = F.interpolate(grid[None], size=list(new_size), mode="bilinear")[0]
    if config.newline:
        column = newline.to(grid.dtype)[:, None, None].expand(-1, grid.shape[1], 1)  # (D, h, 1)
        grid = torch.cat([grid, column], dim=2)  # (D, h, w + 1)
    return torch.cat([base, grid.flatten(1).transpose(0, 1)], dim=0)  # (s*s + h*(w+1), D)
