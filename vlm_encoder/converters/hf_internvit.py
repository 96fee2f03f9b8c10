"""HF InternViT (`InternVLVisionModel`, `model_type` "internvl_vision", also the tower of an
`internvl` checkpoint, read by the loader under `model.vision_tower.`) to `VisionEncoder`;
`TABLE` maps the names.

InternViT is a pre-norm ViT with a CLS token, a learned position table with a CLS row (folded
into the CLS token), LayerScale on both branches (`lambda_1`, `lambda_2`), LayerNorm or RMSNorm
blocks (`norm_type`: InternViT-300M vs 6B), and, where configured (`use_qk_norm`, 6B), an
RMSNorm over all heads' queries and keys at once (`qk_norm_scope='width'`). With
`use_mean_pooling` (the default) there is no final norm and the pooled output is the mean of
the patch tokens (`gap`); otherwise a final LayerNorm and the CLS token. HF resamples the table
with plain (not antialiased) bicubic, as we do here.

The separate q / k / v projections become our fused `qkv` (with their biases when
`attention_bias`, else none: `qkv_bias=False`). The position table's CLS row is added to the CLS
token before the table is read (`_fold`). The mask token is ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..config import VisionConfig
from .hf_common import KeyTable, activation, fused_qkv, parse_config, select_tower, split_position_table, tower_shape

FAMILY = "HF InternViT"
TOWER_PREFIXES = ("vision_tower.", "model.vision_tower.", "internvl_vision.")
IGNORED_PREFIXES = ()
_LAYER = "encoder.layer.{i}"
TABLE = KeyTable(
    renames={
        "embeddings.patch_embeddings.projection": "patch_embed.proj",
        "embeddings.cls_token": "cls_token",  # plus the table's CLS row (see _fold)
        "embeddings.patch_positions": "pos_embed",
        f"{_LAYER}.layernorm_before": "blocks.{i}.norm1",
        f"{_LAYER}.attention.q_norm": "blocks.{i}.attn.q_norm",
        f"{_LAYER}.attention.k_norm": "blocks.{i}.attn.k_norm",
        f"{_LAYER}.attention.projection_layer": "blocks.{i}.attn.proj",
        f"{_LAYER}.lambda_1": "blocks.{i}.ls1.gamma",
        f"{_LAYER}.layernorm_after": "blocks.{i}.norm2",
        f"{_LAYER}.mlp.fc1": "blocks.{i}.mlp.fc1",
        f"{_LAYER}.mlp.fc2": "blocks.{i}.mlp.fc2",
        f"{_LAYER}.lambda_2": "blocks.{i}.ls2.gamma",
        "layernorm": "norm",
    },
    transforms=fused_qkv(f"{_LAYER}.attention", ("q_proj", "k_proj", "v_proj"), optional_bias=True),
    # Which of these a checkpoint must hold follows from its config: load_state_dict_strict checks.
    optional=("embeddings.patch_positions", f"{_LAYER}.attention.q_norm", f"{_LAYER}.attention.k_norm", "layernorm"),
    ignored=("embeddings.mask_token",),
)
_QK_NORM_EPS = 1e-6  # HF's InternVLVisionRMSNorm default, which q_norm / k_norm use


def config_from_hf(hf_config_or_dict: Any) -> VisionConfig:
    """Our config for an HF InternViT.

    Args:
        hf_config_or_dict: An `InternVLVisionConfig` or its dict.

    Returns:
        The `VisionConfig`.

    Raises:
        ValueError: A variant the encoder does not express: non-square sizes, qk-norm with
            LayerNorm blocks or an epsilon other than 1e-6 (HF's qk-norm is always an RMSNorm
            of eps 1e-6), RMSNorm blocks with a final LayerNorm (`use_mean_pooling=False`).
    """
    from transformers import InternVLVisionConfig

    c = parse_config(hf_config_or_dict, {"internvl_vision": InternVLVisionConfig}, FAMILY)
    norm_type = {"layer_norm": "layernorm", "rms_norm": "rmsnorm"}.get(c.norm_type)
    if norm_type is None:
        raise ValueError(f"{FAMILY}: norm_type={c.norm_type!r} is not supported; supported: layer_norm, rms_norm")
    if c.use_qk_norm and (norm_type != "rmsnorm" or c.layer_norm_eps != _QK_NORM_EPS):
        raise ValueError(
            f"{FAMILY}: use_qk_norm needs norm_type='rms_norm' and layer_norm_eps={_QK_NORM_EPS} "
            f"(HF's qk-norm is an RMSNorm of that eps), got {c.norm_type!r}, {c.layer_norm_eps}"
        )
    if not c.use_mean_pooling and norm_type != "layernorm":
        raise ValueError(f"{FAMILY}: use_mean_pooling=False with norm_type='rms_norm' is not supported (HF's final norm is then a LayerNorm)")
    return VisionConfig(
        **tower_shape(c, FAMILY),
        mlp_dim=c.intermediate_size,
        act=activation(c.hidden_act, FAMILY),
        qkv_bias=c.attention_bias,
        class_token=True,
        pos_embed="learned" if c.use_absolute_position_embeddings else "none",
        qk_norm=c.use_qk_norm,
        qk_norm_scope="width",
        norm_type=norm_type,
        final_norm=not c.use_mean_pooling,
        norm_eps=c.layer_norm_eps,
        layer_scale_init=float(c.layer_scale_init_value),
        pool="gap" if c.use_mean_pooling else "cls",
        pos_resample_antialias=False,
    )


def convert_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict from an HF InternViT checkpoint.

    Args:
        state_dict: `InternVLVisionModel` keys (or under `vision_tower.` /
            `model.vision_tower.` of an `internvl` model; the loader strips those itself).

    Returns:
        Tensors under `VisionEncoder` names.

    Raises:
        WeightsError: A key is missing, or a key is neither used nor on the ignored list.
    """
    return TABLE.convert(_fold(select_tower(state_dict, TOWER_PREFIXES, IGNORED_PREFIXES)), FAMILY)


def _fold(tower: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The position table `(1, 1+N, D)` split: its CLS row added to the CLS token, the patch
    rows under `embeddings.patch_positions`."""
    out = dict(tower)
    if "embeddings.position_embeddings" in out and "embeddings.cls_token" in out:
        out["embeddings.cls_token"], out["embeddings.patch_positions"] = split_position_table(
            out.pop("embeddings.position_embeddings"), out["embeddings.cls_token"]
        )
    return out
