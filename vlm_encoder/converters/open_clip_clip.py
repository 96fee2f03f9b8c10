"""Converter for whole open_clip CLIP models (both towers, the logit scale) to a
`ContrastiveModel`: fine-tune or LiT-train a pretrained CLIP with `vlm-encoder train`.

The image tower goes through `open_clip_vit` (its projection becomes the encoder's `proj`, so
`image_proj` is the identity). The text tower is open_clip's `TextTransformer` in its CLIP form
(causal mask, pooling at the end token, linear projection without bias); names mapped:

    token_embedding                -> text.token_embed
    positional_embedding (L, D)    -> text.pos_embed (1, L, D)
    transformer.resblocks.{i}.ln_1 / attn.in_proj_* / attn.out_proj / ln_2 / mlp.c_fc /
        mlp.c_proj                 -> text.blocks.{i}.norm1 / attn.qkv / attn.proj / norm2 /
                                      mlp.fc1 / mlp.fc2
    ln_final                       -> text.norm
    text_projection (D, E)         -> text_proj.weight (E, D)
    logit_scale                    -> logit_scale

Text towers of any other form (SigLIP's last-token pooling without a causal mask, a Hugging
Face text model, CoCa, custom attention blocks, another vocabulary) are refused by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from ..text import TextConfig, TextEncoder
from ..text.config import CLIP_VOCAB_SIZE
from ..weights import WeightsError, load_state_dict_strict, naming, read_state_dict, strip_prefixes
from .open_clip_vit import UnsupportedOpenClipModel, resblock_key, resolve_checkpoint, vision_from_state_dict

if TYPE_CHECKING:
    from ..contrastive import ContrastiveModel

# text_cfg options and the values our TextEncoder expresses (open_clip's defaults).
_TEXT_DEFAULTS: dict[str, Any] = {
    "hf_model_name": None,
    "hf_tokenizer_name": None,
    "vocab_size": CLIP_VOCAB_SIZE,
    "ls_init_value": None,
    "embed_cls": False,
    "no_causal_mask": False,
    "final_ln_after_pool": False,
    "pool_type": "argmax",
    "proj_bias": False,
    "proj_type": "linear",
    "block_type": None,
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
}


class UnsupportedOpenClipTextTower(UnsupportedOpenClipModel):
    """An open_clip text tower the CLIP-style `TextEncoder` cannot express (its image tower
    may still load on its own)."""


def text_config_from_open_clip(model_cfg: Mapping[str, Any]) -> TextConfig:
    """The `TextConfig` of an open_clip model config's text tower.

    Raises:
        UnsupportedOpenClipTextTower: An option our text tower cannot express (named).
    """
    if model_cfg.get("custom_text") and model_cfg.get("text_cfg", {}).get("hf_model_name"):
        raise UnsupportedOpenClipTextTower("open_clip text tower is a Hugging Face model (text_cfg.hf_model_name)")
    if "multimodal_cfg" in model_cfg:
        raise UnsupportedOpenClipTextTower("open_clip CoCa models (multimodal_cfg) are not CLIP models")
    text_cfg = dict(model_cfg.get("text_cfg", {}))
    refused = [
        f"{key}={text_cfg[key]!r} (supported: {default!r})"
        for key, default in _TEXT_DEFAULTS.items()
        if key in text_cfg and text_cfg[key] != default and not (key == "block_type" and text_cfg[key] == "default")
    ]
    if refused:
        raise UnsupportedOpenClipTextTower(f"open_clip text tower options not supported: {', '.join(refused)}")
    act_kwargs = text_cfg.get("act_kwargs") or {}
    if model_cfg.get("quick_gelu"):
        if act_kwargs:
            raise UnsupportedOpenClipTextTower(f"quick_gelu with act_kwargs={act_kwargs!r}")
        act = "quick_gelu"
    elif not act_kwargs:
        act = "gelu"
    elif act_kwargs == {"approximate": "tanh"}:
        act = "gelu_tanh"
    else:
        raise UnsupportedOpenClipTextTower(f"text_cfg.act_kwargs={act_kwargs!r} (supported: approximate='tanh')")
    norm_kwargs = dict(text_cfg.get("norm_kwargs") or {})
    eps = float(norm_kwargs.pop("eps", 1e-5))
    if norm_kwargs:
        raise UnsupportedOpenClipTextTower(f"text_cfg.norm_kwargs={text_cfg['norm_kwargs']!r} (supported: eps)")
    width = int(text_cfg.get("width", 512))
    return TextConfig(
        context_length=int(text_cfg.get("context_length", 77)),
        width=width,
        depth=int(text_cfg.get("layers", 12)),
        num_heads=int(text_cfg.get("heads", 8)),
        mlp_dim=int(width * float(text_cfg.get("mlp_ratio", 4.0))),
        act=act,
        norm_eps=eps,
    )


def convert_text_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an open_clip CLIP state dict's text side to `ContrastiveModel` names (`text.*`,
    `text_proj.weight`, `logit_scale`); the image tower's keys are left to `open_clip_vit`.

    Raises:
        WeightsError: Keys of neither tower (listed), or no text tower.
    """
    state_dict = strip_prefixes(state_dict)
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if key.startswith("visual.") or key == "attn_mask":
            continue
        if key == "token_embedding.weight":
            out["text.token_embed.weight"] = value
        elif key == "positional_embedding":
            out["text.pos_embed"] = value.unsqueeze(0)
        elif key.startswith("ln_final."):
            out["text.norm." + key[len("ln_final.") :]] = value
        elif key == "text_projection":
            out["text_proj.weight"] = value.t().contiguous()  # (D, E) -> (E, D)
        elif key == "logit_scale":
            out["logit_scale"] = value.reshape(())
        elif ours := resblock_key(key, "text.blocks."):
            out[ours] = value
        else:
            unknown.append(key)
    if unknown:
        raise WeightsError(f"open_clip state dict has keys the CLIP converter does not know: {', '.join(sorted(unknown))}")
    if "text.token_embed.weight" not in out:
        raise WeightsError("no text tower ('token_embedding.weight') in the open_clip state dict")
    return out


