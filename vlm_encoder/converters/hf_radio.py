"""HF RADIO / C-RADIO v3 and v4 (`RadioModel`, `model_type` "radio") to `VisionEncoder`;
`TABLE` maps the names.

What transformers' `radio` describes, and how it is expressed:
  - patches: a bias-free Linear over each `(C, p, p)` patch, channel-major -> our patch
    convolution without bias (the same weights reshaped `(D, C, p, p)`);
  - positions: RADIO's CPE, a learned table over the grid of `max_img_size` (128 x 128 for
    2048 px at patch 16), resampled per image bilinearly (no antialias, half-pixel centres) to
    a square of the grid's larger side and cropped to its top-left `h x w`
    (`pos_resample_crop`). Our `image_size` is therefore `max_img_size` (the table's grid);
    the processor resizes to the config's `image_size`;
  - prefix tokens: `cls_register_token` holds `num_cls_tokens` class tokens (one per teacher)
    then `num_registers` registers, no positions -> `num_class_tokens` class tokens and
    `num_register_tokens` registers, `summary_idxs` picking the summary (HF's `summary` is
    `EncoderOutput.summary(-1).flatten(1)`, `features` is `patches(-1)`);
  - blocks: pre-norm LayerNorm, separate q / k / v (fused here), a GELU MLP or SwiGLU
    (`use_swiglu_ffn`, gate first in our packed `fc1`), LayerScale on both branches (HF always
    builds it; a checkpoint without `lambda1` gets `layerscale_value`, as transformers fills
    it); no final norm, no pooler (`pool='none'`).
  - the input conditioner (mean / std inside the model) becomes the processor's normalisation:
    our encoder takes normalised pixels, as for every family.

Two layouts are read: NVIDIA's released one (`radio_model.model.patch_generator.*`,
`radio_model.model.blocks.{i}.attn.qkv`, ...; transformers' `save_pretrained` writes it too,
its conversion mapping reversed), renamed as that mapping renames it (`_RELEASED`; the fused
`qkv` split in q, k, v), and transformers' own names (a live `RadioModel.state_dict()`). The
release's LayerScale (`ls1` / `ls2`, `.gamma` or `.grandma`) is loaded as the blocks'
LayerScale (transformers' mapping leaves it out and fills `layerscale_value`). Refused by name:
the video patch projection (`video_temporal_patch_size`), NVIDIA's remote-code `config.json`
(`args` / `version`, no geometry), and any released key outside the tower, its input
conditioner and `summary_idxs` (e.g. teacher adaptor heads).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from ..config import VisionConfig
from ..weights import WeightsError
from .hf_common import KeyTable, activation, fused_qkv, parse_config, select_tower

FAMILY = "HF RADIO"
TOWER_PREFIXES = ("model.",)
IGNORED_PREFIXES = ("input_conditioner.", "radio_model.input_conditioner.")
_LAYER = "encoder.layer.{i}"
TABLE = KeyTable(
    renames={
        "embeddings.patch_projection": "patch_embed.proj",  # reshaped to a kernel (see _pack)
        "embeddings.position_embedding": "pos_embed",
        f"{_LAYER}.norm1": "blocks.{i}.norm1",
        f"{_LAYER}.attention.o_proj": "blocks.{i}.attn.proj",
        f"{_LAYER}.layer_scale1.lambda1": "blocks.{i}.ls1.gamma",
        f"{_LAYER}.norm2": "blocks.{i}.norm2",
        f"{_LAYER}.mlp.fc1": "blocks.{i}.mlp.fc1",  # the plain MLP's, or ...
        f"{_LAYER}.mlp.packed_in": "blocks.{i}.mlp.fc1",  # ... SwiGLU's gate + up (see _pack)
        f"{_LAYER}.mlp.fc2": "blocks.{i}.mlp.fc2",
        f"{_LAYER}.mlp.down_proj": "blocks.{i}.mlp.fc2",
        f"{_LAYER}.layer_scale2.lambda1": "blocks.{i}.ls2.gamma",
    },
    transforms=fused_qkv(f"{_LAYER}.attention", ("q_proj", "k_proj", "v_proj"), optional_bias=True),
    optional=(f"{_LAYER}.mlp.",),  # which MLP: load_state_dict_strict checks
    ignored=("summary_idxs",),  # the config's `summary_idxs` is read
)


def _refuse_remote_code_config(config: Any) -> None:
    """NVIDIA's remote-code `RADIOConfig` (`args`, `version`, `auto_map`; `model_type` "radio" too)
    states none of `RadioConfig`'s geometry: parsed as one it would silently be ViT-H defaults."""
    if isinstance(config, Mapping) and ("args" in config or "version" in config) and "num_hidden_layers" not in config:
        raise ValueError(
            f"{FAMILY}: this config.json is NVIDIA's remote-code RADIO config (version={config.get('version')!r}, "
            "'args'), which transformers' RadioConfig does not describe (no num_hidden_layers); remote code is "
            "never run: use a checkpoint whose config.json holds RadioConfig's fields"
        )


