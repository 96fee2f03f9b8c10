"""The encoder and image processor of an extraction run, and the facts that identify them."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from ..encoder import VisionEncoder
from ..processing import ImageProcessor
from .config import ExtractConfig

PRESET_SCHEME = "preset:"


def weights_sha256(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def is_preset(model: str) -> bool:
    from ..presets import PRESETS

    return model.startswith(PRESET_SCHEME) or model in PRESETS


def build_encoder(config: ExtractConfig) -> VisionEncoder:
    """The encoder `config.model` names (in float32, eval mode, on the CPU).

    A preset (`preset:NAME` or a bare preset name) is built with random weights from
    `config.seed` and `config.overrides`; anything else goes through `load_encoder`.
    """
    from ..loading import load_encoder
    from ..presets import PRESETS, create_encoder
    from ..weights import load_state_dict_strict, read_state_dict

    name = config.model.removeprefix(PRESET_SCHEME)
    if name in PRESETS:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(config.seed)
        try:
            encoder = create_encoder(name, **dict(config.overrides))
        finally:
            torch.random.set_rng_state(generator_state)
        if config.checkpoint is not None:
            load_state_dict_strict(encoder, read_state_dict(config.checkpoint), source=str(config.checkpoint))
    elif config.model.startswith(PRESET_SCHEME):
        raise ValueError(f"--model {config.model!r}: no preset {name!r} (see vlm_encoder.list_presets())")
    elif config.overrides:
        raise ValueError(f"overrides apply to presets only; {config.model!r} is not a preset")
    else:
        encoder = load_encoder(config.model, checkpoint=config.checkpoint)
    return encoder.float().eval()


def build_processor(encoder: VisionEncoder, image_size: tuple[int, int] | None) -> ImageProcessor:
    """The encoder's own processor (or `ImageProcessor.default_for` its config), resized to
    `image_size` when given: the resize target and the crop (if any) become `image_size`."""
    processor = getattr(encoder, "image_processor", None) or ImageProcessor.default_for(encoder.config)
    if image_size is not None:
        changes: dict[str, Any] = {"size": image_size}
        if processor.config.crop_size is not None:
            changes["crop_size"] = image_size
        processor = ImageProcessor(processor.config.replace(**changes))
    if processor.config.output_size is None:
        raise ValueError(
            f"the processor's output size depends on the image ({processor.config}); batches need one size: "
            "pass --image-size"
        )
    return processor


def describe_model(config: ExtractConfig, encoder: VisionEncoder) -> dict[str, Any]:
    """What identifies the model: source, checkpoint, overrides, seed, config and weights hash."""
    source_info = dict(getattr(encoder, "source_info", None) or {})
    checkpoint = None if config.checkpoint is None else str(Path(config.checkpoint).resolve())
    return {
        "source": config.model,
        "checkpoint": checkpoint,
        "overrides": {k: v for k, v in config.overrides},
        "seed": config.seed if is_preset(config.model) else None,
        "family": source_info.get("family"),
        "config": encoder.config.to_dict(),
        "weights_sha256": weights_sha256(encoder),
    }
