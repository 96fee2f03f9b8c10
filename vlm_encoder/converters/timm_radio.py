"""timm's C-RADIO v3 / v4 backbones to `VisionEncoder`: `naflexvit_*_radio_v3/v4` (RADIO's own
position behaviour at every size) and `vit_*_radio_v3/v4` (a classic timm ViT whose table timm
resampled once to its `img_size` grid at load; other sizes resample that table as any timm ViT).

`naflexvit_*_radio_*` (timm `NaFlexVit`): the table is `pos_embed_grid_size` (128 x 128 for the
real checkpoints) `(1, H, W, D)`, resized bilinearly without antialias to a square of the grid's
larger side and cropped top-left (`pos_embed_ar_preserving`) -> `pos_resample_crop` with
`image_size` = the table's grid in pixels; `pos_embed_align_corners` is kept per checkpoint
(timm: True for C-RADIOv3-B / -H, whose hub code used it; False for the others and for v4). The
patch projection is a Linear over `(p, p, C)` patches (`patchify_channels_last`) -> our patch
convolution. Blocks, LayerScale and the missing final norm are a timm ViT's
(`timm_vit._block_spec`).

`vit_*_radio_*` (timm `VisionTransformer`) goes through `timm_vit` unchanged.

Prefix tokens: timm keeps RADIO's class tokens as one `cls_token` plus `reg_token` (the other
class tokens, then the registers) and does not record how many class tokens there are. By
default the encoder sees timm's split (one CLS, the rest registers, no summary); pass
`num_class_tokens` / `summary_idxs` (a RADIO config's `num_cls_tokens` / `summary_idxs`) to name
the class tokens and the summary as the HF route does (`hf_radio`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..config import VisionConfig
from ..encoder import VisionEncoder
from ..weights import WeightsError, naming, strip_prefixes
from .timm_vit import (
    UnsupportedTimmModel,
    _block_spec,
    _layer_norm_eps,
    config_from_timm,
    create_timm_model,
    encoder_holding,
    timm_processor,
)
from .timm_vit import convert_state_dict as convert_vit_state_dict

_NAME = re.compile(r"^(naflexvit|vit)_\w+_radio_v\d+$")


def is_radio(name: str) -> bool:
    """Whether a timm model name (an optional `.tag` aside) is one of timm's C-RADIO backbones."""
    return bool(_NAME.match(name.split(".", 1)[0]))


def _refuse(name: str, what: str) -> None:
    raise UnsupportedTimmModel(f"timm model {name}: {what} is not supported by VisionEncoder")


