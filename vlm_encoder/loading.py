"""`load_encoder`: one entry point for pretrained vision towers.

The family is chosen explicitly, never guessed from the weights:
  * a directory or hub repo id whose `config.json` has `model_type`
      `vlm_encoder.vision`                    -> our own `save_pretrained` format
      `clip`, `clip_vision_model`             -> `converters.hf_clip`
      `metaclip_2`, `metaclip_2_vision_model` -> `converters.hf_metaclip_2` (CLIP's tower; a whole
                                                 `metaclip_2` spec is a contrastive model, both towers)
      `siglip`, `siglip_vision_model`         -> `converters.hf_siglip`
      `siglip2`, `siglip2_vision_model`       -> `converters.hf_siglip2` (NaFlex: encode images at
                                                 their own sizes with `vlm_encoder.packing`)
      `vit`                                   -> `converters.hf_vit`
      `dinov2`, `dinov2_with_registers`       -> `converters.hf_dinov2`
      `dinov3_vit`                            -> `converters.hf_dinov3` (2D RoPE)
      `qwen2_5_vl`, `qwen2_5_vl_vision`       -> `converters.hf_qwen2_5_vl` (a whole model: its
                                                 vision tower, keys under `visual.` / `model.visual.`)
      `qwen3_vl`, `qwen3_vl_vision`,          -> `converters.hf_qwen3_vl` (likewise)
      `qwen3_vl_moe`, `qwen3_vl_moe_vision`
      `qwen3_5`, `qwen3_5_vision`,            -> `converters.hf_qwen3_vl` (Qwen3.5: Qwen3-VL's tower
      `qwen3_5_moe`, `qwen3_5_moe_vision`        without DeepStack mergers; likewise)
      `deepseek_v4` with `vision_*` fields    -> `converters.hf_deepseek_v4` (a whole model: its
                                                 vision tower, keys under `vision.`)
      `gemma4`, `gemma4_vision`               -> `converters.hf_gemma4` (a whole model: its vision
                                                 tower, keys under `model.vision_tower.`)
      `kimi_k25`, `kimi_k25_vision`           -> `converters.hf_kimi_k25` (a whole model: its vision
                                                 tower, keys under `vision_tower.`, released names)
      `perception_lm`                         -> `converters.hf_perception_lm` (a whole model: its
                                                 timm PE tower, keys under `model.vision_tower.timm_model.`)
      `llama4`, `llama4_vision_model`         -> `converters.hf_llama4` (a whole model: its vision
                                                 tower, keys under `vision_model.`; or the tower alone)
      `molmo2`                                -> `converters.hf_molmo2` (a whole model: its vision
                                                 tower, keys under `model.vision_backbone.image_vit.`)
      `aimv2`, `aimv2_vision_model`           -> `converters.hf_aimv2` (RMSNorm, SwiGLU)
      `radio`                                 -> `converters.hf_radio` (C-RADIO v3 / v4: class tokens,
                                                 summary_idxs, CPE positions)
      `internvl_vision`                       -> `converters.hf_internvit`
      `llava`, `llava_next`, `internvl`,      -> the tower named by `vision_config.model_type`,
      `gemma3` (its SigLIP)                      keys under `vision_tower.` / `model.vision_tower.`
  * `open_clip:ARCH` -> `converters.open_clip_vit.load_open_clip(ARCH, checkpoint)`
  * `timm:NAME`      -> `converters.timm_vit.load_timm(NAME, checkpoint)`, or for a model of timm's
                        `eva.py` (EVA02, PE, DINOv3) `converters.timm_eva.load_timm_eva`

Weights are read from safetensors (single or sharded) or, when a repo has none, from
`pytorch_model.bin` with `torch.load(weights_only=True)`. No code from a repo is ever run
(`auto_map` / remote code is ignored). Hub repos are read through `huggingface_hub`'s cache,
one file at a time, so a LLaVA checkpoint only fetches the shards that hold its vision tower.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from .config import VisionConfig
from .encoder import VisionEncoder
from .pretrained import PROCESSOR_NAME, read_image_processor
from .specs.files import SourceFiles
from .weights import (
    WeightsError,
    build_and_load,
    naming,
    read_safetensors,
    read_state_dict,
    strip_key,
    strip_prefixes,
)

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_FILE = "model.safetensors"
TORCH_INDEX = "pytorch_model.bin.index.json"
TORCH_FILE = "pytorch_model.bin"

HF_MODEL_TYPES: tuple[str, ...] = (
    "clip",
    "clip_vision_model",
    "metaclip_2",
    "metaclip_2_vision_model",
    "siglip",
    "siglip_vision_model",
    "siglip2",
    "siglip2_vision_model",
    "vit",
    "dinov2",
    "dinov2_with_registers",
    "dinov3_vit",
    "kimi_k25_vision",
    "qwen2_5_vl_vision",
    "qwen3_vl_vision",
    "qwen3_vl_moe_vision",
    "qwen3_5_vision",
    "qwen3_5_moe_vision",
    "aimv2",
    "aimv2_vision_model",
    "internvl_vision",
    "radio",
    "gemma4_vision",
    "llama4_vision_model",
)
# Vision-language models whose vision tower is read on its own (an `internvl` gives its InternViT).
LLAVA_MODEL_TYPES: tuple[str, ...] = ("llava", "llava_next", "llava_onevision", "internvl", "gemma3")
# Whole VLMs whose vision tower is a family of its own, under its own prefixes.
QWEN_VL_MODEL_TYPES: tuple[str, ...] = (
    "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "deepseek_v4", "gemma4", "kimi_k25",
    "perception_lm", "llama4", "molmo2",
)
# Qwen3-VL's tower under the other names transformers gives it (MoE models, Qwen3.5).
QWEN3_TOWER_TYPES: tuple[str, ...] = ("qwen3_vl_moe_vision", "qwen3_5_vision", "qwen3_5_moe_vision")
# Families whose processor resizes each image under a patch budget instead of to one size.
NAFLEX_MODEL_TYPES: tuple[str, ...] = ("siglip2", "siglip2_vision_model")
SUPPORTED_MODEL_TYPES: tuple[str, ...] = (VisionEncoder.model_type, *HF_MODEL_TYPES, *LLAVA_MODEL_TYPES, *QWEN_VL_MODEL_TYPES)

# Where a LLaVA checkpoint keeps its vision tower (transformers >= 4.52 in memory / on disk),
# and the parts of it that are not the vision tower.
LLAVA_TOWER_PREFIXES = ("model.vision_tower.", "vision_tower.")
LLAVA_IGNORED_PREFIXES = (
    "model.language_model.",
    "language_model.",
    "lm_head.",
    "model.multi_modal_projector.",
    "multi_modal_projector.",
    "model.image_newline",
    "image_newline",
    # Gemma 4's connector and audio side (its tower is under the same prefixes as LLaVA's)
    "model.embed_vision.",
    "embed_vision.",
    "model.audio_tower.",
    "audio_tower.",
    "model.embed_audio.",
    "embed_audio.",
)


# ---------------------------------------------------------------------------- entry point
def load_encoder(
    source: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    revision: str | None = None,
    overrides: dict[str, Any] | None = None,
    seed: int = 0,
    patch_remainder: str | None = None,
) -> VisionEncoder:
    """Load a vision tower from any model spec as a `VisionEncoder`.

    Args:
        source: A model spec (`vlm_encoder.specs.models`): a directory or hub repo id (our
            encoder, `ContrastiveModel` or `VisionLanguageModel` saves give their image tower;
            HF families as in the module docstring), `open_clip:ARCH[:TAG]`, `timm:NAME` or
            `preset:NAME`.
        checkpoint: A weight file to use instead of the one in the directory (same key
            layout), a preset's state dict, or the open_clip / timm checkpoint file.
        dtype: Floating dtype of the result (default float32; checkpoint tensors are cast).
        device: Where to put the result.
        revision: Hub revision (branch, tag or commit) for a repo id.
        overrides: Changes of a preset's `VisionConfig` fields, e.g. `{"depth": 4}`.
        seed: Seed of a preset's random weights.
        patch_remainder: `error` or `drop` (floor the patch grid, ignoring the last pixels)
            for sides that are not a multiple of the patch stride; default: the source's own
            policy (every HF family, timm and open_clip floor, as their references do, so
            `google/siglip-so400m-patch14-384` is a 27 x 27 grid).

    Returns:
        The encoder in eval mode, with `encoder.image_processor` (the source's preprocessing,
        or the default for its config) and `encoder.source_info` (`family`, `source`, ...).

    Raises:
        FileNotFoundError: No such directory, no weights, or a hub repo that is not in the
            cache while offline (the message says how to point at a local directory).
        ValueError: An unsupported `model_type` (the supported ones are listed), a spec
            without an image tower.
        WeightsError: The weights do not fit the family (missing / unexpected keys, shapes).
    """
    from .specs.models import load_vision

    return load_vision(source, checkpoint=checkpoint, dtype=dtype, device=device, revision=revision,
                       overrides=overrides, seed=seed, patch_remainder=patch_remainder).vision


def load_encoder_files(
    source: str, *, checkpoint: str | os.PathLike | None = None, revision: str | None = None
) -> VisionEncoder:
    """The encoder of a directory or hub repo holding our encoder or an HF vision family
    (the part of `load_encoder` behind the spec resolver)."""
    return _load_from_files(SourceFiles(source, revision), checkpoint)


# ---------------------------------------------------------------------------- files
def read_config_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise WeightsError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_weights(
    files: SourceFiles, checkpoint: str | os.PathLike | None, keep: Callable[[str], bool]
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """The tensors whose names pass `keep`, with the names of every tensor in the weights.

    Reads `checkpoint` when given, else the first of `model.safetensors`, sharded safetensors
    (only the shards holding a kept key are fetched), `pytorch_model.bin`, sharded
    `pytorch_model.bin` (weights only): transformers' order, so a directory holding several
    gives the weights `from_pretrained` gives. Names lose their `module.` / `_orig_mod.`
    prefixes (DDP, torch.compile) before `keep` sees them.

    Returns:
        `(tensors, all_names, files_read)`.
    """
    if checkpoint is not None:
        path = Path(checkpoint)
        tensors, names = _read_file(path, keep)
        return tensors, names, [path.name]
    # transformers' order (modeling_utils.py `_get_resolved_checkpoint_files`, 5.x): the single
    # file before the shard index, safetensors before torch pickles.
    looked = [SAFETENSORS_FILE, SAFETENSORS_INDEX, TORCH_FILE, TORCH_INDEX]
    for name in looked:
        path = files.get(name, required=False)
        if path is None:
            continue
        if name in (SAFETENSORS_FILE, TORCH_FILE):
            tensors, names = _read_file(path, keep)
            return tensors, names, [name]
        weight_map = read_config_file(path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise WeightsError(f"{path}: no 'weight_map' in the shard index")
        shards = sorted({str(shard) for key, shard in weight_map.items() if keep(strip_key(str(key)))})
        tensors: dict[str, torch.Tensor] = {}
        for shard in shards:
            tensors.update(_read_file(files.get(shard), keep)[0])
        return tensors, [strip_key(str(key)) for key in weight_map], shards
    if files.is_hub and files.not_cached:
        raise FileNotFoundError(files.offline_message(looked))
    raise FileNotFoundError(f"{files.source}: no weights found (looked for {', '.join(looked)})")


def _read_file(path: Path, keep: Callable[[str], bool]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The kept tensors of one file and the names of all its tensors (prefixes removed)."""
    if path.suffix != ".safetensors":
        everything = strip_prefixes(read_state_dict(path))
        return {k: v for k, v in everything.items() if keep(k)}, list(everything)
    with naming(str(path)):
        tensors, names = read_safetensors(path, keep=lambda key: keep(strip_key(key)))
        return strip_prefixes(tensors), [strip_key(k) for k in names]


