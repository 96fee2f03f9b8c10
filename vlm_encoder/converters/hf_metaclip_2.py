"""HF MetaCLIP 2 (`MetaClip2Model`, `MetaClip2VisionModel`, `MetaClip2VisionModelWithProjection`)
to `VisionEncoder`, and a whole `MetaClip2Model` to a `ContrastiveModel`.

MetaCLIP 2 is CLIP's architecture under new class names: the checkpoints keep CLIP's key names
(`vision_model.*`, `text_model.*`, `visual_projection`, `text_projection`, `logit_scale`), so
the towers are mapped by `hf_clip.TABLE` and `hf_clip_text.TEXT_TABLE`; only the config classes,
the tokenizer and the text pooling rule differ.

Text pooling: `MetaClip2TextModel` pools at the first position whose id equals
`text_config.eos_token_id`, whatever that id is. CLIP keeps a legacy rule (`eos_token_id == 2`
pools at the largest id, `argmax` over ids); MetaCLIP 2 does not, although its worldwide
checkpoints' XLM-R tokenizer has exactly `eos_token_id = 2` (`<s>` = 0, `<pad>` = 1,
`</s>` = 2). `TextEncoder` pools at the first `eot_token_id`: the same rule, so the config
maps `eos_token_id` to `eot_token_id` as it is. The XLM-R ids are not open_clip's BPE: the
model's `TextConfig.tokenizer` names the checkpoint's own tokenizer files, which
`TextEncoder.tokenizer()` then loads (`AutoTokenizer`, local files only).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from ..config import VisionConfig
from ..text import TextConfig
from . import hf_clip, hf_clip_text
from .hf_common import parse_config, select_tower

if TYPE_CHECKING:
    from ..contrastive import ContrastiveModel

FAMILY = "HF MetaCLIP 2"
TOWER_PREFIXES = hf_clip.TOWER_PREFIXES
IGNORED_PREFIXES = hf_clip.IGNORED_PREFIXES
# The tokenizer files a hub repo may hold (XLM-R: sentencepiece; mT5 variants: spiece.model).
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "sentencepiece.bpe.model",
                   "spiece.model")


def _classes() -> dict[str, type]:
    from transformers import MetaClip2Config, MetaClip2TextConfig, MetaClip2VisionConfig

    return {"metaclip_2": MetaClip2Config, "metaclip_2_vision_model": MetaClip2VisionConfig,
            "metaclip_2_text_model": MetaClip2TextConfig}


def config_from_hf(hf_config_or_dict: Any, *, projection: bool | None = None) -> VisionConfig:
    """Our config for a MetaCLIP 2 vision tower (CLIP's layout: pre-norm, CLS, final norm on the
    pooled CLS token, non-antialiased bicubic resize of the table).

    Args:
        hf_config_or_dict: A `MetaClip2Config` / `MetaClip2VisionConfig` or its `config.json` dict.
        projection: Include the image projection; default yes for a whole `MetaClip2Config`,
            no for a vision config (pass `True` for `MetaClip2VisionModelWithProjection`).
    """
    classes = _classes()
    parsed = parse_config(hf_config_or_dict, {k: classes[k] for k in ("metaclip_2", "metaclip_2_vision_model")}, FAMILY)
    return hf_clip.tower_config(parsed, projection, FAMILY)


def text_config_from_hf(hf_config_or_dict: Any, tokenizer: str | os.PathLike | None = None) -> TextConfig:
    """Our `TextConfig` for a MetaCLIP 2 text tower: pooled at the first `eos_token_id`, any id
    (module docstring).

    Args:
        hf_config_or_dict: A `MetaClip2Config` / `MetaClip2TextConfig` or its dict.
        tokenizer: The directory of the checkpoint's tokenizer files (`TextConfig.tokenizer`).

    Raises:
        ValueError: Several end ids (`eos_token_id` a list: the reference would fail comparing).
    """
    classes = _classes()
    parsed = parse_config(hf_config_or_dict, {k: classes[k] for k in ("metaclip_2", "metaclip_2_text_model")}, FAMILY)
    text = getattr(parsed, "text_config", parsed)
    if not isinstance(text.eos_token_id, int):
        raise ValueError(f"{FAMILY}: eos_token_id={text.eos_token_id!r}; the text is pooled at one end id")
    config = hf_clip_text.tower_config(text, FAMILY)
    return config if tokenizer is None else config.replace(tokenizer=os.fspath(tokenizer))


def convert_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our `VisionEncoder` state dict from a MetaCLIP 2 checkpoint (whole model or vision tower,
    bare or under `vision_model.`; text keys are ignored).

    Raises:
        WeightsError: A key is missing, or a key is neither used nor on the ignored list.
    """
    return hf_clip.TABLE.convert(select_tower(state_dict, TOWER_PREFIXES, IGNORED_PREFIXES), FAMILY)


def convert_contrastive_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`ContrastiveModel` tensors from a whole `MetaClip2Model` state dict (CLIP's layout).

    Raises:
        WeightsError: A key missing or not known (named).
    """
    return hf_clip_text.convert_state_dict(state_dict, convert_state_dict, f"{FAMILY}: a MetaClip2Model")


def load_contrastive(
    source: str | os.PathLike, *, checkpoint: str | os.PathLike | None = None, revision: str | None = None
) -> ContrastiveModel:
    """A `ContrastiveModel` (both towers, projections, logit scale) from a `MetaClip2Model`
    directory or hub repo, in eval mode: its `image_embeds`, `text_embeds` and logits are the
    reference's. The image tower gets the repo's `preprocessor_config.json`; the text tower the
    repo's tokenizer (`TextConfig.tokenizer`) when it has one.

    Args:
        source: A local directory or a hub repo id (read through the Hugging Face cache).
        checkpoint: A weight file used instead of the repo's (same keys).
        revision: Hub revision.

    Raises:
        FileNotFoundError: No config or weights (offline: the files missing from the cache).
        ValueError: Not a `metaclip_2` config.
        WeightsError: Weights that do not fit (named).
    """
    from ..loading import read_config_file
    from ..specs.files import SourceFiles

    files = SourceFiles(os.fspath(source), revision)
    config = read_config_file(files.get("config.json"))
    parsed = parse_config(config, {"metaclip_2": _classes()["metaclip_2"]}, FAMILY)
    tokenizer_config = files.get(TOKENIZER_FILES[0], required=False)
    if tokenizer_config is not None and files.is_hub:
        for name in TOKENIZER_FILES[1:]:  # beside tokenizer_config.json in the cached snapshot
            files.get(name, required=False)
    vision_config = config_from_hf(parsed, projection=False)
    text_config = text_config_from_hf(parsed, None if tokenizer_config is None else tokenizer_config.parent)
    return hf_clip_text.build_contrastive(files, vision_config, text_config, parsed.projection_dim,
                                          convert_contrastive_state_dict, "metaclip_2", checkpoint)
