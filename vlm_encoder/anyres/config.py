"""How images are tiled and how tile features become one token sequence: one config per tiling
policy, `LlavaNextAnyres` and `InternVLAnyres`, both an `AnyresConfig` (the shared fields)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

from ..specs.options import ConfigMixin, at_least, check_fields
from .select import Size, validate_pinpoints

TilePolicy = Literal["llava_next", "internvl"]
TILE_POLICIES: tuple[str, ...] = get_args(TilePolicy)
MultiImage = Literal["tiles", "base"]


@dataclass(frozen=True, kw_only=True)
class AnyresConfig(ConfigMixin):
    """Any-resolution tiling and token assembly: what every policy shares. Build a
    `LlavaNextAnyres` or an `InternVLAnyres`; `AnyresConfig.from_dict` picks one by `policy`.

    Attributes:
        tile_size: Side `S` of one square tile in pixels (the encoder's input size).
        tile_pool: `1` (none) or `2`: bilinear 2x2 downscale of every tile's feature grid to
            `ceil(g / 2)` per side (LLaVA-OneVision's `apply_pooling`), base image included.
        policy: The tiling policy, `llava_next` or `internvl`, fixed by the class.
    """

    tile_size: int = at_least(1)
    tile_pool: Literal[1, 2] = 1
    policy: TilePolicy

    def __post_init__(self) -> None:
        if type(self) is AnyresConfig:
            raise TypeError("AnyresConfig holds what the policies share; build LlavaNextAnyres(...) or InternVLAnyres(...)")
        check_fields(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AnyresConfig:
        """The config of `data["policy"]` (default `llava_next`) from its fields, as `to_dict`
        writes them. A config saved before the policies were split (every field of both, flat)
        is read too: the other policy's fields, which it ignored, are dropped."""
        if cls is not AnyresConfig:
            return super().from_dict(data)
        if not isinstance(data, Mapping):
            raise ValueError(f"an AnyresConfig must be a mapping of fields, got {type(data).__name__}")
        policy = data.get("policy", "llava_next")
        if policy not in POLICY_CONFIGS:
            raise ValueError(f"AnyresConfig.policy must be one of {', '.join(map(repr, TILE_POLICIES))}, got {policy!r}")
        target = POLICY_CONFIGS[policy]
        if set(_SAVED_BEFORE_THE_SPLIT) <= set(data):
            own = {f.name for f in dataclasses.fields(target)}
            data = {k: v for k, v in data.items() if k in own or k not in _SAVED_BEFORE_THE_SPLIT}
        return target.from_dict({**data, "policy": policy})


@dataclass(frozen=True, kw_only=True)
class LlavaNextAnyres(AnyresConfig):
    """LLaVA-NeXT / LLaVA-OneVision tiling: the best pinpoint, the base image first, unpad,
    newlines.

    Attributes:
        pinpoints: Candidate resolutions `((H, W), ...)`, multiples of `tile_size`.
        newline: A learned token after each row of the reassembled grid.
        unpad: Drop the grid rows/columns that only saw padding.
        budget_tiles: LLaVA-OneVision's `anyres_max_N`: when the unpadded grid holds more than
            `1.1^2 * N` tiles' worth of tokens, downscale it bilinearly to about `N` tiles'
            worth (`None`: never).
        multi_image: An image in a sample that holds several images is `tiles` (tiled as any
            other) or `base` (only its base tile, then one newline token: LLaVA-OneVision's
            multi-image path).
    """

    policy: Literal["llava_next"] = "llava_next"
    pinpoints: tuple[Size, ...]
    newline: bool = True
    unpad: bool = True
    budget_tiles: int | None = at_least(1, None)
    multi_image: MultiImage = "tiles"

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "pinpoints", validate_pinpoints(self.pinpoints, self.tile_size))


@dataclass(frozen=True, kw_only=True)
class InternVLAnyres(AnyresConfig):
    """InternVL tiling: `min_tiles..max_tiles` tiles by aspect ratio, then a thumbnail; the
    tiles' tokens one after another.

    Attributes:
        min_tiles: Fewest tiles.
        max_tiles: Most tiles (thumbnail not counted).
        use_thumbnail: Append the whole image as a last tile when there are several.
    """

    # Every image of a multi-image sample is tiled (only LLaVA-OneVision has a base-only path).
    multi_image: ClassVar[MultiImage] = "tiles"

    policy: Literal["internvl"] = "internvl"
    min_tiles: int = at_least(1, 1)
    max_tiles: int = at_least(1, 12)
    use_thumbnail: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min_tiles > self.max_tiles:
            raise ValueError(f"min_tiles={self.min_tiles} exceeds max_tiles={self.max_tiles}")


POLICY_CONFIGS: dict[str, type[AnyresConfig]] = {"llava_next": LlavaNextAnyres, "internvl": InternVLAnyres}
# The fields of the one flat AnyresConfig that held both policies' options.
_SAVED_BEFORE_THE_SPLIT = ("tile_size", "policy", "pinpoints", "newline", "unpad", "tile_pool", "budget_tiles",
                           "min_tiles", "max_tiles", "use_thumbnail", "multi_image")