# ---------------------------------------------------------------------------- families
def _converter(model_type: str) -> ModuleType:
    from .converters import hf_aimv2, hf_deepseek_v4, hf_clip, hf_dinov2, hf_metaclip_2, hf_dinov3, hf_internvit, hf_kimi_k25, hf_qwen2_5_vl, hf_qwen3_vl, hf_siglip, hf_siglip2, hf_vit

    from .converters import hf_gemma4

    from .converters import hf_radio

    from .converters import hf_perception_lm

    from .converters import hf_llama4

    from .converters import hf_molmo2

    table = {
        "clip": hf_clip,
        "clip_vision_model": hf_clip,
        "metaclip_2": hf_metaclip_2,
        "metaclip_2_vision_model": hf_metaclip_2,
        "siglip": hf_siglip,
        "siglip_vision_model": hf_siglip,
        "siglip2": hf_siglip2,
        "siglip2_vision_model": hf_siglip2,
        "vit": hf_vit,
        "dinov2": hf_dinov2,
        "dinov2_with_registers": hf_dinov2,
        "dinov3_vit": hf_dinov3,
        "qwen2_5_vl_vision": hf_qwen2_5_vl,
        "qwen2_5_vl": hf_qwen2_5_vl,
        "qwen3_vl_vision": hf_qwen3_vl,
        "qwen3_vl": hf_qwen3_vl,
        **dict.fromkeys(("qwen3_vl_moe", "qwen3_vl_moe_vision", "qwen3_5", "qwen3_5_vision", "qwen3_5_moe",
                         "qwen3_5_moe_vision"), hf_qwen3_vl),
        "deepseek_v4": hf_deepseek_v4,
        "aimv2": hf_aimv2,
        "aimv2_vision_model": hf_aimv2,
        "internvl_vision": hf_internvit,
        "kimi_k25": hf_kimi_k25,
        "kimi_k25_vision": hf_kimi_k25,
        "radio": hf_radio,
        "gemma4": hf_gemma4,
        "gemma4_vision": hf_gemma4,
        "perception_lm": hf_perception_lm,
        "llama4": hf_llama4,
        "llama4_vision_model": hf_llama4,
        "molmo2": hf_molmo2,
    }
    return table[model_type]


