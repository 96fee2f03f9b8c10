"""HF SigLIP vision tower (`SiglipModel`, `SiglipVisionModel`, the SigLIP tower of LLaVA
variants) to `VisionEncoder`.

Mapping:
  embeddings.patch_embedding (with bias)        -> patch_embed.proj
  embeddings.position_embedding                 -> pos_embed (no CLS token)
  encoder.layers.i.self_attn.{q,k,v}_proj       -> blocks.i.attn.qkv (fused)
  encoder.layers.i.self_attn.out_proj           -> blocks.i.attn.proj
  encoder.layers.i.layer_norm{1,2}, mlp.fc{1,2} -> blocks.i.norm{1,2}, mlp.fc{1,2}
  post_layernorm                                -> norm (HF applies it to every token)
  head.probe                                    -> attn_pool.latent
  head.attention.in_proj_{weight,bias}          -> attn_pool.q (rows 0..D), attn_pool.kv (rows D..3D)
  head.attention.out_proj                       -> attn_pool.proj
  head.layernorm, head.mlp.fc{1,2}              -> attn_pool.norm, attn_pool.mlp.fc{1,2}

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
from .hf_common import KeyReader, activation, fuse_qkv, hf_config, select_tower, square

FAMILY = "HF SigLIP"
TOWER_PREFIXES = ("vision_model.",)
IGNORED_PREFIXES = ("text_model.", "logit_scale", "logit_bias")


def config_from_hf(hf_config_or_dict: Any) -> VisionConfig:
    """Our config for an HF SigLIP vision tower.

    Args:
        hf_config_or_dict: A `SiglipConfig` / `SiglipVisionConfig` or its `config.json` dict.

    Returns:
        The `VisionConfig` (`pool='map'`, or `'none'` when `vision_use_head` is off).
    """
    from transformers import SiglipConfig, SiglipVisionConfig

    model_type = hf_config_or_dict.get("model_type") if isinstance(hf_config_or_dict, Mapping) else getattr(hf_config_or_dict, "model_type", None)
    if model_type == "siglip":
        vision = hf_config(hf_config_or_dict, SiglipConfig).vision_config
    elif model_type == "siglip_vision_model":
        vision = hf_config(hf_config_or_dict, SiglipVisionConfig)
    else:
        raise ValueError(f"{FAMILY}: expected a config with model_type 'siglip' or 'siglip_vision_model', got {model_type!r}")
    use_head = getattr(vision, "vision_use_head", True)
    return VisionConfig(
        image_size=square(vision.image_size, "image_size", FAMILY),
        patch_size=square(vision.patch_size, "patch_size", FAMILY),
        in_channels=vision.num_channels,
        width=vision.hidden_size,
        depth=vision.num_hidden_layers,
        num_heads=vision.num_attention_heads,
        mlp_dim=vision.intermediate_size,
        act=activation(vision.hidden_act, FAMILY),
        qkv_bias=True,
        patch_bias=True,
        class_token=False,
        final_norm=True,
        norm_eps=vision.layer_norm_eps,
        pool="map" if use_head else "none",
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
    tower, _ = select_tower(state_dict, TOWER_PREFIXES, IGNORED_PREFIXES)
    r = KeyReader(tower, FAMILY)
    out: dict[str, torch.Tensor] = {}
    out["patch_embed.proj.weight"], out["patch_embed.proj.bias"] = r.take_linear("embeddings.patch_embedding")
    position = r.take("embeddings.position_embedding.weight")  # (N, D)
    out["pos_embed"] = position.reshape(1, -1, position.shape[-1])
    r.ignore("embeddings.position_ids")
    for i in range(r.count_layers("encoder.layers.")):
        src, dst = f"encoder.layers.{i}", f"blocks.{i}"
        qkv = fuse_qkv(r, f"{src}.self_attn.q_proj", f"{src}.self_attn.k_proj", f"{src}.self_attn.v_proj")
        out[f"{dst}.attn.qkv.weight"], out[f"{dst}.attn.qkv.bias"] = qkv["weight"], qkv["bias"]
        out[f"{dst}.attn.proj.weight"], out[f"{dst}.attn.proj.bias"] = r.take_linear(f"{src}.self_attn.out_proj")
        out[f"{dst}.norm1.weight"], out[f"{dst}.norm1.bias"] = r.take_linear(f"{src}.layer_norm1")
        out[f"{dst}.norm2.weight"], out[f"{dst}.norm2.bias"] = r.take_linear(f"{src}.layer_norm2")
        out[f"{dst}.mlp.fc1.weight"], out[f"{dst}.mlp.fc1.bias"] = r.take_linear(f"{src}.mlp.fc1")
        out[f"{dst}.mlp.fc2.weight"], out[f"{dst}.mlp.fc2.bias"] = r.take_linear(f"{src}.mlp.fc2")
    out["norm.weight"], out["norm.bias"] = r.take_linear("post_layernorm")
    if r.has("head.probe"):
        out.update(_convert_head(r))
    r.finish()
    return out


def _convert_head(r: KeyReader) -> dict[str, torch.Tensor]:
    """The attention-pooling head: `nn.MultiheadAttention`'s packed projection split into
    our query and fused key/value linears."""
    in_weight = r.take("head.attention.in_proj_weight")  # (3D, D), rows q, k, v
    in_bias = r.take("head.attention.in_proj_bias")  # (3D,)
    D = in_weight.shape[-1]
    if in_weight.shape[0] != 3 * D or in_bias.shape != (3 * D,):
        raise WeightsError(
            f"{FAMILY}: head.attention.in_proj_weight {tuple(in_weight.shape)} / in_proj_bias {tuple(in_bias.shape)} "
            f"are not the packed (3D, D) / (3D,) projection"
        )
    out = {
        "attn_pool.latent": r.take("head.probe").reshape(1, 1, D),
        "attn_pool.q.weight": in_weight[:D].contiguous(),
        "attn_pool.q.bias": in_bias[:D].contiguous(),
        "attn_pool.kv.weight": in_weight[D:].contiguous(),
        "attn_pool.kv.bias": in_bias[D:].contiguous(),
    }
    out["attn_pool.proj.weight"], out["attn_pool.proj.bias"] = r.take_linear("head.attention.out_proj")
    out["attn_pool.norm.weight"], out["attn_pool.norm.bias"] = r.take_linear("head.layernorm")
    out["attn_pool.mlp.fc1.weight"], out["attn_pool.mlp.fc1.bias"] = r.take_linear("head.mlp.fc1")
    out["attn_pool.mlp.fc2.weight"], out["attn_pool.mlp.fc2.bias"] = r.take_linear("head.mlp.fc2")
    return out
