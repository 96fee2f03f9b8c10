"""Writing and reading a whole `VisionLanguageModel` (`save_pretrained` / `from_pretrained`):

    vlm_config.json              image_token_id, feature_layers, feature_select, anyres, trainable
                                 (several towers: num_encoders, tower_grid, tower_resize)
    encoder/                     VisionEncoder.save_pretrained (with its image processor)
    encoder_0/, encoder_1/, ...  instead of encoder/ for a model of several towers
    projector/                   Projector.save_pretrained
    deepstack_0/, deepstack_1/, ...  the DeepStack projectors (Projector.save_pretrained), when any
    language_model/              the LM's own save_pretrained (safetensors), unless left out
    image_newline.safetensors    the learned newline token, when the model has one
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..anyres import AnyresConfig
from ..encoder import VisionEncoder
from ..pretrained import move_into_place, staging_directory, write_atomic
from .model import VisionLanguageModel

VLM_MODEL_TYPE = "vlm_encoder.vlm"
VLM_CONFIG_NAME = "vlm_config.json"
VLM_NEWLINE_NAME = "image_newline.safetensors"


def encoder_dirs(num_encoders: int) -> list[str]:
    """The encoder sub-directories: `encoder` for one tower, `encoder_{i}` for several."""
    return ["encoder"] if num_encoders == 1 else [f"encoder_{i}" for i in range(num_encoders)]


def save_vlm(model: VisionLanguageModel, save_directory: str | os.PathLike, language_model: bool = True) -> Path:
    """`VisionLanguageModel.save_pretrained` (see there)."""
    from safetensors.torch import save_file

    target = Path(save_directory)
    with staging_directory(target) as staging:
        towers = encoder_dirs(len(model.encoders))
        entries = [VLM_CONFIG_NAME, *towers, "projector"]
        for name, tower in zip(towers, model.encoders):
            tower.save_pretrained(staging / name)
        model.projector.save_pretrained(staging / "projector")
        for j, projector in enumerate(model.deepstack_projectors):
            projector.save_pretrained(staging / f"deepstack_{j}")
            entries.append(f"deepstack_{j}")
        if language_model:
            model.language_model.save_pretrained(staging / "language_model")
            entries.append("language_model")
        if model.image_newline is not None:
            save_file({"image_newline": model.image_newline.detach().cpu().contiguous()},
                      str(staging / VLM_NEWLINE_NAME))
            entries.append(VLM_NEWLINE_NAME)
        config = {
            "model_type": VLM_MODEL_TYPE,
            "image_token_id": model.image_token_id,
            "feature_layers": [list(layers) for layers in model.tower_layers] if len(towers) > 1 else list(model.feature_layers),
            "feature_select": model.feature_select,
            "anyres": model.anyres.to_dict() if model.anyres is not None else None,
            "trainable": dict(model.trainable),
            "language_model": "language_model" if language_model else None,
        }
        if model.deepstack_layers:
            config["deepstack_layers"] = list(model.deepstack_layers)
        if model.positions != "sequence":
            config["positions"] = model.positions
        if len(towers) > 1:
            config.update(num_encoders=len(towers), tower_grid=list(model.tower_grid), tower_resize=model.tower_resize)
        write_atomic(staging / VLM_CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True).encode())
        # Another save's encoder directories (one tower / several) go with it.
        old_towers = [p.name for p in target.glob("encoder*") if re.fullmatch(r"encoder(_\d+)?", p.name)] if target.is_dir() else []
        old_towers += [p.name for p in target.glob("deepstack_*") if re.fullmatch(r"deepstack_\d+", p.name)] if target.is_dir() else []
        stale = tuple(name for name in ("language_model", VLM_NEWLINE_NAME, *old_towers) if name not in entries)
        move_into_place(staging, target, entries, stale)
    return target


def load_vlm(
    path: str | os.PathLike,
    language_model: nn.Module | str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict[str, Any] | None = None,
    **kwargs: Any,
) -> VisionLanguageModel:
    """`VisionLanguageModel.from_pretrained` (see there)."""
    from safetensors.torch import load_file

    from ..projectors import Projector

    from ..weights import WeightsError

    directory = Path(path)
    if not directory.exists() and str(path).count("/") == 1:  # a hub repo id (push_to_hub's)
        from huggingface_hub import snapshot_download

        try:
            directory = Path(snapshot_download(str(path)))
        except Exception as err:  # offline and not cached, no such repo, no network
            raise FileNotFoundError(
                f"{path} is neither a directory nor a hub repo that could be read ({type(err).__name__}: {err})"
            ) from err
    config_path = directory / VLM_CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} has no {VLM_CONFIG_NAME} (expected a VisionLanguageModel.save_pretrained directory)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise WeightsError(f"{config_path}: not valid JSON ({err})") from None
    if config.get("model_type") != VLM_MODEL_TYPE:
        raise WeightsError(f"{config_path} has model_type={config.get('model_type')!r}, expected {VLM_MODEL_TYPE!r}")
    if language_model is None:
        if not config.get("language_model"):
            raise FileNotFoundError(
                f"{directory} was saved without its language model (save_pretrained(..., language_model=False)); "
                "pass it: VisionLanguageModel.from_pretrained(path, language_model=<module or directory>)"
            )
        language_model = directory / config["language_model"]
    placed = device_map is not None  # the LM is placed by transformers
    if placed and isinstance(language_model, nn.Module):
        raise ValueError("device_map places a language model read from a directory; this one is a module already")
    if not isinstance(language_model, nn.Module):
        from transformers import AutoModelForCausalLM

        lm_path = Path(language_model)
        if not lm_path.is_dir():
            raise FileNotFoundError(f"language model directory {lm_path} does not exist")
        options = {"dtype": dtype} if dtype is not None else {}
        if device_map is not None:  # transformers places it (through accelerate), built on `meta`
            options["device_map"] = device_map
        if config.get("positions") == "mrope":  # a Qwen3-VL model saved without its tower (from_qwen3_vl)
            language_model = _load_multimodal_lm(lm_path, options)
        else:
            language_model = AutoModelForCausalLM.from_pretrained(lm_path, trust_remote_code=False, **options)
    dtype = dtype or language_model.get_input_embeddings().weight.dtype
    num_encoders = config.get("num_encoders", 1)
    if isinstance(num_encoders, bool) or not isinstance(num_encoders, int) or num_encoders < 1:
        raise WeightsError(f"{config_path}: num_encoders must be a positive int, got {num_encoders!r}")
    towers = [VisionEncoder.from_pretrained(directory / name, dtype=dtype) for name in encoder_dirs(num_encoders)]
    if num_encoders > 1:
        kwargs = {"tower_grid": tuple(config["tower_grid"]), "tower_resize": config["tower_resize"], **kwargs}
    projector = Projector.from_pretrained(directory / "projector").to(dtype=dtype)
    deepstack_layers = config.get("deepstack_layers") or []
    deepstack = [Projector.from_pretrained(directory / f"deepstack_{j}").to(dtype=dtype) for j in range(len(deepstack_layers))]
    if deepstack_layers:
        kwargs = {"deepstack_layers": tuple(deepstack_layers), "deepstack_projectors": deepstack, **kwargs}
    if config.get("positions"):
        kwargs = {"positions": config["positions"], **kwargs}
    anyres = config.get("anyres")
    trainable = config.get("trainable") or {}
    options = {f"train_{name}": flag for name, flag in trainable.items()}
    options.update(kwargs)
    model = VisionLanguageModel(
        towers[0] if num_encoders == 1 else towers,
        projector,
        language_model if placed else language_model.to(dtype=dtype),
        image_token_id=int(config["image_token_id"]),
        feature_layers=tuple(tuple(l) if isinstance(l, list) else l for l in config["feature_layers"]),
        feature_select=config["feature_select"],
        anyres=AnyresConfig.from_dict(anyres) if anyres else None,
        **options,
    )
    newline_path = directory / VLM_NEWLINE_NAME
    if model.image_newline is not None:
        if not newline_path.is_file():
            raise FileNotFoundError(f"{directory}: the model has an image_newline but {VLM_NEWLINE_NAME} is missing")
        saved = load_file(str(newline_path))
        if set(saved) != {"image_newline"} or saved["image_newline"].shape != model.image_newline.shape:
            raise WeightsError(
                f"{newline_path}: expected one tensor 'image_newline' of shape {tuple(model.image_newline.shape)}, "
                f"got {({k: tuple(v.shape) for k, v in saved.items()})}"
            )
        with torch.no_grad():
            model.image_newline.copy_(saved["image_newline"])
    if not placed:
        return model.to(device=device).eval()
    # The LM stays where transformers placed it (accelerate's hooks move activations between its
    # parts); the towers and the projector go where its input embeddings are, where image
    # features join the text.
    target = device or language_model.get_input_embeddings().weight.device
    for child in model.children():
        if child is not language_model:
            child.to(target)
    if model.image_newline is not None:
        model.image_newline.data = model.image_newline.data.to(target)
    return model.eval()


def _load_multimodal_lm(lm_path: Path, options: dict[str, Any]) -> nn.Module:
    """The LM of a model with `positions='mrope'`: transformers' whole Qwen-VL model
    (`AutoModelForImageTextToText`), saved without its vision tower (`from_qwen3_vl` removes it).
    transformers builds the tower anyway (randomly initialised, with its missing-weights warning);
    it is dropped at once."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(lm_path, trust_remote_code=False, **options)
    model.model.visual = None
    return model