def _naflex_config(model: nn.Module) -> VisionConfig:
    """The `VisionConfig` of a timm `NaFlexVit` with a learned, aspect-preserving table."""
    name = repr(getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__))
    embeds = model.embeds
    if embeds.pos_embed_type != "learned":
        _refuse(name, f"pos_embed={embeds.pos_embed_type!r} (only a learned table)")
    if not embeds.is_linear or embeds.norm_input is not None or not isinstance(embeds.norm, nn.Identity):
        _refuse(name, "a convolutional or normalised patch embedding (only a Linear over patches)")
    if embeds.dynamic_img_pad or embeds.enable_patch_interpolator:
        _refuse(name, "dynamic_img_pad / patch interpolation")
    if embeds.patch_size[0] != embeds.patch_size[1]:
        _refuse(name, f"non-square patches {embeds.patch_size}")
    grid = tuple(embeds.pos_embed.shape[1:3])
    if embeds.pos_embed_ar_preserving and grid[0] != grid[1]:
        _refuse(name, f"an aspect-preserving resize of a non-square table {grid}")
    if embeds.pos_embed_interp_mode not in ("bilinear", "bicubic"):
        _refuse(name, f"pos_embed_interp_mode={embeds.pos_embed_interp_mode!r}")
    if getattr(model, "rope", None) is not None or model.patch_drop is not None:
        _refuse(name, "rotary embeddings / patch dropout")
    if model.attn_pool is not None or not isinstance(model.head, nn.Identity):
        _refuse(name, "an attention pool or a classifier head (create the model with num_classes=0)")
    if not isinstance(model.norm_pre, nn.Identity) or not isinstance(model.fc_norm, nn.Identity):
        _refuse(name, "norm_pre / fc_norm")
    width = model.embed_dim
    blocks = [_block_spec(b, width, name) for b in model.blocks]
    first = blocks[0]
    for i, spec in enumerate(blocks[1:], start=1):
        if any(spec[k] != first[k] for k in spec if k not in ("eps", "layer_scale_init")):
            _refuse(name, f"blocks that differ from block 0 (block {i})")
    eps = set().union(*(b["eps"] for b in blocks))
    final_norm = not isinstance(model.norm, nn.Identity)
    if final_norm:
        eps.add(_layer_norm_eps(model.norm, "norm", name))
    if len(eps) != 1:
        _refuse(name, f"LayerNorms with different epsilons {sorted(eps)}")
    pools = {"token": "cls", "avg": "gap", "": "none"}
    if model.global_pool not in pools or (model.global_pool == "avg" and model.pool_include_prefix):
        _refuse(name, f"global_pool={model.global_pool!r} (allowed: 'token', 'avg' without prefix tokens, '')")
    patch = embeds.patch_size[0]
    return VisionConfig(
        image_size=(grid[0] * patch, grid[1] * patch),
        patch_size=patch,
        in_channels=embeds.in_chans,
        width=width,
        depth=len(blocks),
        num_heads=first["num_heads"],
        mlp_dim=first["mlp_dim"],
        mlp_type=first["mlp_type"],
        act=first["act"],
        qkv_bias=first["qkv_bias"],
        patch_bias=embeds.proj.bias is not None,
        class_token=embeds.cls_token is not None,
        num_register_tokens=embeds.num_reg_tokens,
        pos_embed="learned",
        pos_resample_mode=embeds.pos_embed_interp_mode,
        pos_resample_antialias=embeds.pos_embed_antialias,
        pos_resample_align_corners=embeds.pos_embed_align_corners,
        pos_resample_crop=embeds.pos_embed_ar_preserving,
        final_norm=final_norm,
        norm_eps=eps.pop(),
        layer_scale_init=first["layer_scale_init"],
        pool=pools[model.global_pool] if embeds.cls_token is not None or model.global_pool != "token" else "none",
        patch_remainder="drop",  # timm's batch_patchify floors the grid
    )


def _naflex_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: VisionConfig, channels_last: bool
) -> dict[str, torch.Tensor]:
    """A `NaFlexVit` state dict under timm `VisionTransformer` names (for `timm_vit`'s mapping)."""
    out: dict[str, torch.Tensor] = {}
    p, c = config.patch_size, config.in_channels
    for key, value in strip_prefixes(state_dict).items():
        if key == "embeds.proj.weight":  # (D, p*p*C) or (D, C*p*p) -> (D, C, p, p)
            value = value.reshape(-1, p, p, c).permute(0, 3, 1, 2) if channels_last else value.reshape(-1, c, p, p)
            out["patch_embed.proj.weight"] = value.contiguous()
        elif key == "embeds.proj.bias":
            out["patch_embed.proj.bias"] = value
        elif key == "embeds.pos_embed":  # (1, H, W, D) -> (1, H*W, D)
            out["pos_embed"] = value.reshape(1, -1, value.shape[-1])
        elif key in ("embeds.cls_token", "embeds.reg_token"):
            out[key[len("embeds.") :]] = value
        elif key.startswith("embeds."):
            raise WeightsError(f"timm NaFlexVit state dict has {key!r}, which the RADIO converter does not know")
        else:
            out[key] = value
    return out


