"""Our checkpoints in the formats people deploy: transformers models (`export.hf`), open_clip
state dicts (`export.open_clip`), and ONNX (`export.onnx`). Each goes through the converters'
own key tables backwards, and refuses, naming the option, what the format cannot hold."""

from .contrastive import save_hf_clip_model, to_hf_clip_model
from .hf import ExportError, hf_vision_config, save_hf_vision_model, to_hf_vision_model
from .open_clip import open_clip_model_config, open_clip_state_dict

__all__ = [
    "ExportError",
    "hf_vision_config",
    "open_clip_model_config",
    "open_clip_state_dict",
    "save_hf_clip_model",
    "save_hf_vision_model",
    "to_hf_clip_model",
    "to_hf_vision_model",
]