def _unsupported(model_type: Any, where: str) -> ValueError:
    return ValueError(
        f"{where}: model_type={model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)} "
        "(or the sources 'open_clip:ARCH' and 'timm:NAME')"
    )


def _load_from_files(files: SourceFiles, checkpoint: str | os.PathLike | None) -> VisionEncoder:
    config_path = files.get(CONFIG_FILE)
    config = read_config_file(config_path)
    model_type = config.get("model_type")
    info: dict[str, Any] = {"source": files.source, "model_type": model_type, "architectures": config.get("architectures")}
    if model_type == VisionEncoder.model_type:
        encoder = _load_own(files, config_path, checkpoint)
        info["family"] = "vlm_encoder"
    elif model_type in HF_MODEL_TYPES:
        module = _converter(model_type)
        encoder, weights = _load_hf_tower(files, checkpoint, model_type, config, module, tower_keys=None)
        info.update(family=model_type.split("_vision_model")[0], weights=weights)
    elif model_type in LLAVA_MODEL_TYPES:
        vision_config = config.get("vision_config") or {}
        # HF's LlavaConfig builds a CLIP tower when `vision_config` names no model_type
        # (InternVLConfig an InternViT).
        default_type = {"internvl": "internvl_vision", "gemma3": "siglip_vision_model"}.get(model_type, "clip_vision_model")
        vision_type = vision_config.get("model_type", default_type)
        if vision_type not in ("clip_vision_model", "siglip_vision_model", "internvl_vision"):
            raise _unsupported(vision_type, f"{config_path} vision_config")
        module = _converter(vision_type)
        encoder, weights = _load_hf_tower(
            files, checkpoint, vision_type, {"model_type": vision_type, **vision_config}, module, tower_keys=LLAVA_TOWER_PREFIXES
        )
        info.update(
            family=model_type,
            vision_family=vision_type.split("_vision_model")[0],
            weights=weights,
            vision_feature_layer=config.get("vision_feature_layer"),
            vision_feature_select_strategy=config.get("vision_feature_select_strategy"),
        )
    elif model_type in QWEN_VL_MODEL_TYPES:
        module = _converter(model_type)  # reads the whole config's `vision_config`
        encoder, weights = _load_hf_tower(files, checkpoint, model_type, config, module, tower_keys=module.TOWER_PREFIXES)
        info.update(family=model_type, weights=weights)
    else:
        raise _unsupported(model_type, str(config_path))
    if model_type in NAFLEX_MODEL_TYPES:
        # Siglip2ImageProcessor: each image at its own NaFlex size (encode with packing.encode_packed).
        encoder.image_processor = _image_processor(files) or _naflex_processor(encoder.config.patch_size)
        info["max_num_patches"] = encoder.image_processor.config.max_patches
    elif model_type in ("gemma4", "gemma4_vision"):  # Gemma4ImageProcessor (resize_mode='gemma4') where given
        path = files.get(PREPROCESSOR_FILE, required=False)
        data = read_config_file(path) if path else None
        encoder.image_processor = _converter(model_type).image_processor(encoder.config, data)
    elif model_type == "radio":
        encoder.image_processor = _converter(model_type).image_processor(config)  # no RADIO processor in transformers
    elif model_type in ("kimi_k25", "kimi_k25_vision"):  # Kimi_K25ImageProcessor (resize_mode='kimi_k25') where given
        path = files.get(PREPROCESSOR_FILE, required=False)
        data = read_config_file(path) if path else None
        encoder.image_processor = _converter(model_type).image_processor(encoder.config, data)
    elif model_type == "molmo2":  # one view of Molmo2ImageProcessor (crops: see there)
        encoder.image_processor = _converter(model_type).image_processor(encoder.config)
    elif model_type in ("llama4", "llama4_vision_model"):  # one tile of Llama4ImageProcessor (tiling: see there)
        encoder.image_processor = _converter(model_type).image_processor(encoder.config)
    elif model_type == "perception_lm":  # the thumbnail of PerceptionLMImageProcessor (tiles: see there)
        path = files.get(PREPROCESSOR_FILE, required=False)
        data = read_config_file(path) if path else None
        encoder.image_processor = _converter(model_type).image_processor(encoder.config, data)
    elif model_type in (*QWEN_VL_MODEL_TYPES, "qwen2_5_vl_vision", "qwen3_vl_vision", *QWEN3_TOWER_TYPES):
        # Qwen2VLImageProcessor (smart_resize: each image at its own size) from the checkpoint's
        # preprocessor_config.json; without one, the default processor (fixed size).
        processor = _qwen_processor(files, encoder.config.patch_size)
        if processor is not None:
            encoder.image_processor = processor
    elif model_type == "gemma3":
        encoder.image_processor = _gemma3_processor(files)
    elif model_type != VisionEncoder.model_type:  # our own format read its processor_config.json
        encoder.image_processor = _image_processor(files)
    encoder.source_info = info
    return encoder


