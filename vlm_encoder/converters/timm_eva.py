"""Converter for timm `Eva` models (`timm/models/eva.py`): EVA02 / EVA02-CLIP, Meta's Perception
Encoder (`vit_pe_*`) and DINOv3 (`vit_*_dinov3*`), all 2D-RoPE towers.

timm serves them with one `EvaBlock` whose options become `VisionConfig` fields: the rotary
variant (`RotaryEmbeddingCat` -> `rope='eva'`, with `ref_feat_shape`, grid offset and axis
order; `RotaryEmbeddingDinoV3` -> `rope='dinov3'`), SwiGLU (packed `GluMlp`, or `SwiGLU` with
separate `fc1_g` / `fc1_x` that we pack, gate first), the sub-LNs (`scale_mlp` -> `mlp_norm`,
`scale_attn_inner` -> `attn_norm`), qk-norm and LayerScale (`gamma_1` / `gamma_2`).

Key changes (`TABLE`, applied strictly): `reg_token -> register_tokens`, `fc_norm ->
pooled_norm`, `head -> proj`, `gamma_{1,2} -> ls{1,2}.gamma`, the q / v biases (timm keeps the
key's as a zero buffer) or the separate `q_proj` / `k_proj` / `v_proj` fused into `qkv`; a
position table with prefix rows has them folded into the CLS / register tokens (as in
`timm_vit`). The architecture is read from the model instance; whatever the encoder cannot
express (post-norm blocks, mixed or M-RoPE, gated or grouped-query attention, RMSNorm,
attention-only LayerScale, max pooling) is refused by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..config import VisionConfig
from ..encoder import VisionEncoder
from ..weights import naming, strip_prefixes
from .hf_common import KeyTable, Transform
from .timm_vit import (
    _POOLS,
    UnsupportedTimmModel,
    _activation,
    _fold_prefix_positions,
    _layer_norm_eps,
    create_timm_model,
    encoder_holding,
    timm_processor,
)


def is_eva(name: str) -> bool:
    """Whether timm builds `name` (an architecture, `.tag` allowed) with `eva.py`: the family is
    timm's registry's answer, not a guess from the name."""
    import timm.models

    return timm.models.is_model_in_modules(name.split(".")[0], ["eva"])


def _refuse(name: str, what: str) -> None:
    raise UnsupportedTimmModel(f"timm model {name}: {what} is not supported by VisionEncoder")


def _zeros_between(first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The fused `qkv` bias from the q and v biases: the key's is zero (timm's `k_bias` buffer)."""
    return torch.cat([first, torch.zeros_like(first), last])


_B = "blocks.{i}"
TABLE = KeyTable(
    renames={
        "patch_embed.proj": "patch_embed.proj",
        "cls_token": "cls_token",
        "reg_token": "register_tokens",
        "pos_embed": "pos_embed",
        "norm_pre": "norm_pre",
        f"{_B}.norm1": "blocks.{i}.norm1",
        f"{_B}.attn.qkv": "blocks.{i}.attn.qkv",  # fused (with its own bias in PE's AttentionRope)
        f"{_B}.attn.q_norm": "blocks.{i}.attn.q_norm",
        f"{_B}.attn.k_norm": "blocks.{i}.attn.k_norm",
        f"{_B}.attn.norm": "blocks.{i}.attn.norm",
        f"{_B}.attn.proj": "blocks.{i}.attn.proj",
        f"{_B}.gamma_1": "blocks.{i}.ls1.gamma",
        f"{_B}.norm2": "blocks.{i}.norm2",
        f"{_B}.mlp.fc1": "blocks.{i}.mlp.fc1",
        f"{_B}.mlp.norm": "blocks.{i}.mlp.norm",
        f"{_B}.mlp.fc2": "blocks.{i}.mlp.fc2",
        f"{_B}.gamma_2": "blocks.{i}.ls2.gamma",
        "norm": "norm",
        "fc_norm": "pooled_norm",
        "attn_pool": "attn_pool",
        "head": "proj",
    },
    transforms=(
        Transform((f"{_B}.attn.qkv.bias",), (f"{_B}.attn.q_bias", f"{_B}.attn.v_bias"), _zeros_between, optional=True),
        Transform(
            (f"{_B}.attn.qkv.weight",),
            tuple(f"{_B}.attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj")),
            lambda *t: torch.cat(t),
            optional=True,
        ),
        Transform((f"{_B}.attn.qkv.bias",), (f"{_B}.attn.q_proj.bias", f"{_B}.attn.v_proj.bias"), _zeros_between, optional=True),
        *(
            Transform((f"{_B}.mlp.fc1.{p}",), (f"{_B}.mlp.fc1_g.{p}", f"{_B}.mlp.fc1_x.{p}"), lambda g, x: torch.cat([g, x]), optional=True)
            for p in ("weight", "bias")
        ),
    ),
    # Which of these a model has is its instance's to say; load_state_dict_strict checks the result.
    optional=("cls_token", "reg_token", "pos_embed", "norm", "fc_norm", "attn_pool", "head", f"{_B}."),
)