def config_from_hf(hf_config_or_dict: Any) -> VisionConfig:
    """Our config for an HF RADIO model.

    Args:
        hf_config_or_dict: A `RadioConfig` or its dict.

    Returns:
        The `VisionConfig` (`image_size` = `max_img_size`: the CPE table's grid).

    Raises:
        ValueError: A variant the encoder does not express (the video patch projection, a
            `max_img_size` that is not a multiple of the patch, an unknown activation).
    """
    from transformers import RadioConfig

    _refuse_remote_code_config(hf_config_or_dict)
    c = parse_config(hf_config_or_dict, {"radio": RadioConfig}, FAMILY)
    if c.video_temporal_patch_size is not None:
        raise ValueError(
            f"{FAMILY}: video_temporal_patch_size={c.video_temporal_patch_size} (the video patch projection) is "
            "not supported; images only"
        )
    if c.max_img_size % c.patch_size:
        raise ValueError(f"{FAMILY}: max_img_size={c.max_img_size} is not a multiple of patch_size={c.patch_size}")
    hidden = int(c.hidden_size * c.mlp_ratio)
    swiglu_hidden = (int(hidden * 2 / 3) + 7) // 8 * 8  # RadioSwiGLUFFN's rounding
    return VisionConfig(
        image_size=c.max_img_size,
        patch_size=c.patch_size,
        in_channels=c.num_channels,
        width=c.hidden_size,
        depth=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        mlp_dim=swiglu_hidden if c.use_swiglu_ffn else hidden,
        mlp_type="swiglu" if c.use_swiglu_ffn else "mlp",
        act="gelu" if c.use_swiglu_ffn else activation(c.hidden_act, FAMILY),  # SwiGLU's SiLU is built in
        qkv_bias=bool(c.qkv_bias),
        patch_bias=False,
        class_token=c.num_cls_tokens > 0,
        num_class_tokens=max(c.num_cls_tokens, 1),
        summary_idxs=tuple(int(i) for i in c.summary_idxs),
        num_register_tokens=c.num_registers,
        pos_embed="learned",
        pos_resample_mode="bilinear",
        pos_resample_antialias=False,
        pos_resample_crop=True,
        final_norm=False,
        norm_eps=c.layer_norm_eps,
        layer_scale_init=float(c.layerscale_value),
        pool="none",
        patch_remainder="drop",  # HF reshapes `H // p` rows: the remainder is dropped
    )


# NVIDIA's released names -> transformers' (its `conversion_mapping.py` entry for "radio").
_RELEASED = (
    ("radio_model.model.patch_generator.embedder.", "embeddings.patch_projection."),
    ("radio_model.model.patch_generator.pos_embed", "embeddings.position_embedding"),
    ("radio_model.model.patch_generator.cls_token.token", "embeddings.cls_register_token"),
    ("radio_model.model.blocks.", "encoder.layer."),
    ("radio_model.input_conditioner.", "input_conditioner."),
    ("radio_model.summary_idxs", "summary_idxs"),
)
_RELEASED_BLOCK = re.compile(r"(encoder\.layer\.\d+\.)(attn\.proj|attn\.qkv|ls([12])\.(?:gamma|grandma))(\..+)?$")


