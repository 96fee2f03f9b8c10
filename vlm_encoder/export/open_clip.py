"""A `ContrastiveModel` as an open_clip CLIP model: its model config (to register with
`open_clip.add_model_config`) and its state dict (`model.load_state_dict`, or a checkpoint
file for `open_clip.create_model(name, pretrained=FILE)`).

Block names go through `converters.open_clip_vit._BLOCK_RENAMES` backwards; the rest is the
inverse of `open_clip_vit._convert_native` and `open_clip_clip.convert_text_state_dict`. The
config is read back with the converters' own `config_from_open_clip` /
`text_config_from_open_clip`: any option that does not come back the same is refused by name
(a timm trunk, SigLIP's objective, an HF text tower, towers with different activations, which
open_clip's one `quick_gelu` flag cannot state).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..converters import open_clip_vit
from ..converters.open_clip_clip import text_config_from_open_clip
from ..text import TextEncoder
from .hf import ExportError, _check_fits

_ACT_KWARGS = {"gelu": {}, "gelu_tanh": {"approximate": "tanh"}, "quick_gelu": {}}


def _tower_projection(model: Any) -> torch.Tensor:
    """The one image projection `(E, D)` open_clip holds (`visual.proj` transposed)."""
    vision = model.vision
    if vision.proj is None:
        return model.image_proj.weight
    if not torch.equal(model.image_proj.weight, torch.eye(*model.image_proj.weight.shape)):
        raise ExportError(
            f"open_clip has one image projection: vision.embed_dim={vision.config.embed_dim} followed by an "
            "image_proj that is not the identity does not fit"
        )
    return vision.proj.weight


def open_clip_model_config(model: Any) -> dict[str, Any]:
    """open_clip's model config (`embed_dim`, `quick_gelu`, `vision_cfg`, `text_cfg`) of
    `model` (a `ContrastiveModel`).

    Raises:
        ExportError: An option open_clip's CLIP cannot hold (named).
    """
    if model.objective != "clip":
        raise ExportError(f"open_clip's CLIP has no logit bias: objective={model.objective!r} does not fit")
    if not isinstance(model.text, TextEncoder):
        raise ExportError(f"text tower {type(model.text).__name__} does not fit open_clip's CLIP text tower")
    v, t = model.vision.config, model.text.config
    if (v.act == "quick_gelu") != (t.act == "quick_gelu"):
        raise ExportError(f"open_clip has one quick_gelu flag for both towers: vision act={v.act!r} with text "
                          f"act={t.act!r} does not fit")
    if v.image_size[0] != v.image_size[1]:
        raise ExportError(f"image_size={v.image_size} does not fit: open_clip here takes square images")
    _tower_projection(model)
    embed_dim = model.embed_dim
    vision_cfg = dict(
        image_size=v.image_size[0],
        layers=v.depth,
        width=v.width,
        head_width=v.width // v.num_heads,
        mlp_ratio=v.mlp_dim / v.width,
        patch_size=v.patch_size,
        ls_init_value=v.layer_scale_init,
        no_ln_pre=not v.norm_pre,
        final_ln_after_pool=v.pooled_norm,
        pool_type={"cls": "tok", "gap": "avg"}.get(v.pool, v.pool),
        act_kwargs=_ACT_KWARGS.get(v.act, {"unknown": v.act}) or None,
        norm_kwargs={"eps": v.norm_eps},
    )
    text_cfg = dict(
        context_length=t.context_length,
        vocab_size=t.vocab_size,
        width=t.width,
        heads=t.num_heads,
        layers=t.depth,
        mlp_ratio=t.mlp_dim / t.width,
        act_kwargs=_ACT_KWARGS[t.act] or None,
        norm_kwargs={"eps": t.norm_eps},
    )
    config = {"embed_dim": embed_dim, "quick_gelu": v.act == "quick_gelu", "vision_cfg": vision_cfg,
              "text_cfg": text_cfg}
    try:
        back = open_clip_vit.config_from_open_clip(config)
        text_back = text_config_from_open_clip(config)
    except ValueError as err:
        raise ExportError(f"this model does not fit open_clip's CLIP: {err}") from None
    ours = dataclasses.replace(v, embed_dim=embed_dim, proj_bias=False, proj_act="none")
    _check_fits(ours, back, "open_clip's VisionTransformer")
    special = ("eot_token_id", "sot_token_id", "pad_token_id")
    differ = [f"text {f.name}={getattr(t, f.name)!r} (open_clip gives {getattr(text_back, f.name)!r})"
              for f in dataclasses.fields(t) if f.name not in special and getattr(t, f.name) != getattr(text_back, f.name)]
    if differ:
        raise ExportError("this model does not fit open_clip's text tower: " + "; ".join(differ))
    return config


def _block_key(key: str) -> str:
    """open_clip's `transformer.resblocks.{i}.*` name of our `blocks.{i}.*` key."""
    _, i, rest = key.split(".", 2)
    for old, new in open_clip_vit._BLOCK_RENAMES.items():
        if rest.startswith(new):
            return f"transformer.resblocks.{i}.{old}{rest[len(new):]}"
    raise ExportError(f"open_clip's block has no place for {key!r}")


def open_clip_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """`model`'s tensors under open_clip's CLIP names (`visual.*`, the text tower at the top
    level, `logit_scale`).

    Raises:
        ExportError: An option open_clip's CLIP cannot hold (named).
    """
    open_clip_model_config(model)
    out: dict[str, torch.Tensor] = {}
    vision = {k: v.detach() for k, v in model.vision.state_dict().items()}
    ln_post = "pooled_norm." if model.vision.config.pooled_norm else "norm."
    for key, value in vision.items():
        if key == "patch_embed.proj.weight":
            out["visual.conv1.weight"] = value
        elif key == "cls_token":
            out["visual.class_embedding"] = value.reshape(-1)
        elif key == "pos_embed":  # our CLS row lives in cls_token: open_clip's first row is zero
            rows = value.reshape(-1, value.shape[-1])
            out["visual.positional_embedding"] = torch.cat([torch.zeros_like(rows[:1]), rows])
        elif key.startswith("norm_pre."):
            out["visual.ln_pre." + key[len("norm_pre."):]] = value
        elif key.startswith(ln_post):
            out["visual.ln_post." + key[len(ln_post):]] = value
        elif key.startswith("blocks."):
            out["visual." + _block_key(key)] = value
        elif key != "proj.weight":
            raise ExportError(f"open_clip's VisionTransformer has no place for vision.{key}")
    out["visual.proj"] = _tower_projection(model).detach().t()  # (E, D) -> (D, E)
    for key, value in model.text.state_dict().items():
        if key == "token_embed.weight":
            out["token_embedding.weight"] = value
        elif key == "pos_embed":
            out["positional_embedding"] = value.reshape(-1, value.shape[-1])
        elif key.startswith("norm."):
            out["ln_final." + key[len("norm."):]] = value
        elif key.startswith("blocks."):
            out[_block_key(key)] = value
        else:
            raise ExportError(f"open_clip's text tower has no place for text.{key}")
    out["text_projection"] = model.text_proj.weight.detach().t()
    out["logit_scale"] = model.logit_scale.detach().reshape(())
    return {k: v.detach().contiguous() for k, v in out.items()}