def _norm_eps(module: nn.Module, where: str, name: str) -> float | None:
    """The LayerNorm epsilon of an optional norm (`None` for Identity)."""
    return None if isinstance(module, nn.Identity) else _layer_norm_eps(module, where, name)


def _block_spec(block: nn.Module, width: int, name: str) -> dict[str, Any]:
    from timm.layers import AttentionRope, GluMlp, Mlp, SwiGLU
    from timm.models.eva import EvaAttention, EvaBlock

    if type(block) is not EvaBlock:
        _refuse(name, f"block type {type(block).__name__} (only the pre-norm EvaBlock)")
    attn = block.attn
    if type(attn) not in (EvaAttention, AttentionRope):
        _refuse(name, f"attention type {type(attn).__name__}")
    if getattr(attn, "gate", None) is not None:
        _refuse(name, "gated attention")
    if getattr(attn, "num_kv_heads", attn.num_heads) != attn.num_heads:
        _refuse(name, "grouped-query attention (num_kv_heads)")
    if attn.head_dim * attn.num_heads != width or attn.proj.bias is None:
        _refuse(name, "an attention width other than embed_dim, or no output-projection bias")
    if block.gamma_1 is None and block.gamma_2 is not None or block.gamma_1 is not None and block.gamma_2 is None:
        _refuse(name, "LayerScale on the attention branch only")
    if isinstance(attn.qkv, nn.Linear):
        qkv_bias = attn.qkv.bias is not None or getattr(attn, "q_bias", None) is not None
    else:
        qkv_bias = attn.q_proj.bias is not None
    eps = {_layer_norm_eps(block.norm1, "norm1", name), _layer_norm_eps(block.norm2, "norm2", name)}
    qk = {_norm_eps(attn.q_norm, "q_norm", name), _norm_eps(attn.k_norm, "k_norm", name)}
    inner = _norm_eps(attn.norm, "attn.norm", name)
    mlp = block.mlp
    if type(mlp) is Mlp:
        mlp_type, mlp_dim, act = "mlp", mlp.fc1.out_features, _activation(mlp.act, name)
    elif type(mlp) is GluMlp and isinstance(mlp.act, nn.SiLU) and not mlp.gate_last:
        mlp_type, mlp_dim, act = "swiglu", mlp.fc2.in_features, "gelu"
    elif type(mlp) is SwiGLU and isinstance(mlp.act, nn.SiLU):
        mlp_type, mlp_dim, act = "swiglu", mlp.fc2.in_features, "gelu"
    else:
        _refuse(name, f"MLP {type(mlp).__name__} (allowed: Mlp, SiLU GluMlp, SwiGLU)")
    if mlp.fc1.bias is None if hasattr(mlp, "fc1") else mlp.fc1_g.bias is None:
        _refuse(name, "an MLP without biases")
    mlp_norm = _norm_eps(mlp.norm, "mlp.norm", name)
    eps |= {e for e in (*qk, inner, mlp_norm) if e is not None}
    return dict(
        num_heads=attn.num_heads,
        qkv_bias=qkv_bias,
        qk_norm=None not in qk,
        attn_norm=inner is not None,
        mlp_norm=mlp_norm is not None,
        layer_scale_init=None if block.gamma_1 is None else 1e-5,  # loaded weights replace it
        mlp_type=mlp_type,
        mlp_dim=mlp_dim,
        act=act,
        rotate_half=bool(getattr(attn, "rotate_half", False)),
        eps=eps,
    )


