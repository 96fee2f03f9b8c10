"""vlm-encoder: the vision side of vision-language models.

A ViT encoder with a multi-layer feature API, loaders for pretrained towers, projectors to an
LLM's width, and contrastive image-text training.
"""

from .anyres import AnyresConfig, encode_anyres
from .config import VisionConfig
from .contrastive import ClipLoss, ContrastiveModel, SigLipLoss
from .encoder import VisionEncoder
from .extract import FeatureStore
from .determinism import batch_invariance
from .cpu_speed import fast_cpu
from .converters.open_clip_vit import load_open_clip
from .converters.timm_vit import load_timm
from .loading import load_encoder
from .output import EncoderOutput
from .packing import encode_packed
from .processing import ImageProcessor
from .presets import PRESETS, create_encoder, list_presets, preset_config
from .text import TextConfig, TextEncoder
from .vlm import VisionLanguageModel, expand_image_tokens
from .vision_side import VisionSide, load_vision_side
from .weights import WeightsError

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "EncoderOutput",
    "FeatureStore",
    "ImageProcessor",
    "VisionConfig",
    "VisionEncoder",
    "WeightsError",
    "create_encoder",
    "list_presets",
    "load_open_clip",
    "load_timm",
    "load_encoder",
    "encode_packed",
    "AnyresConfig",
    "encode_anyres",
    "preset_config",
    "VisionLanguageModel",
    "VisionSide",
    "load_vision_side",
    "expand_image_tokens",
    "ClipLoss",
    "ContrastiveModel",
    "SigLipLoss",
    "TextConfig",
    "TextEncoder",
    "batch_invariance",
    "fast_cpu",
    "__version__",
]
