"""HF ViT (`ViTModel`, and the `vit.` backbone of `ViTForImageClassification`) to `VisionEncoder`.

Mapping:
  embeddings.cls_token + position row 0               -> cls_token
  embeddings.position_embeddings rows 1..             -> pos_embed (patches only)
  embeddings.patch_embeddings.projection              -> patch_embed.proj
  encoder.layer.i.attention.attention.{query,key,value} -> blocks.i.attn.qkv (fused)
  encoder.layer.i.attention.output.dense              -> blocks.i.attn.proj
  encoder.layer.i.layernorm_{before,after}            -> blocks.i.norm{1,2}
  encoder.layer.i.{intermediate,output}.dense         -> blocks.i.mlp.fc{1,2}
  layernorm                                           -> norm
  pooler.dense (+ tanh), when present                 -> proj (proj_bias, proj_act='tanh')

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
from .hf_common import KeyReader, activation, fuse_qkv, hf_config, select_tower, split_position_table, square

FAMILY = "HF ViT"
TOWER_PREFIXES = ("vit.",)
IGNORED_PREFIXES = ("classifier.",)


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

    model_type = hf_config_or_dict.get("model_type") if isinstance(hf_config_or_dict, Mapping) else getattr(hf_config_or_dict, "model_type", None)
    if model_type != "vit":
        raise ValueError(f"{FAMILY}: expected a config with model_type 'vit', got {model_type!r}")
    c = hf_config(hf_config_or_dict, ViTConfig)
    if pooler and c.pooler_act != "tanh":
        raise ValueError(f"{FAMILY}: pooler_act={c.pooler_act!r} is not supported; supported: tanh")
    return VisionConfig(
        image_size=square(c.image_size, "image_size", FAMILY),
        patch_size=square(c.patch_size, "patch_size", FAMILY),
        in_channels=c.num_channels,
        width=c.hidden_size,
        depth=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        mlp_dim=c.intermediate_size,
        act=activation(c.hidden_act, FAMILY),
        qkv_bias=c.qkv_bias,
        patch_bias=True,
        class_token=True,
        final_norm=True,
        norm_eps=c.layer_norm_eps,
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
    tower, _ = select_tower(state_dict, TOWER_PREFIXES, IGNORED_PREFIXES)
    r = KeyReader(tower, FAMILY)
    out: dict[str, torch.Tensor] = {}
    out["cls_token"], out["pos_embed"] = split_position_table(
        r.take("embeddings.position_embeddings"), r.take("embeddings.cls_token")
    )
    out["patch_embed.proj.weight"], out["patch_embed.proj.bias"] = r.take_linear("embeddings.patch_embeddings.projection")
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
        out[f"{dst}.norm1.weight"], out[f"{dst}.norm1.bias"] = r.take_linear(f"{src}.layernorm_before")
        out[f"{dst}.norm2.weight"], out[f"{dst}.norm2.bias"] = r.take_linear(f"{src}.layernorm_after")
        out[f"{dst}.mlp.fc1.weight"], out[f"{dst}.mlp.fc1.bias"] = r.take_linear(f"{src}.intermediate.dense")
        out[f"{dst}.mlp.fc2.weight"], out[f"{dst}.mlp.fc2.bias"] = r.take_linear(f"{src}.output.dense")
    out["norm.weight"], out["norm.bias"] = r.take_linear("layernorm")
    if r.has("pooler.dense.weight"):
        out["proj.weight"], out["proj.bias"] = r.take_linear("pooler.dense")
    r.finish()
    return out
