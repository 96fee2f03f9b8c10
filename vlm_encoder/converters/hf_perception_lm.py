"""The vision tower of a whole transformers PerceptionLM checkpoint (`model_type` "perception_lm")
to `VisionEncoder`.

PerceptionLM's tower is Meta's Perception Encoder served by timm inside transformers'
`TimmWrapperModel`: `vision_config` names a timm architecture (`vit_pe_core_large_patch14_336`
...) and the `model_args` the wrapper passes to `timm.create_model(..., num_classes=0)`. This
module adds no second PE converter: it builds that timm model on the `meta` device (no memory,
no weights) so that `timm_eva.config_from_timm_eva` reads the architecture from the instance, and
maps the whole checkpoint's names to timm's strictly: the tower is under `model.vision_tower.`
(transformers >= 4.52 on disk) or `vision_tower.` (never both), every key of it under
`timm_model.` (the wrapper's attribute); other keys must be the language model's or the
projector's (`loading.check_llava_keys`); anything else is an error naming the keys. `timm_eva.convert_state_dict`
does the rest.

What the language model receives (`get_image_features`): the timm `forward_features` output
(the final norm, when `use_post_transformer_norm` builds one), CLS dropped when
`vision_use_cls_token`, then the `mlp_pool` connector (`converters.hf_connectors.
load_perception_lm_connector`). `load_vision_side` assembles that.

Preprocessing: `PerceptionLMImageProcessor` resizes to a thumbnail of `tile_size` (448 px) plus up
to `max_num_tiles` tiles of that size picked by aspect ratio (`thumb+tile`), bicubic, mean = std =
0.5; the encoder's processor is the thumbnail's (one tile at the tower's size); the tiling is not
expressed: pass tiles `(N, C, S, S)` yourself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..config import VisionConfig
from ..weights import WeightsError
from . import timm_eva

FAMILY = "HF PerceptionLM vision (timm PE)"
TOWER_PREFIXES = ("model.vision_tower.", "vision_tower.")
TIMM_PREFIX = "timm_model."  # TimmWrapperModel's attribute


def vision_config_of(config: Mapping[str, Any]) -> dict[str, Any]:
    """The `vision_config` of a whole `perception_lm` config dict (a `timm_wrapper` config).

    Raises:
        ValueError: Not a `perception_lm` config, or a vision config that is not a timm wrapper.
    """
    if config.get("model_type") != "perception_lm":
        raise ValueError(f"model_type={config.get('model_type')!r} is not a PerceptionLM; expected 'perception_lm'")
    vision = dict(config.get("vision_config") or {})
    if vision.get("model_type", "timm_wrapper") != "timm_wrapper" or "architecture" not in vision:
        raise ValueError(f"PerceptionLM vision_config of model_type={vision.get('model_type')!r} without a timm "
                         "architecture: only transformers' TimmWrapperModel (a timm Eva / PE tower) is expressed")
    return vision


def timm_tower(config: Mapping[str, Any]) -> nn.Module:
    """The timm model `TimmWrapperModel` builds for a whole `perception_lm` config, on the `meta`
    device (its architecture, no weights).

    Raises:
        UnsupportedTimmModel: An architecture not built by timm's `eva.py`.
    """
    import timm

    vision = vision_config_of(config)
    name = vision["architecture"]
    if not timm_eva.is_eva(name):
        raise timm_eva.UnsupportedTimmModel(f"PerceptionLM tower {name!r} is not a timm Eva (PE) model")
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, num_classes=0, **(vision.get("model_args") or {}))


def config_from_hf(config: Mapping[str, Any]) -> VisionConfig:
    """The tower's `VisionConfig`, read from the timm instance its `vision_config` builds.

    Raises:
        ValueError: Not a PerceptionLM with a timm tower, or `vision_use_cls_token` and the
            tower's class token disagree (the reference would drop a patch, or feed the CLS).
        UnsupportedTimmModel: What the encoder does not express, by name.
    """
    vision = timm_eva.config_from_timm_eva(timm_tower(config))
    if bool(config.get("vision_use_cls_token", True)) != vision.class_token:
        raise ValueError(f"PerceptionLM vision_use_cls_token={config.get('vision_use_cls_token', True)} with a tower "
                         f"{'with' if vision.class_token else 'without'} a class token is not expressed")
    return vision


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], config: VisionConfig) -> dict[str, torch.Tensor]:
    """Map the tower's state dict (`TimmWrapperModel`'s: every key under `timm_model.`; `load_encoder`
    strips the whole checkpoint's `model.vision_tower.` / `vision_tower.` first, refusing keys
    outside the tower, language model and projector) to `VisionEncoder` names.

    Raises:
        WeightsError: Keys outside `timm_model.`, or timm keys the `timm_eva` table does not map.
    """
    outside = sorted(k for k in state_dict if not k.startswith(TIMM_PREFIX))
    if outside:
        raise WeightsError(f"{FAMILY}: tower keys outside {TIMM_PREFIX!r}: {outside[:10]}")
    return timm_eva.convert_state_dict({k[len(TIMM_PREFIX):]: v for k, v in state_dict.items()}, config)


def image_processor(config: VisionConfig, preprocessor: Mapping[str, Any] | None) -> Any:
    """The thumbnail step of `PerceptionLMImageProcessor` at the tower's size: bicubic resize,
    mean / std from `preprocessor_config.json` (IMAGENET_STANDARD 0.5 without one)."""
    from ..processing import ImageProcessor, ProcessorConfig

    data = dict(preprocessor or {})
    return ImageProcessor(ProcessorConfig(
        resize_mode="exact", size=config.image_size, interpolation="bicubic", backend="torchvision",
        mean=tuple(data.get("image_mean", (0.5,) * 3)), std=tuple(data.get("image_std", (0.5,) * 3)),
    ))
