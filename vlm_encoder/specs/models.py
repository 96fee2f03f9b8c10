"""Model specs: the one place a string becomes a model, for every command and the Python API.

    DIR                    a `save_pretrained` directory of ours (`VisionEncoder`, `ContrastiveModel`
                           export, `VisionLanguageModel`) or a Hugging Face model directory
    owner/name             a hub repo id (read through the Hugging Face cache)
    open_clip:ARCH[:TAG]   an open_clip model; TAG is a pretrained tag or a checkpoint file
    timm:NAME              a timm ViT, or an EVA02 / PE / DINOv3 model of timm's `eva.py`, or a
                           DeepSeek-V4 vision model of its `deepseek_vit.py`, or a Gemma 4 one
                           of its `gemma4_vit.py`, or a C-RADIO backbone (`naflexvit_*_radio_v3/v4`,
                           `vit_*_radio_v3/v4`)
                           (`NAME.tag` picks timm's pretrained tag)
    preset:NAME            a preset with random weights (seeded), `key=value` overrides of its
                           `VisionConfig`; a bare preset name that is not a directory works too

What a spec holds is read from its `config.json` (`model_type`, never guessed from weights):
an encoder, a contrastive model (both towers), a vision-language model or a text tower. Each
command asks for the part it needs (`need="vision"`, `"contrastive"` or `"any"`); a spec
that does not have it is refused in one line saying what the command takes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

ModelKind = Literal["encoder", "contrastive", "vlm", "text"]
PatchRemainder = Literal["error", "drop"]
PATCH_REMAINDERS: tuple[str, ...] = ("error", "drop")
Need = Literal["vision", "contrastive", "any"]
SCHEMES = ("open_clip", "timm", "preset")
FORMS = (
    "a save_pretrained directory (encoder, ContrastiveModel or VisionLanguageModel), a Hugging Face model "
    "directory or hub id, open_clip:ARCH[:TAG], timm:NAME or preset:NAME"
)
WHAT_IS_NEEDED = {
    "vision": "a model with an image tower: " + FORMS,
    "contrastive": "a contrastive image-text model: a ContrastiveModel save_pretrained directory (what `train` "
    "exports), an HF CLIP (clip) or MetaCLIP 2 (metaclip_2) directory or hub id, or open_clip:ARCH[:TAG]",
    "any": FORMS,
}
OUR_TYPES: dict[str, ModelKind] = {
    "vlm_encoder.vision": "encoder",
    "vlm_encoder.contrastive": "contrastive",
    "vlm_encoder.text": "text",
    "vlm_encoder.vlm": "vlm",
}
VLM_CONFIG_NAME = "vlm_config.json"
# Hugging Face model types read as a whole `ContrastiveModel` (both towers), by their converter.
HF_CONTRASTIVE_TYPES: tuple[str, ...] = ("clip", "metaclip_2")
# Of those, the types whose image tower `load_encoder` converts with its projection: the tower
# alone (`need="vision"`) is read as an encoder, without building the text tower.
HF_TOWER_TYPES: tuple[str, ...] = ("clip",)


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec.

    Attributes:
        text: The spec as given.
        scheme: `path` (a local directory), `hub`, `open_clip`, `timm` or `preset`.
        name: The directory, repo id, open_clip architecture, timm name or preset name.
        tag: open_clip's pretrained tag or checkpoint file (`open_clip:ARCH:TAG`), else `None`.
    """

    text: str
    scheme: Literal["path", "hub", "open_clip", "timm", "preset"]
    name: str
    tag: str | None = None