def load_open_clip_contrastive(
    arch: str, checkpoint: str | None = None, cache_dir: str | None = None
) -> ContrastiveModel:
    """Load a whole open_clip CLIP model (image tower, text tower, logit scale) as a
    `ContrastiveModel`, ready for `Trainer(config, model=...)` or zero-shot evaluation.

    Args:
        arch: An open_clip architecture with a CLIP text tower (`ViT-B-32`, `ViT-B-16`,
            `ViT-L-14-quickgelu`, ...).
        checkpoint: A weight file or a pretrained tag, as for `load_open_clip`.
        cache_dir: open_clip's download cache directory.

    Returns:
        The model in eval mode (`objective="clip"`); its image tower carries open_clip's
        preprocessing as `vision.image_processor`; its text tower uses the bundled BPE.

    Raises:
        UnsupportedOpenClipModel: A text tower of another form (SigLIP, HF text, CoCa).
        WeightsError: The file does not fit the architecture.
    """
    import open_clip

    from ..contrastive import ContrastiveModel

    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise ValueError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
    text_config = text_config_from_open_clip(model_cfg)  # refuse before reading any weights
    path, preprocess = resolve_checkpoint(arch, checkpoint, cache_dir)
    state_dict = read_state_dict(path)
    vision = vision_from_state_dict(arch, state_dict, preprocess, source=str(path))
    embed_dim = int(model_cfg["embed_dim"])
    if vision.config.embed_dim != embed_dim:
        raise UnsupportedOpenClipModel(f"open_clip {arch!r} image tower has no projection to embed_dim={embed_dim}")
    model = ContrastiveModel(vision, TextEncoder(text_config), embed_dim, objective="clip")
    with naming(str(path)):
        weights = convert_text_state_dict(state_dict)
    weights.update({f"vision.{k}": v for k, v in vision.state_dict().items()})
    weights["image_proj.weight"] = torch.eye(embed_dim)  # the tower already projects to embed_dim
    load_state_dict_strict(model, weights, source=f"open_clip {arch} weights ({path})")
    model.vision.image_processor = vision.image_processor
    return model.eval()
