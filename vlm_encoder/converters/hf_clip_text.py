"""HF `CLIPModel` (both towers, the projections, the logit scale) to a `ContrastiveModel`;
`TEXT_TABLE` maps the text tower's names (the image tower goes through `hf_clip.TABLE`).

HF's `visual_projection` becomes `image_proj` (the image tower keeps no projection of its
own) and `text_projection` becomes `text_proj`. HF pools the text at the first `eos_token_id`
(for any id but the legacy 2), as our `TextEncoder` does at `eot_token_id`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..text import TextConfig
from ..weights import WeightsError
from . import hf_clip
from .hf_common import KeyTable, Transform, activation, as_rows, fused_qkv, parse_config, select_tower

if TYPE_CHECKING:
    from ..contrastive import ContrastiveModel

FAMILY = "HF CLIP text"
TEXT_PREFIXES = ("text_model.",)
TEXT_IGNORED = ("vision_model.", "visual_projection.", "text_projection.", "logit_scale")
TEXT_TABLE = KeyTable(
    renames={
        "embeddings.token_embedding": "token_embed",
        "encoder.layers.{i}.self_attn.out_proj": "blocks.{i}.attn.proj",
        "encoder.layers.{i}.layer_norm1": "blocks.{i}.norm1",
        "encoder.layers.{i}.layer_norm2": "blocks.{i}.norm2",
        "encoder.layers.{i}.mlp.fc1": "blocks.{i}.mlp.fc1",
        "encoder.layers.{i}.mlp.fc2": "blocks.{i}.mlp.fc2",
        "final_layer_norm": "norm",
    },
    transforms=(
        Transform(("pos_embed",), ("embeddings.position_embedding.weight",), as_rows),
        *fused_qkv("encoder.layers.{i}.self_attn", ("q_proj", "k_proj", "v_proj")),
    ),
    ignored=("embeddings.position_ids",),
)


def text_config_from_hf(hf_config_or_dict: Any) -> TextConfig:
    """Our `TextConfig` for a `CLIPConfig`'s / `CLIPTextConfig`'s text tower.

    Raises:
        ValueError: The legacy `eos_token_id=2` (HF then pools at the largest id instead).
    """
    from transformers import CLIPConfig, CLIPTextConfig

    parsed = parse_config(hf_config_or_dict, {"clip": CLIPConfig, "clip_text_model": CLIPTextConfig}, FAMILY)
    text = getattr(parsed, "text_config", parsed)
    if text.eos_token_id == 2:
        raise ValueError(f"{FAMILY}: eos_token_id=2 is the legacy argmax pooling, which TextEncoder does not do")
    return tower_config(text, FAMILY)


def tower_config(text: Any, family: str) -> TextConfig:
    """Our `TextConfig` for a parsed CLIP-layout text config (pooled at the first `eos_token_id`)."""
    return TextConfig(
        vocab_size=text.vocab_size,
        context_length=text.max_position_embeddings,
        width=text.hidden_size,
        depth=text.num_hidden_layers,
        num_heads=text.num_attention_heads,
        mlp_dim=text.intermediate_size,
        act=activation(text.hidden_act, family),
        norm_eps=text.layer_norm_eps,
        eot_token_id=text.eos_token_id,
        sot_token_id=text.bos_token_id,
        pad_token_id=text.pad_token_id if text.pad_token_id is not None else 0,
    )


def convert_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`ContrastiveModel` tensors from a `CLIPModel` state dict.

    Raises:
        WeightsError: A key missing or not known (named).
    """
    vision_keys = {k: v for k, v in state_dict.items() if not k.startswith("visual_projection.")}
    vision = hf_clip.convert_state_dict(vision_keys)
    text = TEXT_TABLE.convert(select_tower(state_dict, TEXT_PREFIXES, TEXT_IGNORED), FAMILY)
    missing = [k for k in ("visual_projection.weight", "text_projection.weight", "logit_scale") if k not in state_dict]
    if missing:
        raise WeightsError(f"HF CLIPModel checkpoint is missing {', '.join(missing)}")
    return {
        **{f"vision.{k}": v for k, v in vision.items()},
        **{f"text.{k}": v for k, v in text.items()},
        "image_proj.weight": state_dict["visual_projection.weight"],
        "text_proj.weight": state_dict["text_projection.weight"],
        "logit_scale": state_dict["logit_scale"].reshape(()),
    }


def load_hf_clip_contrastive(directory: str | os.PathLike) -> ContrastiveModel:
    """A `ContrastiveModel` from an HF `CLIPModel` directory (`config.json` +
    `model.safetensors`), in eval mode.

    Raises:
        WeightsError: Weights that do not fit (named).
    """
    from ..contrastive import ContrastiveModel
    from ..encoder import VisionEncoder
    from ..text import TextEncoder
    from ..weights import build_and_load, read_state_dict

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    vision_config = hf_clip.config_from_hf(config, projection=False)
    text_config = text_config_from_hf(config)
    embed_dim = int(config.get("projection_dim", 512))
    tensors = convert_state_dict(read_state_dict(directory / "model.safetensors"))
    model = build_and_load(
        lambda: ContrastiveModel(VisionEncoder(vision_config), TextEncoder(text_config), embed_dim),
        tensors,
        source=f"{directory} (HF CLIPModel converted)",
    )
    return model.eval()
