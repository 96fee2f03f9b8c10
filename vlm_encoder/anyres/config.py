"""`AnyresConfig`: how images are tiled and how tile features become one token sequence."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

from ..validation import check_positive_int as _positive_int
from .select import Size, validate_pinpoints

TilePolicy = Literal["llava_next", "internvl"]
TILE_POLICIES: tuple[str, ...] = get_args(TilePolicy)
MultiImage = Literal["tiles", "base"]
MULTI_IMAGES: tuple[str, ...] = get_args(MultiImage)


@dataclass(frozen=True)
class AnyresConfig:
    """Any-resolution tiling and token assembly.

    Attributes:
        tile_size: Side `S` of one square tile in pixels (the encoder's input size).
        policy: `llava_next` (best pinpoint, base image first, unpad, newlines; also
            LLaVA-OneVision) or `internvl` (1..N tiles by aspect ratio, then a thumbnail; the
            tiles' tokens one after another).
        pinpoints: `llava_next`: candidate resolutions `((H, W), ...)`, multiples of `tile_size`.
        newline: `llava_next`: a learned token after each row of the reassembled grid.
        unpad: `llava_next`: drop the grid rows/columns that only saw padding.
        tile_pool: `1` (none) or `2`: bilinear 2x2 downscale of every tile's feature grid to
            `ceil(g / 2)` per side (LLaVA-OneVision's `apply_pooling`), base image included.
        budget_tiles: `llava_next`: LLaVA-OneVision's `anyres_max_N`: when the unpadded grid
            holds more than `1.1^2 * N` tiles' worth of tokens, downscale it bilinearly to
            about `N` tiles' worth (`None`: never).
        min_tiles: `internvl`: fewest tiles.
        max_tiles: `internvl`: most tiles (thumbnail not counted).
        use_thumbnail: `internvl`: append the whole image as a last tile when there are several.
        multi_image: `llava_next`: an image in a sample that holds several images is `tiles`
            (tiled as any other) or `base` (only its base tile, then one newline token:
            LLaVA-OneVision's multi-image path).
    """

    tile_size: int
    policy: TilePolicy = "llava_next"
    pinpoints: tuple[Size, ...] | None = None
    newline: bool = True
    unpad: bool = True
    tile_pool: int = 1
    budget_tiles: int | None = None
    min_tiles: int = 1
    max_tiles: int = 12
    use_thumbnail: bool = True
    multi_image: MultiImage = "tiles"

    def __post_init__(self) -> None:
        _positive_int(self.tile_size, "tile_size")
        if self.policy not in TILE_POLICIES:
            raise ValueError(f"policy={self.policy!r} is not supported; allowed: {', '.join(TILE_POLICIES)}")
        if self.policy == "llava_next":
            if self.pinpoints is None:
                raise ValueError("policy='llava_next' needs pinpoints, e.g. ((336, 672), (672, 336), (672, 672))")
            object.__setattr__(self, "pinpoints", validate_pinpoints(self.pinpoints, self.tile_size))
        elif self.pinpoints is not None:
            raise ValueError("pinpoints are only used by policy='llava_next'; leave them None for 'internvl'")
        for name in ("newline", "unpad", "use_thumbnail"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.tile_pool not in (1, 2) or isinstance(self.tile_pool, bool):
            raise ValueError(f"tile_pool must be 1 (none) or 2 (2x2 bilinear), got {self.tile_pool!r}")
        if self.budget_tiles is not None:
            _positive_int(self.budget_tiles, "budget_tiles")
        _positive_int(self.min_tiles, "min_tiles")
        _positive_int(self.max_tiles, "max_tiles")
        if self.multi_image not in MULTI_IMAGES:
            raise ValueError(f"multi_image={self.multi_image!r} is not supported; allowed: {', '.join(MULTI_IMAGES)}")
        if self.multi_image == "base" and self.policy != "llava_next":
            raise ValueError("multi_image='base' is LLaVA-OneVision's path: it needs policy='llava_next'")
        if self.min_tiles > self.max_tiles:
            raise ValueError(f"min_tiles={self.min_tiles} exceeds max_tiles={self.max_tiles}")

    def replace(self, **changes: Any) -> AnyresConfig:
        """A copy with `changes` applied and validated again."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data["pinpoints"] is not None:
            data["pinpoints"] = [list(p) for p in data["pinpoints"]]
        return data
