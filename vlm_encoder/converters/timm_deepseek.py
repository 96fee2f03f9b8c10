"""Converter for timm's DeepSeek-V4 vision models (`timm/models/deepseek_vit.py`:
`DeepseekVitEncoder`, the `deepseek_vit_412m_enc` variants, and `DeepseekVitClassifier` without
a head).

The tower is `hf_deepseek_v4`'s (RMSNorm, fused qkv with bias, bias-free packed SwiGLU, 2D RoPE
only, final RMSNorm); timm's names are already ours but for the MLP, whose missing biases become
zero biases. The architecture is read from the model instance and anything else is refused by
name. The encoder's `aligner` (timm `DeepseekVitAligner`, `global_pool='align'`) is not part of
the tower: `aligner_from_timm_deepseek` gives it as a `deepseek_aligner` projector.
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
from .hf_deepseek_v4 import _with_zero_bias, vision_config
from .timm_vit import UnsupportedTimmModel, create_timm_model, encoder_holding, timm_processor

FAMILY = "timm DeepSeek ViT"

_B = "blocks.{i}"
TABLE = KeyTable(
    renames={
        "patch_embed.proj": "patch_embed.proj",
        f"{_B}.norm1": "blocks.{i}.norm1",
        f"{_B}.attn.qkv": "blocks.{i}.attn.qkv",
        f"{_B}.attn.proj": "blocks.{i}.attn.proj",
        f"{_B}.norm2": "blocks.{i}.norm2",
        "norm": "norm",
    },
    transforms=tuple(
        Transform((f"{_B}.mlp.{fc}.weight", f"{_B}.mlp.{fc}.bias"), (f"{_B}.mlp.{fc}.weight",), _with_zero_bias)
        for fc in ("fc1", "fc2")
    ),
)


def is_deepseek(name: str) -> bool:
    """Whether timm builds `name` (an architecture, `.tag` allowed) with `deepseek_vit.py`."""
    import timm.models

    return timm.models.is_model_in_modules(name.split(".")[0], ["deepseek_vit"])


def _refuse(name: str, what: str) -> None:
    raise UnsupportedTimmModel(f"timm model {name}: {what} is not supported by VisionEncoder")


def _trunk(model: nn.Module, name: str) -> nn.Module:
    """The `DeepseekVitEncoder` of a model (a classifier's `encoder`, when it has no head)."""
    from timm.models.deepseek_vit import DeepseekVitClassifier, DeepseekVitEncoder

    if type(model) is DeepseekVitEncoder:
        return model
    if type(model) is DeepseekVitClassifier:
        if not isinstance(model.head, nn.Identity) or not isinstance(model.norm, nn.Identity) or model.global_pool:
            _refuse(name, "the classifier's pooling, affine-free RMSNorm and head (use the _enc variant, or "
                    "num_classes=0, global_pool='', final_norm=False)")
        return model.encoder
    _refuse(name, f"model class {type(model).__name__} (only DeepseekVitEncoder / DeepseekVitClassifier)")
    raise AssertionError  # unreachable


def _norm_eps(module: nn.Module, where: str, name: str) -> float:
    from timm.layers import RmsNormFp32

    if type(module) is not RmsNormFp32 or module.weight is None:
        _refuse(name, f"{where} of type {type(module).__name__} (only an affine RmsNormFp32)")
    return float(module.eps)


def _check_block(block: nn.Module, width: int, name: str) -> tuple[int, int, set[float]]:
    """(heads, MLP hidden width, norm epsilons) of a block, refusing what differs from the reference's."""
    from timm.layers import AttentionRope, GluMlp
    from timm.models.deepseek_vit import DeepseekVitBlock

    if type(block) is not DeepseekVitBlock:
        _refuse(name, f"block type {type(block).__name__}")
    attn, mlp = block.attn, block.mlp
    if type(attn) is not AttentionRope or not attn.rotate_half or attn.num_prefix_tokens:
        _refuse(name, "attention other than AttentionRope with the 'half' rotation and no prefix tokens")
    if not isinstance(attn.qkv, nn.Linear) or attn.qkv.bias is None or attn.proj.bias is None:
        _refuse(name, "attention without a fused, biased qkv and a biased output projection")
    if not all(isinstance(m, nn.Identity) for m in (attn.q_norm, attn.k_norm, attn.norm)):
        _refuse(name, "qk-norm or a norm inside the attention")
    if getattr(attn, "num_kv_heads", attn.num_heads) != attn.num_heads or attn.head_dim * attn.num_heads != width:
        _refuse(name, "grouped-query attention or an attention width other than embed_dim")
    if type(mlp) is not GluMlp or not isinstance(mlp.act, nn.SiLU) or mlp.gate_last or not isinstance(mlp.norm, nn.Identity):
        _refuse(name, f"MLP {type(mlp).__name__} (only the packed SwiGLU GluMlp, gate first)")
    if mlp.fc1.bias is not None or mlp.fc2.bias is not None:
        _refuse(name, "a SwiGLU with biases (the reference has none)")
    eps = {_norm_eps(block.norm1, "norm1", name), _norm_eps(block.norm2, "norm2", name)}
    return attn.num_heads, mlp.fc2.in_features, eps


def config_from_timm_deepseek(model: nn.Module) -> VisionConfig:
    """Read the `VisionConfig` of a timm `DeepseekVitEncoder` (or a head-less classifier).

    Raises:
        UnsupportedTimmModel: Naming what the encoder does not express.
    """
    from timm.layers import PatchEmbed
    from timm.layers.pos_embed_sincos import RotaryEmbeddingCat

    name = repr(getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__))
    trunk = _trunk(model, name)
    embed, rope, width = trunk.patch_embed, trunk.rope, trunk.embed_dim
    if type(embed) is not PatchEmbed or not isinstance(embed.norm, nn.Identity) or embed.proj.bias is None:
        _refuse(name, "a patch embedding other than a biased convolution")
    if embed.dynamic_img_pad:
        _refuse(name, "dynamic_img_pad (zero-padding images to whole patches)")
    if embed.patch_size[0] != embed.patch_size[1] or embed.proj.in_channels != 3:
        _refuse(name, f"patches {embed.patch_size} over {embed.proj.in_channels} channels (only square, RGB)")
    if (
        type(rope) is not RotaryEmbeddingCat or rope.in_pixels or rope.grid_type != "index" or not rope.rotate_half
        or rope.ref_feat_shape is not None or rope.grid_offset or rope.grid_indexing != "ij"
    ):
        _refuse(name, "a RoPE other than integer (y, x) positions in the 'half' layout")
    specs = [_check_block(b, width, name) for b in trunk.blocks]
    if len({s[:2] for s in specs}) != 1:
        _refuse(name, "blocks of different heads or MLP widths")
    eps = set().union(*(s[2] for s in specs), {_norm_eps(trunk.norm, "norm", name)})
    if len(eps) != 1:
        _refuse(name, f"RMSNorms with different epsilons {sorted(eps)}")
    if trunk.global_pool not in ("", "align", "avg"):
        _refuse(name, f"global_pool={trunk.global_pool!r}")
    return vision_config(
        width=width, depth=len(specs), num_heads=specs[0][0], mlp_dim=specs[0][1], patch_size=embed.patch_size[0],
        rope_theta=float(rope.temperature), image_size=tuple(embed.img_size), norm_eps=eps.pop(),
        pool="gap" if trunk.global_pool == "avg" and model is trunk else "none",
    )


