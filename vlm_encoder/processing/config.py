"""`ProcessorConfig`: the one validated, frozen description of an image preprocessing pipeline.

The pipeline is fixed: input to RGB -> resize -> center crop (or pad) -> rescale -> normalize.
The config chooses each step's parameters; the converters in `from_hf`, `from_open_clip` and
`from_timm` express those libraries' eval transforms with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from ..specs.options import ConfigMixin, at_least, check_fields
from ..validation import repeat_number

ResizeMode = Literal["shortest_edge", "exact", "longest_edge", "naflex", "smart_resize", "gemma4", "kimi_k25", "none"]
Interpolation = Literal["bicubic", "bilinear", "nearest", "lanczos", "box", "hamming"]
ResizeBackend = Literal["pil", "torchvision"]
CropRounding = Literal["round", "floor"]

INTERPOLATIONS: tuple[str, ...] = get_args(Interpolation)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ProcessorConfig(ConfigMixin):
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
            `naflex`: SigLIP2's NaFlex rule (`Siglip2ImageProcessor`): keep the aspect ratio,
            sides multiples of `patch_size`, the largest scale (enlarging or shrinking) whose
            grid has at most `max_patches` patches (`packing.naflex_size`); `size` is unused
            and every image gets its own size (encode them with `packing.encode_packed`).
            `smart_resize`: Qwen2-VL's rule (`Qwen2VLImageProcessor`, for Qwen2.5-VL, Qwen3-VL
            and Qwen3.5; `packing.smart_resize_size`): keep the aspect ratio, sides rounded to
            multiples of `factor`, the area clamped to `[min_pixels, max_pixels]`; `size` is
            unused and every image gets its own size.
            `gemma4`: Gemma 4's rule (`Gemma4ImageProcessor`; `packing.gemma4_size`): keep the
            aspect ratio, the largest sides that are multiples of `patch_size *
            pooling_kernel_size` with at most `max_patches` patches (transformers'
            `max_soft_tokens * pooling_kernel_size**2`); `size` is unused and every image gets
            its own size.
            `kimi_k25`: Kimi K2.5's `navit_resize` (`Kimi_K25ImageProcessor`;
            `packing.kimi_k25_size`): keep the native size unless it has over `max_patches`
            patches or a side over `max_side` patches (then shrink, aspect kept, truncating),
            then pad bottom / right with `pad_fill` to multiples of `factor` (`patch_size *
            merge_size`); `size` is unused and every image gets its own size.
            `none`: no resize.
        size: Resize target `(h, w)` (an int means square).
        crop_size: Center crop `(h, w)` (an int means square), or `None` for no crop. An image smaller than the
            crop is first padded with `pad_fill`, evenly with the extra pixel right/bottom.
        crop_rounding: Offset of the crop when the margin is odd: `round` is Python's
            `round(margin / 2)` (torchvision, timm, open_clip), `floor` is `margin // 2` (HF).
        interpolation: Resampling filter of the resize.
        backend: `pil` resizes with `PIL.Image.resize` (torchvision on PIL images, timm,
            open_clip, HF's PIL backend); `torchvision` resizes a tensor with
            `torchvision.transforms.v2.functional.resize(antialias=True)` (transformers 5's
            default image processors). The two differ by up to a few grey levels.
        rescale_factor: Multiplies the 0-255 pixel values (`1/255` gives `[0, 1]`).
        mean: Per-channel mean subtracted after rescaling (one number means all three), or
            `None` for no normalization.
        std: Per-channel std divided by after subtracting `mean` (`None` with `mean`).
        background: RGB colour (0-255) that transparent pixels are composited on (white, as
            HF and most viewers do).
        pad_fill: RGB colour (0-255) of the padding added by the crop step (black, as
            torchvision and open_clip; timm's `border` mode uses the mean colour).
        exif_transpose: Apply a PIL image's EXIF orientation before anything else.
        patch_size: The patch side of the `naflex`, `gemma4` and `kimi_k25` resizes (`None` for
            the other modes).
        max_patches: The patch budget of the `naflex`, `gemma4` and `kimi_k25` resizes (`None`
            for the other modes).
        pooling_kernel_size: The pooler's side of the `gemma4` resize (its sides are multiples of
            `patch_size * pooling_kernel_size`; `None` for the other modes).
        max_side: The largest side, in patches, of the `kimi_k25` resize (transformers'
            `size['max_height']`; `None` for the other modes).
        min_pixels: Smallest area of the `smart_resize` resize (`None` for the other modes).
        max_pixels: Largest area of the `smart_resize` resize (`None` for the other modes).
        factor: Side multiple of the `smart_resize` resize and the `kimi_k25` padding,
            `patch_size * merge_size` (`None` for the other modes).
    """

    resize_mode: ResizeMode = "exact"
    size: tuple[int, int] = at_least(1, (224, 224))
    crop_size: tuple[int, int] | None = at_least(1, None)
    crop_rounding: CropRounding = "round"
    interpolation: Interpolation = "bicubic"
    backend: ResizeBackend = "pil"
    rescale_factor: float = 1 / 255
    mean: tuple[float, float, float] | None = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] | None = OPENAI_CLIP_STD
    background: tuple[int, int, int] = at_least(0, (255, 255, 255))
    pad_fill: tuple[int, int, int] = at_least(0, (0, 0, 0))
    exif_transpose: bool = True
    patch_size: int | None = at_least(1, None)
    max_patches: int | None = at_least(1, None)
    min_pixels: int | None = at_least(1, None)
    max_pixels: int | None = at_least(1, None)
    factor: int | None = at_least(1, None)
    pooling_kernel_size: int | None = at_least(1, None)
    max_side: int | None = at_least(1, None)

    def __post_init__(self) -> None:
        for name, times in (("size", 2), ("crop_size", 2), ("mean", 3), ("std", 3), ("background", 3), ("pad_fill", 3)):
            object.__setattr__(self, name, repeat_number(getattr(self, name), times))  # one number for all
        check_fields(self)
        if not (math.isfinite(self.rescale_factor) and self.rescale_factor > 0):
            raise ValueError(
                f"rescale_factor must be a positive number (1/255 maps 0-255 to [0, 1]), got {self.rescale_factor!r}"
            )
        if (self.mean is None) != (self.std is None):
            raise ValueError(f"mean and std must both be set or both be None, got mean={self.mean!r}, std={self.std!r}")
        if self.mean is not None and not all(map(math.isfinite, self.mean)):
            raise ValueError(f"mean must be finite numbers (R, G, B), got {self.mean}")
        if self.std is not None and not all(math.isfinite(v) and v > 0 for v in self.std):
            raise ValueError(f"std must be positive finite numbers (R, G, B), got {self.std}")
        budgeted = self.resize_mode in ("naflex", "gemma4", "kimi_k25")
        if budgeted and (self.patch_size is None or self.max_patches is None):
            raise ValueError(f"resize_mode={self.resize_mode!r} needs patch_size and max_patches (the patch budget)")
        if not budgeted and (self.patch_size is not None or self.max_patches is not None):
            raise ValueError("patch_size and max_patches apply to resize_mode='naflex', 'gemma4' or 'kimi_k25' only, "
                             f"not {self.resize_mode!r}")
        if budgeted and self.crop_size is not None:
            raise ValueError(f"resize_mode={self.resize_mode!r} sizes each image to its patch grid: "
                             "it takes no crop_size")
        gemma4 = self.resize_mode == "gemma4"
        if gemma4 and self.pooling_kernel_size is None:
            raise ValueError("resize_mode='gemma4' needs pooling_kernel_size (sides are multiples of "
                             "patch_size * pooling_kernel_size)")
        if not gemma4 and self.pooling_kernel_size is not None:
            raise ValueError(f"pooling_kernel_size applies to resize_mode='gemma4' only, not {self.resize_mode!r}")
        if gemma4 and self.max_patches < self.pooling_kernel_size**2:
            raise ValueError(f"resize_mode='gemma4' needs max_patches >= pooling_kernel_size**2 (one pooled token), "
                             f"got {self.max_patches} < {self.pooling_kernel_size**2}")
        smart = self.resize_mode == "smart_resize"
        smart_fields = (self.min_pixels, self.max_pixels, self.factor)
        if smart and None in smart_fields:
            raise ValueError("resize_mode='smart_resize' needs min_pixels, max_pixels and factor (patch_size * merge_size)")
        if not smart and (self.min_pixels, self.max_pixels) != (None, None):
            raise ValueError("min_pixels and max_pixels apply to resize_mode='smart_resize' only, "
                             f"not {self.resize_mode!r}")
        kimi = self.resize_mode == "kimi_k25"
        if kimi and (self.factor is None or self.max_side is None):
            raise ValueError("resize_mode='kimi_k25' needs factor (patch_size * merge_size) and max_side (patches)")
        if not (smart or kimi) and self.factor is not None:
            raise ValueError("min_pixels, max_pixels and factor apply to resize_mode='smart_resize' only (factor also "
                             f"to 'kimi_k25'), not {self.resize_mode!r}")
        if not kimi and self.max_side is not None:
            raise ValueError(f"max_side applies to resize_mode='kimi_k25' only, not {self.resize_mode!r}")
        if smart and self.crop_size is not None:
            raise ValueError("resize_mode='smart_resize' sizes each image to its own grid: it takes no crop_size")
        if smart and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels={self.min_pixels} is larger than max_pixels={self.max_pixels}")
        for name in ("background", "pad_fill"):
            if max(getattr(self, name)) > 255:
                raise ValueError(f"{name} must be an RGB colour of ints in [0, 255], got {getattr(self, name)}")

    @property
    def output_size(self) -> tuple[int, int] | None:
        """`(H, W)` of every output image, or `None` when it depends on the input."""
        if self.crop_size is not None:
            return self.crop_size
        if self.resize_mode == "exact":
            return self.size
        return None
