"""HF Llama 4 vision tower (`Llama4VisionModel`) to `VisionEncoder`: the tower of a whole `llama4`
checkpoint (keys under `vision_model.`) or a `llama4_vision_model` saved alone.

The tower is the one block with options, nothing new:
  * patch embedding: `torch.nn.Unfold` + a bias-free `Linear` over `(C, p, p)`-ordered pixels,
    the strided convolution whose kernel is that weight reshaped to `(D, C, p, p)`
    (`patch_bias=False`, `patch_remainder='drop'`: Unfold floors the grid);
  * a CLS token appended AFTER the patches, a learned table of `N + 1` rows (patches, then CLS)
    added to every token: the CLS row is folded into our CLS token (ours comes first; attention
    does not see the order, RoPE leaves the CLS unrotated in both);
  * `layernorm_pre` after the positions (`norm_pre`), `layernorm_post` on every token of the
    last layer (`final_norm`); LayerNorm pre-norm blocks; all LayerNorms are built with
    PyTorch's default eps 1e-5 (the config's `norm_eps` is not read by the reference);
  * separate q / k / v projections with biases (fused into `qkv`), `o_proj` with bias, a
    `fc1` / GELU / `fc2` MLP (exact GELU: `Llama4VisionMLP` builds `nn.GELU()` whatever
    `hidden_act` says);
  * 2D RoPE on the patches (`Llama4VisionRotaryEmbedding`, Pixtral's axial rope): pair `j` of
    each head turns by `(x + 1) f_j` for the first `d / 4` pairs and `(y + 1) f_j` for the
    rest, `f_j = theta ** -(j / (d/4))`, adjacent channel pairs (complex multiply); the CLS
    row is zero (unrotated). That is `rope='eva'`, `rope_layout='interleaved'`,
    `rope_grid_offset=1`, `rope_xy=True`.

Layer `i` is `hidden_states[i + 1]` with the CLS moved from the end to the front; `norm=True` on
the last layer is `layernorm_post`'s output, whose patches (CLS dropped) the reference's
`vision_adapter` (pixel shuffle + MLP, our `pixel_shuffle` projector: `converters.hf_connectors.
load_llama4_connector`) reads; `load_vision_side` assembles both.

The reference's rotary table and position table are built for `image_size` only: it takes no
other size. Ours resamples the table (bicubic) and recomputes the rotary table for other grids,
which the reference does not define. `Llama4ImageProcessor`'s tiling (up to `max_patches` tiles
of `image_size` plus a global view) is not expressed: the encoder's processor is one tile's
(bilinear to `image_size`, mean = std = 0.5).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..config import VisionConfig
from .hf_common import KeyTable, Transform, fused_qkv, parse_config, square

FAMILY = "HF Llama 4 vision"
TOWER_PREFIXES = ("vision_model.",)  # a whole llama4 checkpoint (transformers 5 keeps it at the top)
IGNORED_PREFIXES = ("vision_adapter.",)  # the connector's (`load_llama4_connector`)

_L = "model.layers.{i}"


def _patch_weight(patch: int):
    def fold(linear: torch.Tensor) -> torch.Tensor:
        width, pixels = linear.shape  # (D, C*p*p), Unfold's (C, kh, kw) order
        return linear.reshape(width, pixels // (patch * patch), patch, patch)  # (D, C, p, p)

    return fold


def _cls_and_table(cls: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our CLS token `(1, 1, D)` (the class embedding plus the table's LAST row) and the patch rows `(1, N, D)`."""
    return (cls + table[-1]).reshape(1, 1, -1), table[:-1].reshape(1, -1, table.shape[-1]).contiguous()


