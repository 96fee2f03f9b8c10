"""HF DINOv2 (`Dinov2Model`, `Dinov2WithRegistersModel`, and their image-classification
wrappers) to `VisionEncoder`; `TABLE` maps the names. Register tokens have no position row.

`mlp.weights_in` is HF's on-disk packing of SwiGLU's gate then up projection, which is our
`SwiGLU.fc1` layout (`silu(first half) * second half`). The pooled output is the CLS token
after the final LayerNorm (HF `pooler_output`). The mask token and a classifier are ignored.
HF resizes the position table bicubically (in float32) to the new grid size (the original
DINOv2 scales by a factor instead); `Dinov2Model` without antialiasing, but
`Dinov2WithRegistersModel` with `antialias=True` (which changes the bicubic kernel even when
upsampling). The config follows each exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..config import VisionConfig
from . import hf_vit
from .hf_common import KeyTable, Transform, as_rows, parse_config, select_tower, tower_fields

FAMILY = "HF DINOv2"
TOWER_PREFIXES = ("dinov2.", "dinov2_with_registers.")
IGNORED_PREFIXES = ("classifier.",)
TABLE = KeyTable(
    renames={
        "embeddings.patch_embeddings.projection": "patch_embed.proj",
        "encoder.layer.{i}.attention.output.dense": "blocks.{i}.attn.proj",
        "encoder.layer.{i}.norm1": "blocks.{i}.norm1",
        "encoder.layer.{i}.norm2": "blocks.{i}.norm2",
        "encoder.layer.{i}.layer_scale1.lambda1": "blocks.{i}.ls1.gamma",
        "encoder.layer.{i}.layer_scale2.lambda1": "blocks.{i}.ls2.gamma",
        "encoder.layer.{i}.mlp.fc1": "blocks.{i}.mlp.fc1",  # the MLP's, or SwiGLU's below
        "encoder.layer.{i}.mlp.fc2": "blocks.{i}.mlp.fc2",
        "encoder.layer.{i}.mlp.weights_in": "blocks.{i}.mlp.fc1",
        "encoder.layer.{i}.mlp.weights_out": "blocks.{i}.mlp.fc2",
        "layernorm": "norm",
    },
    transforms=(  # HF ViT's embeddings and attention, plus the registers
        *hf_vit.TABLE.transforms,
        Transform(("register_tokens",), ("embeddings.register_tokens",), as_rows, optional=True),
    ),
    optional=("encoder.layer.{i}.mlp.",),
    ignored=("embeddings.mask_token",),
)


def swiglu_hidden_dim(width: int, mlp_ratio: float) -> int:
    """HF / DINOv2's SwiGLU hidden width: two thirds of `width * mlp_ratio`, rounded up to 8."""
    hidden = int(width * mlp_ratio)
    return (int(hidden * 2 / 3) + 7) // 8 * 8


def config_from_hf(hf_config_or_dict: Any) -> VisionConfig:
    """Our config for an HF DINOv2 (with or without registers).

    Args:
        hf_config_or_dict: A `Dinov2Config` / `Dinov2WithRegistersConfig` or its dict.

    Returns:
        The `VisionConfig`.
    """
    from transformers import Dinov2Config, Dinov2WithRegistersConfig

    classes = {"dinov2": Dinov2Config, "dinov2_with_registers": Dinov2WithRegistersConfig}
    c = parse_config(hf_config_or_dict, classes, FAMILY)
    registers = c.model_type == "dinov2_with_registers"
    swiglu = bool(c.use_swiglu_ffn)
    return VisionConfig(
        **tower_fields(c, FAMILY),
        mlp_dim=swiglu_hidden_dim(c.hidden_size, c.mlp_ratio) if swiglu else int(c.hidden_size * c.mlp_ratio),
        mlp_type="swiglu" if swiglu else "mlp",
        qkv_bias=c.qkv_bias,
        patch_bias=True,
        class_token=True,
        num_register_tokens=c.num_register_tokens if registers else 0,
        final_norm=True,
        layer_scale_init=float(c.layerscale_value),
        pool="cls",
        pos_resample_antialias=registers,
    )


def convert_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict from an HF DINOv2 checkpoint (with or without registers).

    Args:
        state_dict: `Dinov2Model` / `Dinov2WithRegistersModel` keys, or their
            image-classification wrappers (`dinov2.*`; the classifier is ignored).

    Returns:
        Tensors under `VisionEncoder` names.

    Raises:
        WeightsError: A key is missing, or a key is neither used nor on the ignored list.
    """
    return TABLE.convert(select_tower(state_dict, TOWER_PREFIXES, IGNORED_PREFIXES), FAMILY)
