"""The pipeline's steps as plain functions: resize geometry, resize, center crop or pad, normalize.

Each reproduces the arithmetic of the reference it is named after, so the processor's output
matches torchvision / timm / open_clip / HF to float rounding.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from .config import CropRounding, Interpolation, ResizeBackend, ResizeMode

PIL_FILTERS: dict[str, int] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
# torchvision InterpolationMode names; NEAREST_EXACT is the PIL-like nearest (HF maps PIL
# NEAREST to it for its torchvision backend).
TORCH_FILTERS: dict[str, str] = {
    "nearest": "NEAREST_EXACT",
    "bilinear": "BILINEAR",
    "bicubic": "BICUBIC",
    "lanczos": "LANCZOS",
    "box": "BOX",
    "hamming": "HAMMING",
}


def resized_size(height: int, width: int, mode: ResizeMode, size: tuple[int, int]) -> tuple[int, int]:
    """`(h, w)` after the resize step (see `ProcessorConfig.resize_mode` for the rules)."""
    target_h, target_w = size
    if mode == "none":
        return (height, width)
    if mode == "exact":
        return size
    if mode == "shortest_edge" and target_h == target_w:
        # torchvision `Resize(int)` / HF `get_resize_output_image_size`: the long side truncates.
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = target_h, int(target_h * long / short)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        return (max(1, new_h), max(1, new_w))
    # timm / open_clip `ResizeKeepRatio`: both sides rounded.
    ratio_h, ratio_w = height / target_h, width / target_w
    ratio = min(ratio_h, ratio_w) if mode == "shortest_edge" else max(ratio_h, ratio_w)
    return (max(1, round(height / ratio)), max(1, round(width / ratio)))


def _to_chw(rgb: np.ndarray) -> torch.Tensor:
    """`(H, W, 3)` array -> `(3, H, W)` tensor (a copy where the array is read-only, as PIL's are)."""
    if not rgb.flags.writeable or not rgb.flags.c_contiguous:
        rgb = rgb.copy()
    return torch.from_numpy(rgb).permute(2, 0, 1)


def resize(
    rgb: np.ndarray, size: tuple[int, int], interpolation: Interpolation, backend: ResizeBackend
) -> torch.Tensor:
    """Resize an RGB array `(H, W, 3)` to `size = (h, w)`.

    Returns:
        `(3, h, w)`, `uint8` for `uint8` input (PIL and torchvision round and clamp), else
        `float32` clamped to `[0, 255]` (not rounded).
    """
    height, width = rgb.shape[:2]
    if (height, width) == tuple(size):
        return _to_chw(rgb)
    if backend == "torchvision":
        from torchvision.transforms.v2 import InterpolationMode  # imported here: only this backend needs it
        from torchvision.transforms.v2 import functional as tvF

        mode = InterpolationMode[TORCH_FILTERS[interpolation]]
        resized = tvF.resize(_to_chw(rgb).contiguous(), list(size), interpolation=mode, antialias=True)
        return resized if resized.dtype == torch.uint8 else resized.clamp_(0.0, 255.0)
    new_size, resample = (size[1], size[0]), PIL_FILTERS[interpolation]
    if rgb.dtype == np.uint8:
        resized = np.array(Image.fromarray(rgb, mode="RGB").resize(new_size, resample=resample))
        return torch.from_numpy(resized).permute(2, 0, 1)
    # Float data: PIL resizes mode 'F' one channel at a time, in float32.
    channels = [np.array(Image.fromarray(rgb[:, :, c], mode="F").resize(new_size, resample=resample)) for c in range(3)]
    # Clamped as the 8-bit path is: cubic and Lanczos overshoot past black and white.
    return torch.from_numpy(np.stack(channels)).clamp_(0.0, 255.0)


def center_crop_or_pad(
    image: torch.Tensor, size: tuple[int, int], rounding: CropRounding, fill: tuple[int, int, int]
) -> torch.Tensor:
    """Center crop `(3, H, W)` to `size = (h, w)`, padding with `fill` first where it is smaller.

    Padding puts the odd pixel right/bottom (torchvision, timm, open_clip, HF's torchvision
    backend); the crop offset of an odd margin follows `rounding`.

    Returns:
        `(3, h, w)`, same dtype.
    """
    crop_h, crop_w = size
    height, width = image.shape[-2:]
    if crop_h > height or crop_w > width:
        top, left = max(0, (crop_h - height) // 2), max(0, (crop_w - width) // 2)
        new_h, new_w = max(crop_h, height), max(crop_w, width)
        fill_values = torch.tensor(fill, dtype=image.dtype).view(3, 1, 1)
        padded = fill_values.expand(3, new_h, new_w).clone()
        padded[:, top : top + height, left : left + width] = image
        image, height, width = padded, new_h, new_w
    if (height, width) == (crop_h, crop_w):
        return image
    if rounding == "round":
        top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
    else:
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return image[:, top : top + crop_h, left : left + crop_w]


def pad_bottom_right(image: torch.Tensor, size: tuple[int, int], fill: tuple[int, int, int]) -> torch.Tensor:
    """Pad `(3, H, W)` bottom / right with `fill` to `size = (h, w)` (HF's `pad(pad_size=...)`)."""
    height, width = image.shape[-2:]
    if (height, width) == tuple(size):
        return image
    padded = torch.tensor(fill, dtype=image.dtype).view(3, 1, 1).expand(3, *size).clone()
    padded[:, :height, :width] = image
    return padded


def rescale_and_normalize(
    images: torch.Tensor,
    rescale_factor: float,
    mean: tuple[float, float, float] | None,
    std: tuple[float, float, float] | None,
) -> torch.Tensor:
    """`(x * rescale_factor - mean) / std` per channel of `(B, 3, H, W)`.

    Computed in float64 and rounded once to float32: within half an ulp of the exact value;
    the references' float32 arithmetic differs from it by a few ulps (< 1e-6).

    Returns:
        `(B, 3, H, W)` float32.
    """
    values = images.to(torch.float64) * rescale_factor
    if mean is not None and std is not None:
        mean_ = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
        std_ = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
        values = (values - mean_) / std_
    return values.to(torch.float32)
