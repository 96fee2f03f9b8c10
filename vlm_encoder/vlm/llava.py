"""Loading transformers LLaVA checkpoints (`LlavaForConditionalGeneration`, LLaVA-NeXT,
LLaVA-OneVision) as a `VisionLanguageModel`: the vision tower converted to a `VisionEncoder`,
`multi_modal_projector` to an `mlp2x_gelu` `Projector`, the language model shared as an
`AutoModelForCausalLM`, so the same inputs give the same logits."""

from __future__ import annotations

import os
import re
from typing import Any, Literal

import torch

from ..anyres import LlavaNextAnyres
from ..encoder import VisionEncoder
from .model import VisionLanguageModel, hf_layer_to_block


def load_hf_llava(
    path: str | os.PathLike,
    family: Literal["llava", "llava_next", "llava_onevision"],
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    **kwargs: Any,
) -> VisionLanguageModel:
    """The body of `VisionLanguageModel.from_llava` / `from_llava_next` / `from_llava_onevision`:
    the same loader for the three families, which differ only in their tiling (`anyres`)."""
    import transformers
    from transformers import AutoModelForCausalLM

    from ..projectors import build_projector, convert_hf_llava_projector

    from ..converters import hf_clip, hf_siglip
    from ..weights import load_state_dict_strict

    families = {
        "llava": (transformers.LlavaConfig, transformers.LlavaForConditionalGeneration),
        "llava_next": (transformers.LlavaNextConfig, transformers.LlavaNextForConditionalGeneration),
        "llava_onevision": (transformers.LlavaOnevisionConfig, transformers.LlavaOnevisionForConditionalGeneration),
    }
    config_class, model_class = families[family]
    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
    if not isinstance(config, config_class):
        raise ValueError(f"{path}: model_type={config.model_type!r}, expected {family!r} ({model_class.__name__})")
    towers = {"clip_vision_model": hf_clip, "siglip_vision_model": hf_siglip}
    vision_type = config.vision_config.model_type
    if vision_type not in towers:
        raise ValueError(f"{path}: vision tower {vision_type!r} is not supported; supported: {', '.join(towers)}")
    if config.projector_hidden_act != "gelu":
        raise ValueError(f"{path}: projector_hidden_act={config.projector_hidden_act!r}; only 'gelu' (mlp2x_gelu) is supported")
    converter = towers[vision_type]
    encoder = VisionEncoder(converter.config_from_hf(config.vision_config))
    feature_layers, feature_select, anyres = llava_vision_options(path, family, config, encoder)

    hf_model = model_class.from_pretrained(
        path, trust_remote_code=False, **({"dtype": dtype} if dtype is not None else {})
    )
    load_state_dict_strict(
        encoder, converter.convert_state_dict(hf_model.model.vision_tower.state_dict()), source=f"{path} (vision tower)"
    )
    projector = build_projector(
        "mlp2x_gelu",
        (encoder.width,) * len(feature_layers),
        config.text_config.hidden_size,
        bias=config.multimodal_projector_bias,
    )
    load_state_dict_strict(
        projector,
        convert_hf_llava_projector(hf_model.model.multi_modal_projector.state_dict()),
        source=f"{path} (multi_modal_projector)",
    )
    # The causal LM shares the loaded decoder and head; it is built on the meta device so
    # no second copy of the weights is ever allocated.
    with torch.device("meta"):
        language_model = AutoModelForCausalLM.from_config(config.text_config)
    setattr(language_model, language_model.base_model_prefix, hf_model.model.language_model)
    language_model.set_output_embeddings(hf_model.lm_head)
    language_model.generation_config = hf_model.generation_config
    left_on_meta = [n for n, t in [*language_model.named_parameters(), *language_model.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise ValueError(f"{path}: the causal LM could not take every module of the LLaVA LM: {left_on_meta[:5]}")
    lm_dtype = hf_model.lm_head.weight.dtype
    encoder.to(dtype=lm_dtype)
    projector.to(dtype=lm_dtype)
    model = VisionLanguageModel(
        encoder,
        projector,
        language_model,
        image_token_id=config.image_token_id,
        feature_layers=feature_layers,
        feature_select=feature_select,
        anyres=anyres,
        **kwargs,
    )
    if model.image_newline is not None:
        with torch.no_grad():
            model.image_newline.copy_(hf_model.model.image_newline.to(lm_dtype))
    return model.to(device=device).eval()


def llava_vision_options(
    path: str | os.PathLike, family: str, config: Any, encoder: VisionEncoder
) -> tuple[tuple[int, ...], str, LlavaNextAnyres | None]:
    """What a LLaVA config says about its vision side: the encoder blocks the projector reads
    (`vision_feature_layer`), `feature_select` (`vision_feature_select_strategy`) and the
    tiling of LLaVA-NeXT / LLaVA-OneVision (`None` for LLaVA).

    Raises:
        ValueError: A strategy, aspect policy or layer that is not supported.
    """
    vision_type = config.vision_config.model_type
    hf_layers = config.vision_feature_layer
    hf_layers = [hf_layers] if isinstance(hf_layers, int) else list(hf_layers)
    feature_layers = tuple(hf_layer_to_block(k, encoder.num_blocks) for k in hf_layers)
    strategy = config.vision_feature_select_strategy
    if strategy == "default" and encoder.cls_token is None:
        raise ValueError(
            f"{path}: vision_feature_select_strategy='default' drops the first token, but the {vision_type} tower "
            "has no CLS token (transformers would drop a patch); only 'full' is supported for it"
        )
    feature_select = "patch" if strategy == "default" or encoder.cls_token is None else "cls_patch"
    anyres = None
    budget_tiles = None
    if family == "llava_onevision":
        aspect = str(config.vision_aspect_ratio)
        if not re.fullmatch(r"anyres_max_[1-9]\d*", aspect):
            raise ValueError(f"{path}: vision_aspect_ratio={aspect!r}; only 'anyres_max_N' is supported")
        budget_tiles = int(aspect[len("anyres_max_") :])
    if family in ("llava_next", "llava_onevision"):
        if feature_select != "patch":
            raise ValueError(
                f"{path}: vision_feature_select_strategy='full' keeps the CLS token of the {vision_type} tower, "
                "which cannot be laid out on the tile grid; only 'default' is supported for it"
            )
        anyres = LlavaNextAnyres(
            tile_size=config.vision_config.image_size,
            pinpoints=config.image_grid_pinpoints,
            budget_tiles=budget_tiles,
            multi_image="base" if family == "llava_onevision" else "tiles",
        )
    return feature_layers, feature_select, anyres
