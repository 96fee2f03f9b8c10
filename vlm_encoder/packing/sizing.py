"""Per-image target sizes for native-resolution encoding: keep the aspect ratio, sides
multiples of the patch stride, at most a token budget of patches.

Two policies:
  * `naflex`: SigLIP2's NaFlex rule, `transformers`' `get_image_size_for_max_num_patches`
    reproduced exactly (a binary search on one scale for both sides, sides rounded *up* to
    the stride, so it also enlarges small images to fill the budget).
  (Processor rules that size each image themselves: `smart_resize_size` (Qwen) and
  `gemma4_size` (Gemma 4), `kimi_k25_size` (Kimi K2.5), used through `ProcessorConfig.resize_mode`.)
  * `navit`: native resolution when it fits: an image is only ever shrunk, by the largest
    scale whose stride-rounded (*down*) grid fits the budget (NaViT's "native aspect ratio,
    resize only to bound the sequence length").
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from ..validation import check_positive_int

SizingPolicy = Literal["navit", "naflex"]
SIZING_POLICIES: tuple[str, ...] = get_args(SizingPolicy)


def _check_size_args(height: int, width: int, patch_size: int, max_tokens: int) -> None:
    for name, value in (("height", height), ("width", width), ("patch_size", patch_size), ("max_tokens", max_tokens)):
        check_positive_int(value, name)


def naflex_size(height: int, width: int, patch_size: int, max_tokens: int, eps: float = 1e-5) -> tuple[int, int]:
    """SigLIP2 NaFlex target size `(H, W)` (exactly HF's `get_image_size_for_max_num_patches`).

    A binary search over one scale in `[eps / 10, 100]` keeps the largest scale whose grid
    `ceil(side * scale / p)` (at least one patch per side) has at most `max_tokens` patches.

    Args:
        height: Image height in pixels.
        width: Image width in pixels.
        patch_size: Patch stride `p` in pixels.
        max_tokens: Patch budget (HF's `max_num_patches`).
        eps: Stop when the search interval is narrower than this.

    Returns:
        `(H, W)`, multiples of `patch_size`.
    """
    _check_size_args(height, width, patch_size, max_tokens)

    def scaled(scale: float, size: int) -> int:
        side = math.ceil(size * scale / patch_size) * patch_size
        return int(max(patch_size, side))

    scale_min, scale_max = eps / 10, 100.0
    while (scale_max - scale_min) >= eps:
        scale = (scale_min + scale_max) / 2
        patches = (scaled(scale, height) / patch_size) * (scaled(scale, width) / patch_size)
        if patches <= max_tokens:
            scale_min = scale
        else:
            scale_max = scale
    return scaled(scale_min, height), scaled(scale_min, width)


def smart_resize_size(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's `smart_resize` target size `(H, W)` (exactly transformers' `smart_resize`, used
    by `Qwen2VLImageProcessor` for Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3.5).

    Each side is rounded to the nearest multiple of `factor` (`patch_size * merge_size`); when
    the area is then over `max_pixels` (under `min_pixels`) both sides are scaled by one factor
    and rounded down (up) to multiples of `factor`, keeping the aspect ratio.

    Args:
        height: Image height in pixels.
        width: Image width in pixels.
        factor: Side multiple (the merge unit's side in pixels).
        min_pixels: Smallest area (transformers' `size["shortest_edge"]` / `min_pixels`).
        max_pixels: Largest area (`size["longest_edge"]` / `max_pixels`).

    Returns:
        `(H, W)`, multiples of `factor`.

    Raises:
        ValueError: An aspect ratio over 200 (refused by transformers too).
    """
    _check_size_args(height, width, factor, max_pixels)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"image {height}x{width}: smart_resize needs an aspect ratio of at most 200, "
            f"got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def gemma4_size(
    height: int, width: int, patch_size: int, max_patches: int, pooling_kernel_size: int
) -> tuple[int, int]:
    """Gemma 4's target size `(H, W)` (exactly transformers' `get_aspect_ratio_preserving_size`,
    used by `Gemma4ImageProcessor`).

    Both sides are scaled by one factor to the area of `max_patches` patches, then rounded down
    to multiples of `m = patch_size * pooling_kernel_size`; a side that rounds to zero becomes
    `m` and the other `floor(long / short) * m`, at most `(max_patches // k**2) * m`. Enlarges
    small images as well as shrinking large ones.

    Args:
        height: Image height in pixels.
        width: Image width in pixels.
        patch_size: Patch side in pixels.
        max_patches: Patch budget (transformers' `max_soft_tokens * pooling_kernel_size**2`).
        pooling_kernel_size: The pooler's side `k` in patches.

    Returns:
        `(H, W)`, multiples of `patch_size * pooling_kernel_size`.

    Raises:
        ValueError: Where transformers refuses too: both sides round to zero, or the thin-image
            fallback exceeds the budget.
    """
    _check_size_args(height, width, patch_size, max_patches)
    check_positive_int(pooling_kernel_size, "pooling_kernel_size")
    target_px = max_patches * patch_size**2
    scale = math.sqrt(target_px / (height * width))
    side = pooling_kernel_size * patch_size
    h = int(math.floor(scale * height / side)) * side
    w = int(math.floor(scale * width / side)) * side
    if h == 0 and w == 0:
        raise ValueError(f"image {height}x{width}: Gemma 4's resize gives 0 x 0 (a budget of {max_patches} patches "
                         f"is under one {side} x {side} pooling block)")
    longest = (max_patches // pooling_kernel_size**2) * side
    if h == 0:
        h, w = side, min(int(math.floor(width / height)) * side, longest)
    elif w == 0:
        h, w = min(int(math.floor(height / width)) * side, longest), side
    if h * w > target_px:
        raise ValueError(f"image {height}x{width}: Gemma 4's resize to {h}x{w} exceeds {max_patches} patches "
                         f"of {patch_size} px")
    return h, w


def kimi_k25_size(
    height: int, width: int, patch_size: int, factor: int, max_patches: int, max_side: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Kimi K2.5's sizes (exactly transformers' `navit_resize`, used by `Kimi_K25ImageProcessor`):
    the resize target `(H, W)` and the padded size `(H_pad, W_pad)`.

    The image keeps its size unless its patch count (`max(1, side // patch_size)` per side) is
    over `max_patches` or a side is over `max_side` patches: then both sides are scaled by the
    smallest of those ratios and truncated (at least 1 px). The padded size rounds each side up
    to a multiple of `factor` (`patch_size * merge_size`), the image at the top left.

    Args:
        height: Image height in pixels.
        width: Image width in pixels.
        patch_size: Patch side in pixels.
        factor: Multiple the padded sides round up to.
        max_patches: Patch budget.
        max_side: Largest side in patches (transformers' `size['max_height']`).

    Returns:
        `((H, W), (H_pad, W_pad))`.
    """
    _check_size_args(height, width, patch_size, max_patches)
    check_positive_int(factor, "factor")
    check_positive_int(max_side, "max_side")
    patches = max(1.0, height // patch_size) * max(1.0, width // patch_size)
    limit = max_side * patch_size
    scale = min(1.0, math.sqrt(max_patches / patches), limit / height, limit / width)
    h = min(max(1, int(height * scale)), limit)
    w = min(max(1, int(width * scale)), limit)
    return (h, w), ((factor - h % factor) % factor + h, (factor - w % factor) % factor + w)


def navit_size(height: int, width: int, patch_size: int, max_tokens: int) -> tuple[int, int]:
    """NaViT target size `(H, W)`: the native size rounded down to the patch stride, shrunk
    (aspect ratio kept) only when its grid has more than `max_tokens` patches.

    Args:
        height: Image height in pixels (at least `patch_size`).
        width: Image width in pixels (at least `patch_size`).
        patch_size: Patch stride `p` in pixels.
        max_tokens: Patch budget.

    Returns:
        `(H, W)`, multiples of `patch_size`, never larger than the image.

    Raises:
        ValueError: A side shorter than one patch.
    """
    _check_size_args(height, width, patch_size, max_tokens)
    if height < patch_size or width < patch_size:
        raise ValueError(f"image {height}x{width} has a side shorter than one patch ({patch_size} px)")
    scale = min(1.0, math.sqrt(max_tokens * patch_size**2 / (height * width)))
    h = max(1, math.floor(height * scale / patch_size))
    w = max(1, math.floor(width * scale / patch_size))
    # Float rounding, or the one-patch floor on a very thin image, can leave the grid over budget.
    while h * w > max_tokens and max(h, w) > 1:
        if h >= w:
            h -= 1
        else:
            w -= 1
    return h * patch_size, w * patch_size


def target_size(
    height: int, width: int, patch_size: int, max_tokens: int, policy: SizingPolicy = "navit"
) -> tuple[int, int]:
    """The `(H, W)` an image is encoded at under `policy` (`navit` or `naflex`)."""
    if policy == "navit":
        return navit_size(height, width, patch_size, max_tokens)
    if policy == "naflex":
        return naflex_size(height, width, patch_size, max_tokens)
    raise ValueError(f"policy={policy!r} is not supported; allowed: {', '.join(SIZING_POLICIES)}")


def native_sizing(encoder, max_patches: int | None = None) -> tuple[SizingPolicy, int]:
    """How `encoder` takes images at native resolution: `(policy, patch budget)`.

    A tower whose processor is a NaFlex one (SigLIP2's `Siglip2ImageProcessor`,
    `resize_mode='naflex'`) follows it: `naflex` under its `max_patches`. Any other follows
    `navit` under the patches of its native size. `max_patches` replaces the budget.
    """
    processor = encoder.get_image_processor()
    if processor is not None and processor.config.resize_mode == "naflex":
        return "naflex", max_patches or processor.config.max_patches
    h, w = encoder.config.grid_size
    return "navit", max_patches or h * w


def resize_to_budget(
    images: list[torch.Tensor], patch_size: int, max_tokens: int, policy: SizingPolicy = "navit"
) -> list[torch.Tensor]:
    """Resize each image `(C, H_i, W_i)` to its `target_size` (antialiased bilinear, as
    SigLIP2's processor; images already at their target size are returned as they are).

    Args:
        images: Float images `(C, H_i, W_i)` (normalised or not; resizing is linear).
        patch_size: Patch stride of the encoder (`encoder.config.input_stride`).
        max_tokens: Patch budget per image.
        policy: `navit` or `naflex`.

    Returns:
        The resized images, in order.
    """
    out = []
    for i, image in enumerate(images):
        if not isinstance(image, torch.Tensor) or image.ndim != 3 or not image.is_floating_point():
            raise ValueError(f"image {i} must be a float tensor (C, H, W), got {getattr(image, 'shape', type(image))}")
        size = target_size(int(image.shape[-2]), int(image.shape[-1]), patch_size, max_tokens, policy)
        if tuple(image.shape[-2:]) != size:
            image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
        out.append(image)
    return out