def _load_own(files: SourceFiles, config_path: Path, checkpoint: str | os.PathLike | None) -> VisionEncoder:
    return VisionEncoder.from_pretrained(config_path.parent, checkpoint=checkpoint)


def _load_hf_tower(
    files: SourceFiles,
    checkpoint: str | os.PathLike | None,
    model_type: str,
    config: dict[str, Any],
    module: ModuleType,
    tower_keys: tuple[str, ...] | None,
) -> tuple[VisionEncoder, list[str]]:
    """Read, convert and load one HF vision tower.

    `tower_keys` are the prefixes of the tower inside a larger model (LLaVA); keys outside
    them must be on `LLAVA_IGNORED_PREFIXES` and are never read into memory.
    """
    family_ignored = getattr(module, "IGNORED_PREFIXES", ())
    if tower_keys is None:
        keep = lambda key: not key.startswith(family_ignored)  # noqa: E731
    else:
        keep = lambda key: key.startswith(tower_keys)  # noqa: E731
    tensors, names, weights = read_weights(files, checkpoint, keep)
    if checkpoint is not None:
        source = str(checkpoint)
    elif files.directory is not None:
        source = ", ".join(str(files.directory / name) for name in weights)
    else:
        source = f"{files.source} ({', '.join(weights)})"
    with naming(source):
        if tower_keys == LLAVA_TOWER_PREFIXES:  # a Qwen2.5-VL's other keys are its LM, never read
            check_llava_keys(names, files.source)
            tensors = _strip_tower(tensors, tower_keys, files.source)
        if not tensors:
            raise WeightsError(f"the weights hold no {model_type} vision-tower keys")
        config_kwargs = _config_options(model_type, tensors)
        vision_config: VisionConfig = module.config_from_hf(config, **config_kwargs)
        state_dict = module.convert_state_dict(tensors, **_convert_options(model_type, vision_config))
        # Built on `meta`: a config.json that does not fit the weights is refused before allocating.
        encoder = build_and_load(lambda: VisionEncoder(vision_config), state_dict, source=f"{source} ({model_type} converted)")
    return encoder, weights


