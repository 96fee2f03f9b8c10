"""HF `CLIPModel` (both towers, the projections, the logit scale) to a `ContrastiveModel`;
`TEXT_TABLE` maps the text tower's names (the image tower goes through `hf_clip.TABLE`).

HF's `visual_projection` becomes `image_proj` (the image tower keeps no projection of its
own) and `text_projection` becomes `text_proj`. HF pools the text at the first `eos_token_id`,
as our `TextEncoder` does at `eot_token_id`, except under the legacy `eos_token_id = 2` of the
configs written before HF set CLIP's ids (every OpenAI CLIP on the hub): HF then pools at the
largest id (`argmax`). With CLIP's BPE (49,408 ids) the largest id is `<|endoftext|>` (49,407),
which ends every tokenized caption, so the legacy rule is pooling at its first occurrence: such a
config maps to CLIP's own ids (start 49,406, end 49,407), and any other vocabulary is refused.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from ..text import TextConfig
from ..text.tokenizer import ClipTokenizer
from ..weights import WeightsError
from . import hf_clip
from .hf_common import KeyTable, Transform, activation, as_rows, fused_qkv, parse_config, select_tower

if TYPE_CHECKING:
    from ..contrastive import ContrastiveModel

FAMILY = "HF CLIP text"
LEGACY_EOS_TOKEN_ID = 2  # HF CLIP: pool at the largest id (module docstring)
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
    if text.eos_token_id == LEGACY_EOS_TOKEN_ID:
        if text.vocab_size != ClipTokenizer.vocab_size:
            raise ValueError(f"{FAMILY}: eos_token_id=2 is HF's legacy argmax pooling, the same rule as pooling at "
                             f"the end token only for CLIP's BPE ({ClipTokenizer.vocab_size} ids); this vocabulary "
                             f"has {text.vocab_size}")
        return tower_config(text, FAMILY).replace(
            sot_token_id=ClipTokenizer.sot_token_id, eot_token_id=ClipTokenizer.eot_token_id, pad_token_id=0
        )
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
        # HF's text model never reads pad_token_id (CLIP's tokenizer pads with the end token); ours
        # is what our tokenizer fills in after the end token, unseen by the causal mask and the
        # pooling, and must differ from it.
        pad_token_id=text.pad_token_id if text.pad_token_id not in (None, text.eos_token_id) else 0,
    )


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    convert_vision: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]] = hf_clip.convert_state_dict,
    family: str = "HF CLIPModel",
) -> dict[str, torch.Tensor]:
    """`ContrastiveModel` tensors from a `CLIPModel` state dict, or a family's with CLIP's layout
    (its image tower converted by `convert_vision`, e.g. MetaCLIP 2's).

    Raises:
        WeightsError: A key missing or not known (named).
    """
    missing = [k for k in ("visual_projection.weight", "text_projection.weight", "logit_scale") if k not in state_dict]
    if missing:
        raise WeightsError(f"{family} checkpoint is missing {', '.join(missing)}")
    vision = convert_vision({k: v for k, v in state_dict.items() if not k.startswith("visual_projection.")})
    text = TEXT_TABLE.convert(select_tower(state_dict, TEXT_PREFIXES, TEXT_IGNORED), f"{family} text")
    return {
        **{f"vision.{k}": v for k, v in vision.items()},
        **{f"text.{k}": v for k, v in text.items()},
        "image_proj.weight": state_dict["visual_projection.weight"],
        "text_proj.weight": state_dict["text_projection.weight"],
        "logit_scale": state_dict["logit_scale"].reshape(()),
    }


def load_contrastive(
    source: str | os.PathLike, *, checkpoint: str | os.PathLike | None = None, revision: str | None = None
) -> ContrastiveModel:
    """A `ContrastiveModel` (both towers, projections, logit scale) from an HF `CLIPModel`
    directory or hub repo (e.g. `openai/clip-vit-base-patch32`), in eval mode: its image embeds,
    text embeds and logits are the reference's for captions tokenized by CLIP's BPE (our
    `TextEncoder.tokenizer()`). The image tower gets the repo's `preprocessor_config.json`.

    Args:
        source: A local directory or a hub repo id (read through the Hugging Face cache).
        checkpoint: A weight file used instead of the repo's (same keys).
        revision: Hub revision.

    Raises:
        FileNotFoundError: No config or weights (offline: the files missing from the cache).
        ValueError: Not a `clip` config, or a text tower `TextEncoder` does not express.
        WeightsError: Weights that do not fit (named).
    """
    from transformers import CLIPConfig

    from ..loading import read_config_file
    from ..specs.files import SourceFiles

    files = SourceFiles(os.fspath(source), revision)
    parsed = parse_config(read_config_file(files.get("config.json")), {"clip": CLIPConfig}, "HF CLIP")
    return build_contrastive(files, hf_clip.config_from_hf(parsed, projection=False), text_config_from_hf(parsed),
                             parsed.projection_dim, convert_state_dict, "clip", checkpoint)


def build_contrastive(
    files: Any,
    vision_config: Any,
    text_config: TextConfig,
    projection_dim: int,
    convert: Any,
    model_type: str,
    checkpoint: str | os.PathLike | None,
) -> ContrastiveModel:
    """A `ContrastiveModel` from a CLIP-layout checkpoint's files (`specs.files.SourceFiles`):
    reads the weights (or `checkpoint`), converts them with `convert`, builds both towers and
    attaches the repo's image processor. Shared by CLIP and MetaCLIP 2.

    HF exponentiates the stored logit scale unclamped; ours clamps at ln 100, so the clamp is
    raised to a checkpoint's own scale when it lies above (trained CLIPs sit at ln 100).
    """
    from ..contrastive import ContrastiveModel
    from ..encoder import VisionEncoder
    from ..loading import _image_processor, read_weights
    from ..text import TextEncoder
    from ..weights import build_and_load, naming

    tensors, _, weights = read_weights(files, checkpoint, lambda key: True)
    where = str(checkpoint) if checkpoint is not None else f"{files.source} ({', '.join(weights)})"
    with naming(where):
        state = convert(tensors)
        clamp = max(math.log(100.0), float(state["logit_scale"]))
        model = build_and_load(
            lambda: ContrastiveModel(VisionEncoder(vision_config), TextEncoder(text_config), projection_dim,
                                     max_logit_scale=clamp),
            state,
            source=f"{where} ({model_type} converted)",
        )
    processor = _image_processor(files)
    if processor is not None:
        model.vision.image_processor = processor
    return model.eval()