def parse_model_spec(spec: str | os.PathLike) -> ModelSpec:
    """Parse a model spec (see the module docstring); nothing is loaded.

    Raises:
        ValueError: An empty spec, an unknown `scheme:` or a scheme without a name.
        FileNotFoundError: A path (it starts with `.`, `/` or `~`, or has several `/`) that
            is not a directory.
    """
    from ..presets import PRESETS

    text = os.fspath(spec).strip() if isinstance(spec, (str, os.PathLike)) else None
    if not text:
        raise ValueError(f"a model spec must be a non-empty string ({FORMS}), got {spec!r}")
    scheme, sep, rest = text.partition(":")
    if sep and scheme in SCHEMES:
        name, _, tag = rest.partition(":") if scheme == "open_clip" else (rest, "", "")
        if not name.strip():
            raise ValueError(f"model {text!r}: give a name after '{scheme}:' (e.g. {_example(scheme)})")
        if scheme == "preset" and name.strip() not in PRESETS:
            raise ValueError(f"model {text!r}: no preset {name.strip()!r}; see vlm_encoder.list_presets()"
                             + _close(name.strip(), PRESETS))
        return ModelSpec(text, scheme, name.strip(), tag.strip() or None)  # type: ignore[arg-type]
    path = Path(text).expanduser()
    if path.is_dir():
        return ModelSpec(text, "path", str(path))
    if path.exists():
        raise ValueError(f"model {text!r} is a file; a model is {FORMS} (a weight file goes to --checkpoint)")
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text:
        raise FileNotFoundError(f"model {text!r}: no such directory")
    if text in PRESETS:
        return ModelSpec(text, "preset", text)
    if "/" not in text and not sep and _close(text, PRESETS, cutoff=0.8):
        raise ValueError(f"model {text!r} is not a directory, a preset or a hub id (owner/name)"
                         + _close(text, PRESETS, cutoff=0.8, prefix="preset:"))
    if sep:
        raise ValueError(f"model {text!r}: unknown scheme {scheme + ':'!r}; a model is {FORMS}")
    return ModelSpec(text, "hub", text)


def _example(scheme: str) -> str:
    return {"open_clip": "open_clip:ViT-B-32:laion2b_s34b_b79k", "timm": "timm:vit_base_patch16_224",
            "preset": "preset:vit_tiny_patch16_224"}[scheme]


def _close(name: str, names: Sequence[str], cutoff: float = 0.6, prefix: str = "") -> str:
    import difflib

    close = difflib.get_close_matches(name, list(names), n=3, cutoff=cutoff)
    return f" (did you mean {', '.join(prefix + c for c in close)}?)" if close else ""


@dataclass
class LoadedModel:
    """What a spec resolved to.

    Attributes:
        spec: The parsed spec.
        kind: `encoder`, `contrastive`, `vlm` or `text`.
        model: The module (in eval mode).
        info: Where it came from: `family`, `source`, `model_type`, ... (JSON-friendly).
    """

    spec: ModelSpec
    kind: ModelKind
    model: nn.Module
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def vision(self) -> Any:
        """The image tower (a `VisionEncoder`), or `None` for a text tower."""
        if self.kind == "encoder":
            return self.model
        if self.kind == "contrastive":
            return self.model.vision
        if self.kind == "vlm":
            return self.model.encoder
        return None


def model_kind(spec: ModelSpec, revision: str | None = None) -> ModelKind:
    """What a directory or hub spec holds, from its config file alone (no weights are read).
    Every other scheme is an encoder (open_clip: a contrastive model)."""
    if spec.scheme in ("timm", "preset"):
        return "encoder"
    if spec.scheme == "open_clip":
        return "contrastive"
    from .files import SourceFiles

    files = SourceFiles(spec.name, revision)
    vlm_config = files.get(VLM_CONFIG_NAME, required=False)
    if vlm_config is not None:
        return OUR_TYPES.get(_model_type(vlm_config), "encoder")
    model_type = _model_type(files.get("config.json"))
    if model_type in HF_CONTRASTIVE_TYPES:
        return "contrastive"
    return OUR_TYPES.get(model_type, "encoder")  # an HF family: load_encoder converts its tower


def _model_type(path: Path) -> Any:
    from ..weights import WeightsError

    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise WeightsError(f"{path}: not valid JSON ({err})") from None
    return data.get("model_type") if isinstance(data, dict) else None


