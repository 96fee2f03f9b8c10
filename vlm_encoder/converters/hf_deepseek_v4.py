"""DeepSeek-V4 vision tower from a whole DeepSeek-V4 checkpoint (DeepSeek's own release layout) to
`VisionEncoder`; `TABLE` maps the names.

transformers 5.24's `deepseek_v4` is the language model only: `DeepseekV4Config` has no vision
sub-config and no vision module. A DeepSeek-V4 vision checkpoint states its tower with the flat
`vision_*` fields of DeepSeek's inference `ModelArgs` (`vision_n_layers`, `vision_dim`,
`vision_n_heads`, `vision_inter_dim`, `vision_patch_size`, `vision_rope_theta`,
`vision_downsample_ratio`, `vision_min_pixels`), which `DeepseekV4Config` keeps as extra
attributes; a `deepseek_v4` config without them (e.g. `DeepSeek-V4-Flash-Base`) has no tower and is
refused by name. Its weights keep the tower under `vision.` and the aligner under `aligner.`, the
language model at the top level (the layout timm's `deepseek_vit.checkpoint_filter_fn_encoder`
reads, the reference for these names).

The tower (timm `deepseek_vit.py`) is the one block with options: RMSNorm (eps 1e-6, computed in
float32) before attention and MLP, fused qkv with bias, a bias-free packed SwiGLU (`w1` emits
`[gate, up]`; our `fc1` / `fc2` get zero biases, which is exact), 2D RoPE over integer `(y, x)`
patch positions as the only position encoding (`rope='eva'`, `half` layout, theta 10000): any grid
works, there is no table to resample. A final RMSNorm over the patch tokens; no CLS or register
tokens, patches row-major. The patch embedding is a Linear over each flattened `(C, p, p)` patch
(`proj.weight` of shape `(D, 3 p^2)`), exactly a `Conv2d` kernel reshaped.

The `aligner.*` keys (3x3 unshuffle, Linear, GELU, Linear) are the `deepseek_aligner` projector:
`load_aligner` reads them from the same directory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import torch

from ..config import VisionConfig
from ..weights import WeightsError, naming
from .hf_common import KeyTable, Transform, parse_config

FAMILY = "DeepSeek-V4 vision"
TOWER_PREFIXES = ("vision.",)
IN_CHANNELS = 3  # the reference embeds RGB patches: Linear(3 * p * p, D)
NORM_EPS = 1e-6  # the reference's RMSNorms (timm `deepseek_vit` norm_eps)
# `DeepseekV4Config` attributes that state the tower (DeepSeek's inference `ModelArgs` names).
VISION_FIELDS = (
    "vision_n_layers", "vision_dim", "vision_n_heads", "vision_inter_dim", "vision_patch_size",
    "vision_rope_theta", "vision_downsample_ratio", "vision_min_pixels",
)


def _patch_kernel(weight: torch.Tensor) -> torch.Tensor:
    """The Linear over flattened `(C, p, p)` patches `(D, C*p*p)` as the Conv2d kernel `(D, C, p, p)`."""
    if weight.ndim == 4:
        return weight
    p = math.isqrt(weight.shape[1] // IN_CHANNELS)
    if weight.ndim != 2 or IN_CHANNELS * p * p != weight.shape[1]:
        raise WeightsError(f"{FAMILY}: patch_embed.proj.weight of shape {tuple(weight.shape)} is not (D, 3 * p * p)")
    return weight.reshape(weight.shape[0], IN_CHANNELS, p, p)


def _with_zero_bias(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A bias-free Linear as ours with a zero bias (the same function)."""
    return weight, weight.new_zeros(weight.shape[0])


_B = "blocks.{i}"
TABLE = KeyTable(
    renames={
        "patch_embed.proj.bias": "patch_embed.proj.bias",
        f"{_B}.norm1": "blocks.{i}.norm1",
        f"{_B}.attn.wqkv": "blocks.{i}.attn.qkv",
        f"{_B}.attn.wo": "blocks.{i}.attn.proj",
        f"{_B}.norm2": "blocks.{i}.norm2",
        "norm": "norm",
    },
    transforms=(
        Transform(("patch_embed.proj.weight",), ("patch_embed.proj.weight",), _patch_kernel),
        Transform((f"{_B}.mlp.fc1.weight", f"{_B}.mlp.fc1.bias"), (f"{_B}.mlp.w1.weight",), _with_zero_bias),
        Transform((f"{_B}.mlp.fc2.weight", f"{_B}.mlp.fc2.bias"), (f"{_B}.mlp.w2.weight",), _with_zero_bias),
    ),
)


