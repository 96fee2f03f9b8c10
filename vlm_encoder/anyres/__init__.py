"""Any-resolution tiling (LLaVA-NeXT / LLaVA-OneVision, InternVL).

An image is cut into encoder-sized tiles (`tiling`) chosen by its size and aspect ratio
(`select`); the tiles are encoded in one batch and their features reassembled into one
variable-length token sequence per image (`assemble`), whose length `num_image_tokens` gives
before encoding. `encode_anyres` does it all for a bare `VisionEncoder`;
`VisionLanguageModel(anyres=LlavaNextAnyres(...))` feeds the sequences to an LM; the
config is one class per tiling policy (`LlavaNextAnyres`, `InternVLAnyres`).
See `docs/resolution.md`.
"""

from .assemble import assemble_tokens, num_image_tokens, num_tiles, tile_grid, unpad_bounds
from .config import TILE_POLICIES, AnyresConfig, InternVLAnyres, LlavaNextAnyres
from .encode import AnyresFeatures, encode_anyres
from .select import (
    anyres_grid_shape,
    fit_size,
    grid_pinpoints,
    internvl_aspect_ratios,
    internvl_grid,
    select_best_resolution,
    validate_pinpoints,
)
from .tiling import AnyresTiles, stack_tiles, tile_image, tile_image_internvl, tile_with

__all__ = [
    "TILE_POLICIES",
    "AnyresConfig",
    "AnyresFeatures",
    "AnyresTiles",
    "InternVLAnyres",
    "LlavaNextAnyres",
    "anyres_grid_shape",
    "assemble_tokens",
    "encode_anyres",
    "fit_size",
    "grid_pinpoints",
    "internvl_aspect_ratios",
    "internvl_grid",
    "num_image_tokens",
    "num_tiles",
    "select_best_resolution",
    "stack_tiles",
    "tile_grid",
    "tile_image",
    "tile_image_internvl",
    "tile_with",
    "unpad_bounds",
    "validate_pinpoints",
]
