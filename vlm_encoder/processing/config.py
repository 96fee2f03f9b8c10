"""`ProcessorConfig`: the one validated, frozen description of an image preprocessing pipeline.

The pipeline is fixed: input to RGB -> resize -> center crop (or pad) -> rescale -> normalize.
The config chooses each step's parameters; the converters in `from_hf`, `from_open_clip` and
`from_timm` express those libraries' eval transforms with it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

from ..validation import check_choice as _choice
from ..validation import positive_pair as _pair

ResizeMode = Literal["shortest_edge", "exact", "longest_edge", "none"]
Interpolation = Literal["bicubic", "bilinear", "nearest", "lanczos", "box", "hamming"]
ResizeBackend = Literal["pil", "torchvision"]
CropRounding = Literal["round", "floor"]

RESIZE_MODES: tuple[str, ...] = get_args(ResizeMode)
INTERPOLATIONS: tuple[str, ...] = get_args(Interpolation)
RESIZE_BACKENDS: tuple[str, ...] = get_args(ResizeBackend)
CROP_ROUNDINGS: tuple[str, ...] = get_args(CropRounding)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)


def _triple(value: Any, name: str, *, low: float, high: float, integer: bool = False) -> tuple:
    """A number or a 3-sequence (one per RGB channel) in `[low, high]`."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value,) * 3
    if isinstance(value, (list, tuple)) and len(value) == 3:
        ok = all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and low <= v <= high
            and (not integer or float(v).is_integer())
            for v in value
        )
        if ok:
            return tuple(int(v) for v in value) if integer else tuple(float(v) for v in value)
    kind = "ints" if integer else "numbers"
    raise ValueError(f"{name} must be one or three {kind} in [{low}, {high}] (R, G, B), got {value!r}")


@dataclass(frozen=True)
class ProcessorConfig:
    """Configuration of an `ImageProcessor`.

    Attributes:
        resize_mode: How the RGB image is resized to `size = (th, tw)`:
            `shortest_edge`: keep the aspect ratio and cover `size`. For a square size `S` the
            short side becomes exactly `S` and the long side `int(S * long / short)`
            (torchvision `Resize(int)`, HF `shortest_edge`); for a non-square size both sides
            become `round(side / r)` with `r = min(h / th, w / tw)` (timm / open_clip
            `ResizeKeepRatio`).
            `exact`: squash to `size`, ignoring the aspect ratio (SigLIP, ViT).
            `longest_edge`: keep the aspect ratio and fit inside `size`: both sides become
            `round(side / r)` with `r = max(h / th, w / tw)`; pair it with `crop_size` to pad.
            `none`: no resize.
        size: Resize target `(h, w)` (an int means square).
        crop_size: Center crop `(h, w)`, or `None` for no crop. An image smaller than the
            crop is first padded with `pad_fill`, evenly with the extra pixel right/bottom.
        crop_rounding: Offset of the crop when the margin is odd: `round` is Python's
            `round(margin / 2)` (torchvision, timm, open_clip), `floor` is `margin // 2` (HF).
        interpolation: Resampling filter of the resize.
        backend: `pil` resizes with `PIL.Image.resize` (torchvision on PIL images, timm,
            open_clip, HF's PIL backend); `torchvision` resizes a tensor with
            `torchvision.transforms.v2.functional.resize(antialias=True)` (transformers 5's
            default image processors). The two differ by up to a few grey levels.
        rescale_factor: Multiplies the 0-255 pixel values (`1/255` gives `[0, 1]`).
        mean: Per-channel mean subtracted after rescaling, or `None` for no normalization.
        std: Per-channel std divided by after subtracting `mean` (`None` with `mean`).
        background: RGB colour (0-255) that transparent pixels are composited on (white, as
            HF and most viewers do).
        pad_fill: RGB colour (0-255) of the padding added by the crop step (black, as
            torchvision and open_clip; timm's `border` mode uses the mean colour).
        exif_transpose: Apply a PIL image's EXIF orientation before anything else.
    """

    resize_mode: ResizeMode = "exact"
    size: tuple[int, int] = (224, 224)
    crop_size: tuple[int, int] | None = None
    crop_rounding: CropRounding = "round"
    interpolation: Interpolation = "bicubic"
    backend: ResizeBackend = "pil"
    rescale_factor: float = 1 / 255
    mean: tuple[float, float, float] | None = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] | None = OPENAI_CLIP_STD
    background: tuple[int, int, int] = (255, 255, 255)
    pad_fill: tuple[int, int, int] = (0, 0, 0)
    exif_transpose: bool = True

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        _choice(self.resize_mode, RESIZE_MODES, "resize_mode")
        _choice(self.interpolation, INTERPOLATIONS, "interpolation")
        _choice(self.backend, RESIZE_BACKENDS, "backend")
        _choice(self.crop_rounding, CROP_ROUNDINGS, "crop_rounding")
        set_("size", _pair(self.size, "size"))
        if self.crop_size is not None:
            set_("crop_size", _pair(self.crop_size, "crop_size"))
        factor = self.rescale_factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 0:
            raise ValueError(f"rescale_factor must be a positive number (1/255 maps 0-255 to [0, 1]), got {factor!r}")
        set_("rescale_factor", float(factor))
        if (self.mean is None) != (self.std is None):
            raise ValueError(f"mean and std must both be set or both be None, got mean={self.mean!r}, std={self.std!r}")
        if self.mean is not None:
            set_("mean", _triple(self.mean, "mean", low=-1e6, high=1e6))
            std = _triple(self.std, "std", low=0.0, high=1e6)
            if min(std) <= 0:
                raise ValueError(f"std must be positive, got {std}")
            set_("std", std)
        set_("background", _triple(self.background, "background", low=0, high=255, integer=True))
        set_("pad_fill", _triple(self.pad_fill, "pad_fill", low=0, high=255, integer=True))
        if not isinstance(self.exif_transpose, bool):
            raise ValueError(f"exif_transpose must be a bool, got {self.exif_transpose!r}")

    @property
    def output_size(self) -> tuple[int, int] | None:
        """`(H, W)` of every output image, or `None` when it depends on the input."""
        if self.crop_size is not None:
            return self.crop_size
        if self.resize_mode == "exact":
            return self.size
        return None

    def replace(self, **changes: Any) -> "ProcessorConfig":
        """A copy with `changes` applied and validated again."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown ProcessorConfig fields: {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ProcessorConfig":
        """Build from a dict (e.g. `processor_config.json`); unknown keys are an error."""
        data = {k: v for k, v in data.items() if k != "processor_type"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ProcessorConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)
