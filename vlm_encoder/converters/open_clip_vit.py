"""Converter for open_clip image towers: its own `VisionTransformer`, or a timm trunk (SigLIP).

open_clip checkpoints hold the whole CLIP model; only `visual.*` is read, the text tower and
the logit scale/bias are ignored explicitly. Names mapped for the native tower:

    visual.conv1                  -> patch_embed.proj        (no bias)
    visual.class_embedding (D,)   -> cls_token (1, 1, D)     (+ positional_embedding[0])
    visual.positional_embedding   -> pos_embed (1, N, D)     (rows 1..N)
    visual.ln_pre                 -> norm_pre
    visual.transformer.resblocks.{i}.ln_1 / attn.in_proj_* / attn.out_proj / ls_1 / ln_2 /
        mlp.c_fc / mlp.c_proj / ls_2
                                  -> blocks.{i}.norm1 / attn.qkv / attn.proj / ls1 / norm2 /
                                     mlp.fc1 / mlp.fc2 / ls2
    visual.ln_post                -> norm (or pooled_norm with final_ln_after_pool)
    visual.proj (D, E)            -> proj.weight (E, D)

A timm trunk (`vision_cfg.timm_model_name`, e.g. `ViT-B-16-SigLIP`) goes through
`timm_vit`: `visual.trunk.*` is a timm state dict, `visual.head.proj` the optional linear
projection.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..config import VisionConfig
from ..encoder import VisionEncoder
from ..weights import WeightsError, build_and_load, naming, read_state_dict, strip_prefixes
from . import timm_vit

# Top-level keys of a CLIP / CustomTextCLIP checkpoint that belong to the text side.
_TEXT_PREFIXES = (
    "token_embedding.",
    "positional_embedding",
    "transformer.",
    "ln_final.",
    "text_projection",
    "logit_scale",
    "logit_bias",
    "attn_mask",
    "text.",
)
_BLOCK_RENAMES = {
    "ln_1.": "norm1.",
    "attn.in_proj_weight": "attn.qkv.weight",
    "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj.": "attn.proj.",
    "ls_1.": "ls1.",
    "ln_2.": "norm2.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
    "ls_2.": "ls2.",
}
_CUSTOM_BLOCK_OPTIONS = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")
_TIMM_POOLS_REFUSED = ("abs_attn", "rot_attn")


class UnsupportedOpenClipModel(ValueError):
    """An open_clip image tower uses an option `VisionEncoder` cannot express."""


def _vision_cfg(model_cfg: Mapping[str, Any]) -> Any:
    """open_clip's `CLIPVisionCfg` (with its defaults) for a model config dict."""
    from open_clip.model import CLIPVisionCfg

    if not isinstance(model_cfg, Mapping) or "vision_cfg" not in model_cfg or "embed_dim" not in model_cfg:
        raise ValueError("model_cfg must be an open_clip model config dict with 'embed_dim' and 'vision_cfg'")
    raw = dict(model_cfg["vision_cfg"])
    known = {f.name for f in dataclasses.fields(CLIPVisionCfg)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UnsupportedOpenClipModel(f"vision_cfg has options this converter does not know: {unknown}")
    return CLIPVisionCfg(**raw)


def is_timm_trunk(model_cfg: Mapping[str, Any]) -> bool:
    """Whether the config's image tower is a timm model (`visual.trunk.*` weights)."""
    return bool(_vision_cfg(model_cfg).timm_model_name)


def build_timm_trunk(model_cfg: Mapping[str, Any]) -> nn.Module:
    """Build the timm trunk of a timm-tower open_clip config as open_clip's `TimmModel` does
    (random init, no download). Only the options that change the architecture are used.

    Raises:
        UnsupportedOpenClipModel: Attention-pool heads or an MLP projection on top of the trunk.
    """
    import timm

    vc = _vision_cfg(model_cfg)
    if vc.timm_pool in _TIMM_POOLS_REFUSED:
        raise UnsupportedOpenClipModel(
            f"timm_pool={vc.timm_pool!r} is not supported (allowed: 'map', 'avg', 'token', '')"
        )
    if vc.timm_proj == "mlp":
        raise UnsupportedOpenClipModel("timm_proj='mlp' is not supported (allowed: 'linear', 'none', '')")
    if vc.timm_proj in ("linear",):
        trunk = timm.create_model(vc.timm_model_name, pretrained=False)
        trunk.reset_classifier(0, **(dict(global_pool=vc.timm_pool) if vc.timm_pool else {}))
    else:
        num_classes = 0 if vc.timm_proj == "none" else model_cfg["embed_dim"]
        trunk = timm.create_model(
            vc.timm_model_name, pretrained=False, num_classes=num_classes, global_pool=vc.timm_pool
        )
    return trunk


def _config_from_trunk(model_cfg: Mapping[str, Any], trunk: nn.Module) -> VisionConfig:
    vc = _vision_cfg(model_cfg)
    config = timm_vit.config_from_timm(trunk)
    if vc.timm_proj == "linear":
        config = config.replace(embed_dim=model_cfg["embed_dim"], proj_bias=bool(vc.timm_proj_bias))
    return config


def config_from_open_clip(model_cfg: Mapping[str, Any]) -> VisionConfig:
    """The `VisionConfig` of an open_clip model config's image tower.

    Args:
        model_cfg: open_clip's model config (`open_clip.get_model_config(name)`): `embed_dim`,
            `vision_cfg`, `quick_gelu`, ... The text side is ignored.

    Returns:
        The equivalent configuration. For a timm trunk (`vision_cfg.timm_model_name`) the
        trunk is instantiated (random init, no download) and read by `timm_vit.config_from_timm`;
        otherwise this is a pure function of the dict.

    Raises:
        UnsupportedOpenClipModel: An option we do not express: a ResNet tower, attentional
            pooling (CoCa), custom attention blocks (qk-norm, scaled cosine, head scales, extra
            norms), `pool_type='none'`, unknown activation or norm arguments.
    """
    vc = _vision_cfg(model_cfg)
    if vc.timm_model_name:
        return _config_from_trunk(model_cfg, build_timm_trunk(model_cfg))
    if isinstance(vc.layers, (list, tuple)):
        raise UnsupportedOpenClipModel("ResNet image towers (vision_cfg.layers is a list) are not supported; only ViT")
    if vc.attentional_pool:
        raise UnsupportedOpenClipModel("attentional_pool (CoCa's attention pooler) is not supported")
    enabled = [name for name in _CUSTOM_BLOCK_OPTIONS if getattr(vc, name)]
    if enabled or vc.block_type not in (None, "default"):
        raise UnsupportedOpenClipModel(
            f"custom attention blocks are not supported (block_type={vc.block_type!r}, enabled: {enabled or 'none'})"
        )
    pools = {"tok": "cls", "avg": "gap"}
    if vc.pool_type not in pools:
        raise UnsupportedOpenClipModel(f"pool_type={vc.pool_type!r} is not supported (allowed: 'tok', 'avg')")
    if vc.pos_embed_type not in ("learnable", "sin_cos_2d"):
        raise UnsupportedOpenClipModel(f"pos_embed_type={vc.pos_embed_type!r} is not supported")

    quick_gelu = bool(model_cfg.get("quick_gelu", False))
    act_kwargs = dict(vc.act_kwargs or {})
    if quick_gelu:
        if act_kwargs:
            raise UnsupportedOpenClipModel(f"act_kwargs {act_kwargs} with quick_gelu are not supported")
        act = "quick_gelu"
    elif not act_kwargs or act_kwargs == {"approximate": "none"}:
        act = "gelu"
    elif act_kwargs == {"approximate": "tanh"}:
        act = "gelu_tanh"
    else:
        raise UnsupportedOpenClipModel(
            f"act_kwargs {act_kwargs} are not supported (allowed: {{'approximate': 'tanh'}})"
        )
    norm_kwargs = dict(vc.norm_kwargs or {})
    if set(norm_kwargs) - {"eps"}:
        raise UnsupportedOpenClipModel(f"norm_kwargs {norm_kwargs} are not supported (allowed: eps)")

    patch = vc.patch_size
    if isinstance(patch, (list, tuple)):
        if len(patch) != 2 or patch[0] != patch[1]:
            raise UnsupportedOpenClipModel(f"non-square patch_size {patch} is not supported")
        patch = patch[0]
    image_size = vc.image_size
    if isinstance(image_size, list):
        image_size = tuple(image_size)
    if vc.width % vc.head_width:
        raise UnsupportedOpenClipModel(f"width={vc.width} is not a multiple of head_width={vc.head_width}")
    return VisionConfig(
        image_size=image_size,
        patch_size=int(patch),
        width=vc.width,
        depth=vc.layers,
        num_heads=vc.width // vc.head_width,
        mlp_dim=int(vc.width * vc.mlp_ratio),
        act=act,
        qkv_bias=True,
        patch_bias=False,
        class_token=True,
        pos_embed="learned",  # a sin-cos table is stored in the checkpoint too: load it as is
        norm_pre=not vc.no_ln_pre,
        final_norm=not vc.final_ln_after_pool,
        pooled_norm=bool(vc.final_ln_after_pool),
        norm_eps=float(norm_kwargs.get("eps", 1e-5)),
        layer_scale_init=vc.ls_init_value,
        pool=pools[vc.pool_type],
        embed_dim=int(model_cfg["embed_dim"]),
        proj_bias=False,
        patch_remainder="drop",  # conv1 floors the grid, positional_embedding has image_size // patch_size rows
    )


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: VisionConfig, timm_trunk: bool = False
) -> dict[str, torch.Tensor]:
    """Map an open_clip CLIP state dict's image tower to `VisionEncoder` names.

    Args:
        state_dict: A full open_clip model state dict (`visual.*` plus text-tower keys).
        config: The target configuration (`config_from_open_clip`): it says where `ln_post`
            goes and how many prefix rows a timm trunk's position table has.
        timm_trunk: The tower is a timm trunk (`is_timm_trunk(model_cfg)`).

    Returns:
        A state dict for `VisionEncoder(config)`.

    Raises:
        WeightsError: No `visual.*` keys, or keys that are neither image tower nor text tower
            (listed).
    """
    state_dict = strip_prefixes(state_dict)
    visual = {k[len("visual.") :]: v for k, v in state_dict.items() if k.startswith("visual.")}
    unknown = sorted(k for k in state_dict if not k.startswith("visual.") and not k.startswith(_TEXT_PREFIXES))
    if not visual:
        raise WeightsError("no 'visual.*' keys: expected an open_clip CLIP model state dict")
    if timm_trunk:
        out, left = _convert_trunk(visual, config)
    else:
        out, left = _convert_native(visual, config)
    unknown += ["visual." + k for k in left]
    if unknown:
        raise WeightsError(
            f"open_clip state dict has keys the ViT converter does not know: {', '.join(sorted(unknown))}"
        )
    return out


