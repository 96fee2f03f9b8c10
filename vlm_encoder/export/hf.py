"""Our models as Hugging Face transformers models: an encoder as `CLIPVisionModel`
(`...WithProjection` when it has a projection), `SiglipVisionModel` or `Dinov2Model`
(`Dinov2WithRegistersModel` with registers); a `ContrastiveModel` as `CLIPModel`.

The weights go through each family's converter table backwards (`export.keys.reverse`). The
config is built for the family and then read back with the family's own converter
(`config_from_hf`): any field of ours that does not come back the same is an option the
format cannot hold, and the export stops naming it. Fields that only steer resampling at
other resolutions or training (`RUNTIME_FIELDS`) are not compared: the exported model
resizes its position table the way its library does.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from ..config import VisionConfig
from ..converters import hf_clip, hf_dinov2, hf_siglip
from ..encoder import VisionEncoder
from ..weights import WeightsError
from .keys import reverse

RUNTIME_FIELDS = ("patch_remainder", "drop_path_rate", "pos_resample_antialias", "pos_resample_mode", "pos_resample_align_corners")
HF_ACT = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh"}
FAMILIES = ("clip", "siglip", "dinov2")


class ExportError(ValueError):
    """Our model has an option the target format cannot hold (the message names it)."""


def _common(c: VisionConfig, target: str) -> dict[str, Any]:
    if c.image_size[0] != c.image_size[1]:
        raise ExportError(f"{target} holds square images only; this encoder has image_size={c.image_size}")
    if c.act not in HF_ACT:
        raise ExportError(f"{target} has no activation act={c.act!r}; it fits {', '.join(HF_ACT)}")
    return dict(
        hidden_size=c.width,
        num_hidden_layers=c.depth,
        num_attention_heads=c.num_heads,
        num_channels=c.in_channels,
        image_size=c.image_size[0],
        patch_size=c.patch_size,
        hidden_act=HF_ACT[c.act],
        layer_norm_eps=c.norm_eps,
    )


def _check_fits(ours: VisionConfig, back: VisionConfig, target: str) -> None:
    """Stop naming every field of ours that the target's config cannot state."""
    ours, back = _resolved(ours), _resolved(back)
    differ = [
        f"{f.name}={getattr(ours, f.name)!r} (the format gives {getattr(back, f.name)!r})"
        for f in dataclasses.fields(VisionConfig)
        if f.name not in RUNTIME_FIELDS and getattr(ours, f.name) != getattr(back, f.name)
    ]
    if differ:
        raise ExportError(f"this encoder does not fit {target}: " + "; ".join(differ))


def _resolved(c: VisionConfig) -> VisionConfig:
    """`c` with the MAP head's defaults spelled out (`None` means the blocks' value), so
    that a default and its value compare equal."""
    if c.pool != "map":
        return dataclasses.replace(c, map_mlp_dim=None, map_num_heads=None)
    return dataclasses.replace(c, map_mlp_dim=c.map_mlp_dim or c.mlp_dim, map_num_heads=c.map_num_heads or c.num_heads)


def hf_vision_config(config: VisionConfig, family: str) -> Any:
    """The transformers config of `family` for our `config`.

    Raises:
        ExportError: An option the family cannot hold, named.
    """
    import transformers as tf

    if family == "clip":
        target = "HF CLIPVisionModel"
        hf = tf.CLIPVisionConfig(
            **_common(config, target), intermediate_size=config.mlp_dim, projection_dim=config.embed_dim or 512
        )
        back = hf_clip.config_from_hf(hf, projection=config.embed_dim is not None)
    elif family == "siglip":
        target = "HF SiglipVisionModel"
        hf = tf.SiglipVisionConfig(
            **_common(config, target), intermediate_size=config.mlp_dim, vision_use_head=config.pool == "map"
        )
        back = hf_siglip.config_from_hf(hf)
    elif family == "dinov2":
        target = "HF Dinov2Model"
        swiglu = config.mlp_type == "swiglu"
        # SwiGLU's hidden width is 2/3 of width * mlp_ratio rounded up to 8 (HF's rule): the
        # integer ratio that gives ours, else 3/2 of ours (the check below confirms either).
        ratio = config.mlp_dim * (1.5 if swiglu else 1.0) / config.width
        if swiglu:
            ratio = next((r for r in range(1, 17) if hf_dinov2.swiglu_hidden_dim(config.width, r) == config.mlp_dim), ratio)
        ratio = int(ratio) if float(ratio).is_integer() else ratio  # transformers 5 types it int
        fields = dict(
            **_common(config, target),
            mlp_ratio=ratio,
            qkv_bias=config.qkv_bias,
            use_swiglu_ffn=swiglu,
            layerscale_value=config.layer_scale_init if config.layer_scale_init is not None else 1.0,
        )
        if config.num_register_tokens:
            hf = tf.Dinov2WithRegistersConfig(**fields, num_register_tokens=config.num_register_tokens)
        else:
            hf = tf.Dinov2Config(**fields)
        back = hf_dinov2.config_from_hf(hf)
    else:
        raise ExportError(f"unknown target family {family!r}; one of {', '.join(FAMILIES)}")
    _check_fits(config, back, target)
    return hf


