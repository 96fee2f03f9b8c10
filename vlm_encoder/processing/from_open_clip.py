"""open_clip `PreprocessCfg` -> `ProcessorConfig`, reproducing `open_clip.image_transform(...,
is_train=False)` for RGB images."""

from __future__ import annotations

import dataclasses
from typing import Any

from .config import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ProcessorConfig

OPEN_CLIP_DEFAULTS: dict[str, Any] = {
    "size": 224,
    "mode": "RGB",
    "mean": OPENAI_CLIP_MEAN,
    "std": OPENAI_CLIP_STD,
    "interpolation": "bicubic",
    "resize_mode": "shortest",
    "fill_color": 0,
}
_RESIZE_MODES = ("shortest", "longest", "squash")


def config_from_open_clip(cfg: Any) -> ProcessorConfig:
    """A `ProcessorConfig` for open_clip's eval transform of `cfg`.

    Args:
        cfg: An `open_clip.transform.PreprocessCfg`, or a dict with its fields
            (`size`, `mode`, `mean`, `std`, `interpolation`, `resize_mode`, `fill_color`);
            missing fields take open_clip's defaults.

    Raises:
        ValueError: Unknown fields or values open_clip itself rejects.
    """
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        data = dataclasses.asdict(cfg)
    elif isinstance(cfg, dict):
        data = dict(cfg)
    else:
        raise TypeError(f"from_open_clip takes a PreprocessCfg or a dict, got {type(cfg).__name__}")
    unknown = set(data) - set(OPEN_CLIP_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown open_clip preprocess fields {sorted(unknown)}; known: {sorted(OPEN_CLIP_DEFAULTS)}")
    merged = {**OPEN_CLIP_DEFAULTS, **{k: v for k, v in data.items() if v is not None}}
    if merged["mode"] != "RGB":
        raise ValueError(f"open_clip mode={merged['mode']!r} is not supported; allowed: 'RGB'")
    if merged["resize_mode"] not in _RESIZE_MODES:
        raise ValueError(f"open_clip resize_mode={merged['resize_mode']!r}; allowed: {', '.join(_RESIZE_MODES)}")
    if merged["interpolation"] not in ("bicubic", "bilinear", "random"):
        raise ValueError(f"open_clip interpolation={merged['interpolation']!r}; allowed: bicubic, bilinear, random")
    # open_clip evaluates 'random' with bicubic.
    interpolation = "bilinear" if merged["interpolation"] == "bilinear" else "bicubic"
    size = merged["size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    common = dict(
        size=size,
        interpolation=interpolation,
        mean=merged["mean"],
        std=merged["std"],
        backend="pil",
        crop_rounding="round",
    )
    if merged["resize_mode"] == "squash":
        return ProcessorConfig(resize_mode="exact", **common)
    if merged["resize_mode"] == "longest":
        return ProcessorConfig(resize_mode="longest_edge", crop_size=size, pad_fill=merged["fill_color"], **common)
    if size[0] != size[1]:
        # open_clip builds ResizeKeepRatio(size) here without its interpolation: always bicubic.
        common["interpolation"] = "bicubic"
    return ProcessorConfig(resize_mode="shortest_edge", crop_size=size, **common)