def resblock_key(key: str, prefix: str) -> str | None:
    """Our name, under `prefix` (`blocks.`, `text.blocks.`), of an open_clip
    `transformer.resblocks.{i}.*` key; `None` for any other key."""
    block = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", key)
    old = next((old for old in _BLOCK_RENAMES if block and block[2].startswith(old)), None)
    return None if old is None else f"{prefix}{block[1]}.{_BLOCK_RENAMES[old]}{block[2][len(old) :]}"


def _convert_native(visual: dict[str, torch.Tensor], config: VisionConfig) -> tuple[dict[str, torch.Tensor], list[str]]:
    out: dict[str, torch.Tensor] = {}
    left = []
    ln_post = "pooled_norm." if config.pooled_norm else "norm."
    for key, value in visual.items():
        if key == "conv1.weight":
            out["patch_embed.proj.weight"] = value
        elif key == "class_embedding":
            out["cls_token"] = value.reshape(1, 1, -1)
        elif key == "positional_embedding":
            out["pos_embed"] = value.unsqueeze(0)  # (1, 1 + N, D), split below
        elif key.startswith("ln_pre."):
            out["norm_pre." + key[len("ln_pre.") :]] = value
        elif key.startswith("ln_post."):
            out[ln_post + key[len("ln_post.") :]] = value
        elif key == "proj":
            out["proj.weight"] = value.t().contiguous()  # (D, E) -> (E, D)
        elif ours := resblock_key(key, "blocks."):
            out[ours] = value
        else:
            left.append(key)
    if "pos_embed" in out:
        table = out["pos_embed"]
        if "cls_token" not in out:
            raise WeightsError("open_clip state dict has visual.positional_embedding but no visual.class_embedding")
        out["cls_token"] = out["cls_token"] + table[:, :1]
        out["pos_embed"] = table[:, 1:].contiguous()
    return out, left