def _name_class_tokens(config: VisionConfig, weights: dict[str, torch.Tensor], num_class_tokens: int | None,
                       summary_idxs: tuple[int, ...]) -> tuple[VisionConfig, dict[str, torch.Tensor]]:
    """timm's CLS + registers re-split into RADIO's `num_class_tokens` class tokens + registers."""
    if num_class_tokens is None:
        if summary_idxs:
            raise ValueError("summary_idxs needs num_class_tokens (how many of timm's prefix tokens are class tokens)")
        return config, weights
    prefix = torch.cat([weights.pop(k) for k in ("cls_token", "register_tokens") if k in weights], dim=1)  # (1, P, D)
    if not 1 <= num_class_tokens <= prefix.shape[1]:
        raise ValueError(f"num_class_tokens={num_class_tokens} must be in 1..{prefix.shape[1]} (timm's prefix tokens)")
    weights["cls_token"] = prefix[:, :num_class_tokens].contiguous()
    if prefix.shape[1] > num_class_tokens:
        weights["register_tokens"] = prefix[:, num_class_tokens:].contiguous()
    config = config.replace(class_token=True, num_class_tokens=num_class_tokens, summary_idxs=tuple(summary_idxs),
                            num_register_tokens=prefix.shape[1] - num_class_tokens)
    return config, weights


def encoder_from_timm_radio(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    num_class_tokens: int | None = None,
    summary_idxs: tuple[int, ...] = (),
) -> VisionEncoder:
    """A `VisionEncoder` equivalent to a timm C-RADIO model (`NaFlexVit` or `VisionTransformer`).

    Args:
        model: The timm model (gives the architecture).
        state_dict: Weights in timm's layout; the model's own when `None`.
        num_class_tokens: How many of timm's prefix tokens are RADIO class tokens (`None`:
            timm's split, one CLS).
        summary_idxs: Which class tokens form the summary (with `num_class_tokens`).

    Returns:
        The encoder in eval mode, without an image processor.

    Raises:
        UnsupportedTimmModel: The model uses something the encoder does not express.
        WeightsError: Keys the converter does not know.
    """
    from timm.models.naflexvit import NaFlexVit

    weights_in = model.state_dict() if state_dict is None else state_dict
    if type(model) is NaFlexVit:
        config = _naflex_config(model)
        weights = convert_vit_state_dict(_naflex_state_dict(weights_in, config, model.embeds.channels_last), config)
    else:
        config = config_from_timm(model)
        weights = convert_vit_state_dict(weights_in, config)
    config, weights = _name_class_tokens(config, weights, num_class_tokens, tuple(summary_idxs))
    return encoder_holding(config, weights, copy=state_dict is None, source="converted timm RADIO state dict")


def load_timm_radio(
    name: str,
    checkpoint: str | None = None,
    num_class_tokens: int | None = None,
    summary_idxs: tuple[int, ...] = (),
    **timm_kwargs: Any,
) -> VisionEncoder:
    """Load a timm C-RADIO backbone (`naflexvit_*_radio_*` or `vit_*_radio_*`) as a `VisionEncoder`.

    Args:
        name: A timm model name (`naflexvit_huge_patch16_radio_v4.c_radio`, ...).
        checkpoint: A weight file in timm's layout; `None` uses timm's pretrained weights
            (offline they must be in the Hugging Face cache).
        num_class_tokens: See `encoder_from_timm_radio`.
        summary_idxs: See `encoder_from_timm_radio`.
        **timm_kwargs: Architecture overrides passed to `timm.create_model`.

    Returns:
        The encoder in eval mode; `image_processor` holds timm's preprocessing.
    """
    way_out = f"load_timm_radio({name!r}, checkpoint='path/to/model.safetensors')"
    model, state_dict, source = create_timm_model(name, checkpoint, timm_kwargs, way_out=way_out)
    with naming(source):
        encoder = encoder_from_timm_radio(model, state_dict, num_class_tokens, summary_idxs)
    encoder.image_processor = timm_processor(model)
    return encoder
