"""Images in, pixels out, for the pictures, through the package's `ImageProcessor`.

The encoder's own `image_processor` is used when a loader set one (pretrained towers),
else `ImageProcessor.default_for(config)`. The figures draw each image exactly as the
encoder saw it: after the processor's resize and crop, before normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ..processing import ImageProcessor, load_image
from ..processing.config import ProcessorConfig
from ..processing.convert import to_rgb
from ..validation import check_positive_int

__all__ = ["image_size_of", "load_image", "native_processor", "prepare_images", "prepare_native_images", "processor_for"]


def processor_for(encoder, image_size: tuple[int, int] | None = None) -> ImageProcessor:
    """The processor for `encoder`, optionally producing `image_size` `(H, W)` instead.

    A different size keeps the processor's resize mode: a processor that crops then crops
    to `image_size` after resizing to it, one that squashes squashes to it.
    """
    processor = getattr(encoder, "image_processor", None) or ImageProcessor.default_for(encoder.config)
    if processor.config.resize_mode in ("naflex", "smart_resize", "gemma4", "kimi_k25"):  # one size a batch: squash
        return processor.at_size(image_size or encoder.config.image_size)
    if image_size is None:
        return processor
    size = (int(image_size[0]), int(image_size[1]))
    cfg = processor.config
    return ImageProcessor(cfg.replace(size=size, crop_size=size if cfg.crop_size is not None else None))


def prepare_images(
    images: Sequence[Image.Image | np.ndarray], encoder, image_size: tuple[int, int] | None = None
) -> tuple[torch.Tensor, list[np.ndarray]]:
    """Preprocess images for `encoder`, keeping what it sees for drawing.

    Args:
        images: PIL images or uint8 arrays `(H, W, 3)` (what `ImageProcessor` accepts).
        encoder: The `VisionEncoder`.
        image_size: Input `(H, W)`; default the processor's (the encoder's native size).

    Returns:
        Pixels `(B, 3, H, W)` float32 normalised, and the resized/cropped images `(H, W, 3)`
        uint8 exactly as the encoder saw them (to draw beside the feature maps).
    """
    processor = processor_for(encoder, image_size)
    pixels = processor(list(images))  # (B, 3, H, W)
    crops = []
    for image in images:
        seen = processor.preprocess_one(image).float()  # (3, H, W), 0-255 scale
        crops.append(seen.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    return pixels, crops


def image_size_of(image: Image.Image | np.ndarray, config: ProcessorConfig) -> tuple[int, int]:
    """`(H, W)` of an image as the processor reads it (after EXIF orientation)."""
    return tuple(to_rgb(image, config.background, config.exif_transpose).shape[:2])


def native_processor(encoder, image: Image.Image | np.ndarray, max_patches: int, policy: str = "navit") -> ImageProcessor:
    """A processor that resizes `image` to its native-resolution size (no crop).

    Args:
        encoder: The `VisionEncoder`.
        image: The image.
        max_patches: Patch budget (`navit`: shrink only when over it; `naflex`: fill it).
        policy: `navit` or `naflex` (`vlm_encoder.packing.target_size`; a SigLIP2 tower's
            NaFlex processor asks for `naflex`, see `packing.native_sizing`).
    """
    from ..packing import target_size

    base = processor_for(encoder)
    height, width = image_size_of(image, base.config)
    return base.at_size(target_size(height, width, encoder.config.input_stride, max_patches, policy))


def prepare_native_images(
    images: Sequence[Image.Image | np.ndarray], encoder, max_patches: int, policy: str = "navit"
) -> tuple[list[torch.Tensor], list[np.ndarray], list[ImageProcessor]]:
    """Preprocess each image at its own aspect ratio (see `native_processor`).

    Returns:
        Pixels `(3, H_i, W_i)` per image (what `encode_packed` takes), the images as the
        encoder saw them `(H_i, W_i, 3)` uint8, and each image's processor.
    """
    check_positive_int(max_patches, "max_patches")
    pixels, crops, processors = [], [], []
    for image in images:
        processor = native_processor(encoder, image, max_patches, policy)
        pixels.append(processor([image])[0])  # (3, H_i, W_i)
        seen = processor.preprocess_one(image).float()  # (3, H_i, W_i), 0-255 scale
        crops.append(seen.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
        processors.append(processor)
    return pixels, crops, processors
