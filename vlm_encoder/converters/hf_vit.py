"""HF ViT (`ViTModel`, and the `vit.` backbone of `ViTForImageClassification`) to
`VisionEncoder`; `TABLE` maps the names. The pooler (`pooler.dense` + tanh), when present,
becomes our `proj` (with bias, `proj_act='tanh'`).

Our `pooled` is the final-normed CLS token (HF `last_hidden_state[:, 0]`); with a pooler,
`image_embeds` is HF's `pooler_output`. The classifier of an image-classification checkpoint
and the mask token of a masked-image-modelling one are ignored. HF's `interpolate_pos_encoding`
resizes bicubically to the new grid without antialiasing, so the config turns it off.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..config import VisionConfig
from .hf_common import KeyTable, Transform, fused_qkv, parse_config, select_tower, split_position_table, tower_fields

FAMILY = "HF ViT"
TOWER_PREFIXES = ("vit.",)
IGNORED_PREFIXES = ("classifier.",)
TABLE = KeyTable(
    renames={
        "embeddings.patch_embeddings.projection": "patch_embed.proj",
        "encoder.layer.{i}.attention.output.dense": "blocks.{i}.attn.proj",
        "encoder.layer.{i}.layernorm_before": "blocks.{i}.norm1",
        "encoder.layer.{i}.layernorm_after": "blocks.{i}.norm2",
        "encoder.layer.{i}.intermediate.dense": "blocks.{i}.mlp.fc1",
        "encoder.layer.{i}.output.dense": "blocks.{i}.mlp.fc2",
        "layernorm": "norm",
        "pooler.dense": "proj",
    },
    transforms=(
        Transform(
            ("cls_token", "pos_embed"), ("embeddings.position_embeddings", "embeddings.cls_token"), split_position_table
        ),
        *fused_qkv("encoder.layer.{i}.attention.attention", ("query", "key", "value"), optional_bias=True),
    ),
    optional=("pooler.",),
    ignored=("embeddings.mask_token",),
)


def config_from_hf(hf_config_or_dict: Any, *, pooler: bool = False) -> VisionConfig:
    """Our config for an HF ViT.

    Args:
        hf_config_or_dict: A `ViTConfig` or its `config.json` dict.
        pooler: The checkpoint has the pooler (`pooler.dense`): add it as a projection with
            bias and tanh (`ViTModel(add_pooling_layer=True)`).

    Returns:
        The `VisionConfig`.
    """
    from transformers import ViTConfig

    c = parse_config(hf_config_or_dict, {"vit": ViTConfig}, FAMILY)
    if pooler and c.pooler_act != "tanh":
        raise ValueError(f"{FAMILY}: pooler_act={c.pooler_act!r} is not supported; supported: tanh")
    return VisionConfig(
        **tower_fields(c, FAMILY),
        mlp_dim=c.intermediate_size,
        qkv_bias=c.qkv_bias,
        patch_bias=True,
        class_token=True,
        final_norm=True,
        pool="cls",
        embed_dim=(c.pooler_output_size or c.hidden_size) if pooler else None,
        proj_bias=True,
        proj_act="tanh" if pooler else "none",
        pos_resample_antialias=False,
    )


def convert_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict from an HF ViT checkpoint.

    Args:
        state_dict: `ViTModel` keys, or `ViTForImageClassification` (`vit.*`; the
            classifier is ignored).

    Returns:
        Tensors under `VisionEncoder` names.

    Raises:
        WeightsError: A key is missing, or a key is neither used nor on the ignored list.
    """
    return TABLE.convert(select_tower(state_dict, TOWER_PREFIXES, IGNORED_PREFIXES), FAMILY)
