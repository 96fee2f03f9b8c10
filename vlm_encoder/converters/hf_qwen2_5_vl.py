"""HF Qwen2.5-VL vision tower (`Qwen2_5_VisionTransformerPretrainedModel`, vision `model_type`
"qwen2_5_vl_vision") to `VisionEncoder`; `TABLE` maps the names.

The tower is the one block with options: RMSNorm before attention and MLP (`norm_type`), a
bias-carrying SwiGLU MLP (`gate_proj` / `up_proj` packed into `fc1`, gate first), no position
table and no final norm, 2D RoPE over integer `(h, w)` patch positions (`rope='eva'`, `half`
layout, `(y, x)` axis order: the reference's `Qwen2_5_VLVisionRotaryEmbedding`), and window
attention in every block outside `fullatt_block_indexes` (`attn_window`, windows of
`window_size // spatial_merge_size // patch_size` merge units, i.e. that many times
`spatial_merge_size` patches per side, tiling the grid from its top-left corner).

Token order: the reference takes patches grouped by `spatial_merge_size`^2 merge unit, then
regroups the merge units window by window; our tokens stay row-major `(B, h*w, D)` (the
windows are an attention mask, `layers.WindowMask`), so every layer is the reference's hidden
state with its tokens put back in row-major order.

Patch embedding: the reference's `Conv3d` over `temporal_patch_size` frames sees an image
repeated over those frames (its processor tiles a single image), so for images it is the
`Conv2d` whose kernel is the 3D kernel summed over the temporal axis (`_fold_temporal`).
Videos (distinct frames) are not expressed.

The `merger.*` keys (the 2x2 `PatchMerger`) are not part of the encoder: load them as a
`qwen_merger` projector with `projectors.load_qwen2_5_vl_merger`. A whole `qwen2_5_vl`
checkpoint keeps the tower under `visual.` (hub checkpoints) or `model.visual.` (transformers
5 in memory); either is read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..config import VisionConfig
from .hf_common import KeyTable, Transform, parse_config, square

FAMILY = "HF Qwen2.5-VL vision"
TOWER_PREFIXES = ("model.visual.", "visual.")
IGNORED_PREFIXES = ("merger.",)
# Qwen2.5-VL has no fixed input size (its processor keeps each image near its own size); the
# encoder's native size, used by the default processor only, is 16 x 16 merge units.
NATIVE_MERGE_UNITS = 16


def _fold_temporal(weight: torch.Tensor) -> torch.Tensor:
    """Conv3d kernel `(D, C, T, p, p)` to the Conv2d kernel `(D, C, p, p)` of a still image."""
    return weight.sum(dim=2)


def _packed_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.cat([gate, up], dim=0)  # SwiGLU's fc1: gate rows first


TABLE = KeyTable(
    renames={
        "blocks.{i}.norm1": "blocks.{i}.norm1",
        "blocks.{i}.attn.qkv": "blocks.{i}.attn.qkv",
        "blocks.{i}.attn.proj": "blocks.{i}.attn.proj",
        "blocks.{i}.norm2": "blocks.{i}.norm2",
        "blocks.{i}.mlp.down_proj": "blocks.{i}.mlp.fc2",
    },
    transforms=(
        Transform(("patch_embed.proj.weight",), ("patch_embed.proj.weight",), _fold_temporal),
        *(
            Transform((f"blocks.{{i}}.mlp.fc1.{p}",), (f"blocks.{{i}}.mlp.gate_proj.{p}", f"blocks.{{i}}.mlp.up_proj.{p}"), _packed_gate_up)
            for p in ("weight", "bias")
        ),
    ),
    ignored=("rotary_pos_emb.inv_freq",),
)


def vision_config_of(hf_config_or_dict: Any) -> Any:
    """The `Qwen2_5_VLVisionConfig` of a vision config, or of a whole `qwen2_5_vl` config."""
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

    classes = {"qwen2_5_vl_vision": Qwen2_5_VLVisionConfig, "qwen2_5_vl": Qwen2_5_VLConfig}
    c = parse_config(hf_config_or_dict, classes, FAMILY)
    return c.vision_config if c.model_type == "qwen2_5_vl" else c


def config_from_hf(hf_config_or_dict: Any) -> VisionConfig:
    """Our config for a Qwen2.5-VL vision tower.

    Args:
        hf_config_or_dict: A `Qwen2_5_VLVisionConfig`, a whole `Qwen2_5_VLConfig`, or either's dict.

    Returns:
        The `VisionConfig` (`image_size`: 16 x 16 merge units, a default for the processor;
        the tower takes any grid).

    Raises:
        ValueError: A variant the encoder does not express (an activation other than SiLU,
            non-axial RoPE, a window smaller than one merge unit).
    """
    c = vision_config_of(hf_config_or_dict)
    if c.hidden_act != "silu":
        raise ValueError(f"{FAMILY}: hidden_act={c.hidden_act!r} is not supported (the gated MLP is SwiGLU: SiLU)")
    patch = square(c.patch_size, "patch_size", FAMILY)
    merge = int(c.spatial_merge_size)
    window_units = int(c.window_size) // merge // patch
    if window_units < 1:
        raise ValueError(f"{FAMILY}: window_size={c.window_size} is smaller than one merge unit ({merge * patch} px)")
    return VisionConfig(
        image_size=patch * merge * NATIVE_MERGE_UNITS,
        patch_size=patch,
        in_channels=c.in_channels,
        width=c.hidden_size,
        depth=c.depth,
        num_heads=c.num_heads,
        mlp_dim=c.intermediate_size,
        mlp_type="swiglu",
        qkv_bias=True,
        patch_bias=False,
        class_token=False,
        pos_embed="none",
        rope="eva",
        rope_theta=axial_rope_theta(c, FAMILY),
        rope_layout="half",
        attn_window=window_units * merge,
        full_attention_blocks=tuple(int(i) for i in c.fullatt_block_indexes),
        norm_type="rmsnorm",
        norm_eps=1e-6,  # the reference's RMSNorms are built with eps=1e-6
        final_norm=False,
        pool="none",
    )


def convert_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict from a Qwen2.5-VL vision tower checkpoint.

    Args:
        state_dict: `Qwen2_5_VisionTransformerPretrainedModel` keys, bare or under `visual.` /
            `model.visual.` (then only the keys under that prefix are read: a whole model's
            language model is left out); the merger's keys are left out (module docstring).

    Returns:
        Tensors under `VisionEncoder` names.

    Raises:
        WeightsError: A key is missing, or a key is neither used nor on the ignored list.
    """
    return TABLE.convert(tower_keys(state_dict, IGNORED_PREFIXES), FAMILY)


def tower_keys(state_dict: Mapping[str, torch.Tensor], ignored: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The vision tower's keys of a Qwen-VL checkpoint, bare: only those under the first of
    `TOWER_PREFIXES` present (a whole model's language model is left out), the prefix removed,
    then the keys starting with `ignored` (the mergers) dropped."""
    prefix = next((p for p in TOWER_PREFIXES if any(k.startswith(p) for k in state_dict)), "")
    return {
        key[len(prefix) :]: value
        for key, value in state_dict.items()
        if key.startswith(prefix) and not key[len(prefix) :].startswith(ignored)
    }


def axial_rope_theta(vision: Any, family: str) -> float:
    """The base of a Qwen-VL tower's axial 2D RoPE (another rope type is refused)."""
    rope = dict(vision.rope_parameters or {})
    if rope.get("rope_type", "axial") != "axial":
        raise ValueError(f"{family}: rope_type={rope['rope_type']!r} is not supported (only 'axial')")
    return float(rope.get("rope_theta", 10000.0))
