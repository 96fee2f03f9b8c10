"""Native-resolution encoding with sequence packing (NaViT, SigLIP2 NaFlex).

    sizes = resize_to_budget(images, encoder.config.input_stride, max_tokens=256)
    outputs = encode_packed(encoder, sizes, layers=(-2, -1))   # one EncoderOutput per image

`sizing` picks each image's size (aspect ratio kept, sides multiples of the patch stride,
at most a token budget); `pack` lays several images' tokens into one sequence with a
block-diagonal mask; `encode` runs the encoder over the packs and splits the outputs.
"""

from .encode import embed_images, encode_packed
from .pack import PackedBatch, Segment, block_diagonal_mask, cu_seqlens, pack_sequences, plan_packs, segment_ids
from .sizing import (
    SIZING_POLICIES,
    SizingPolicy,
    gemma4_size,
    kimi_k25_size,
    naflex_size,
    smart_resize_size,
    native_sizing,
    navit_size,
    resize_to_budget,
    target_size,
)

__all__ = [
    "PackedBatch",
    "SIZING_POLICIES",
    "Segment",
    "SizingPolicy",
    "block_diagonal_mask",
    "cu_seqlens",
    "embed_images",
    "encode_packed",
    "gemma4_size",
    "kimi_k25_size",
    "naflex_size",
    "smart_resize_size",
    "native_sizing",
    "navit_size",
    "pack_sequences",
    "plan_packs",
    "resize_to_budget",
    "segment_ids",
    "target_size",
]