def convert_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a timm DeepSeek ViT state dict (encoder keys, or a classifier's under `encoder.`) to
    `VisionEncoder` names; the `aligner.` keys are left out (`aligner_from_timm_deepseek`).

    Raises:
        WeightsError: Unknown or missing keys, misnumbered blocks.
    """
    state = strip_prefixes(state_dict)
    if any(k.startswith("encoder.") for k in state):
        state = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    return TABLE.convert({k: v for k, v in state.items() if not k.startswith("aligner.")}, FAMILY)


def encoder_from_timm_deepseek(model: nn.Module, state_dict: Mapping[str, torch.Tensor] | None = None) -> VisionEncoder:
    """A `VisionEncoder` equivalent to a timm DeepSeek ViT instance (its weights, or
    `state_dict` in timm's format), in eval mode, without an image processor."""
    config = config_from_timm_deepseek(model)
    weights = convert_state_dict(model.state_dict() if state_dict is None else state_dict)
    return encoder_holding(config, weights, copy=state_dict is None, source=f"converted {FAMILY} state dict")


def aligner_from_timm_deepseek(model: nn.Module) -> Any:
    """The encoder's `aligner` (timm `DeepseekVitAligner`: `fc1`, GELU, `fc2`) as a
    `deepseek_aligner` `Projector`: `proj(encoder(x).patches(-1), grid)` equals the timm
    encoder's `forward(x)` with `global_pool='align'`.

    Raises:
        UnsupportedTimmModel: The model has no aligner, or one with another activation.
    """
    from ..projectors.deepseek_aligner import load_deepseek_v4_aligner

    name = repr(getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__))
    aligner = getattr(_trunk(model, name), "aligner", None)
    if aligner is None:
        _refuse(name, "an aligner: this model has none (global_pool != 'align')")
    if type(aligner.act) is not nn.GELU or aligner.act.approximate != "none":
        _refuse(name, f"an aligner activation {aligner.act!r} (only exact GELU)")
    names = {"fc1": "w1", "fc2": "w2"}
    state = {f"{names[k.split('.')[0]]}.{k.split('.')[1]}": v for k, v in aligner.state_dict().items()}
    return load_deepseek_v4_aligner(state, scale_factor=aligner.downsample_ratio)


def load_timm_deepseek(name: str, checkpoint: str | None = None, **timm_kwargs: Any) -> VisionEncoder:
    """Load a timm DeepSeek-V4 vision model as a `VisionEncoder`.

    Args:
        name: A timm model name built by `deepseek_vit.py` (`deepseek_vit_412m_enc.deepseek_v4_1_flash`, ...).
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
        encoder = encoder_from_timm_deepseek(model, state_dict)
    encoder.image_processor = timm_processor(model, _trunk(model, name).patch_embed.img_size)
    return encoder
