"""Loading a transformers Qwen3-VL checkpoint (`Qwen3VLForConditionalGeneration`, or its MoE
model's) as a `VisionLanguageModel` with DeepStack, and a Qwen3.5 one (`Qwen3_5...`, the same
tower without DeepStack mergers):

* the vision tower -> `VisionEncoder` (`converters.hf_qwen3_vl`), its main merger -> the
  `qwen_merger` projector on the last block, each `deepstack_merger_list[j]` -> a `qwen_merger`
  (norm after the merge) on block `deepstack_visual_indexes[j]`;
* the language model is the loaded transformers model itself with its vision tower removed, so
  the decoder, its multimodal RoPE (`positions='mrope'`: the model's own `get_rope_index`) and
  `generate` are transformers' code; the DeepStack features are added after its first decoder
  layers at the image positions (`deepstack.py`), as `Qwen3VLTextModel` does.

Images are `(I, C, H, W)` of one size per call (the tower's processor normalisation applied);
videos are not expressed.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..encoder import VisionEncoder
from .model import VisionLanguageModel


def load_hf_qwen3_vl(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    **kwargs: Any,
) -> VisionLanguageModel:
    """The body of `VisionLanguageModel.from_qwen3_vl` (see there)."""
    import transformers

    from ..converters import hf_qwen3_vl
    from ..projectors import load_qwen3_vl_merger
    from ..weights import load_state_dict_strict

    families = {
        "qwen3_vl": transformers.Qwen3VLForConditionalGeneration,
        "qwen3_vl_moe": transformers.Qwen3VLMoeForConditionalGeneration,
        "qwen3_5": transformers.Qwen3_5ForConditionalGeneration,
        "qwen3_5_moe": transformers.Qwen3_5MoeForConditionalGeneration,
    }
    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
    if config.model_type not in families:
        raise ValueError(f"{path}: model_type={config.model_type!r}, expected one of {', '.join(families)}")
    hf_model = families[config.model_type].from_pretrained(
        path, trust_remote_code=False, **({"dtype": dtype} if dtype is not None else {})
    )
    visual = hf_model.model.visual
    vision = config.vision_config
    encoder = VisionEncoder(hf_qwen3_vl.config_from_hf(vision))
    state = visual.state_dict()
    load_state_dict_strict(encoder, hf_qwen3_vl.convert_state_dict(state), source=f"{path} (vision tower)")

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    merge = vision.spatial_merge_size
    projector = load_qwen3_vl_merger(part("merger."), scale_factor=merge)
    taps = tuple(getattr(vision, "deepstack_visual_indexes", None) or ())  # Qwen3.5: none
    deepstack = [
        load_qwen3_vl_merger(part(f"deepstack_merger_list.{j}."), scale_factor=merge, norm_after_merge=True)
        for j in range(len(taps))
    ]
    # The LM is the whole model without its tower: transformers' decoder, M-RoPE and generate.
    hf_model.model.visual = None
    lm_dtype = hf_model.lm_head.weight.dtype
    for module in (encoder, projector, *deepstack):
        module.to(dtype=lm_dtype)
    model = VisionLanguageModel(
        encoder,
        projector,
        hf_model,
        image_token_id=config.image_token_id,
        feature_layers=(-1,),
        deepstack_layers=taps,
        deepstack_projectors=deepstack,
        positions="mrope",
        **kwargs,
    )
    return model.to(device=device).eval()
