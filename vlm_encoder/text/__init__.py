"""The text tower of contrastive image-text models: config, tokenizers, encoders."""

from .config import TEXT_PRESETS, TextConfig, text_preset_config
from .hf_text import HFTextConfig, HFTextEncoder, HFTokenizer
from .model import TextEncoder
from .output import TextOutput, TokenizedText
from .tokenizer import ClipTokenizer

__all__ = [
    "TEXT_PRESETS",
    "ClipTokenizer",
    "HFTextConfig",
    "HFTextEncoder",
    "HFTokenizer",
    "TextConfig",
    "TextEncoder",
    "TextOutput",
    "TokenizedText",
    "text_preset_config",
]
