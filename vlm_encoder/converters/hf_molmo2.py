"""HF Molmo2 vision tower (`Molmo2VisionModel`) to `VisionEncoder`: the tower of a whole `molmo2`
checkpoint.

A plain SigLIP-style ViT, the one block with options: a `Linear` patch embedding over
pre-patchified pixels in `(p_h, p_w, C)` order (`Molmo2ImageProcessor`'s
`batch_pixels_to_patches`; the strided convolution whose kernel is that weight reshaped to
`(D, p, p, C)` and moved to `(D, C, p, p)`), a learned table of one row per patch of
`image_size` (row-major; the reference takes exactly that many patches), LayerNorm pre-norm
blocks (`layer_norm_eps`), q / k / v / o projections with biases (fused `qkv`), an `fc1` / act /
`fc2` MLP, no CLS and no final norm. Grouped-query attention (`num_key_value_heads <
num_attention_heads`), a head width other than `hidden_size / num_attention_heads` and
`attention_bias=False` are not expressed by the block and are refused by name (the released
Molmo2 towers have none of them).

Names: a saved checkpoint holds the released names (transformers writes them back on save):
`model.vision_backbone.image_vit.` + `patch_embedding`, `positional_embedding`,
`transformer.resblocks.{i}.` + `attention.w{q,k,v,o}`, `attention_norm`, `feed_forward.w1` /
`w2`, `ffn_norm`; transformers' in-memory names (`model.vision_tower.` + `layers.{i}.self_attn.
{q,k,v,o}_proj`, `layer_norm1` / `2`, `mlp.fc1` / `fc2`) are read as well. One layout per
checkpoint; each is applied strictly.

Layer `i` is `hidden_states[i + 1]`; the adapter (`molmo_pool`: `converters.hf_connectors.
load_molmo2_connector`) reads the layers `adapter_config.vision_feature_layer` (`l >= 0`:
`hidden_states[l + 1]` = our layer `l`; `l < 0`: `hidden_states[l]` = our layer `l`), concatenated
in that order; `load_vision_side` assembles both for one crop per image.

Preprocessing: `Molmo2ImageProcessor` resizes a low-resolution view to `image_size` and cuts
overlapping crops (`max_crops`, `overlap_margins`) with their pooling sets; the encoder's
processor is one view's (bilinear to `image_size`, mean = std = 0.5); the crops are not
expressed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..config import VisionConfig
from ..weights import WeightsError
from .hf_common import KeyTable, Transform, activation, fused_qkv, parse_config

FAMILY = "HF Molmo2 vision"
RELEASED_PREFIXES = ("model.vision_backbone.image_vit.", "vision_backbone.image_vit.")
MEMORY_PREFIXES = ("model.vision_tower.", "vision_tower.")
TOWER_PREFIXES = (*RELEASED_PREFIXES, *MEMORY_PREFIXES)


def _patch_weight(channels: int):
    def fold(linear: torch.Tensor) -> torch.Tensor:
        width, pixels = linear.shape  # (D, p*p*C), the processor's (p_h, p_w, C) order
        patch = int(round((pixels // channels) ** 0.5))
        return linear.reshape(width, patch, patch, channels).permute(0, 3, 1, 2).contiguous()  # (D, C, p, p)

    return fold


def _table(layer: str, names: Mapping[str, str], channels: int) -> KeyTable:
    """One layout's table: `layer` is the block prefix, `names` its module names
    (`q`, `k`, `v`, `o`, `norm1`, `norm2`, `fc1`, `fc2`)."""
    return KeyTable(
        renames={
            "patch_embedding.bias": "patch_embed.proj.bias",
            f"{layer}.{names['norm1']}": "blocks.{i}.norm1",
            f"{layer}.{names['o']}": "blocks.{i}.attn.proj",
            f"{layer}.{names['norm2']}": "blocks.{i}.norm2",
            f"{layer}.{names['fc1']}": "blocks.{i}.mlp.fc1",
            f"{layer}.{names['fc2']}": "blocks.{i}.mlp.fc2",
        },
        transforms=(
            Transform(("patch_embed.proj.weight",), ("patch_embedding.weight",), _patch_weight(channels)),
            Transform(("pos_embed",), ("positional_embedding",), lambda t: t.reshape(1, -1, t.shape[-1])),
            *fused_qkv(layer, (names["q"], names["k"], names["v"])),
        ),
    )


RELEASED_NAMES = dict(q="attention.wq", k="attention.wk", v="attention.wv", o="attention.wo", norm1="attention_norm",
                      norm2="ffn_norm", fc1="feed_forward.w1", fc2="feed_forward.w2")
MEMORY_NAMES = dict(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
                    norm1="layer_norm1", norm2="layer_norm2", fc1="mlp.fc1", fc2="mlp.fc2")


def vision_config_of(hf_config_or_dict: Any) -> Any:
    """The `Molmo2VisionConfig` of a whole `molmo2` config (or its dict; released key names read)."""
    import transformers as tr

    return parse_config(hf_config_or_dict, {"molmo2": tr.Molmo2Config}, FAMILY).vision_config


def config_from_hf(hf_config_or_dict: Any) -> VisionConfig:
    """Our config for a Molmo2 vision tower (`image_size` `(h, w)` as the config's).

    Raises:
        ValueError: What the block does not express (module docstring), or a position table
            that is not one row per patch of `image_size`.
    """
    c = vision_config_of(hf_config_or_dict)
    if c.num_key_value_heads != c.num_attention_heads:
        raise ValueError(f"{FAMILY}: grouped-query attention (num_key_value_heads={c.num_key_value_heads}, "
                         f"num_attention_heads={c.num_attention_heads}) is not supported")
    if c.head_dim * c.num_attention_heads != c.hidden_size:
        raise ValueError(f"{FAMILY}: head_dim={c.head_dim} x {c.num_attention_heads} heads != hidden_size="
                         f"{c.hidden_size} is not supported")
    if not c.attention_bias:
        raise ValueError(f"{FAMILY}: attention_bias=False (no output-projection bias) is not supported")
    height, width = (c.image_size, c.image_size) if isinstance(c.image_size, int) else tuple(c.image_size)
    grid = (height // c.patch_size, width // c.patch_size)
    if c.num_position_embeddings != grid[0] * grid[1]:
        raise ValueError(f"{FAMILY}: num_position_embeddings={c.num_position_embeddings} is not one row per patch "
                         f"of image_size {height}x{width} ({grid[0]}x{grid[1]})")
    return VisionConfig(
        image_size=(height, width),
        patch_size=c.patch_size,
        in_channels=c.num_channels,
        width=c.hidden_size,
        depth=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        mlp_dim=c.intermediate_size,
        act=activation(c.hidden_act, FAMILY),
        qkv_bias=True,
        patch_bias=True,
        class_token=False,
        pos_embed="learned",
        norm_eps=c.layer_norm_eps,
        final_norm=False,
        pool="none",
        patch_remainder="drop",
    )


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], config: VisionConfig) -> dict[str, torch.Tensor]:
    """Our state dict from a Molmo2 tower's keys under one of `TOWER_PREFIXES` (released or
    in-memory names, module docstring); a whole model's other keys are left out.

    Raises:
        WeightsError: Keys under two layouts, a missing key, or a key neither used nor known.
    """
    used = [p for p in TOWER_PREFIXES if any(k.startswith(p) for k in state_dict)]
    if len(used) != 1:
        raise WeightsError(f"{FAMILY}: expected the tower under one of {list(TOWER_PREFIXES)}, found {used or 'none'}")
    prefix = used[0]
    tower = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if prefix in RELEASED_PREFIXES:
        table = _table("transformer.resblocks.{i}", RELEASED_NAMES, config.in_channels)
    else:
        table = _table("layers.{i}", MEMORY_NAMES, config.in_channels)
    return table.convert(tower, FAMILY)


def image_processor(config: VisionConfig) -> Any:
    """One view of `Molmo2ImageProcessor`: bilinear to `image_size` (torchvision), mean = std = 0.5."""
    from ..processing import ImageProcessor, ProcessorConfig

    return ImageProcessor(ProcessorConfig(resize_mode="exact", size=config.image_size, interpolation="bilinear",
                                          backend="torchvision", mean=0.5, std=0.5))