def table(patch: int) -> KeyTable:
    """The key table of a tower of patch side `patch` (bare `Llama4VisionModel` names)."""
    return KeyTable(
        renames={
            "layernorm_pre": "norm_pre",
            "layernorm_post": "norm",
            f"{_L}.input_layernorm": "blocks.{i}.norm1",
            f"{_L}.self_attn.o_proj": "blocks.{i}.attn.proj",
            f"{_L}.post_attention_layernorm": "blocks.{i}.norm2",
            f"{_L}.mlp.fc1": "blocks.{i}.mlp.fc1",
            f"{_L}.mlp.fc2": "blocks.{i}.mlp.fc2",
        },
        transforms=(
            Transform(("patch_embed.proj.weight",), ("patch_embedding.linear.weight",), _patch_weight(patch)),
            Transform(("cls_token", "pos_embed"), ("class_embedding", "positional_embedding_vlm"), _cls_and_table),
            *fused_qkv(f"{_L}.self_attn", ("q_proj", "k_proj", "v_proj")),
        ),
        ignored=("rotary_embedding.freqs_ci",),  # a buffer computed from the config
    )


def vision_config_of(hf_config_or_dict: Any) -> Any:
    """The `Llama4VisionConfig` of a vision config or of a whole `llama4` config (or their dicts)."""
    import transformers as tr

    classes = {"llama4_vision_model": tr.Llama4VisionConfig, "llama4": tr.Llama4Config}
    c = parse_config(hf_config_or_dict, classes, FAMILY)
    return c.vision_config if c.model_type == "llama4" else c


def config_from_hf(hf_config_or_dict: Any) -> VisionConfig:
    """Our config for a Llama 4 vision tower.

    Args:
        hf_config_or_dict: A `Llama4VisionConfig`, a whole `Llama4Config`, or either's dict.

    Raises:
        ValueError: Non-square sizes, a RoPE type other than the default, or a head width not
            a multiple of 4 (two axes of rotated pairs).
    """
    c = vision_config_of(hf_config_or_dict)
    rope = dict(c.rope_parameters or {})
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"{FAMILY}: rope_type={rope['rope_type']!r} is not supported (only 'default')")
    if (c.hidden_size // c.num_attention_heads) % 4:
        raise ValueError(f"{FAMILY}: head width {c.hidden_size // c.num_attention_heads} is not a multiple of 4")
    return VisionConfig(
        image_size=square(c.image_size, "image_size", FAMILY),
        patch_size=square(c.patch_size, "patch_size", FAMILY),
        in_channels=c.num_channels,
        width=c.hidden_size,
        depth=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        mlp_dim=c.intermediate_size,
        act="gelu",  # nn.GELU() in Llama4VisionMLP, whatever hidden_act says
        qkv_bias=True,
        patch_bias=False,
        class_token=True,
        pos_embed="learned",
        rope="eva",
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        rope_layout="interleaved",
        rope_grid_offset=1.0,
        rope_xy=True,
        norm_pre=True,
        final_norm=True,
        norm_eps=1e-5,  # nn.LayerNorm's default: the reference does not pass norm_eps
        pool="none",
        patch_remainder="drop",
    )


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], config: VisionConfig) -> dict[str, torch.Tensor]:
    """Our state dict from a Llama 4 vision tower's keys.

    Args:
        state_dict: `Llama4VisionModel` keys, bare or under `vision_model.` (then only those are
            read: a whole model's language model and projector are left out); the
            `vision_adapter.*` keys (the connector) are left out.
        config: The tower's `VisionConfig` (its patch side unfolds the patch weight).

    Raises:
        WeightsError: A key is missing, or a key is neither used nor ignored.
    """
    prefix = next((p for p in TOWER_PREFIXES if any(k.startswith(p) for k in state_dict)), "")
    tower = {
        key[len(prefix):]: value
        for key, value in state_dict.items()
        if key.startswith(prefix) and not key[len(prefix):].startswith(IGNORED_PREFIXES)
    }
    return table(config.patch_size).convert(tower, FAMILY)


def image_processor(config: VisionConfig) -> Any:
    """One tile of `Llama4ImageProcessor`: bilinear to `image_size` (torchvision), mean = std = 0.5."""
    from ..processing import ImageProcessor, ProcessorConfig

    return ImageProcessor(ProcessorConfig(resize_mode="exact", size=config.image_size, interpolation="bilinear",
                                          backend="torchvision", mean=0.5, std=0.5))
