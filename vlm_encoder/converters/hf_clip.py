"""HF CLIP vision tower (`CLIPModel`, `CLIPVisionModel`, `CLIPVisionModelWithProjection`,
and the CLIP tower of LLaVA) to `VisionEncoder`; `TABLE` maps the names.

The CLS row of HF's position table is folded into our `cls_token`. HF applies
`post_layernorm` to the pooled CLS token only. LayerNorm works per token, so our final `norm`
followed by CLS pooling gives the same pooled vector; the tokens that `encoder(..., norm=False)`
returns are the raw block outputs, as HF's `hidden_states`. HF's `interpolate_pos_encoding`
resizes the table bicubically to the new grid with no antialiasing, so the config turns
antialiasing off.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..config import VisionConfig
from .hf_common import KeyTable, Transform, fused_qkv, parse_config, select_tower, split_position_table, tower_fields

FAMILY = "HF CLIP"
TOWER_PREFIXES = ("vision_model.",)
IGNORED_PREFIXES = ("text_model.", "text_projection.", "logit_scale")
TABLE = KeyTable(
    renames={
        "embeddings.patch_embedding.weight": "patch_embed.proj.weight",  # no bias
        "pre_layrnorm": "norm_pre",
        "encoder.layers.{i}.self_attn.out_proj": "blocks.{i}.attn.proj",
        "encoder.layers.{i}.layer_norm1": "blocks.{i}.norm1",
        "encoder.layers.{i}.layer_norm2": "blocks.{i}.norm2",
        "encoder.layers.{i}.mlp.fc1": "blocks.{i}.mlp.fc1",
        "encoder.layers.{i}.mlp.fc2": "blocks.{i}.mlp.fc2",
        "post_layernorm": "norm",
        "visual_projection.weight": "proj.weight",
    },
    transforms=(
        Transform(
            ("cls_token", "pos_embed"),
            ("embeddings.position_embedding.weight", "embeddings.class_embedding"),
            split_position_table,
        ),
        *fused_qkv("encoder.layers.{i}.self_attn", ("q_proj", "k_proj", "v_proj")),
    ),
    optional=("visual_projection",),
    ignored=("embeddings.position_ids",),  # a buffer older transformers saved
)


def config_from_hf(hf_config_or_dict: Any, *, projection: bool | None = None) -> VisionConfig:
    """Our config for an HF CLIP vision tower.

    Args:
        hf_config_or_dict: A `CLIPConfig` / `CLIPVisionConfig` or its `config.json` dict.
        projection: Include the image projection (`embed_dim = projection_dim`). Default:
            yes for a full `CLIPConfig`, no for a `CLIPVisionConfig` (which carries a
            `projection_dim` even when the checkpoint has no projection; pass `True` for
            `CLIPVisionModelWithProjection`).

    Returns:
        The `VisionConfig`.
    """
    from transformers import CLIPConfig, CLIPVisionConfig

    parsed = parse_config(hf_config_or_dict, {"clip": CLIPConfig, "clip_vision_model": CLIPVisionConfig}, FAMILY)
    return tower_config(parsed, projection, FAMILY)


def tower_config(parsed: Any, projection: bool | None, family: str) -> VisionConfig:
    """Our config for a parsed CLIP-layout vision config (CLIP's, or a family that reuses its
    tower, e.g. MetaCLIP 2): a whole model's config or the vision config alone."""
    vision = getattr(parsed, "vision_config", parsed)
    if projection is None:
        projection = vision is not parsed
    return VisionConfig(
        **tower_fields(vision, family),
        mlp_dim=vision.intermediate_size,
        qkv_bias=True,
        patch_bias=False,
        class_token=True,
        norm_pre=True,
        final_norm=True,
        pool="cls",
        embed_dim=parsed.projection_dim if projection else None,
        proj_bias=False,
        pos_resample_antialias=False,
    )


def convert_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict from an HF CLIP checkpoint (full model or vision tower).

    Args:
        state_dict: `CLIPModel` (`vision_model.*`, `visual_projection.*`; text keys are
            ignored), `CLIPVisionModelWithProjection`, or `CLIPVisionModel` (with or
            without the `vision_model.` prefix).

    Returns:
        Tensors under `VisionEncoder` names.

    Raises:
        WeightsError: A key is missing, or a key is neither used nor on the ignored list.
    """
    return TABLE.convert(select_tower(state_dict, TOWER_PREFIXES, IGNORED_PREFIXES), FAMILY)
