"""Converter for timm's Qwen3-VL / Qwen3.5 vision models (`timm/models/qwen3_vit.py`:
`Qwen3VitEncoder`, the `qwen3_vit_*_enc` variants, and `Qwen3VitClassifier` without its head).

The tower is `hf_qwen3_vl`'s (LayerNorm pre-norm, fused qkv with bias, GELU-tanh MLP, a learned
square table resized bilinearly with aligned corners plus axial 2D RoPE in the 'half' layout, no
final norm; `hf_qwen3_vl.tower_config`); timm's names are already ours, and
timm has folded the `Conv3d` patch kernel already. The architecture is read from the model
instance and anything else is refused by name. The `_enc` variants keep Qwen's main merger
(`merger.*`, timm `Qwen3VitPatchMerger`): `merger_from_timm_qwen3` gives it as a `qwen_merger`
projector; timm drops the DeepStack mergers (see `hf_qwen3_vl` / `projectors.load_qwen3_vl_merger`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..config import VisionConfig
from ..encoder import VisionEncoder
from ..weights import naming, strip_prefixes
from .hf_common import KeyTable
from .hf_qwen3_vl import tower_config
from .timm_vit import (
    UnsupportedTimmModel,
    _activation,
    _layer_norm_eps,
    create_timm_model,
    encoder_holding,
    timm_processor,
)

FAMILY = "timm Qwen3 ViT"

_B = "blocks.{i}"
TABLE = KeyTable(
    renames={
        "patch_embed.proj": "patch_embed.proj",
        "pos_embed": "pos_embed",  # (1, side*side, D) both
        f"{_B}.norm1": "blocks.{i}.norm1",
        f"{_B}.attn.qkv": "blocks.{i}.attn.qkv",
        f"{_B}.attn.proj": "blocks.{i}.attn.proj",
        f"{_B}.norm2": "blocks.{i}.norm2",
        f"{_B}.mlp.fc1": "blocks.{i}.mlp.fc1",
        f"{_B}.mlp.fc2": "blocks.{i}.mlp.fc2",
    },
)


def is_qwen3_vit(name: str) -> bool:
    """Whether timm builds `name` (an architecture, `.tag` allowed) with `qwen3_vit.py`."""
    import timm.models

    return timm.models.is_model_in_modules(name.split(".")[0], ["qwen3_vit"])


def _refuse(name: str, what: str) -> None:
    raise UnsupportedTimmModel(f"timm model {name}: {what} is not supported by VisionEncoder")


def _name(model: nn.Module) -> str:
    return repr(getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__))


def _trunk(model: nn.Module, name: str) -> nn.Module:
    """The `Qwen3VitEncoder` of a model (a classifier's `encoder`, when it has no head)."""
    from timm.models.qwen3_vit import Qwen3VitClassifier, Qwen3VitEncoder

    if type(model) is Qwen3VitEncoder:
        return model
    if type(model) is Qwen3VitClassifier:
        if not isinstance(model.head, nn.Identity) or not isinstance(model.norm, nn.Identity) or model.global_pool:
            _refuse(name, "the classifier's pooling, affine-free LayerNorm and head (use the _enc variant, or "
                    "num_classes=0, global_pool='', final_norm=False)")
        return model.encoder
    _refuse(name, f"model class {type(model).__name__} (only Qwen3VitEncoder / Qwen3VitClassifier)")
    raise AssertionError  # unreachable


def _check_block(block: nn.Module, width: int, name: str) -> tuple[int, int, str, set[float]]:
    """(heads, MLP hidden width, activation, norm epsilons) of a block, refusing what differs from the reference's."""
    from timm.layers import AttentionRope, Mlp
    from timm.models.eva import EvaBlock

    if type(block) is not EvaBlock or block.gamma_1 is not None or block.gamma_2 is not None:
        _refuse(name, f"block type {type(block).__name__} or LayerScale (only the pre-norm EvaBlock)")
    attn, mlp = block.attn, block.mlp
    if type(attn) is not AttentionRope or not attn.rotate_half or attn.num_prefix_tokens:
        _refuse(name, "attention other than AttentionRope with the 'half' rotation and no prefix tokens")
    if not isinstance(attn.qkv, nn.Linear) or attn.qkv.bias is None or attn.proj.bias is None:
        _refuse(name, "attention without a fused, biased qkv and a biased output projection")
    if not all(isinstance(m, nn.Identity) for m in (attn.q_norm, attn.k_norm, attn.norm)):
        _refuse(name, "qk-norm or a norm inside the attention")
    if getattr(attn, "num_kv_heads", attn.num_heads) != attn.num_heads or attn.head_dim * attn.num_heads != width:
        _refuse(name, "grouped-query attention or an attention width other than embed_dim")
    if type(mlp) is not Mlp or not isinstance(mlp.norm, nn.Identity) or mlp.fc1.bias is None or mlp.fc2.bias is None:
        _refuse(name, f"MLP {type(mlp).__name__} (only a biased fc1 / act / fc2 Mlp)")
    eps = {_layer_norm_eps(block.norm1, "norm1", name), _layer_norm_eps(block.norm2, "norm2", name)}
    return attn.num_heads, mlp.fc1.out_features, _activation(mlp.act, name), eps


def config_from_timm_qwen3(model: nn.Module) -> VisionConfig:
    """Read the `VisionConfig` of a timm `Qwen3VitEncoder` (or a head-less classifier).

    Raises:
        UnsupportedTimmModel: Naming what the encoder does not express.
    """
    from timm.layers import PatchEmbed
    from timm.layers.pos_embed_sincos import RotaryEmbeddingCat

    name = _name(model)
    trunk = _trunk(model, name)
    embed, rope, width = trunk.patch_embed, trunk.rope, trunk.embed_dim
    if type(embed) is not PatchEmbed or not isinstance(embed.norm, nn.Identity) or embed.proj.bias is None:
        _refuse(name, "a patch embedding other than a biased convolution")
    if embed.dynamic_img_pad or embed.patch_size[0] != embed.patch_size[1]:
        _refuse(name, f"dynamic_img_pad or non-square patches {embed.patch_size}")
    if (
        type(rope) is not RotaryEmbeddingCat or rope.in_pixels or rope.grid_type != "index" or not rope.rotate_half
        or rope.ref_feat_shape is not None or rope.grid_offset or rope.grid_indexing != "ij"
    ):
        _refuse(name, "a RoPE other than integer (y, x) positions in the 'half' layout")
    side = trunk.pos_embed_grid_size
    if tuple(trunk.pos_embed.shape[1:]) != (side * side, width):
        _refuse(name, f"a position table of shape {tuple(trunk.pos_embed.shape)} (expected a {side}x{side} grid)")
    specs = [_check_block(b, width, name) for b in trunk.blocks]
    if len({s[:3] for s in specs}) != 1:
        _refuse(name, "blocks of different heads, MLP widths or activations")
    eps = set().union(*(s[3] for s in specs))
    if len(eps) != 1:
        _refuse(name, f"LayerNorms with different epsilons {sorted(eps)}")
    if trunk.global_pool not in ("", "merge"):
        _refuse(name, f"global_pool={trunk.global_pool!r} (the mean pool; use '' or the _enc variant's 'merge')")
    heads, mlp_dim, act, _ = specs[0]
    return tower_config(
        patch_size=embed.patch_size[0], table_side=side, in_channels=embed.proj.in_channels, width=width,
        depth=len(specs), num_heads=heads, mlp_dim=mlp_dim, act=act, rope_theta=float(rope.temperature),
        norm_eps=eps.pop(),
    )


def convert_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a timm Qwen3 ViT state dict (encoder keys, or a classifier's under `encoder.`) to
    `VisionEncoder` names; the `merger.` keys are left out (`merger_from_timm_qwen3`).

    Raises:
        WeightsError: Unknown or missing keys, misnumbered blocks.
    """
    state = strip_prefixes(state_dict)
    if any(k.startswith("encoder.") for k in state):
        state = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    return TABLE.convert({k: v for k, v in state.items() if not k.startswith("merger.")}, FAMILY)


def encoder_from_timm_qwen3(model: nn.Module, state_dict: Mapping[str, torch.Tensor] | None = None) -> VisionEncoder:
    """A `VisionEncoder` equivalent to a timm Qwen3 ViT instance (its weights, or `state_dict` in
    timm's format), in eval mode, without an image processor."""
    config = config_from_timm_qwen3(model)
    weights = convert_state_dict(model.state_dict() if state_dict is None else state_dict)
    return encoder_holding(config, weights, copy=state_dict is None, source=f"converted {FAMILY} state dict")


def merger_from_timm_qwen3(model: nn.Module) -> Any:
    """The `_enc` variants' merger (timm `Qwen3VitPatchMerger`: LayerNorm per patch, 2x2 merge,
    `fc1`, GELU, `fc2`) as a `qwen_merger` `Projector`: `proj(encoder(x).patches(-1), grid)`
    equals the timm encoder's `forward(x)` with `global_pool='merge'`.

    Raises:
        UnsupportedTimmModel: The model has no merger, one without its last projection
            (`out_features=0`), or another norm or activation.
    """
    from timm.layers import LayerNorm

    from ..projectors import load_qwen3_vl_merger

    name = _name(model)
    merger = getattr(_trunk(model, name), "merger", None)
    if merger is None:
        _refuse(name, "a merger: this model has none (global_pool != 'merge')")
    if isinstance(merger.fc2, nn.Identity):
        _refuse(name, "a merger without its last projection (out_features=0)")
    if type(merger.act) is not nn.GELU or merger.act.approximate != "none" or type(merger.norm) not in (nn.LayerNorm, LayerNorm):
        _refuse(name, f"a merger with {type(merger.norm).__name__} / {merger.act!r} (only LayerNorm and exact GELU)")
    names = {"norm": "norm", "fc1": "linear_fc1", "fc2": "linear_fc2"}
    state = {f"{names[k.split('.')[0]]}.{k.split('.')[1]}": v for k, v in merger.state_dict().items()}
    projector = load_qwen3_vl_merger(state, scale_factor=merger.merge_size)
    if projector.body.norm.eps != merger.norm.eps:
        _refuse(name, f"a merger LayerNorm eps {merger.norm.eps} (Qwen's is {projector.body.norm.eps})")
    return projector


def load_timm_qwen3(name: str, checkpoint: str | None = None, **timm_kwargs: Any) -> VisionEncoder:
    """Load a timm Qwen3-VL / Qwen3.5 vision model as a `VisionEncoder`.

    Args:
        name: A timm model name built by `qwen3_vit.py` (`qwen3_vit_306m_enc.qwen3_vl_4b`, ...).
        checkpoint: A weight file in timm's state-dict format; `None` uses timm's pretrained
            weights (from the Hugging Face cache; offline they must be there).
        **timm_kwargs: Passed to `timm.create_model`.

    Returns:
        The encoder in eval mode; `image_processor` holds timm's preprocessing.

    Raises:
        RuntimeError: `checkpoint=None` and timm cannot get the weights.
        UnsupportedTimmModel: The architecture is not expressible.
        WeightsError: The checkpoint does not fit the architecture.
    """
    model, state_dict, source = create_timm_model(name, checkpoint, timm_kwargs)
    with naming(source):
        encoder = encoder_from_timm_qwen3(model, state_dict)
    encoder.image_processor = timm_processor(model, _trunk(model, name).patch_embed.img_size)
    return encoder
