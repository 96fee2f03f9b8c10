"""Tile layouts: which resolution (LLaVA-NeXT) or tile grid (InternVL) an image gets.

Sizes are `(height, width)` in pixels throughout; tile grids are `(rows, cols)`.

- LLaVA-NeXT / LLaVA-OneVision: from candidate resolutions ("grid pinpoints", multiples of
  the tile size), pick the one that keeps the most of the image's pixels after an
  aspect-preserving downscale, and among equals the one that wastes the least area
  (`select_best_resolution`, as transformers does). The image is resized to fit it, padded
  to it and cut into tiles.
- InternVL: among all grids of `min_tiles..max_tiles` tiles pick the one whose aspect ratio is
  closest to the image's (ties go to the larger grid while the image covers more than half of
  it); the image is squashed onto the grid (`internvl_grid`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Size = tuple[int, int]


def _positive_pair(value: object, name: str) -> Size:
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"{name} must be a pair of positive ints (height, width), got {value!r}")


def validate_pinpoints(pinpoints: Sequence[Sequence[int]], tile_size: int | None = None) -> tuple[Size, ...]:
    """Check candidate resolutions and return them as a tuple of `(height, width)` pairs.

    Args:
        pinpoints: Candidate resolutions `[(H, W), ...]` (JSON gives lists).
        tile_size: When given, every side must be a multiple of it (the tiles must cover each
            resolution exactly, as the reassembled feature grid assumes).

    Raises:
        ValueError: An empty list, a malformed pair, or a side that is not a multiple of `tile_size`.
    """
    if isinstance(pinpoints, (str, bytes)) or not isinstance(pinpoints, Sequence) or not pinpoints:
        raise ValueError(f"pinpoints must be a non-empty list of (height, width) pairs, got {pinpoints!r}")
    pairs = tuple(_positive_pair(p, "each pinpoint") for p in pinpoints)
    if tile_size is not None:
        bad = [p for p in pairs if p[0] % tile_size or p[1] % tile_size]
        if bad:
            raise ValueError(f"pinpoints {bad} are not multiples of the tile size {tile_size}; allowed: k * {tile_size}")
    return pairs


def grid_pinpoints(tile_size: int, max_rows: int, max_cols: int | None = None, *, min_tiles: int = 1) -> list[Size]:
    """All resolutions `(r * tile_size, c * tile_size)` for `1 <= r <= max_rows`, `1 <= c <= max_cols`.

    LLaVA-OneVision's `"(1x1),...,(6x6)"` is `grid_pinpoints(384, 6)`; `min_tiles=2` drops the
    single-tile resolution.
    """
    max_cols = max_rows if max_cols is None else max_cols
    return [
        (r * tile_size, c * tile_size)
        for r in range(1, max_rows + 1)
        for c in range(1, max_cols + 1)
        if r * c >= min_tiles
    ]


def select_best_resolution(image_size: Sequence[int], pinpoints: Sequence[Sequence[int]]) -> Size:
    """The candidate resolution LLaVA-NeXT tiles an image at.

    For each candidate `(H, W)`, the image is scaled by `min(W / w, H / h)`; the effective
    resolution is the scaled area (truncated sides), capped at the original area; the best
    candidate has the largest effective resolution, then the least wasted area `H * W -
    effective`; the first wins a full tie. Same as transformers' `select_best_resolution`.

    Args:
        image_size: The image's `(height, width)`.
        pinpoints: Candidate resolutions `(H, W)`.

    Returns:
        The chosen `(H, W)`.
    """
    height, width = image_size
    best, best_effective, best_wasted = None, 0, math.inf
    for cand_h, cand_w in pinpoints:
        scale = min(cand_w / width, cand_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = cand_h * cand_w - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (int(cand_h), int(cand_w)), effective, wasted
    if best is None:
        raise ValueError(f"no pinpoint fits image size {tuple(image_size)}: {list(pinpoints)}")
    return best


def fit_size(image_size: Sequence[int], target: Sequence[int]) -> Size:
    """`(h, w)` of the image resized to fit inside `target` with its aspect ratio kept: the
    limiting side fills the target exactly, the other is rounded up and capped (transformers'
    `get_patch_output_size`). The rest of `target` is padding."""
    height, width = image_size
    target_h, target_w = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return (min(math.ceil(height * scale_w), target_h), target_w)
    return (target_h, min(math.ceil(width * scale_h), target_w))


def anyres_grid_shape(image_size: Sequence[int], pinpoints: Sequence[Sequence[int]], tile_size: int) -> Size:
    """`(rows, cols)` of tiles LLaVA-NeXT cuts the image into (the base image not counted)."""
    best_h, best_w = select_best_resolution(image_size, pinpoints)
    return (math.ceil(best_h / tile_size), math.ceil(best_w / tile_size))


def internvl_aspect_ratios(min_tiles: int, max_tiles: int) -> list[Size]:
    """Every tile grid `(cols, rows)` with `min_tiles <= cols * rows <= max_tiles`, fewest tiles
    first (InternVL's / transformers GotOcr2's order)."""
    if not (isinstance(min_tiles, int) and isinstance(max_tiles, int) and 1 <= min_tiles <= max_tiles):
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got min_tiles={min_tiles!r}, max_tiles={max_tiles!r}")
    grids = [
        (cols, rows)
        for cols in range(1, max_tiles + 1)
        for rows in range(1, max_tiles + 1)
        if min_tiles <= cols * rows <= max_tiles
    ]
    return sorted(grids, key=lambda g: g[0] * g[1])


def internvl_grid(image_size: Sequence[int], tile_size: int, min_tiles: int = 1, max_tiles: int = 12) -> Size:
    """`(rows, cols)` of InternVL's dynamic tiling for an image.

    The grid whose `cols / rows` is closest to the image's `width / height`; on a tie the later
    (larger) grid wins while the image's area exceeds half the grid's pixel area.

    Args:
        image_size: The image's `(height, width)`.
        tile_size: Side of one square tile (448 for InternVL).
        min_tiles: Fewest tiles.
        max_tiles: Most tiles (12 in InternVL's chat demo, 6 in its training configs).
    """
    height, width = image_size
    aspect, area = width / height, width * height
    best_diff, best = math.inf, (1, 1)
    for cols, rows in internvl_aspect_ratios(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return (best[1], best[0])
