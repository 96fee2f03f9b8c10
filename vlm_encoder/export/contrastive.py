"""A `ContrastiveModel` as an HF `CLIPModel` directory.

The image tower goes through `hf_clip.TABLE` backwards and the text tower through
`hf_clip_text.TEXT_TABLE` backwards; `image_proj` becomes `visual_projection`, `text_proj`
`text_projection`. What a `CLIPModel` cannot hold is refused by name: the SigLIP objective
(a bias), an HF text tower, an image tower that does not fit `CLIPVisionModel`, and an image
tower with its own projection followed by an `image_proj` that is not the identity (HF has
one image projection; an open_clip model loaded here has the identity, so it exports).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from ..converters import hf_clip, hf_clip_text
from ..text import TextEncoder
from .hf import HF_ACT, ExportError, hf_vision_config, load_checked
from .keys import reverse


def hf_clip_config(model: Any) -> Any:
    """The transformers `CLIPConfig` of `model` (a `ContrastiveModel`).

    Raises:
        ExportError: An option a `CLIPModel` cannot hold (named).
    """
    import transformers as tf

    if model.objective != "clip":
        raise ExportError(f"HF CLIPModel has no logit bias: objective={model.objective!r} does not fit (use 'clip')")
    if not isinstance(model.text, TextEncoder):
        raise ExportError(f"HF CLIPModel's text tower is CLIP's: text tower {type(model.text).__name__} does not fit")
    vision = dataclasses.replace(model.vision.config, embed_dim=None, proj_bias=False, proj_act="none")
    if model.vision.config.embed_dim is not None:
        if model.vision.config.proj_bias or model.vision.config.proj_act != "none":
            raise ExportError("HF CLIPModel's visual_projection has no bias or activation: vision.proj_bias / "
                              "vision.proj_act do not fit")
        if not torch.equal(model.image_proj.weight, torch.eye(*model.image_proj.weight.shape)):
            raise ExportError(
                f"HF CLIPModel has one image projection: vision.embed_dim={model.vision.config.embed_dim} followed by "
                "an image_proj that is not the identity does not fit"
            )
    vision_hf = hf_vision_config(vision, "clip")
    t = model.text.config
    text_hf = tf.CLIPTextConfig(
        vocab_size=t.vocab_size,
        hidden_size=t.width,
        intermediate_size=t.mlp_dim,
        num_hidden_layers=t.depth,
        num_attention_heads=t.num_heads,
        max_position_embeddings=t.context_length,
        hidden_act=HF_ACT[t.act],
        layer_norm_eps=t.norm_eps,
        eos_token_id=t.eot_token_id,
        bos_token_id=t.sot_token_id,
        pad_token_id=t.pad_token_id,
    )
    if t.eot_token_id == 2:
        raise ExportError("eot_token_id=2 does not fit: HF CLIP reads eos_token_id=2 as its legacy argmax pooling")
    config = tf.CLIPConfig(
        text_config=text_hf.to_dict(), vision_config=vision_hf.to_dict(), projection_dim=model.embed_dim,
        logit_scale_init_value=float(model.init_logit_scale),
    )
    config.architectures = ["CLIPModel"]
    return config


def hf_clip_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """`model`'s tensors under `CLIPModel`'s on-disk names (call `hf_clip_config` first to
    check it fits)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    vision = {k[len("vision."):]: v for k, v in state.items() if k.startswith("vision.") and k != "vision.proj.weight"}
    text = {k[len("text."):]: v for k, v in state.items() if k.startswith("text.")}
    out = {f"vision_model.{k}": v for k, v in reverse(hf_clip.TABLE, vision, model.vision.num_blocks, "HF CLIP").items()}
    text_keys = reverse(hf_clip_text.TEXT_TABLE, text, model.text.config.depth, hf_clip_text.FAMILY)
    out.update({f"text_model.{k}": v for k, v in text_keys.items()})
    out["text_model.embeddings.position_embedding.weight"] = text["pos_embed"].reshape(-1, model.text.width)
    out["visual_projection.weight"] = state.get("vision.proj.weight", state["image_proj.weight"])
    out["text_projection.weight"] = state["text_proj.weight"]
    out["logit_scale"] = state["logit_scale"].reshape(())
    return {k: v.contiguous() for k, v in out.items()}


def save_hf_clip_model(model: Any, directory: str | os.PathLike) -> Path:
    """Write `model` (a `ContrastiveModel`) as an HF `CLIPModel` directory (`config.json` +
    `model.safetensors`), loadable by `CLIPModel.from_pretrained` and by
    `converters.hf_clip_text.load_contrastive`.

    Raises:
        ExportError: An option a `CLIPModel` cannot hold (named).
    """
    from safetensors.torch import save_file

    config = hf_clip_config(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    save_file(hf_clip_state_dict(model), str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def to_hf_clip_model(model: Any) -> torch.nn.Module:
    """`model` as a transformers `CLIPModel` (eval mode), loaded by transformers from what
    `save_hf_clip_model` writes, every tensor used."""
    import tempfile

    import transformers as tf

    with tempfile.TemporaryDirectory() as tmp:
        save_hf_clip_model(model, tmp)
        return load_checked(tf.CLIPModel, tmp)
