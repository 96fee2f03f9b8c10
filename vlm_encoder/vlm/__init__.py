"""`VisionLanguageModel`: a vision encoder, a projector and any Hugging Face causal LM
(`model.py`); loading transformers LLaVA checkpoints (`llava.py`); saving and loading the whole
model (`saving.py`)."""

from .model import (
    FEATURE_SELECTS,
    IGNORE_INDEX,
    FeatureSelect,
    VisionLanguageModel,
    expand_image_tokens,
    hf_layer_to_block,
)

__all__ = [
    "FEATURE_SELECTS",
    "IGNORE_INDEX",
    "FeatureSelect",
    "VisionLanguageModel",
    "expand_image_tokens",
    "hf_layer_to_block",
]
