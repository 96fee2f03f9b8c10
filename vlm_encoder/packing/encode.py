"""`encode_packed`: encode images of different sizes in packed sequences, one
`EncoderOutput` per image, equal to encoding each image alone.

Each image is embedded at its own size (patch embedding, the position table resampled to
its grid, its own CLS / register tokens at the start of its segment); the segments are
packed (`pack.py`) and every block runs once over the batch of packs, so no token is padding
(except at the end of packs shorter than the longest one). The final norm and the pooling
(CLS, mean of the image's patches, or MAP over the image's tokens only) are applied per image.

Attention: the linears run over the whole packed batch; the attention is one fused
`scaled_dot_product_attention` call per block over every pack and image segment, with the
block-diagonal mask (`layers.SegmentMask`, built once and shared by the blocks), not a loop
over segments (`benchmarks/packed_attention.py` measures the alternatives).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.utils.checkpoint

from ..encoder import LayerSpec, VisionEncoder
from ..output import EncoderOutput
from .pack import PackedBatch, pack_sequences


def _check_images(encoder: VisionEncoder, images: Sequence[torch.Tensor]) -> None:
    if isinstance(images, torch.Tensor) or not isinstance(images, Sequence):
        raise TypeError(
            "images must be a list of (C, H, W) tensors (sizes may differ); "
            f"got {type(images).__name__}" + (" (for a batch of equal sizes call the encoder itself)" if isinstance(images, torch.Tensor) else "")
        )
    if not images:
        raise ValueError("images is empty: give at least one (C, H, W) image")
    for i, image in enumerate(images):
        if not isinstance(image, torch.Tensor) or image.ndim != 3:
            raise ValueError(f"image {i} must be a (C, H, W) tensor, got {getattr(image, 'shape', type(image).__name__)}")
        try:
            encoder._check_pixels(image[None])
        except (TypeError, ValueError) as err:
            raise type(err)(f"image {i}: {err}") from None


def embed_images(
    encoder: VisionEncoder, images: Sequence[torch.Tensor], max_tokens_per_pack: int | None = None
) -> PackedBatch:
    """Embed each image at its own size and pack the token sequences.

    Args:
        encoder: The encoder.
        images: Normalised images `(C, H_i, W_i)`.
        max_tokens_per_pack: Token budget of one pack, or `None` for one pack.

    Returns:
        The packed input tokens (after `norm_pre`) and each image's segment.
    """
    _check_images(encoder, images)
    embedded = [encoder.embed(image[None]) for image in images]  # each ((1, T_i, D), (h_i, w_i))
    return pack_sequences([x for x, _ in embedded], [g for _, g in embedded], max_tokens_per_pack)


def encode_packed(
    encoder: VisionEncoder,
    images: Sequence[torch.Tensor],
    layers: LayerSpec = (-1,),
    norm: bool = False,
    max_tokens_per_pack: int | None = None,
) -> list[EncoderOutput]:
    """Encode images of different sizes, packed, and return one output per image.

    Args:
        encoder: The encoder.
        images: Normalised float images `(C, H_i, W_i)`, sides multiples of the patch
            stride (see `resize_to_budget` to pick sizes under a token budget).
        layers: Block indices to return (negatives from the end) or `"all"`.
        norm: Apply the final LayerNorm to the returned tokens.
        max_tokens_per_pack: Token budget of one packed sequence (the attention mask is
            `(T, T)` per pack); `None` packs everything into one sequence.

    Returns:
        One `EncoderOutput` per image, in input order, with batch size 1: patches
        `(1, h_i * w_i, D)`, `grid_size` `(h_i, w_i)`, `pooled` `(1, D)` when the last block ran.

    Raises:
        ValueError: An empty list, an image that is not `(C, H, W)` float with sides of at
            least one patch (multiples of it unless `patch_remainder='drop'`), or an image
            with more tokens than `max_tokens_per_pack`.
    """
    wanted = encoder.resolve_layers(layers)
    if encoder.config.attn_window is not None:
        raise ValueError("encode_packed does not serve windowed attention (attn_window); encode each image with encoder(...)")
    packed = embed_images(encoder, images, max_tokens_per_pack)
    last = max(wanted)
    wanted_set = set(wanted)
    checkpointing = encoder.grad_checkpointing and encoder.training and torch.is_grad_enabled()
    x, _ = packed.batched()  # (P, T, D)
    mask = packed.segment_mask()  # one attention call per block over all segments
    rope = None  # a RoPE tower: each image's rotary rows at its place in its pack (P, T, head_dim)
    if encoder.rope is not None:
        rows = [[(s.start, s.grid) for s in packed.pack_segments(p)] for p in range(packed.num_packs)]
        rope = encoder.rope.packed(rows, x.shape[1], encoder.num_prefix_tokens, x.device)
    captured: dict[int, torch.Tensor] = {}
    for i, block in enumerate(encoder.blocks[: last + 1]):
        if checkpointing:
            x, _ = torch.utils.checkpoint.checkpoint(block, x, mask, rope=rope, use_reentrant=False)
        else:
            x, _ = block(x, attn_mask=mask, rope=rope)
        if i in wanted_set:
            captured[i] = x
    # layer -> per-image (1, T_i, D)
    per_layer = {i: packed.unpack(captured[i].split(1, dim=0)) for i in wanted}
    ran_all = last == encoder.num_blocks - 1
    per_image_final = packed.unpack(x.split(1, dim=0)) if ran_all else None
    outputs = []
    for segment in packed.segments:
        n = segment.image
        pooled = encoder.pool(encoder.norm(per_image_final[n])) if per_image_final is not None else None
        outputs.append(
            encoder._assemble(wanted, {i: per_layer[i][n] for i in wanted}, None, segment.grid, pooled, norm)
        )
    return outputs