def _rope_fields(model: nn.Module, name: str, rotate_half: bool) -> dict[str, Any]:
    from timm.layers.pos_embed_sincos import RotaryEmbeddingCat, RotaryEmbeddingDinoV3

    rope = model.rope
    if rope is None:
        return {}
    if getattr(model, "rope_mixed", False):
        _refuse(name, "mixed (learned per-layer) RoPE")
    if bool(rope.rotate_half) != rotate_half:
        _refuse(name, "a RoPE table layout that differs from the attention's")
    if rope.grid_indexing not in ("ij", "xy"):
        _refuse(name, f"rope grid_indexing={rope.grid_indexing!r}")
    fields = dict(
        rope_layout="half" if rotate_half else "interleaved",
        rope_grid_offset=float(rope.grid_offset),
        rope_xy=rope.grid_indexing == "xy",
    )
    if type(rope) is RotaryEmbeddingCat:
        if rope.in_pixels or rope.grid_type != "index":
            _refuse(name, "pixel-frequency RoPE (in_pixels=True)")
        ref = rope.ref_feat_shape
        return dict(fields, rope="eva", rope_theta=float(rope.temperature), rope_ref_grid=None if ref is None else tuple(ref))
    if type(rope) is RotaryEmbeddingDinoV3:
        if rope.temperature is None or rope.min_period is not None or rope.normalize_coords != "separate":
            _refuse(name, "DINOv3 RoPE with min/max periods or shared coordinate normalisation")
        return dict(fields, rope="dinov3", rope_theta=float(rope.temperature))
    _refuse(name, f"rotary embedding {type(rope).__name__} (allowed: RotaryEmbeddingCat, RotaryEmbeddingDinoV3)")
    raise AssertionError  # unreachable


