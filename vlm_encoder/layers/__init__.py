"""Building blocks of the encoder, one concept per module. Layers never import models."""

from .attention import Attention, SegmentMask, WindowMask, attention_weights
from .block import Block, DropPath, LayerScale
from .clipped import ClippedLinear
from .init import init_linears_and_norms
from .map_head import AttentionPoolHead
from .mlp import Mlp, SwiGLU, build_mlp, get_activation
from .norm import RMSNorm, build_norm
from .patch_embed import PatchEmbed, resample_patch_projection
from .pos_embed import resample_pos_embed, sincos_2d_pos_embed
from .rope import Rope2d, RopeTable
from .stem import ResNetStem

__all__ = [
    "Attention",
    "attention_weights",
    "AttentionPoolHead",
    "Block",
    "ClippedLinear",
    "DropPath",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
    "RMSNorm",
    "ResNetStem",
    "Rope2d",
    "RopeTable",
    "SegmentMask",
    "SwiGLU",
    "WindowMask",
    "build_mlp",
    "build_norm",
    "get_activation",
    "init_linears_and_norms",
    "resample_patch_projection",
    "resample_pos_embed",
    "sincos_2d_pos_embed",
]
