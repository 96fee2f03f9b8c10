"""End-to-end pictures: images through the encoder into a PNG.

Each picture is one function `write_<kind>_picture(encoder, images, ..., path)`; the
numerical part lives in its own module (`pca.py`, `attention.py`, `similarity.py`) and the
drawing in `figures.py` / `overlays.py`.

Resolution: `fixed` runs every image through the encoder's processor (its native size, or
`image_size`); `native` keeps each image's aspect ratio under a patch budget and encodes
the images packed (`vlm_encoder.packing.encode_packed`; attention pictures encode each
image alone, as the packed path returns no attention weights). `anyres` (PCA and
similarity) tiles each image LLaVA-NeXT style over the given pinpoints
(`vlm_encoder.anyres.encode_anyres`) and shows the assembled, unpadded feature map beside
the whole image (drawn at the map's size: one patch per `input_stride` pixels).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from ..processing import ImageProcessor
from .attention import (
    QUERY_DESCRIPTIONS,
    AttentionQuery,
    attention_rollout,
    map_head_attention,
    query_maps,
    resolve_query,
)
from .figures import attention_figure, pca_figure, save_figure, similarity_figure
from .images import image_size_of, prepare_images, prepare_native_images, processor_for
from .pca import fit_pca_basis
from .similarity import patch_at_point, patch_index, point_in_processed_image, similarity_maps

Resolution = Literal["fixed", "native"]
RESOLUTIONS: tuple[str, ...] = ("fixed", "native")

ImageInput = Image.Image | np.ndarray


@dataclass
class _Prepared:
    """Images ready for the encoder: batches of pixels, what each image looks like to it,
    and the processor that made it (for mapping points)."""

    batches: list[torch.Tensor]  # (B_j, 3, H_j, W_j): one batch (fixed) or one per image (native)
    crops: list[np.ndarray]  # (H_i, W_i, 3) uint8 per image
    processors: list[ImageProcessor]


def _prepare(encoder, images, image_size, resolution: Resolution, max_patches: int | None) -> _Prepared:
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution={resolution!r} is not supported; allowed: {', '.join(RESOLUTIONS)}")
    if not images:
        raise ValueError("no images given: pass at least one image")
    param = next(encoder.parameters())
    move = lambda px: px.to(device=param.device, dtype=param.dtype)
    if resolution == "fixed":
        if max_patches is not None:
            raise ValueError("max_patches applies to resolution='native' only")
        pixels, crops = prepare_images(images, encoder, image_size)
        return _Prepared([move(pixels)], crops, [processor_for(encoder, image_size)] * len(images))
    if image_size is not None:
        raise ValueError("image_size and resolution='native' exclude each other: native keeps each image's own shape")
    from ..packing import native_sizing

    policy, budget = native_sizing(encoder, max_patches)  # SigLIP2: its NaFlex processor's rule and budget
    pixels, crops, processors = prepare_native_images(images, encoder, budget, policy)
    return _Prepared([move(p[None]) for p in pixels], crops, processors)


def _layer_patches(encoder, prepared: _Prepared, layer: int, resolution: Resolution):
    """Per image: the layer's patch tokens `(N_i, D)` and grid `(h_i, w_i)`."""
    if resolution == "native":
        from ..packing import encode_packed

        outputs = encode_packed(encoder, [px[0] for px in prepared.batches], layers=(layer,))
    else:
        outputs = [encoder(prepared.batches[0], layers=(layer,))]
    patches, grids = [], []
    for out in outputs:
        for tokens in out.patches(layer):
            patches.append(tokens)
            grids.append(out.grid_size)
    return patches, grids


def _anyres_patches(encoder, images, layer: int, pinpoints, image_size, max_patches, resolution):
    """Per image: the assembled anyres map's tokens `(h_i * w_i, D)`, its grid, the image drawn
    at `(h_i * p, w_i * p)`, and the scale `(sy, sx)` from the image's pixels to that drawing."""
    from ..anyres import encode_anyres
    from ..processing.convert import to_rgb

    if image_size is not None or max_patches is not None or resolution != "fixed":
        raise ValueError("anyres excludes image_size, max_patches and resolution='native': it picks its own tiling")
    if not images:
        raise ValueError("no images given: pass at least one image")
    processor = processor_for(encoder)
    stride = encoder.config.input_stride
    patches, grids, crops, scales = [], [], [], []
    for image in images:
        feats = encode_anyres(encoder, image, pinpoints, processor=processor, layer=layer)
        dim, h, w = feats.feature_map.shape
        patches.append(feats.feature_map.reshape(dim, h * w).T)  # (h*w, D)
        grids.append((h, w))
        rgb = to_rgb(image, processor.config.background, processor.config.exif_transpose)
        crops.append(np.asarray(Image.fromarray(rgb).resize((w * stride, h * stride), Image.BICUBIC)))
        scales.append((h * stride / rgb.shape[0], w * stride / rgb.shape[1]))
    return patches, grids, crops, scales


