"""HF AIMv2 (`Aimv2VisionModel`, `model_type` "aimv2_vision_model", and the image tower of an
`Aimv2Model`, "aimv2") to `VisionEncoder`; `TABLE` maps the names.

AIMv2 is a ViT without a CLS token whose every norm is an RMSNorm (`norm_type='rmsnorm'`),
with one more right after the patch convolution (`patch_norm`), and a SwiGLU MLP. Positions:
a learned table over the native grid (`is_native=False`; HF never resamples it, we do, as for
every learned table) or, for the `-native` checkpoints, the fixed 2D sin-cos table laid out
`[sin_x, cos_x, sin_y, cos_y]`, which is our `pos_embed='sincos'` at any grid.

Two layouts are packed on the way in (`_pack`): the separate q / k / v projections become our
fused `qkv`, and `gate_proj` / `up_proj` become SwiGLU's packed `fc1` (gate first). AIMv2's
bias-free attention output and MLP (`qkv_bias=False`, `mlp_bias=False`, its defaults) load
with zero biases, which computes what HF computes.

The pooling head (`use_head`, `Aimv2AttentionPoolingHead`) is the MAP head without its query
projection and residual MLP: a learned query attends over `k_proj` / `v_proj` of the final
tokens, then `output_proj`. It loads into our `AttentionPoolHead` with an identity query
projection and a zero MLP of width 1 (`map_mlp_dim=1`), so `h + mlp(LN(h))` is `h` exactly.
`Aimv2Model`'s `visual_projection` is our bias-free `proj` (`image_embeds`); its text tower and
logit scale are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..config import VisionConfig
from ..weights import WeightsError
from .hf_common import KeyTable, Transform, as_rows, fused_qkv, parse_config, select_tower, tower_shape

FAMILY = "HF AIMv2"
TOWER_PREFIXES = ("vision_model.", "aimv2.vision_model.")
IGNORED_PREFIXES = ("text_model.", "text_projection.", "logit_scale")
_LAYER = "encoder.layers.{i}"
TABLE = KeyTable(
    renames={
        "embeddings.patch_embed": "patch_embed.proj",
        "embeddings.rms_norm": "patch_norm",
        f"{_LAYER}.rms_norm1": "blocks.{i}.norm1",
        f"{_LAYER}.attention.out_proj": "blocks.{i}.attn.proj",
        f"{_LAYER}.rms_norm2": "blocks.{i}.norm2",
        f"{_LAYER}.ffn.packed_in": "blocks.{i}.mlp.fc1",  # gate_proj + up_proj (see _pack)
        f"{_LAYER}.ffn.down_proj": "blocks.{i}.mlp.fc2",
        "rms_norm": "norm",
        "head.cls_token": "attn_pool.latent",
        "head.packed_kv": "attn_pool.kv",  # k_proj + v_proj (see _pack)
        "head.output_proj": "attn_pool.proj",
        "visual_projection": "proj",
    },
    transforms=(
        *fused_qkv(f"{_LAYER}.attention", ("q_proj", "k_proj", "v_proj"), optional_bias=True),
        Transform(("pos_embed",), ("embeddings.position_embedding.weight",), as_rows, optional=True),
    ),
    optional=("head.", "visual_projection"),
    ignored=("embeddings.position_ids",),
)


def config_from_hf(hf_config_or_dict: Any, projection: bool = False) -> VisionConfig:
    """Our config for an HF AIMv2 vision tower.

    Args:
        hf_config_or_dict: An `Aimv2VisionConfig` or `Aimv2Config` (its `vision_config`), or
            the dict of either.
        projection: The checkpoint has `Aimv2Model`'s `visual_projection` (set by the loader;
            an `aimv2` config implies it).

    Returns:
        The `VisionConfig`.

    Raises:
        ValueError: A variant the encoder does not express (a gated MLP other than SiLU).
    """
    from transformers import Aimv2Config, Aimv2VisionConfig

    c = parse_config(hf_config_or_dict, {"aimv2": Aimv2Config, "aimv2_vision_model": Aimv2VisionConfig}, FAMILY)
    embed_dim = None
    if c.model_type == "aimv2":
        embed_dim, c = c.projection_dim, c.vision_config
    elif projection:
        raise ValueError(f"{FAMILY}: a visual_projection needs the aimv2 config (its projection_dim)")
    if c.hidden_act != "silu":
        raise ValueError(f"{FAMILY}: hidden_act={c.hidden_act!r} is not supported (AIMv2's gated MLP: only SiLU, SwiGLU)")
    return VisionConfig(
        **tower_shape(c, FAMILY),
        mlp_dim=c.intermediate_size,
        mlp_type="swiglu",
        qkv_bias=c.qkv_bias,
        class_token=False,
        pos_embed="sincos" if c.is_native else "learned",
        norm_type="rmsnorm",
        patch_norm=True,
        final_norm=True,
        norm_eps=c.rms_norm_eps,
        pool="map" if c.use_head else "none",
        map_mlp_dim=1 if c.use_head else None,
        embed_dim=embed_dim,
        proj_bias=False,
        # HF never resamples the learned table; ours resamples like CLIP's (plain bicubic).
        pos_resample_antialias=False,
    )


def _pack(tower: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF's separate projections in our packed layouts, zero biases where AIMv2 has none."""
    out = dict(tower)
    for key in [k for k in out if k.endswith(".attention.q_proj.weight")]:
        attn = key[: -len("q_proj.weight")]
        width = out[key].shape[0]
        if not any(f"{attn}{n}.bias" in out for n in ("q_proj", "k_proj", "v_proj")):
            continue  # qkv_bias=False: our qkv has no bias either
        for n in ("q_proj", "k_proj", "v_proj"):
            out.setdefault(f"{attn}{n}.bias", out[key].new_zeros(width))
    for key in [k for k in out if k.endswith(".attention.out_proj.weight")]:
        out.setdefault(key[: -len("weight")] + "bias", out[key].new_zeros(out[key].shape[0]))
    for key in [k for k in out if k.endswith(".ffn.gate_proj.weight")]:
        ffn = key[: -len("gate_proj.weight")]
        if f"{ffn}up_proj.weight" not in out or f"{ffn}down_proj.weight" not in out:
            raise WeightsError(f"{FAMILY} checkpoint has {key!r} but not {ffn}up_proj.weight / {ffn}down_proj.weight")
        up, down = out.pop(f"{ffn}up_proj.weight"), out[f"{ffn}down_proj.weight"]
        out[f"{ffn}packed_in.weight"] = torch.cat([out.pop(key), up], dim=0)
        gate_b, up_b = out.pop(f"{ffn}gate_proj.bias", None), out.pop(f"{ffn}up_proj.bias", None)
        zeros = up.new_zeros(up.shape[0])
        out[f"{ffn}packed_in.bias"] = torch.cat([zeros if gate_b is None else gate_b, zeros if up_b is None else up_b])
        out.setdefault(f"{ffn}down_proj.bias", down.new_zeros(down.shape[0]))
    if "head.k_proj.weight" in out and "head.v_proj.weight" in out:
        k, v = out.pop("head.k_proj.weight"), out.pop("head.v_proj.weight")
        out["head.packed_kv.weight"] = torch.cat([k, v], dim=0)
        k_b, v_b = out.pop("head.k_proj.bias", None), out.pop("head.v_proj.bias", None)
        zeros = k.new_zeros(k.shape[0])
        out["head.packed_kv.bias"] = torch.cat([zeros if k_b is None else k_b, zeros if v_b is None else v_b])
    return out


