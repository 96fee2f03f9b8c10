"""HF DINOv2 (`Dinov2Model`, `Dinov2WithRegistersModel`, and their image-classification
wrappers) to `VisionEncoder`.

Mapping:
  embeddings.cls_token + position row 0                 -> cls_token
  embeddings.position_embeddings rows 1..               -> pos_embed (patches only)
  embeddings.register_tokens                            -> register_tokens (no position)
  embeddings.patch_embeddings.projection                -> patch_embed.proj
  encoder.layer.i.attention.attention.{query,key,value} -> blocks.i.attn.qkv (fused)
  encoder.layer.i.attention.output.dense                -> blocks.i.attn.proj
  encoder.layer.i.norm{1,2}                             -> blocks.i.norm{1,2}
  encoder.layer.i.layer_scale{1,2}.lambda1              -> blocks.i.ls{1,2}.gamma
  encoder.layer.i.mlp.fc{1,2}                           -> blocks.i.mlp.fc{1,2}
  encoder.layer.i.mlp.weights_{in,out} (SwiGLU)         -> blocks.i.mlp.fc{1,2}
  layernorm                                             -> norm

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
from .hf_common import KeyReader, activation, fuse_qkv, hf_config, select_tower, split_position_table, square

FAMILY = "HF DINOv2"
TOWER_PREFIXES = ("dinov2.", "dinov2_with_registers.")
IGNORED_PREFIXES = ("classifier.",)


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

    model_type = hf_config_or_dict.get("model_type") if isinstance(hf_config_or_dict, Mapping) else getattr(hf_config_or_dict, "model_type", None)
    classes = {"dinov2": Dinov2Config, "dinov2_with_registers": Dinov2WithRegistersConfig}
    if model_type not in classes:
        raise ValueError(f"{FAMILY}: expected a config with model_type 'dinov2' or 'dinov2_with_registers', got {model_type!r}")
    c = hf_config(hf_config_or_dict, classes[model_type])
    swiglu = bool(c.use_swiglu_ffn)
    return VisionConfig(
        image_size=square(c.image_size, "image_size", FAMILY),
        patch_size=square(c.patch_size, "patch_size", FAMILY),
        in_channels=c.num_channels,
        width=c.hidden_size,
        depth=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        mlp_dim=swiglu_hidden_dim(c.hidden_size, c.mlp_ratio) if swiglu else int(c.hidden_size * c.mlp_ratio),
        mlp_type="swiglu" if swiglu else "mlp",
        act=activation(c.hidden_act, FAMILY),
        qkv_bias=c.qkv_bias,
        patch_bias=True,
        class_token=True,
        num_register_tokens=getattr(c, "num_register_tokens", 0) if model_type == "dinov2_with_registers" else 0,
        final_norm=True,
        norm_eps=c.layer_norm_eps,
        layer_scale_init=float(c.layerscale_value),
        pool="cls",
        pos_resample_antialias=model_type == "dinov2_with_registers",
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
    tower, _ = select_tower(state_dict, TOWER_PREFIXES, IGNORED_PREFIXES)
    r = KeyReader(tower, FAMILY)
    out: dict[str, torch.Tensor] = {}
    out["cls_token"], out["pos_embed"] = split_position_table(
        r.take("embeddings.position_embeddings"), r.take("embeddings.cls_token")
    )
    out["patch_embed.proj.weight"], out["patch_embed.proj.bias"] = r.take_linear("embeddings.patch_embeddings.projection")
    if r.has("embeddings.register_tokens"):
        registers = r.take("embeddings.register_tokens")
        out["register_tokens"] = registers.reshape(1, -1, registers.shape[-1])
    r.ignore("embeddings.mask_token")
    for i in range(r.count_layers("encoder.layer.")):
        src, dst = f"encoder.layer.{i}", f"blocks.{i}"
        attn = f"{src}.attention.attention"
        bias = r.has(f"{attn}.query.bias")
        qkv = fuse_qkv(r, f"{attn}.query", f"{attn}.key", f"{attn}.value", bias=bias)
        out[f"{dst}.attn.qkv.weight"] = qkv["weight"]
        if bias:
            out[f"{dst}.attn.qkv.bias"] = qkv["bias"]
        out[f"{dst}.attn.proj.weight"], out[f"{dst}.attn.proj.bias"] = r.take_linear(f"{src}.attention.output.dense")
        out[f"{dst}.norm1.weight"], out[f"{dst}.norm1.bias"] = r.take_linear(f"{src}.norm1")
        out[f"{dst}.norm2.weight"], out[f"{dst}.norm2.bias"] = r.take_linear(f"{src}.norm2")
        out[f"{dst}.ls1.gamma"] = r.take(f"{src}.layer_scale1.lambda1")
        out[f"{dst}.ls2.gamma"] = r.take(f"{src}.layer_scale2.lambda1")
        swiglu = r.has(f"{src}.mlp.weights_in.weight")
        fc1, fc2 = ("weights_in", "weights_out") if swiglu else ("fc1", "fc2")
        out[f"{dst}.mlp.fc1.weight"], out[f"{dst}.mlp.fc1.bias"] = r.take_linear(f"{src}.mlp.{fc1}")
        out[f"{dst}.mlp.fc2.weight"], out[f"{dst}.mlp.fc2.bias"] = r.take_linear(f"{src}.mlp.{fc2}")
    out["norm.weight"], out["norm.bias"] = r.take_linear("layernorm")
    r.finish()
    return out