def _config_options(model_type: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Options the HF config does not state but the checkpoint's classes do: whether a
    `CLIPVisionModelWithProjection` / `ViTModel(add_pooling_layer=True)` head was saved."""
    if model_type in ("clip_vision_model", "metaclip_2_vision_model"):
        return {"projection": any(k.endswith("visual_projection.weight") for k in tensors)}
    if model_type == "vit":
        return {"pooler": any(k.endswith("pooler.dense.weight") for k in tensors)}
    return {}


def _convert_options(model_type: str, vision_config: VisionConfig) -> dict[str, Any]:
    """What a converter needs beyond the keys: Kimi K2.5 permutes each head's query and key
    channels (its head count), in the released layout (a whole `kimi_k25`) or transformers'."""
    if model_type == "radio":
        return _converter(model_type).convert_options(vision_config)  # class tokens, LayerScale fill
    if model_type in ("perception_lm", "llama4", "llama4_vision_model", "molmo2"):
        return {"config": vision_config}  # the CLS row of the position table, the patch weight's shape
    if model_type in ("kimi_k25", "kimi_k25_vision"):
        return {"num_heads": vision_config.num_heads, "layout": "released" if model_type == "kimi_k25" else "transformers"}
    return {}


def _strip_tower(tensors: dict[str, torch.Tensor], prefixes: tuple[str, ...], source: str) -> dict[str, torch.Tensor]:
    used = [p for p in prefixes if any(k.startswith(p) for k in tensors)]
    if len(used) > 1:
        raise WeightsError(f"{source}: vision-tower keys under both {used[0]!r} and {used[1]!r}; expected one layout")
    prefix = used[0] if used else prefixes[0]
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def check_llava_keys(names: Iterable[str], source: str) -> None:
    """Fail on keys of a LLaVA checkpoint that are neither its vision tower nor a known part."""
    unknown = sorted(k for k in names if not k.startswith(LLAVA_TOWER_PREFIXES + LLAVA_IGNORED_PREFIXES))
    if unknown:
        raise WeightsError(f"{source}: LLaVA checkpoint has keys outside the vision tower, LM and projector: {unknown[:20]}")


def _naflex_processor(patch_size: int) -> Any:
    """transformers' default `Siglip2ImageProcessor` for a tower without a
    `preprocessor_config.json` (bilinear, mean/std 0.5, 256 patches of the tower's size)."""
    from .processing import ImageProcessor

    return ImageProcessor.from_hf_config({"image_processor_type": "Siglip2ImageProcessor", "patch_size": patch_size})


def _qwen_processor(files: SourceFiles, patch_size: int) -> Any:
    """A Qwen checkpoint's `Qwen2VLImageProcessor` (`resize_mode='smart_resize'`), or `None`
    without a `preprocessor_config.json`.

    Raises:
        ValueError: Another processor class, or a side multiple (`patch_size * merge_size`)
            that is not a whole number of the tower's patches.
    """
    from .processing import ImageProcessor

    path = files.get(PREPROCESSOR_FILE, required=False)
    if path is None:
        return None
    processor = ImageProcessor.from_hf_config(read_config_file(path))
    cfg = processor.config
    if cfg.resize_mode != "smart_resize":
        raise ValueError(f"{path}: a Qwen checkpoint's processor should be Qwen2VLImageProcessor (smart_resize), "
                         f"got resize_mode={cfg.resize_mode!r}")
    if cfg.factor % patch_size:
        raise ValueError(f"{path}: patch_size * merge_size = {cfg.factor} is not a multiple of the tower's "
                         f"patch_size {patch_size}")
    return processor


def _gemma3_processor(files: SourceFiles) -> Any:
    """A `gemma3` checkpoint's `Gemma3ImageProcessor` as the SigLIP processor it is (resize to
    `size`, bilinear by default; mean = std = 0.5), or `None` without a `preprocessor_config.json`.

    Raises:
        ValueError: Pan-and-scan crops switched on (not expressed).
    """
    from .processing import ImageProcessor

    path = files.get(PREPROCESSOR_FILE, required=False)
    if path is None:
        return None
    data = read_config_file(path)
    if data.get("do_pan_and_scan"):
        raise ValueError(f"{path}: Gemma 3's pan-and-scan crops (do_pan_and_scan=true) are not expressed")
    siglip = {k: v for k, v in data.items() if not k.startswith(("pan_and_scan", "do_pan_and_scan"))}
    siglip = {"resample": 2, **siglip, "image_processor_type": "SiglipImageProcessor"}  # Gemma3: BILINEAR default
    return ImageProcessor.from_hf_config(siglip)


def _image_processor(files: SourceFiles) -> Any:
    """The source's preprocessing as an `ImageProcessor`, or `None` without a
    `preprocessor_config.json`."""
    from .processing import ImageProcessor

    path = files.get(PREPROCESSOR_FILE, required=False)
    return None if path is None else ImageProcessor.from_hf_config(read_config_file(path))
