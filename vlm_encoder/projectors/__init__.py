"""Projectors: map vision tokens of width `d_vit` to an LLM width `d_llm`.

`build_projector(kind, in_dim, out_dim, **options)` builds any registered kind; a
`Projector` fuses several layers or encoders first (`fusion`). Each kind's own options are a
dataclass of its own (`PoolOptions`, ...). Also importable as `projectors`; this subpackage
builds on `vlm_encoder`'s base modules only, and `vlm` uses it (see `projectors/__init__.py`).
See `docs/projectors.md`.
"""

from .base import Projector, build_projector
from .c_abstractor import CAbstractorOptions
from .config import KindOptions, ProjectorConfig
from .deepseek_aligner import DeepseekAlignerOptions, load_deepseek_v4_aligner
from .fusion import FeatureFusion, TokenStream, resample_tokens
from .gemma_pool import GemmaPoolOptions, load_gemma3_projector, load_gemma4_projector
from .kind import ProjectorKind, build_mlp
from .llama4_adapter import load_llama4_projector
from .llava import convert_hf_llava_projector, load_llava_mm_projector
from .mlp import MLPOptions
from .mlp_pool import MLPPoolOptions, load_perception_lm_projector
from .molmo_pool import MolmoPoolOptions, load_molmo2_adapter
from .pixel_shuffle import PixelShuffleOptions, load_idefics3_connector, load_internvl_projector
from .pool import PoolOptions
from .qwen_merger import QwenMergerOptions, load_kimi_k25_merger, load_qwen2_5_vl_merger, load_qwen3_vl_merger
from .registry import list_projectors, projector_class, projector_table, register_projector
from .resampler import ResamplerOptions

__all__ = [
    "CAbstractorOptions",
    "DeepseekAlignerOptions",
    "FeatureFusion",
    "GemmaPoolOptions",
    "KindOptions",
    "MLPOptions",
    "MLPPoolOptions",
    "MolmoPoolOptions",
    "PixelShuffleOptions",
    "PoolOptions",
    "Projector",
    "ProjectorConfig",
    "ProjectorKind",
    "QwenMergerOptions",
    "ResamplerOptions",
    "TokenStream",
    "build_mlp",
    "build_projector",
    "convert_hf_llava_projector",
    "list_projectors",
    "load_deepseek_v4_aligner",
    "load_gemma3_projector",
    "load_gemma4_projector",
    "load_idefics3_connector",
    "load_internvl_projector",
    "load_kimi_k25_merger",
    "load_llama4_projector",
    "load_llava_mm_projector",
    "load_molmo2_adapter",
    "load_perception_lm_projector",
    "load_qwen2_5_vl_merger",
    "load_qwen3_vl_merger",
    "projector_class",
    "projector_table",
    "register_projector",
    "resample_tokens",
]