def _layer_label(encoder, layer: int) -> tuple[int, str]:
    resolved = encoder.resolve_layers((layer,))[0]
    return resolved, f"layer {resolved} of {encoder.num_blocks} blocks"


@torch.inference_mode()
def model_line(encoder) -> str:
    """`model: SOURCE (FAMILY)`, or `model: SOURCE (random weights)` for a preset without a
    checkpoint: a picture of untrained features must say so."""
    info = encoder.source_info
    source = info.get("source") or "built in Python (no source recorded)"
    if info.get("random_weights"):
        return f"model: {source} (random weights)"
    return f"model: {source}" + (f" ({info['family']})" if info.get("family") else "")


def write_pca_picture(
    encoder,
    images: Sequence[ImageInput],
    layer: int,
    path: str | Path,
    names: Sequence[str] | None = None,
    image_size: tuple[int, int] | None = None,
    panel_px: int = 320,
    resolution: Resolution = "fixed",
    max_patches: int | None = None,
    anyres: Sequence[tuple[int, int]] | None = None,
) -> Path:
    """Encode images, colour the patch features of `layer` by one shared 3-component PCA,
    and save the images beside their colour maps as a PNG.

    Args:
        encoder: A `VisionEncoder` (put in eval mode here).
        images: PIL images or uint8 arrays `(H, W, 3)`; all share one PCA basis.
        layer: Block index (negatives count from the end).
        path: Output `.png`.
        names: A title per image.
        image_size: Input `(H, W)` for `fixed` resolution; default the encoder's native size.
        panel_px: Side of each panel in pixels.
        resolution: `fixed` or `native` (each image at its own aspect ratio).
        max_patches: Patch budget per image at `native` resolution (default the number of
            patches of the encoder's native size, or a NaFlex processor's own budget).
        anyres: LLaVA-NeXT pinpoints `[(H, W), ...]`: show each image's assembled (unpadded)
            anyres feature map instead.

    Returns:
        The path written.
    """
    encoder.eval()
    _, label = _layer_label(encoder, layer)
    if anyres is not None:
        patches, grids, crops, _ = _anyres_patches(encoder, images, layer, anyres, image_size, max_patches, resolution)
        prepared = _Prepared([], crops, [])
        resolution = "anyres"
    else:
        prepared = _prepare(encoder, images, image_size, resolution, max_patches)
        patches, grids = _layer_patches(encoder, prepared, layer, resolution)
    basis = fit_pca_basis(torch.cat(patches)[None])  # one basis over every patch of every image
    rgb = [basis.colors(p.float().cpu()).reshape(h, w, 3) for p, (h, w) in zip(patches, grids)]
    grid_text = f"{grids[0][0]}x{grids[0][1]} patches" if len(set(grids)) == 1 else f"{resolution} resolution"
    fig = pca_figure(prepared.crops, rgb, names=names, layer_label=f"{label}, {grid_text}", panel_px=panel_px,
                     keep_aspect=resolution != "fixed", header=model_line(encoder))
    return save_figure(fig, path)


@torch.inference_mode()
def write_attention_picture(
    encoder,
    images: Sequence[ImageInput],
    layer: int,
    path: str | Path,
    query: AttentionQuery = "auto",
    names: Sequence[str] | None = None,
    image_size: tuple[int, int] | None = None,
    panel_px: int = 200,
    head_cols: int = 6,
    resolution: Resolution = "fixed",
    max_patches: int | None = None,
) -> Path:
    """Save the attention maps of `layer` (per head and their mean) and the attention
    rollout through blocks `0..layer`, over each image.

    The query is said in the picture's header: the CLS token (`cls`, register and CLS
    columns dropped), the MAP head's learned query (`map`, last block only), or the mean
    attention each patch receives (`mean`); `auto` picks the first the model has.

    Args:
        encoder: A `VisionEncoder` (put in eval mode here).
        images: PIL images or uint8 arrays `(H, W, 3)`.
        layer: Block index (negatives count from the end).
        path: Output `.png`.
        query: `auto`, `cls`, `map` or `mean` (see `vlm_encoder.viz.attention`).
        names: A title per image.
        image_size: Input `(H, W)` for `fixed` resolution.
        panel_px: Side of each panel in pixels.
        head_cols: Heads per row of panels.
        resolution: `fixed` or `native` (each image encoded alone at its own aspect ratio).
        max_patches: Patch budget per image at `native` resolution.

    Returns:
        The path written.
    """
    encoder.eval()
    resolved, label = _layer_label(encoder, layer)
    config = encoder.config
    chosen = resolve_query(config, query, last_layer=resolved == encoder.num_blocks - 1)
    prepared = _prepare(encoder, images, image_size, resolution, max_patches)
    head_maps, rollout_maps = [], []
    for pixels in prepared.batches:
        out = encoder(pixels, layers=tuple(range(resolved + 1)), output_attentions=True)
        rollout = attention_rollout(out.attentions)  # (B, T, T)
        map_weights = None
        if chosen == "map":
            map_weights = map_head_attention(encoder.attn_pool, encoder.norm(out.tokens(resolved)))  # (B, heads, T)
        heads, flow = query_maps(chosen, out.attentions[-1], rollout, encoder.num_prefix_tokens, map_weights)
        h, w = out.grid_size
        head_maps += list(heads.float().cpu().reshape(heads.shape[0], heads.shape[1], h, w))
        rollout_maps += list(flow.float().cpu().reshape(-1, h, w))
    notes = []
    if chosen == "cls":
        notes.append("CLS and register columns dropped" if config.num_register_tokens else "CLS column dropped")
    elif config.num_register_tokens:
        notes.append("register columns dropped")
    if not config.class_token:
        notes.append(f"this model has no CLS token (pool={config.pool!r})")
    header = f"{model_line(encoder)}\n{QUERY_DESCRIPTIONS[chosen]}, {label}" + (f"; {'; '.join(notes)}" if notes else "")
    header += ("\nrollout (Abnar & Zuidema 2020): per block mean of heads + identity, rows renormalised, "
               f"multiplied over blocks 0..{resolved}" + (", then the MAP query" if chosen == "map" else "")
               + "; each panel scaled to its own min..max")
    rollout_label = f"rollout, blocks 0-{resolved}" if resolved else "rollout, block 0"
    fig = attention_figure(prepared.crops, head_maps, rollout_maps, config.input_stride, header, names=names,
                           rollout_label=rollout_label, head_cols=head_cols, panel_px=panel_px)
    return save_figure(fig, path)