def _convert_trunk(visual: dict[str, torch.Tensor], config: VisionConfig) -> tuple[dict[str, torch.Tensor], list[str]]:
    trunk = {k[len("trunk.") :]: v for k, v in visual.items() if k.startswith("trunk.")}
    out = timm_vit.convert_state_dict(trunk, config)
    left = []
    for key, value in visual.items():
        if key.startswith("trunk."):
            continue
        if key in ("head.proj.weight", "head.proj.bias") and "proj.weight" not in out:
            out["proj." + key.rsplit(".", 1)[1]] = value
        else:
            left.append(key)
    return out, left


def load_open_clip(arch: str, checkpoint: str | None = None, cache_dir: str | None = None) -> VisionEncoder:
    """Load an open_clip image tower as a `VisionEncoder`.

    Args:
        arch: An open_clip architecture (`ViT-B-32`, `ViT-B-16-quickgelu`, `ViT-B-16-SigLIP`,
            any name from `open_clip.list_models()` or added with `open_clip.add_model_config`).
        checkpoint: A weight file (`.safetensors`, or a torch pickle read with
            `weights_only=True`) holding the full CLIP state dict; or a pretrained tag of
            `arch` (`open_clip.list_pretrained_tags_by_model(arch)`), fetched through
            open_clip's download cache; or `None` for the architecture's only tag.
        cache_dir: open_clip's download cache directory (its default when `None`).

    Returns:
        The encoder in eval mode; `image_processor` holds open_clip's preprocessing.

    Raises:
        ValueError: Unknown architecture or tag.
        RuntimeError: The pretrained weights are not in the cache and cannot be downloaded.
        UnsupportedOpenClipModel: The tower uses an option we do not express.
        WeightsError: The file does not fit the architecture.
    """
    path, preprocess = resolve_checkpoint(arch, checkpoint, cache_dir)
    return vision_from_state_dict(arch, read_state_dict(path), preprocess, source=str(path))