def _head_identity(width: int, like: torch.Tensor) -> dict[str, torch.Tensor]:
    """The parts of our MAP head that AIMv2's head lacks, set to do nothing: the query
    projection the identity, the residual MLP (width 1) zero, its LayerNorm the identity."""
    zeros = lambda *shape: like.new_zeros(shape)  # noqa: E731
    return {
        "attn_pool.q.weight": torch.eye(width, dtype=like.dtype),
        "attn_pool.q.bias": zeros(width),
        "attn_pool.norm.weight": like.new_ones(width),
        "attn_pool.norm.bias": zeros(width),
        "attn_pool.mlp.fc1.weight": zeros(1, width),
        "attn_pool.mlp.fc1.bias": zeros(1),
        "attn_pool.mlp.fc2.weight": zeros(width, 1),
        "attn_pool.mlp.fc2.bias": zeros(width),
    }


def convert_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict from an HF AIMv2 checkpoint.

    Args:
        state_dict: `Aimv2VisionModel` keys, or an `Aimv2Model`'s (the tower under
            `vision_model.`, `visual_projection` kept, the text tower ignored).

    Returns:
        Tensors under `VisionEncoder` names.

    Raises:
        WeightsError: A key is missing, or a key is neither used nor on the ignored list.
    """
    out = TABLE.convert(_pack(select_tower(state_dict, TOWER_PREFIXES, IGNORED_PREFIXES)), FAMILY)
    if "attn_pool.latent" in out:
        latent = out["attn_pool.latent"]
        out.update(_head_identity(latent.shape[-1], latent))
    return out