def _from_released(tower: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """NVIDIA's released keys under transformers' names (other keys unchanged)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tower.items():
        for old, new in _RELEASED:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        m = _RELEASED_BLOCK.match(key)
        if m and m[2] == "attn.proj":
            key = f"{m[1]}attention.o_proj{m[4] or ''}"
        elif m and m[2] == "attn.qkv":
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{m[1]}attention.{name}{m[4] or ''}"] = part
            continue
        elif m:
            key = f"{m[1]}layer_scale{m[3]}.lambda1"
        if key in out:
            raise WeightsError(f"{FAMILY} checkpoint has {key!r} in both the released and transformers' layouts")
        out[key] = value
    return out


def _pack(tower: dict[str, torch.Tensor], num_class_tokens: int, layerscale_value: float) -> dict[str, torch.Tensor]:
    """HF's layouts in ours (see the module docstring)."""
    out = _from_released(tower)
    weight = out.get("embeddings.patch_projection.weight")
    if weight is not None:  # (D, C*p*p), channel-major patches -> (D, C, p, p)
        side = int(round((weight.shape[1] / 3) ** 0.5))
        channels = weight.shape[1] // (side * side)
        out["embeddings.patch_projection.weight"] = weight.reshape(weight.shape[0], channels, side, side)
    prefix = out.pop("embeddings.cls_register_token", None)
    if prefix is None:
        raise WeightsError(f"{FAMILY} checkpoint is missing the keys embeddings.cls_register_token")
    if num_class_tokens:
        out["cls_token"] = prefix[:num_class_tokens].reshape(1, num_class_tokens, -1)
    if prefix.shape[0] > num_class_tokens:
        out["register_tokens"] = prefix[num_class_tokens:].reshape(1, prefix.shape[0] - num_class_tokens, -1)
    for key in [k for k in out if k.endswith(".attention.q_proj.weight")]:
        block = key[: -len(".attention.q_proj.weight")]
        width = out[key].shape[0]
        for n in (1, 2):  # a checkpoint without LayerScale (NVIDIA's C-RADIO): transformers' fill
            out.setdefault(f"{block}.layer_scale{n}.lambda1", out[key].new_full((width,), layerscale_value))
    for key in [k for k in out if ".mlp.gate_proj." in k]:
        up = key.replace(".gate_proj.", ".up_proj.")
        if up not in out:
            raise WeightsError(f"{FAMILY} checkpoint has {key!r} but not {up!r}")
        out[key.replace(".gate_proj.", ".packed_in.")] = torch.cat([out.pop(key), out.pop(up)], dim=0)
    return out


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], *, num_class_tokens: int, layerscale_value: float
) -> dict[str, torch.Tensor]:
    """Our state dict from an HF RADIO checkpoint.

    Args:
        state_dict: `RadioModel` keys (bare as saved, or under `model.`); the input conditioner's
            mean / std buffers are ignored (the processor normalises).
        num_class_tokens: `num_cls_tokens` of the config: how `cls_register_token` splits.
        layerscale_value: What a missing LayerScale is filled with (the config's).

    Returns:
        Tensors under `VisionEncoder` names (`cls_token`, `register_tokens` put directly).

    Raises:
        WeightsError: A key is missing, or a key is neither used nor on the ignored list.
    """
    tower = select_tower(state_dict, TOWER_PREFIXES, IGNORED_PREFIXES)
    packed = _pack(tower, num_class_tokens, layerscale_value)
    direct = {k: packed.pop(k) for k in ("cls_token", "register_tokens") if k in packed}
    return {**TABLE.convert(packed, FAMILY), **direct}


def convert_options(vision_config: VisionConfig) -> dict[str, Any]:
    """The `convert_state_dict` options a loaded config gives."""
    return {"num_class_tokens": vision_config.num_class_tokens if vision_config.class_token else 0,
            "layerscale_value": vision_config.layer_scale_init}


def image_processor(hf_config: Mapping[str, Any]) -> Any:
    """What our encoder takes from an image, for a RADIO model: a resize to the config's
    `image_size` (bilinear, torchvision; transformers ships no RADIO image processor, RADIO takes
    any multiple of the patch) and `[0, 1]` pixels normalised with the input conditioner's
    `norm_mean` / `norm_std` (OpenAI CLIP's by default)."""
    from transformers import RadioConfig

    from ..processing import ImageProcessor, ProcessorConfig

    c = parse_config(hf_config, {"radio": RadioConfig}, FAMILY)
    return ImageProcessor(ProcessorConfig(resize_mode="exact", size=c.image_size, interpolation="bilinear",
                                          backend="torchvision", mean=tuple(c.norm_mean), std=tuple(c.norm_std)))
