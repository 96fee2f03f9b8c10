"""`encode_anyres`: one image, tiled, through a `VisionEncoder`, as one feature map and sequence."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..encoder import VisionEncoder
from ..processing import ImageProcessor
from ..processing.processor import ImageInput
from .assemble import assemble_tokens, assembled_map_size, merge_tiles, pool_tiles, pooled_side
from .config import AnyresConfig, LlavaNextAnyres
from .tiling import AnyresTiles, tile_with


@dataclass(frozen=True)
class AnyresFeatures:
    """Encoder features of one tiled image.

    Attributes:
        tokens: `(L, D)`: `llava_next`: the base image's `s*s` patch tokens, then the
            reassembled (unpadded) map row by row; no newline tokens (a learned newline lives
            in a VLM, not in the encoder). `internvl`: every tile's tokens in order.
        feature_map: `(D, h, w)`, the tiles' patch grids reassembled into one map
            (`llava_next`: after unpad and budget; `internvl`: the full `rows*s x cols*s` grid).
        global_tokens: `(s*s, D)` of the base image (`llava_next`) or thumbnail (`internvl`),
            or `None` (an `internvl` image of one tile, or without thumbnail).
        tiles: The tiles that were encoded.
        layer: The encoder block the features come from.
    """

    tokens: torch.Tensor
    feature_map: torch.Tensor
    global_tokens: torch.Tensor | None
    tiles: AnyresTiles
    layer: int


def encode_anyres(
    encoder: VisionEncoder,
    image: ImageInput,
    pinpoints: Sequence[Sequence[int]] | AnyresConfig,
    *,
    processor: ImageProcessor | None = None,
    layer: int = -1,
    norm: bool = False,
) -> AnyresFeatures:
    """Tile an image, encode all its tiles in one batch, and reassemble the patch features.

    Args:
        encoder: The vision encoder; tiles are its `image_size` unless `pinpoints` is an
            `AnyresConfig` with another `tile_size` (a multiple of its patch size).
        image: Any input `ImageProcessor` accepts.
        pinpoints: Candidate resolutions `[(H, W), ...]` (LLaVA-NeXT tiling with unpad), or an
            `AnyresConfig` for any policy and option (its `newline` is ignored here).
        processor: Normalisation and resize filter (default `ImageProcessor.default_for(encoder.config)`).
        layer: Encoder block (negatives from the end).
        norm: Apply the final norm to the features.

    Returns:
        `AnyresFeatures`.
    """
    c = encoder.config
    if isinstance(pinpoints, AnyresConfig):
        config = pinpoints
    else:
        if c.image_size[0] != c.image_size[1]:
            raise ValueError(f"tiling needs a square encoder input, got image_size={c.image_size}; pass an AnyresConfig")
        config = LlavaNextAnyres(tile_size=c.image_size[0], pinpoints=pinpoints)
    if config.tile_size % c.input_stride and c.patch_remainder == "error":  # `drop` floors each tile's grid
        raise ValueError(f"tile_size={config.tile_size} is not a multiple of the encoder's patch stride {c.input_stride}")
    processor = processor if processor is not None else ImageProcessor.default_for(c)
    tiles = tile_with(image, config, processor)
    side = config.tile_size // c.input_stride
    param = next(encoder.parameters())
    with torch.no_grad():
        out = encoder(tiles.pixel_values.to(param.device, param.dtype), layers=(layer,), norm=norm)
    features = out.patches(layer)  # (T, side*side, D)
    layer_index = out.layers[0]
    rows, cols = tiles.grid
    if config.policy == "internvl":
        tokens = assemble_tokens(features, tiles.image_size, config, side)
        pooled = pool_tiles(features, side, config.tile_pool)
        s = pooled_side(side, config.tile_pool)
        feature_map = merge_tiles(pooled[: rows * cols], tiles.grid, s)
        global_tokens = pooled[rows * cols] if pooled.shape[0] > rows * cols else None
        return AnyresFeatures(tokens, feature_map, global_tokens, tiles, layer_index)
    tokens = assemble_tokens(features, tiles.image_size, config.replace(newline=False), side)
    pooled = pool_tiles(features, side, config.tile_pool)
    s = pooled_side(side, config.tile_pool)
    # The map is the assembled sequence after the base tokens, in row-major order.
    grid = tokens[s * s :]
    feature_map = grid.transpose(0, 1).reshape(-1, *assembled_map_size(tiles.image_size, config, side))  # (D, h, w)
    return AnyresFeatures(tokens, feature_map, pooled[0], tiles, layer_index)