def config_from_timm_eva(model: nn.Module) -> VisionConfig:
    """Read the `VisionConfig` of a timm `Eva` instance.

    Raises:
        UnsupportedTimmModel: Naming what the encoder does not express.
    """
    from timm.layers import AttentionPoolLatent, PatchEmbed
    from timm.models.eva import Eva

    name = repr(getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__))
    if type(model) is not Eva:
        _refuse(name, f"model class {type(model).__name__} (only timm Eva)")
    width = model.embed_dim
    embed = model.patch_embed
    if type(embed) is not PatchEmbed or not isinstance(embed.norm, nn.Identity) or embed.dynamic_img_pad:
        _refuse(name, "a patch embedding other than a plain convolution")
    if embed.patch_size[0] != embed.patch_size[1]:
        _refuse(name, f"non-square patches {embed.patch_size}")
    if model.patch_drop is not None:
        _refuse(name, "patch dropout")
    blocks = [_block_spec(b, width, name) for b in model.blocks]
    first = blocks[0]
    for i, spec in enumerate(blocks[1:], start=1):
        differing = [k for k in spec if k != "eps" and spec[k] != first[k]]
        if differing:
            _refuse(name, f"blocks that differ from block 0 in {differing} (block {i})")
    eps = set().union(*(b["eps"] for b in blocks))
    for where in ("norm_pre", "norm", "fc_norm"):
        if (value := _norm_eps(getattr(model, where), where, name)) is not None:
            eps.add(value)
    pool = model.global_pool
    if pool not in _POOLS:
        _refuse(name, f"global_pool={pool!r} (allowed: 'token', 'avg', 'map', '')")
    map_fields: dict[str, Any] = {}
    if pool == "map":
        head = model.attn_pool
        if (
            type(head) is not AttentionPoolLatent
            or head.latent_len != 1
            or head.pos_embed is not None
            or not isinstance(head.q_norm, nn.Identity)
            or head.q.bias is None
            or head.mlp is None
            or head.pool != "token"
        ):
            _refuse(name, "a MAP head other than one latent query with q/kv projections, LayerNorm and MLP")
        if _activation(head.mlp.act, name) != first["act"]:
            _refuse(name, "a MAP head whose MLP activation differs from the blocks'")
        eps.add(_layer_norm_eps(head.norm, "attn_pool.norm", name))
        map_fields = dict(map_mlp_dim=head.mlp.fc1.out_features, map_num_heads=head.num_heads)
    if len(eps) != 1:
        _refuse(name, f"LayerNorms with different epsilons {sorted(eps)}")
    if isinstance(model.head, nn.Linear):
        embed_dim, proj_bias = model.head.out_features, model.head.bias is not None
    elif isinstance(model.head, nn.Identity):
        embed_dim, proj_bias = None, False
    else:
        _refuse(name, f"classifier head {type(model.head).__name__}")
    return VisionConfig(
        image_size=tuple(embed.img_size),
        patch_size=embed.patch_size[0],
        in_channels=embed.proj.in_channels,
        width=width,
        depth=len(blocks),
        num_heads=first["num_heads"],
        mlp_dim=first["mlp_dim"],
        mlp_type=first["mlp_type"],
        act=first["act"],
        qkv_bias=first["qkv_bias"],
        qk_norm=first["qk_norm"],
        attn_norm=first["attn_norm"],
        mlp_norm=first["mlp_norm"],
        patch_bias=embed.proj.bias is not None,
        class_token=model.cls_token is not None,
        num_register_tokens=0 if model.reg_token is None else model.reg_token.shape[1],
        pos_embed="learned" if model.pos_embed is not None else "none",
        **_rope_fields(model, name, first["rotate_half"]),
        norm_pre=not isinstance(model.norm_pre, nn.Identity),
        final_norm=not isinstance(model.norm, nn.Identity),
        pooled_norm=not isinstance(model.fc_norm, nn.Identity),
        norm_eps=eps.pop(),
        layer_scale_init=first["layer_scale_init"],
        pool=_POOLS[pool],
        **map_fields,
        embed_dim=embed_dim,
        proj_bias=proj_bias,
        patch_remainder="drop",  # timm's convolution floors the grid
    )


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], config: VisionConfig) -> dict[str, torch.Tensor]:
    """Map a timm `Eva` state dict to `VisionEncoder` names (`TABLE`, then the prefix rows of
    the position table folded into the prefix tokens).

    Raises:
        WeightsError: Unknown keys, misnumbered blocks, or a position table of the wrong length.
    """
    out = TABLE.convert(strip_prefixes(state_dict), "timm Eva")
    if "pos_embed" in out:
        _fold_prefix_positions(out, config)
    return out


def encoder_from_timm_eva(model: nn.Module, state_dict: Mapping[str, torch.Tensor] | None = None) -> VisionEncoder:
    """A `VisionEncoder` equivalent to a timm `Eva` instance (its weights, or `state_dict` in
    timm's format), in eval mode, without an image processor."""
    config = config_from_timm_eva(model)
    weights = convert_state_dict(model.state_dict() if state_dict is None else state_dict, config)
    return encoder_holding(config, weights, copy=state_dict is None, source="converted timm Eva state dict")


def load_timm_eva(name: str, checkpoint: str | None = None, **timm_kwargs: Any) -> VisionEncoder:
    """Load a timm EVA02 / PE / DINOv3 model as a `VisionEncoder`.

    Args:
        name: A timm model name built by `eva.py` (`eva02_base_patch14_224.mim_in22k`,
            `vit_pe_core_base_patch16_224`, `vit_small_patch16_dinov3`, ...).
        checkpoint: A weight file in timm's state-dict format; `None` uses timm's pretrained
            weights (from the Hugging Face cache; offline they must be there).
        **timm_kwargs: Passed to `timm.create_model` (e.g. `img_size=448`).

    Returns:
        The encoder in eval mode; `image_processor` holds timm's preprocessing.

    Raises:
        RuntimeError: `checkpoint=None` and timm cannot get the weights.
        UnsupportedTimmModel: The architecture is not expressible.
        WeightsError: The checkpoint does not fit the architecture.
    """
    model, state_dict, source = create_timm_model(name, checkpoint, timm_kwargs, meta=False)
    with naming(source):
        encoder = encoder_from_timm_eva(model, state_dict)
    encoder.image_processor = timm_processor(model, model.patch_embed.img_size)
    return encoder