def hf_vision_state_dict(encoder: VisionEncoder, family: str) -> tuple[Any, str, dict[str, torch.Tensor]]:
    """The transformers config, model class name and tensors of `encoder` as `family`'s
    checkpoints hold them on disk (the names the converter tables read; transformers maps
    them to its in-memory names on load, as for any hub checkpoint).

    Raises:
        ExportError: The encoder has an option the family cannot hold (named).
    """
    config = encoder.config
    hf_config = hf_vision_config(config, family)
    state = {k: v.detach().contiguous() for k, v in encoder.state_dict().items()}
    if family == "clip":
        name = "CLIPVisionModelWithProjection" if config.embed_dim is not None else "CLIPVisionModel"
        tensors = _prefixed(reverse(hf_clip.TABLE, state, config.depth, "HF CLIP"))
    elif family == "siglip":
        name = "SiglipVisionModel"
        tensors = _prefixed(reverse(hf_siglip.TABLE, state, config.depth, "HF SigLIP"))
    else:
        name = "Dinov2WithRegistersModel" if config.num_register_tokens else "Dinov2Model"
        swiglu_names = ("encoder.layer.{i}.mlp.weights_in", "encoder.layer.{i}.mlp.weights_out")
        mlp_names = ("encoder.layer.{i}.mlp.fc1", "encoder.layer.{i}.mlp.fc2")
        skip = mlp_names if config.mlp_type == "swiglu" else swiglu_names
        tensors = reverse(hf_dinov2.TABLE, state, config.depth, "HF DINOv2", skip=skip)
        tensors["embeddings.mask_token"] = torch.zeros(1, config.width)  # unused at inference
    shapes = _hf_shapes(name, hf_config)
    tensors = {k: v.reshape(shapes[k]).contiguous() if k in shapes else v for k, v in tensors.items()}
    hf_config.architectures = [name]
    return hf_config, name, tensors


def _hf_shapes(name: str, hf_config: Any) -> dict[str, torch.Size]:
    """Parameter shapes of the transformers model `name`, built on `meta` (nothing allocated),
    by on-disk name where the two differ only by the `vision_model.` prefix."""
    import transformers as tf

    with torch.device("meta"):
        model = getattr(tf, name)(hf_config)
    shapes = {}
    for key, value in model.state_dict().items():
        shapes[key] = value.shape
        shapes[key if key.startswith(("vision_model.", "visual_projection.")) else "vision_model." + key] = value.shape
    return shapes


def _prefixed(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP / SigLIP tower keys under `vision_model.`, as their checkpoints keep them; the
    projection stays outside it."""
    top = ("visual_projection.",)
    return {k if k.startswith(top) else "vision_model." + k: v for k, v in tensors.items()}


def save_hf_vision_model(encoder: VisionEncoder, directory: str | os.PathLike, family: str) -> Path:
    """Write `encoder` as a transformers checkpoint of `family` (`clip`, `siglip`,
    `dinov2`): `config.json` + `model.safetensors`, loadable by `AutoModel.from_pretrained`
    and by our `load_encoder`.

    Layer `i` of ours is HF's `hidden_states[i + 1]` (`hidden_states[0]` is the embeddings).

    Raises:
        ExportError: The encoder has an option the family cannot hold (named).
    """
    from safetensors.torch import save_file

    hf_config, _, tensors = hf_vision_state_dict(encoder, family)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(directory)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def to_hf_vision_model(encoder: VisionEncoder, family: str) -> torch.nn.Module:
    """`encoder` as the transformers model of `family` in eval mode, loaded by transformers
    itself from what `save_hf_vision_model` writes, every key used and none missing.

    Raises:
        ExportError: The encoder has an option the family cannot hold (named).
        WeightsError: transformers did not take every tensor (a version whose layout differs).
    """
    import tempfile

    import transformers as tf

    with tempfile.TemporaryDirectory() as tmp:
        save_hf_vision_model(encoder, tmp, family)
        name = tf.AutoConfig.from_pretrained(tmp).architectures[0]
        return load_checked(getattr(tf, name), tmp)


def load_checked(model_cls: type, directory: str | os.PathLike) -> torch.nn.Module:
    """`model_cls.from_pretrained(directory)`, refusing a load that left a tensor out."""
    model, info = model_cls.from_pretrained(directory, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise WeightsError(f"{model_cls.__name__} did not take the exported weights whole: {problems}")
    return model.eval()