def resolve_checkpoint(arch: str, checkpoint: str | None, cache_dir: str | None) -> tuple[str, dict[str, Any]]:
    """The weight file of `arch` (`checkpoint` itself when it is a file, else a pretrained
    tag's download through open_clip's cache) and its preprocessing settings.

    Raises:
        ValueError: Unknown architecture or tag.
        RuntimeError: The weights are not in the cache and cannot be downloaded.
    """
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise ValueError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
    preprocess = dataclasses.asdict(PreprocessCfg())
    preprocess["size"] = _vision_cfg(model_cfg).image_size
    if checkpoint is not None and os.path.isfile(checkpoint):
        return checkpoint, preprocess
    path, tag_cfg = _pretrained_file(arch, checkpoint, cache_dir)
    if bool(tag_cfg.get("quick_gelu", False)) != bool(model_cfg.get("quick_gelu", False)):
        warnings.warn(
            f"open_clip tag {checkpoint!r} was trained with quick_gelu={tag_cfg.get('quick_gelu', False)} "
            f"but {arch!r} has quick_gelu={model_cfg.get('quick_gelu', False)}; following the architecture "
            "as open_clip does (use the '-quickgelu' architecture to match the training)",
            UserWarning,
            stacklevel=3,
        )
    return path, merge_preprocess_dict(preprocess, tag_cfg)


def vision_from_state_dict(
    arch: str, state_dict: Mapping[str, torch.Tensor], preprocess: dict[str, Any], source: str
) -> VisionEncoder:
    """The `VisionEncoder` of `arch` with the image tower of a full open_clip `state_dict`
    (read from `source`, named in errors), carrying `preprocess` as its image processor."""
    import open_clip

    from ..processing import ImageProcessor

    model_cfg = open_clip.get_model_config(arch)
    vc = _vision_cfg(model_cfg)
    trunk = build_timm_trunk(model_cfg) if vc.timm_model_name else None
    config = _config_from_trunk(model_cfg, trunk) if trunk is not None else config_from_open_clip(model_cfg)
    with naming(source):
        weights = convert_state_dict(state_dict, config, timm_trunk=trunk is not None)
        # Built on `meta` and assigned: loading holds one copy of the weights.
        encoder = build_and_load(lambda: VisionEncoder(config), weights, source=f"open_clip {arch} weights ({source})")
    encoder.eval()
    encoder.image_processor = ImageProcessor.from_open_clip(preprocess)
    return encoder


def _pretrained_file(arch: str, tag: str | None, cache_dir: str | None) -> tuple[str, dict[str, Any]]:
    """Path of `arch`'s pretrained weights for `tag` (downloaded or from the cache) and the tag's cfg."""
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(arch)
    if tag is None:
        if len(tags) != 1:
            raise ValueError(
                f"open_clip {arch!r} has {'no' if not tags else len(tags)} pretrained tags"
                + (f" ({', '.join(tags)}); pass one as checkpoint=" if tags else "; pass a weight file as checkpoint=")
            )
        tag = tags[0]
    tag_cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not tag_cfg:
        raise ValueError(
            f"checkpoint {tag!r} is neither a file nor a pretrained tag of open_clip {arch!r} "
            f"(tags: {', '.join(tags) or 'none'})"
        )
    try:
        path = open_clip.download_pretrained(tag_cfg, cache_dir=cache_dir)
    except Exception as err:  # noqa: BLE001 - urllib / huggingface_hub raise many kinds
        way_out = f"load_open_clip({arch!r}, checkpoint='path/to/open_clip_model.safetensors')"
        raise timm_vit.not_cached(f"open_clip weights {arch!r} / {tag!r}", err, way_out) from err
    if not path or not os.path.isfile(path):
        raise RuntimeError(f"open_clip gave no weight file for {arch!r} / {tag!r}; pass a local file as checkpoint=")
    return path, tag_cfg

