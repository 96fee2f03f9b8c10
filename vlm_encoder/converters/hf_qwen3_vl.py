"""HF Qwen3-VL vision tower (`Qwen3VLVisionModel`, vision `model_type` "qwen3_vl_vision") to
`VisionEncoder`; `TABLE` maps the names (the MoE models' "qwen3_vl_moe_vision" is the same
class). Qwen3.5's tower (`Qwen3_5VisionModel`, "qwen3_5_vision", and its MoE models'
"qwen3_5_moe_vision") is the same tower, same names and options, without the DeepStack mergers:
read by the same table.

The tower is the one block with options, closer to a plain ViT than Qwen2.5-VL's: LayerNorm
(eps 1e-6) before attention and MLP, a plain `fc1` / GELU (tanh) / `fc2` MLP, no window attention,
no final norm, and two position schemes at once:
  * a learned square table of `num_position_embeddings` rows, resized per image to its grid
    by bilinear interpolation with `align_corners=True`, not antialiased
    (`pos_resample_mode='bilinear'`, `pos_resample_align_corners=True`); its side times
    `patch_size` is our `image_size`, where the table is used as it is;
  * 2D RoPE over integer `(h, w)` patch positions, the same rotary as Qwen2.5-VL's (`rope='eva'`,
    `half` layout, `(y, x)` axis order; `Qwen3VLVisionRotaryEmbedding`).

Token order: the reference takes patches grouped by `spatial_merge_size`^2 merge unit (its table
lookup decodes that order); our tokens stay row-major `(B, h*w, D)`, so every layer is the
reference's hidden state with its tokens put back in row-major order.

Patch embedding: the `Conv3d` over `temporal_patch_size` frames of a still image (its processor
repeats the image over those frames) is the `Conv2d` whose kernel is the 3D kernel summed over
the temporal axis (`hf_qwen2_5_vl._fold_temporal`); videos are not expressed.

The `merger.*` keys (the 2x2 patch merger, a LayerNorm before the merge) and the DeepStack
`deepstack_merger_list.{k}.*` keys (LayerNorm after the merge) are not part of the encoder: load
them as `qwen_merger` projectors with `projectors.load_qwen3_vl_merger`. A whole `qwen3_vl` /
`qwen3_vl_moe` / `qwen3_5` / `qwen3_5_moe` checkpoint keeps the tower under `visual.` or
`model.visual.`; either is read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..config import VisionConfig
from .hf_common import KeyTable, Transform, parse_config, square
from .hf_qwen2_5_vl import TOWER_PREFIXES, _fold_temporal, axial_rope_theta, tower_keys  # noqa: F401 (loading reads TOWER_PREFIXES)

FAMILY = "HF Qwen3-VL / Qwen3.5 vision"
# Whole-model config types: their `vision_config` is the tower's.
WHOLE_MODEL_TYPES = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")
IGNORED_PREFIXES = ("merger.", "deepstack_merger_list.")
ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}

TABLE = KeyTable(
    renames={
        "patch_embed.proj.bias": "patch_embed.proj.bias",
        "blocks.{i}.norm1": "blocks.{i}.norm1",
        "blocks.{i}.attn.qkv": "blocks.{i}.attn.qkv",
        "blocks.{i}.attn.proj": "blocks.{i}.attn.proj",
        "blocks.{i}.norm2": "blocks.{i}.norm2",
        "blocks.{i}.mlp.linear_fc1": "blocks.{i}.mlp.fc1",
        "blocks.{i}.mlp.linear_fc2": "blocks.{i}.mlp.fc2",
    },
    transforms=(
        Transform(("patch_embed.proj.weight",), ("patch_embed.proj.weight",), _fold_temporal),
        Transform(("pos_embed",), ("pos_embed.weight",), lambda table: table.unsqueeze(0)),  # (1, side*side, D)
    ),
    ignored=("rotary_pos_emb.inv_freq", "rotary_pos_emb.original_inv_freq"),
)


def vision_config_of(hf_config_or_dict: Any) -> Any:
    """The vision config (`Qwen3VLVisionConfig`, `Qwen3_5VisionConfig` or their MoE models')
    of a vision config, or of a whole `qwen3_vl` / `qwen3_vl_moe` / `qwen3_5` / `qwen3_5_moe` config."""
    import transformers as tr

    classes = {
        "qwen3_vl_vision": tr.Qwen3VLVisionConfig, "qwen3_vl": tr.Qwen3VLConfig,
        "qwen3_vl_moe_vision": tr.Qwen3VLMoeVisionConfig, "qwen3_vl_moe": tr.Qwen3VLMoeConfig,
        "qwen3_5_vision": tr.Qwen3_5VisionConfig, "qwen3_5": tr.Qwen3_5Config,
        "qwen3_5_moe_vision": tr.Qwen3_5MoeVisionConfig, "qwen3_5_moe": tr.Qwen3_5MoeConfig,
    }
    c = parse_config(hf_config_or_dict, classes, FAMILY)
    return c.vision_config if c.model_type in WHOLE_MODEL_TYPES else c


def config_from_hf(hf_config_or_dict: Any) -> VisionConfig:
    """Our config for a Qwen3-VL vision tower.

    Args:
        hf_config_or_dict: A `Qwen3VLVisionConfig`, a whole `Qwen3VLConfig`, or either's dict;
            likewise the MoE models' and Qwen3.5's (`qwen3_vl_moe`, `qwen3_5`, `qwen3_5_moe` and
            their `_vision` configs).

    Returns:
        The `VisionConfig` (`image_size`: the position table's side in patches; the tower takes
        any grid, the table resized to it).

    Raises:
        ValueError: A variant the encoder does not express (another activation or RoPE type,
            a position table that is not square).
    """
    c = vision_config_of(hf_config_or_dict)
    if c.hidden_act not in ACTIVATIONS:
        raise ValueError(f"{FAMILY}: hidden_act={c.hidden_act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    side = int(round(c.num_position_embeddings**0.5))
    if side * side != c.num_position_embeddings:
        raise ValueError(
            f"{FAMILY}: num_position_embeddings={c.num_position_embeddings} is not a square number; the table is a square grid"
        )
    return tower_config(
        patch_size=square(c.patch_size, "patch_size", FAMILY), table_side=side, in_channels=c.in_channels,
        width=c.hidden_size, depth=c.depth, num_heads=c.num_heads, mlp_dim=c.intermediate_size,
        act=ACTIVATIONS[c.hidden_act], rope_theta=axial_rope_theta(c, FAMILY),
        norm_eps=1e-6,  # the reference's LayerNorms are built with eps=1e-6
    )


def tower_config(
    *, patch_size: int, table_side: int, in_channels: int, width: int, depth: int, num_heads: int, mlp_dim: int,
    act: str, rope_theta: float, norm_eps: float,
) -> VisionConfig:
    """The `VisionConfig` of a Qwen3-VL / Qwen3.5 tower of this shape (transformers' and timm's
    `qwen3_vit`): `image_size` is the position table's side times the patch."""
    return VisionConfig(
        image_size=patch_size * table_side,
        patch_size=patch_size,
        in_channels=in_channels,
        width=width,
        depth=depth,
        num_heads=num_heads,
        mlp_dim=mlp_dim,
        act=act,
        qkv_bias=True,
        patch_bias=True,
        class_token=False,
        pos_embed="learned",
        pos_resample_mode="bilinear",
        pos_resample_antialias=False,
        pos_resample_align_corners=True,
        rope="eva",
        rope_theta=rope_theta,
        rope_layout="half",
        norm_eps=norm_eps,
        final_norm=False,
        pool="none",
    )


def convert_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict from a Qwen3-VL vision tower checkpoint.

    Args:
        state_dict: `Qwen3VLVisionModel` keys, bare or under `visual.` / `model.visual.` (then
            only the keys under that prefix are read: a whole model's language model is left
            out); the mergers' keys are left out (module docstring).

    Returns:
        Tensors under `VisionEncoder` names.

    Raises:
        WeightsError: A key is missing, or a key is neither used nor on the ignored list.
    """
    return TABLE.convert(tower_keys(state_dict, IGNORED_PREFIXES), FAMILY)