def load_model(
    spec: str | os.PathLike | ModelSpec,
    *,
    need: Need = "any",
    command: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    seed: int = 0,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    patch_remainder: PatchRemainder | None = None,
) -> LoadedModel:
    """Resolve and load a model spec: the one resolver behind `load_encoder`, every command
    and `TrainConfig`'s `vision_init` / `init_model`.

    Args:
        spec: A model spec (see the module docstring) or a parsed `ModelSpec`.
        need: `vision` (an image tower; a contrastive model or VLM gives its tower, an
            open_clip spec only its image tower), `contrastive` (both towers) or `any`.
        command: The command asking, named in the refusal of a spec that does not fit.
        checkpoint: A weight file loaded instead of the directory's (same key layout), the
            state dict of a preset (this package's names, strict), or an open_clip / timm
            checkpoint file.
        overrides: Changes of a preset's `VisionConfig` fields (`specs.options.apply_overrides`
            reads them from `key=value` text).
        seed: Seed of a preset's random weights.
        revision: Hub revision of a repo id.
        dtype: Floating dtype of the result (default float32).
        device: Where to put it.
        patch_remainder: The image tower's policy for sides that are not a multiple of the
            patch stride (`VisionConfig.patch_remainder`): `error` or `drop` (floor the grid).
            Default: what the source's converter sets, its reference's behaviour (every HF
            family, timm and open_clip floor; a preset or our own save keeps its config's).

    Returns:
        A `LoadedModel` in eval mode.

    Raises:
        ValueError: A spec that does not fit `need`, overrides for a non-preset, a bad override,
            an unknown `patch_remainder`, or `patch_remainder='error'` for a tower whose
            native size is not a multiple of its patch stride.
        FileNotFoundError: No such directory, missing files, or a hub id not cached offline.
        WeightsError: Weights that do not fit.
    """
    spec = spec if isinstance(spec, ModelSpec) else parse_model_spec(spec)
    if overrides and spec.scheme != "preset":
        raise ValueError(f"overrides apply to preset: models only; {spec.text!r} is not a preset")
    if patch_remainder is not None and patch_remainder not in PATCH_REMAINDERS:
        raise ValueError(f"patch_remainder={patch_remainder!r} is not one of {', '.join(PATCH_REMAINDERS)}")
    if patch_remainder is not None and spec.scheme == "preset":  # before the preset's config is checked
        overrides = {**(overrides or {}), "patch_remainder": patch_remainder}
    kind = model_kind(spec, revision)
    if need == "contrastive" and kind != "contrastive" or need == "vision" and kind == "text":
        what = f"{command} takes" if command else "expected"
        raise ValueError(f"model {spec.text!r} is {_a(kind)}; {what} {WHAT_IS_NEEDED[need]}")
    checkpoint = None if checkpoint is None else os.fspath(checkpoint)
    if spec.scheme == "preset":
        loaded = LoadedModel(spec, "encoder", _preset(spec.name, overrides, seed, checkpoint),
                             {"family": "preset", "source": spec.text, "name": spec.name, "seed": seed,
                              "random_weights": checkpoint is None})
    elif spec.scheme == "timm":
        from ..converters.timm_deepseek import is_deepseek, load_timm_deepseek
        from ..converters.timm_eva import is_eva, load_timm_eva
        from ..converters.timm_vit import load_timm

        load = load_timm_eva if is_eva(spec.name) else load_timm  # timm's registry names the module
        load = load_timm_deepseek if is_deepseek(spec.name) else load
        from ..converters.timm_qwen3 import is_qwen3_vit, load_timm_qwen3

        load = load_timm_qwen3 if is_qwen3_vit(spec.name) else load
        from ..converters.hf_gemma4 import is_gemma4, load_timm_gemma4

        load = load_timm_gemma4 if is_gemma4(spec.name) else load
        from ..converters.timm_radio import is_radio, load_timm_radio

        load = load_timm_radio if is_radio(spec.name) else load  # C-RADIO: naflexvit_* / vit_*_radio_v3/v4
        loaded = LoadedModel(spec, "encoder", load(spec.name, checkpoint),
                             {"family": "timm", "source": spec.text, "name": spec.name, "checkpoint": checkpoint})
    elif spec.scheme == "open_clip":
        tag = spec.tag or checkpoint
        info = {"family": "open_clip", "source": spec.text, "name": spec.name, "checkpoint": tag}
        from ..converters.open_clip_clip import UnsupportedOpenClipTextTower
        from ..converters.open_clip_vit import load_open_clip

        if need == "vision":
            loaded = LoadedModel(spec, "encoder", load_open_clip(spec.name, tag), info)
        else:
            from ..contrastive import ContrastiveModel

            try:
                loaded = LoadedModel(spec, "contrastive", ContrastiveModel.from_open_clip(spec.name, tag), info)
            except UnsupportedOpenClipTextTower as err:
                if need == "contrastive":
                    raise
                # `info` of e.g. an open_clip SigLIP: describe the image tower, and say why alone.
                info["text_tower"] = f"not loaded ({err})"
                loaded = LoadedModel(spec, "encoder", load_open_clip(spec.name, tag), info)
    else:
        loaded = _load_directory(spec, kind, need, checkpoint, revision)
    if loaded.vision is not None:
        loaded.vision.source_info = loaded.info
        if patch_remainder is not None and spec.scheme != "preset":
            loaded.vision.config = loaded.vision.config.replace(patch_remainder=patch_remainder)
    loaded.model.to(device=device, dtype=dtype)
    return loaded


