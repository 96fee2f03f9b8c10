"""The encoder and image processor of an extraction run, and the facts that identify them."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from ..encoder import VisionEncoder
from ..processing import ImageProcessor
from .config import ExtractConfig

def weights_sha256(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def build_encoder(config: ExtractConfig) -> VisionEncoder:
    """The image tower `config.model` names (in float32, eval mode, on the CPU), through the
    one model-spec resolver (`specs.models.load_vision`)."""
    from ..specs.models import load_vision

    loaded = load_vision(config.model, command="extract", checkpoint=config.checkpoint,
                         overrides=config.overrides, seed=config.seed, patch_remainder=config.patch_remainder)
    return loaded.vision.float().eval()


def build_processor(encoder: VisionEncoder, image_size: tuple[int, int] | None, mode: str = "fixed") -> ImageProcessor:
    """The encoder's own processor (or `ImageProcessor.default_for` its config), resized to
    `image_size` when given: the resize target and the crop (if any) become `image_size` (a
    NaFlex processor squashes to it). `fixed` mode needs one output size."""
    processor = encoder.image_processor
    # each image at its own size
    naflex = processor.config.resize_mode in ("naflex", "smart_resize", "gemma4", "kimi_k25")
    if image_size is not None and naflex:
        processor = processor.at_size(image_size)
    elif image_size is not None:
        changes: dict[str, Any] = {"size": image_size}
        if processor.config.crop_size is not None:
            changes["crop_size"] = image_size
        processor = ImageProcessor(processor.config.replace(**changes))
    if processor.config.output_size is None and mode == "fixed":
        raise ValueError(
            f"the processor's output size depends on the image ({processor.config}); batches need one size: "
            "pass --image-size" + (" or --resolution native (its own NaFlex / smart_resize sizes)" if naflex else "")
        )
    return processor


def describe_model(config: ExtractConfig, encoder: VisionEncoder) -> dict[str, Any]:
    """What identifies the model: source, checkpoint, overrides, seed, config and weights hash."""
    source_info = encoder.source_info
    checkpoint = None if config.checkpoint is None else str(Path(config.checkpoint).resolve())
    return {
        "source": config.model,
        "checkpoint": checkpoint,
        "overrides": dict(config.overrides),
        "seed": config.seed if source_info.get("family") == "preset" else None,
        "family": source_info.get("family"),
        "config": encoder.config.to_dict(),
        "weights_sha256": weights_sha256(encoder),
    }
