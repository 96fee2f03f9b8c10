"""HF DINOv3 ViT (`DINOv3ViTModel`, `model_type` "dinov3_vit") to `VisionEncoder`; `TABLE`
maps the names.

DINOv3 has no position table: its patches rotate their queries and keys with 2D RoPE over
patch centres in [-1, 1] (`rope='dinov3'`; the training-time shift / jitter / rescale of the
coordinates is off at inference, as in HF's eval mode); CLS and registers are not rotated.
LayerScale on both branches, the pooled output is the CLS token after the final LayerNorm (HF
`pooler_output`).

Two layouts are packed on the way in (`_pack`): the separate q / k / v projections become our
fused `qkv` (an absent bias, by default the key's, is zero, as HF computes it), and the gated
MLP's `gate_proj` / `up_proj` become SwiGLU's packed `fc1` (gate first). Blocks are
`layer.{i}` on disk and `model.layer.{i}` in a live model's `state_dict()`: both are read. The
mask token is ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..config import VisionConfig
from ..weights import WeightsError
from .hf_common import KeyTable, activation, fused_qkv, parse_config, select_tower, tower_shape

FAMILY = "HF DINOv3 ViT"
TOWER_PREFIXES = ("dinov3_vit.", "model.dinov3_vit.")
IGNORED_PREFIXES = ("classifier.",)
_LAYER = "layer.{i}"  # on disk (hub checkpoints, `save_pretrained`); `model.layer.{i}` in memory
TABLE = KeyTable(
    renames={
        "embeddings.patch_embeddings": "patch_embed.proj",
        "embeddings.cls_token": "cls_token",
        "embeddings.register_tokens": "register_tokens",
        f"{_LAYER}.norm1": "blocks.{i}.norm1",
        f"{_LAYER}.attention.o_proj": "blocks.{i}.attn.proj",
        f"{_LAYER}.layer_scale1.lambda1": "blocks.{i}.ls1.gamma",
        f"{_LAYER}.norm2": "blocks.{i}.norm2",
        f"{_LAYER}.mlp.up_proj": "blocks.{i}.mlp.fc1",  # the plain MLP's, or ...
        f"{_LAYER}.mlp.packed_in": "blocks.{i}.mlp.fc1",  # ... SwiGLU's gate + up (see _pack)
        f"{_LAYER}.mlp.down_proj": "blocks.{i}.mlp.fc2",
        f"{_LAYER}.layer_scale2.lambda1": "blocks.{i}.ls2.gamma",
        "norm": "norm",
    },
    transforms=fused_qkv(f"{_LAYER}.attention", ("q_proj", "k_proj", "v_proj"), optional_bias=True),
    optional=("embeddings.register_tokens", f"{_LAYER}.mlp."),  # which MLP: load_state_dict_strict checks
    ignored=("embeddings.mask_token",),
)


def config_from_hf(hf_config_or_dict: Any) -> VisionConfig:
    """Our config for an HF DINOv3 ViT.

    Args:
        hf_config_or_dict: A `DINOv3ViTConfig` or its dict.

    Returns:
        The `VisionConfig`.

    Raises:
        ValueError: A variant the encoder does not express (bias-free MLP or output
            projection, a gated MLP other than SiLU).
    """
    from transformers import DINOv3ViTConfig

    c = parse_config(hf_config_or_dict, {"dinov3_vit": DINOv3ViTConfig}, FAMILY)
    if not (c.mlp_bias and c.proj_bias):
        raise ValueError(f"{FAMILY}: mlp_bias=False / proj_bias=False is not supported (the encoder's MLP and attention output have biases)")
    if c.use_gated_mlp and c.hidden_act != "silu":
        raise ValueError(f"{FAMILY}: a gated MLP with hidden_act={c.hidden_act!r} is not supported (only SiLU: SwiGLU)")
    return VisionConfig(
        **tower_shape(c, FAMILY),
        mlp_dim=c.intermediate_size,
        mlp_type="swiglu" if c.use_gated_mlp else "mlp",
        act="gelu" if c.use_gated_mlp else activation(c.hidden_act, FAMILY),  # SwiGLU's SiLU is built in
        qkv_bias=bool(c.query_bias or c.key_bias or c.value_bias),
        class_token=True,
        num_register_tokens=c.num_register_tokens,
        pos_embed="none",
        rope="dinov3",
        rope_theta=float(c.rope_theta),
        rope_layout="half",
        final_norm=True,
        norm_eps=c.layer_norm_eps,
        layer_scale_init=float(c.layerscale_value),
        pool="cls",
    )


def _pack(tower: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF's separate projections in our packed layouts (see the module docstring)."""
    out = {"layer." + k[len("model.layer.") :] if k.startswith("model.layer.") else k: v for k, v in tower.items()}
    if out.get("embeddings.register_tokens", torch.ones(1)).numel() == 0:
        del out["embeddings.register_tokens"]  # HF keeps an empty (1, 0, D) table without registers
    for key in [k for k in out if k.endswith(".attention.q_proj.weight")]:
        attn = key[: -len("q_proj.weight")]
        biases = [f"{attn}{name}.bias" for name in ("q_proj", "k_proj", "v_proj")]
        if any(b in out for b in biases):
            width = out[key].shape[0]
            for b in biases:
                out.setdefault(b, out[key].new_zeros(width))
    for key in [k for k in out if ".mlp.gate_proj." in k]:
        up = key.replace(".gate_proj.", ".up_proj.")
        if up not in out:
            raise WeightsError(f"{FAMILY} checkpoint has {key!r} but not {up!r}")
        out[key.replace(".gate_proj.", ".packed_in.")] = torch.cat([out.pop(key), out.pop(up)], dim=0)
    return out


def convert_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict from an HF DINOv3 ViT checkpoint.

    Args:
        state_dict: `DINOv3ViTModel` keys (or under `dinov3_vit.` in a wrapper; a classifier
            is ignored).

    Returns:
        Tensors under `VisionEncoder` names.

    Raises:
        WeightsError: A key is missing, or a key is neither used nor on the ignored list.
    """
    return TABLE.convert(_pack(select_tower(state_dict, TOWER_PREFIXES, IGNORED_PREFIXES)), FAMILY)