def load_vision(spec: str | os.PathLike | ModelSpec, *, command: str | None = None, **options: Any) -> LoadedModel:
    """`load_model(spec, need="vision")`: `.vision` is the image tower."""
    return load_model(spec, need="vision", command=command, **options)


def _a(kind: ModelKind) -> str:
    return {"encoder": "an image encoder (no text tower)", "contrastive": "a contrastive image-text model",
            "vlm": "a vision-language model", "text": "a text tower only"}[kind]


def _preset(name: str, overrides: Mapping[str, Any] | None, seed: int, checkpoint: str | None) -> nn.Module:
    from ..encoder import VisionEncoder
    from ..presets import preset_config
    from ..weights import load_state_dict_strict, read_state_dict

    config = preset_config(name, **dict(overrides or {}))
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        encoder = VisionEncoder(config)
    finally:
        torch.random.set_rng_state(state)
    if checkpoint is not None:
        load_state_dict_strict(encoder, read_state_dict(checkpoint), source=checkpoint)
    return encoder.eval()


def _load_directory(
    spec: ModelSpec, kind: ModelKind, need: Need, checkpoint: str | None, revision: str | None
) -> LoadedModel:
    info: dict[str, Any] = {"source": spec.text}
    hf_type = _hf_contrastive_type(spec, revision) if kind == "contrastive" else None
    if hf_type in HF_TOWER_TYPES and need == "vision":
        return _load_directory(spec, "encoder", need, checkpoint, revision)
    if hf_type in HF_TOWER_TYPES and need == "any":
        try:
            return _load_hf_contrastive(spec, hf_type, checkpoint, revision, info)
        except ValueError as err:  # a text tower TextEncoder does not express: describe the image tower
            loaded = _load_directory(spec, "encoder", need, checkpoint, revision)
            loaded.info["text_tower"] = f"not loaded ({err})"
            return loaded
    if hf_type is not None:
        return _load_hf_contrastive(spec, hf_type, checkpoint, revision, info)
    if kind == "contrastive":
        from ..contrastive import ContrastiveModel

        model = ContrastiveModel.from_pretrained(spec.name, revision=revision, checkpoint=checkpoint)
        info["family"] = "vlm_encoder.contrastive"
    elif kind == "vlm":
        from ..vlm import VisionLanguageModel

        model = VisionLanguageModel.from_pretrained(_local_snapshot(spec, revision))
        info["family"] = "vlm_encoder.vlm"
    elif kind == "text":
        from ..text import TextEncoder

        model = TextEncoder.from_pretrained(spec.name, revision=revision, checkpoint=checkpoint)
        info["family"] = "vlm_encoder.text"
    else:
        from ..loading import load_encoder_files

        model = load_encoder_files(spec.name, checkpoint=checkpoint, revision=revision)
        info = model.source_info
    return LoadedModel(spec, kind, model.eval(), info)


def _load_hf_contrastive(
    spec: ModelSpec, hf_type: str, checkpoint: str | None, revision: str | None, info: dict[str, Any]
) -> LoadedModel:
    """Both towers of an HF contrastive checkpoint (`HF_CONTRASTIVE_TYPES`), by its converter."""
    from ..converters import hf_clip_text, hf_metaclip_2

    load = {"clip": hf_clip_text.load_contrastive, "metaclip_2": hf_metaclip_2.load_contrastive}[hf_type]
    model = load(spec.name, checkpoint=checkpoint, revision=revision)
    info.update(family=hf_type, model_type=hf_type, checkpoint=checkpoint)
    return LoadedModel(spec, "contrastive", model.eval(), info)


def _hf_contrastive_type(spec: ModelSpec, revision: str | None) -> str | None:
    """The `model_type` of an HF contrastive checkpoint (`HF_CONTRASTIVE_TYPES`), else `None`."""
    from .files import SourceFiles

    files = SourceFiles(spec.name, revision)
    if files.get(VLM_CONFIG_NAME, required=False) is not None:
        return None
    model_type = _model_type(files.get("config.json"))
    return model_type if model_type in HF_CONTRASTIVE_TYPES else None


def _local_snapshot(spec: ModelSpec, revision: str | None) -> str:
    """A directory holding the whole repo (a `VisionLanguageModel` has sub-directories)."""
    if spec.scheme == "path":
        return spec.name
    from huggingface_hub import snapshot_download

    return snapshot_download(spec.name, revision=revision)


__all__ = ["FORMS", "LoadedModel", "ModelSpec", "load_model", "load_vision", "model_kind", "parse_model_spec"]
