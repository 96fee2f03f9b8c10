"""HF SigLIP2 NaFlex vision tower (`Siglip2Model`, `Siglip2VisionModel`) to `VisionEncoder`.

SigLIP2 is the SigLIP tower (same blocks, post-norm, MAP head: see `hf_siglip`) with two
differences, both handled here:
  * the patch embedding is a `Linear` over flattened patches `(D, p*p*C)`, the patches
    flattened by the NaFlex processor in `(row in patch, column in patch, channel)` order;
    it becomes our convolution kernel `(D, C, p, p)`;
  * the learned position table is a square grid (`num_patches` rows) resized per image to
    its own grid `(h_i, w_i)` with antialiased *bilinear* interpolation: the config sets
    `pos_resample_mode='bilinear'`, `pos_resample_antialias=True`.

HF runs a padded batch `pixel_values (B, max_patches, C*p*p)` with `pixel_attention_mask` and
`spatial_shapes`; this package encodes the same images unpadded and packed
(`vlm_encoder.packing.encode_packed`), one `(C, H_i, W_i)` image each
(`naflex_patches_to_images` turns the processor's output back into those images).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ..config import VisionConfig
from ..weights import WeightsError
from . import hf_siglip
from .hf_common import parse_config, select_tower, square

FAMILY = "HF SigLIP2"
TOWER_PREFIXES = ("vision_model.",)
IGNORED_PREFIXES = ("text_model.", "logit_scale", "logit_bias")
PATCH_KEY = "embeddings.patch_embedding.weight"


def config_from_hf(hf_config_or_dict: Any) -> VisionConfig:
    """Our config for an HF SigLIP2 (NaFlex) vision tower.

    `image_size` is the grid of the learned table (`sqrt(num_patches)` patches a side); it
    is only the table's native size: images are encoded at their own sizes.

    Args:
        hf_config_or_dict: A `Siglip2Config` / `Siglip2VisionConfig` or its `config.json` dict.

    Returns:
        The `VisionConfig` (`pool='map'`, or `'none'` when `vision_use_head` is off).

    Raises:
        ValueError: Another model type, or a `num_patches` that is not a square number.
    """
    from transformers import Siglip2Config, Siglip2VisionConfig

    classes = {"siglip2": Siglip2Config, "siglip2_vision_model": Siglip2VisionConfig}
    parsed = parse_config(hf_config_or_dict, classes, FAMILY)
    vision = getattr(parsed, "vision_config", parsed)
    side = math.isqrt(int(vision.num_patches))
    if side * side != vision.num_patches:
        raise ValueError(f"{FAMILY}: num_patches={vision.num_patches} is not a square number; the position table is a square grid")
    image_size = side * square(vision.patch_size, "patch_size", FAMILY)
    config = hf_siglip.config_from_vision(vision, FAMILY, image_size)
    return config.replace(pos_resample_antialias=True, pos_resample_mode="bilinear")


def linear_patch_to_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """SigLIP2's patch `Linear` weight `(D, p*p*C)` (inputs in `(i, j, c)` order) as a
    convolution kernel `(D, C, p, p)`."""
    if weight.ndim != 2:
        raise WeightsError(
            f"{FAMILY}: {PATCH_KEY} has shape {tuple(weight.shape)}; a NaFlex tower has a Linear (D, p*p*C) "
            "(a convolution kernel means a fixed-resolution SigLIP2 checkpoint: load it as model_type 'siglip')"
        )
    D, fan_in = weight.shape
    p = math.isqrt(fan_in // in_channels) if fan_in % in_channels == 0 else 0
    if p == 0 or p * p * in_channels != fan_in:
        raise WeightsError(
            f"{FAMILY}: {PATCH_KEY} has shape {tuple(weight.shape)}, not (D, p*p*C) with C={in_channels}"
        )
    return weight.reshape(D, p, p, in_channels).permute(0, 3, 1, 2).contiguous()  # (D, C, p, p)


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], in_channels: int = 3) -> dict[str, torch.Tensor]:
    """Our state dict from an HF SigLIP2 checkpoint (full model or vision tower).

    The patch `Linear` is turned into a convolution kernel; the rest is SigLIP's key table.

    Args:
        state_dict: `Siglip2Model` (`vision_model.*`; text keys and logit scale/bias are
            ignored) or `Siglip2VisionModel` (with or without the `vision_model.` prefix).
        in_channels: Image channels `C` (to unflatten the patch weight).

    Returns:
        Tensors under `VisionEncoder` names.

    Raises:
        WeightsError: A key is missing, unknown, or the patch weight is not `(D, p*p*C)`.
    """
    tower = select_tower(state_dict, TOWER_PREFIXES, IGNORED_PREFIXES)
    if PATCH_KEY in tower:
        tower[PATCH_KEY] = linear_patch_to_conv(tower[PATCH_KEY], in_channels)
    return hf_siglip.TABLE.convert(tower, FAMILY)


def naflex_patches_to_images(
    pixel_values: torch.Tensor, spatial_shapes: torch.Tensor, patch_size: int, num_channels: int = 3
) -> list[torch.Tensor]:
    """The images behind a NaFlex processor batch, unpadded.

    Args:
        pixel_values: `(B, max_patches, p*p*C)` from `Siglip2ImageProcessor`.
        spatial_shapes: `(B, 2)` patch grids `(h_i, w_i)`.
        patch_size: `p`.
        num_channels: `C`.

    Returns:
        One `(C, h_i * p, w_i * p)` image per row, ready for `encode_packed`.
    """
    if pixel_values.ndim != 3 or pixel_values.shape[-1] != patch_size * patch_size * num_channels:
        raise ValueError(
            f"pixel_values must be (B, max_patches, p*p*C) = (B, N, {patch_size * patch_size * num_channels}), "
            f"got {tuple(pixel_values.shape)}"
        )
    if spatial_shapes.shape != (pixel_values.shape[0], 2):
        raise ValueError(f"spatial_shapes must be (B, 2) = ({pixel_values.shape[0]}, 2), got {tuple(spatial_shapes.shape)}")
    p, C = patch_size, num_channels
    images = []
    for row, (h, w) in zip(pixel_values, spatial_shapes.tolist()):
        if h * w > row.shape[0]:
            raise ValueError(f"spatial shape {h}x{w} has more patches than the {row.shape[0]} rows of pixel_values")
        patches = row[: h * w].reshape(h, w, p, p, C)  # (h, w, i, j, c)
        images.append(patches.permute(4, 0, 2, 1, 3).reshape(C, h * p, w * p))  # (C, H, W)
    return images