@torch.inference_mode()
def write_similarity_picture(
    encoder,
    images: Sequence[ImageInput],
    layer: int,
    path: str | Path,
    patch: tuple[int, int] | None = None,
    point: tuple[float, float] | None = None,
    names: Sequence[str] | None = None,
    image_size: tuple[int, int] | None = None,
    panel_px: int = 320,
    resolution: Resolution = "fixed",
    max_patches: int | None = None,
    anyres: Sequence[tuple[int, int]] | None = None,
) -> Path:
    """Save the cosine similarity of one patch of the first image to every patch of every
    image, as heat maps over the images, the chosen patch boxed.

    Args:
        encoder: A `VisionEncoder` (put in eval mode here).
        images: PIL images or uint8 arrays `(H, W, 3)`; the query patch is in the first.
        layer: Block index (negatives count from the end).
        path: Output `.png`.
        patch: The query patch `(row, col)` of the patch grid (negatives from the end).
        point: Or a point `(x, y)` in the first image's own pixels; the patch that covers
            it after the processor's resize and crop is the query.
        names: A title per image.
        image_size: Input `(H, W)` for `fixed` resolution.
        panel_px: Side of each panel in pixels.
        resolution: `fixed` or `native`.
        max_patches: Patch budget per image at `native` resolution.
        anyres: LLaVA-NeXT pinpoints `[(H, W), ...]`: compare patches of each image's
            assembled (unpadded) anyres feature map instead.

    Returns:
        The path written.
    """
    if (patch is None) == (point is None):
        raise ValueError("give the query patch either as patch=(row, col) or as point=(x, y), exactly one of them")
    encoder.eval()
    _, label = _layer_label(encoder, layer)
    scales = None
    if anyres is not None:
        patches, grids, crops, scales = _anyres_patches(encoder, images, layer, anyres, image_size, max_patches,
                                                        resolution)
        prepared = _Prepared([], crops, [])
    else:
        prepared = _prepare(encoder, images, image_size, resolution, max_patches)
        patches, grids = _layer_patches(encoder, prepared, layer, resolution)
    stride = encoder.config.input_stride
    names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
    if point is not None and scales is not None:
        (sy, sx), (h, w) = scales[0], grids[0]
        row, col = min(int(point[1] * sy) // stride, h - 1), min(int(point[0] * sx) // stride, w - 1)
        where = f"at point ({point[0]:g}, {point[1]:g}) of {names[0]}"
    elif point is not None:
        processor = prepared.processors[0].config
        x, y = point_in_processed_image(point[0], point[1], image_size_of(images[0], processor), processor)
        row, col = patch_at_point(x, y, stride, grids[0])
        where = f"at point ({point[0]:g}, {point[1]:g}) of {names[0]}"
    else:
        index = patch_index(patch[0], patch[1], grids[0])
        row, col = divmod(index, grids[0][1])
        where = f"of {names[0]}"
    maps = similarity_maps(patches, 0, row * grids[0][1] + col)
    maps = [m.reshape(h, w) for m, (h, w) in zip(maps, grids)]
    header = f"{model_line(encoder)}\ncosine similarity of patch (row {row}, col {col}) {where} to every patch, {label}"
    fig = similarity_figure(prepared.crops, maps, 0, (row, col), stride, header, names=names, panel_px=panel_px)
    return save_figure(fig, path)
