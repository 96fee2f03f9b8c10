"""HF SigLIP vision tower (`SiglipModel`, `SiglipVisionModel`, the SigLIP tower of LLaVA
variants) to `VisionEncoder`; `TABLE` maps the names.

HF applies `post_layernorm` to every token, as our final `norm`. The MAP head's packed
`nn.MultiheadAttention` input projection is split into our query and fused key/value linears.
SigLIP has no image projection: `image_embeds` is the pooled output, as
`SiglipModel.get_image_features`. HF's `interpolate_pos_encoding` resizes bicubically to the
new grid without antialiasing, so the config turns antialiasing off.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..config import VisionConfig
from ..weights import WeightsError
from .hf_common import KeyTable, Transform, as_rows, fused_qkv, parse_config, select_tower, tower_fields

FAMILY = "HF SigLIP"
TOWER_PREFIXES = ("vision_model.",)
IGNORED_PREFIXES = ("text_model.", "logit_scale", "logit_bias")


def _split_in_proj(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`nn.MultiheadAttention`'s packed `(3D, D)` / `(3D,)` projection as our query (rows
    0..D) and fused key/value (rows D..3D) weights and biases."""
    D = weight.shape[-1]
    if weight.shape[0] != 3 * D or bias.shape != (3 * D,):
        raise WeightsError(
            f"{FAMILY}: head.attention.in_proj_weight {tuple(weight.shape)} / in_proj_bias {tuple(bias.shape)} "
            f"are not the packed (3D, D) / (3D,) projection"
        )
    # Copies, not views: a view of the packed tensor would make save_pretrained (safetensors) refuse it.
    return weight[:D].clone(), bias[:D].clone(), weight[D:].clone(), bias[D:].clone()


TABLE = KeyTable(
    renames={
        "embeddings.patch_embedding": "patch_embed.proj",
        "encoder.layers.{i}.self_attn.out_proj": "blocks.{i}.attn.proj",
        "encoder.layers.{i}.layer_norm1": "blocks.{i}.norm1",
        "encoder.layers.{i}.layer_norm2": "blocks.{i}.norm2",
        "encoder.layers.{i}.mlp.fc1": "blocks.{i}.mlp.fc1",
        "encoder.layers.{i}.mlp.fc2": "blocks.{i}.mlp.fc2",
        "post_layernorm": "norm",
        "head.attention.out_proj": "attn_pool.proj",
        "head.layernorm": "attn_pool.norm",
        "head.mlp.fc1": "attn_pool.mlp.fc1",
        "head.mlp.fc2": "attn_pool.mlp.fc2",
    },
    transforms=(
        Transform(("pos_embed",), ("embeddings.position_embedding.weight",), as_rows),
        *fused_qkv("encoder.layers.{i}.self_attn", ("q_proj", "k_proj", "v_proj")),
        Transform(("attn_pool.latent",), ("head.probe",), as_rows, optional=True),
        Transform(
            ("attn_pool.q.weight", "attn_pool.q.bias", "attn_pool.kv.weight", "attn_pool.kv.bias"),
            ("head.attention.in_proj_weight", "head.attention.in_proj_bias"),
            _split_in_proj,
            optional=True,
        ),
    ),
    optional=("head.",),
    ignored=("embeddings.position_ids",),
)


def config_from_hf(hf_config_or_dict: Any) -> VisionConfig:
    """Our config for an HF SigLIP vision tower.

    Args:
        hf_config_or_dict: A `SiglipConfig` / `SiglipVisionConfig` or its `config.json` dict.

    Returns:
        The `VisionConfig` (`pool='map'`, or `'none'` when `vision_use_head` is off).
    """
    from transformers import SiglipConfig, SiglipVisionConfig

    classes = {"siglip": SiglipConfig, "siglip_vision_model": SiglipVisionConfig}
    parsed = parse_config(hf_config_or_dict, classes, FAMILY)
    vision = getattr(parsed, "vision_config", parsed)
    return config_from_vision(vision, FAMILY)


def config_from_vision(vision: Any, family: str, image_size: int | None = None) -> VisionConfig:
    """Our config for a SigLIP `vision_config` whose position table is `image_size` a side
    (default: the config's; SigLIP2 states it as a patch count); antialiasing off, as HF
    resamples SigLIP's."""
    return VisionConfig(
        **tower_fields(vision, family, image_size),
        mlp_dim=vision.intermediate_size,
        qkv_bias=True,
        patch_bias=True,
        class_token=False,
        final_norm=True,
        pool="map" if getattr(vision, "vision_use_head", True) else "none",
        map_mlp_dim=vision.intermediate_size,
        pos_resample_antialias=False,
    )


def convert_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict from an HF SigLIP checkpoint (full model or vision tower).

    Args:
        state_dict: `SiglipModel` (`vision_model.*`; text keys and logit scale/bias are
            ignored) or `SiglipVisionModel` (with or without the `vision_model.` prefix).

    Returns:
        Tensors under `VisionEncoder` names.

    Raises:
        WeightsError: A key is missing, or a key is neither used nor on the ignored list.
    """
    return TABLE.convert(select_tower(state_dict, TOWER_PREFIXES, IGNORED_PREFIXES), FAMILY)