def vision_config(
    *, width: int, depth: int, num_heads: int, mlp_dim: int, patch_size: int, rope_theta: float,
    image_size: int | tuple[int, int], norm_eps: float = NORM_EPS, pool: str = "none",
) -> VisionConfig:
    """The `VisionConfig` of a DeepSeek-V4 vision tower (shared with `timm_deepseek`)."""
    return VisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        in_channels=IN_CHANNELS,
        width=width,
        depth=depth,
        num_heads=num_heads,
        mlp_dim=mlp_dim,
        mlp_type="swiglu",
        qkv_bias=True,
        patch_bias=True,
        class_token=False,
        pos_embed="none",
        rope="eva",
        rope_theta=rope_theta,
        rope_layout="half",
        norm_type="rmsnorm",
        norm_eps=norm_eps,
        final_norm=True,
        pool=pool,
    )


def deepseek_v4_config(hf_config_or_dict: Any) -> Any:
    """The `DeepseekV4Config` of a whole checkpoint, refused by name when it states no tower.

    Raises:
        ValueError: Another `model_type`, or `vision_*` fields missing (listed).
    """
    from transformers import DeepseekV4Config

    c = parse_config(hf_config_or_dict, {"deepseek_v4": DeepseekV4Config}, FAMILY)
    missing = [name for name in VISION_FIELDS if getattr(c, name, None) is None]
    if missing:
        raise ValueError(
            f"{FAMILY}: this deepseek_v4 config states no vision tower (missing {', '.join(missing)}); "
            "a text-only DeepSeek-V4 checkpoint has none"
        )
    return c


def config_from_hf(hf_config_or_dict: Any) -> VisionConfig:
    """Our config for the vision tower of a whole DeepSeek-V4 checkpoint.

    Args:
        hf_config_or_dict: A `DeepseekV4Config` carrying the `vision_*` fields, or its dict.

    Returns:
        The `VisionConfig`; `image_size` is the smallest square grid of `vision_min_pixels`
        (its side rounded up to whole patches, as the reference's processor does: 384^2 -> 392,
        544^2 -> 546 at patch 14), the processor's default. The tower takes any grid.

    Raises:
        ValueError: Another `model_type`, or a config without the tower's fields.
    """
    c = deepseek_v4_config(hf_config_or_dict)
    patch = int(c.vision_patch_size)
    side = math.ceil(math.sqrt(c.vision_min_pixels) / patch) * patch
    return vision_config(
        width=int(c.vision_dim), depth=int(c.vision_n_layers), num_heads=int(c.vision_n_heads),
        mlp_dim=int(c.vision_inter_dim), patch_size=patch, rope_theta=float(c.vision_rope_theta), image_size=side,
    )


def convert_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict from a DeepSeek-V4 checkpoint's vision tower.

    Args:
        state_dict: The tower's keys under `vision.` (then only those are read: the language
            model and the `aligner.` are left out), or bare.

    Returns:
        Tensors under `VisionEncoder` names.

    Raises:
        WeightsError: A key is missing, or a key is neither used nor known.
    """
    prefix = next((p for p in TOWER_PREFIXES if any(k.startswith(p) for k in state_dict)), "")
    tower = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return TABLE.convert(tower, FAMILY)


def load_aligner(directory: str | os.PathLike, revision: str | None = None) -> Any:
    """The `deepseek_aligner` `Projector` of a whole DeepSeek-V4 checkpoint (a directory or hub
    repo id): `vision_downsample_ratio` from its `config.json`, the `aligner.*` tensors from the
    shards that hold them (nothing else is read).

    Returns:
        The projector; on the tower's last layer (`load_encoder(directory)`), its output is the
        image tokens the reference hands its language model (`projectors.deepseek_aligner`).

    Raises:
        FileNotFoundError: No such directory, or a repo not in the cache while offline.
        ValueError: A config that states no DeepSeek-V4 vision tower.
        WeightsError: Missing or unexpected aligner keys, widths that do not fit.
    """
    from ..loading import CONFIG_FILE, read_config_file, read_weights
    from ..projectors.deepseek_aligner import load_deepseek_v4_aligner
    from ..specs.files import SourceFiles

    files = SourceFiles(os.fspath(directory), revision)
    config = deepseek_v4_config(read_config_file(files.get(CONFIG_FILE)))
    tensors, _, read = read_weights(files, None, lambda key: key.startswith("aligner."))
    with naming(f"{files.source} ({', '.join(read)})"):
        return load_deepseek_v4_aligner(tensors, scale_factor=int(config.vision_downsample_ratio))
