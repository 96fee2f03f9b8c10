"""timm data config -> `ProcessorConfig`, reproducing `timm.data.create_transform(**data_config)`
(the eval transform) for RGB images."""

from __future__ import annotations

import math
from typing import Any

from .config import INTERPOLATIONS, ProcessorConfig

DEFAULT_CROP_PCT = 0.875
_KNOWN = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
_CROP_MODES = ("center", "squash", "border")


def config_from_timm(data_config: dict[str, Any]) -> ProcessorConfig:
    """A `ProcessorConfig` for timm's eval transform.

    Args:
        data_config: The dict from `timm.data.resolve_data_config` (`input_size`,
            `interpolation`, `mean`, `std`, `crop_pct`, `crop_mode`).

    Raises:
        ValueError: Missing or unknown fields, or values timm's eval transform rejects.
    """
    if not isinstance(data_config, dict):
        raise TypeError(f"from_timm takes resolve_data_config's dict, got {type(data_config).__name__}")
    unknown = set(data_config) - set(_KNOWN)
    if unknown:
        raise ValueError(f"unknown timm data config fields {sorted(unknown)}; known: {list(_KNOWN)}")
    missing = {"input_size", "interpolation", "mean", "std"} - set(data_config)
    if missing:
        raise ValueError(f"timm data config lacks {sorted(missing)}; pass timm.data.resolve_data_config(...)'s dict")
    input_size = tuple(data_config["input_size"])
    if len(input_size) != 3 or input_size[0] != 3:
        raise ValueError(f"timm input_size must be (3, H, W), got {data_config['input_size']!r}")
    image_size = (int(input_size[1]), int(input_size[2]))
    interpolation = data_config["interpolation"]
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"timm interpolation={interpolation!r}; allowed for eval: {', '.join(INTERPOLATIONS)}")
    crop_pct = data_config.get("crop_pct") or DEFAULT_CROP_PCT
    crop_mode = data_config.get("crop_mode") or "center"
    if crop_mode not in _CROP_MODES:
        raise ValueError(f"timm crop_mode={crop_mode!r}; allowed: {', '.join(_CROP_MODES)}")
    scale_size = tuple(math.floor(side / crop_pct) for side in image_size)
    mean = tuple(data_config["mean"])
    common = dict(
        size=scale_size,
        crop_size=image_size,
        interpolation=interpolation,
        mean=mean,
        std=tuple(data_config["std"]),
        backend="pil",
        crop_rounding="round",
    )
    if crop_mode == "squash":
        return ProcessorConfig(resize_mode="exact", **common)
    if crop_mode == "border":
        return ProcessorConfig(resize_mode="longest_edge", pad_fill=tuple(round(255 * m) for m in mean), **common)
    return ProcessorConfig(resize_mode="shortest_edge", **common)
