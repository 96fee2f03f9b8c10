"""Projectors: map vision tokens of width `d_vit` to an LLM width `d_llm`.

`build_projector(kind, in_dim, out_dim, **options)` builds any registered kind; a
`Projector` fuses several layers or encoders first (`fusion`). See `docs/projectors.md`.
"""

from . import c_abstractor, mlp, pixel_shuffle, pool, resampler  # noqa: F401  (registers the kinds)
from .base import Projector
from .config import ProjectorConfig
from .fusion import FeatureFusion, TokenStream, resample_tokens
from .kind import ProjectorKind, build_mlp
from .llava import convert_hf_llava_projector, load_llava_mm_projector
from .registry import build_projector, list_projectors, projector_class, projector_table, register_projector

__all__ = [
    "FeatureFusion",
    "Projector",
    "ProjectorConfig",
    "ProjectorKind",
    "TokenStream",
    "build_mlp",
    "build_projector",
    "convert_hf_llava_projector",
    "list_projectors",
    "load_llava_mm_projector",
    "projector_class",
    "projector_table",
    "register_projector",
    "resample_tokens",
]
