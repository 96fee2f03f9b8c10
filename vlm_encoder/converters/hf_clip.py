"""HF CLIP vision tower (`CLIPModel`, `CLIPVisionModel`, `CLIPVisionModelWithProjection`,
and the CLIP tower of LLaVA) to `VisionEncoder`.

Mapping:
  embeddings.class_embedding + position row 0   -> cls_token
  embeddings.position_embedding rows 1..        -> pos_embed (patches only)
  embeddings.patch_embedding (no bias)          -> patch_embed.proj
  pre_layrnorm                                  -> norm_pre
  encoder.layers.i.self_attn.{q,k,v}_proj       -> blocks.i.attn.qkv (fused)
  encoder.layers.i.self_attn.out_proj           -> blocks.i.attn.proj
  encoder.layers.i.layer_norm{1,2}, mlp.fc{1,2} -> blocks.i.norm{1,2}, mlp.fc{1,2}
  post_layernorm                                -> norm
  visual_projection (no bias)                   -> proj

HF applies `post_layernorm` to the pooled CLS token only. LayerNorm works per token, so our
final `norm` followed by CLS pooling gives the same pooled vector; the tokens that
`encoder(..., norm=False)` returns are the raw block outputs, as HF's `hidden_states`.
HF's `interpolate_pos_encoding` resizes the table bicubically to the new grid with no
antialiasing, so the config turns antialiasing off.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..config import VisionConfig
from .hf_common import KeyReader, activation, fuse_qkv, hf_config, select_tower, split_position_table, square

FAMILY = "HF CLIP"
TOWER_PREFIXES = ("vision_model.",)
IGNORED_PREFIXES = ("text_model.", "text_projection.", "logit_scale")


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

    model_type = hf_config_or_dict.get("model_type") if isinstance(hf_config_or_dict, Mapping) else getattr(hf_config_or_dict, "model_type", None)
    if model_type == "clip":
        full = hf_config(hf_config_or_dict, CLIPConfig)
        vision, projection_dim = full.vision_config, full.projection_dim
        projection = True if projection is None else projection
    elif model_type == "clip_vision_model":
        vision = hf_config(hf_config_or_dict, CLIPVisionConfig)
        projection_dim = vision.projection_dim
        projection = bool(projection)
    else:
        raise ValueError(f"{FAMILY}: expected a config with model_type 'clip' or 'clip_vision_model', got {model_type!r}")
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
        patch_bias=False,
        class_token=True,
        norm_pre=True,
        final_norm=True,
        norm_eps=vision.layer_norm_eps,
        pool="cls",
        embed_dim=projection_dim if projection else None,
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
    tower, _ = select_tower(state_dict, TOWER_PREFIXES, IGNORED_PREFIXES)
    r = KeyReader(tower, FAMILY)
    out: dict[str, torch.Tensor] = {}
    out["cls_token"], out["pos_embed"] = split_position_table(
        r.take("embeddings.position_embedding.weight"), r.take("embeddings.class_embedding")
    )
    out["patch_embed.proj.weight"] = r.take("embeddings.patch_embedding.weight")
    r.ignore("embeddings.position_ids")  # a buffer older transformers saved
    out["norm_pre.weight"], out["norm_pre.bias"] = r.take_linear("pre_layrnorm")
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
    if r.has("visual_projection.weight"):
        out["proj.weight"] = r.take("visual_projection.weight")
    r.finish()
    return out
