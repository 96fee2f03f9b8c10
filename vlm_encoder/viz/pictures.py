"""End-to-end pictures: images through the encoder into a PNG.

Each picture is one function `write_<kind>_picture(encoder, images, ..., path)`; the
numerical part lives in its own module (`pca.py`) and the drawing in `figures.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .figures import pca_figure, save_figure
from .images import prepare_images
from .pca import pca_rgb


@torch.inference_mode()
def write_pca_picture(
    encoder,
    images: Sequence[Image.Image | np.ndarray],
    layer: int,
    path: str | Path,
    names: Sequence[str] | None = None,
    image_size: tuple[int, int] | None = None,
    panel_px: int = 320,
) -> Path:
    """Encode images, colour the patch features of `layer` by one shared 3-component PCA,
    and save the images beside their colour maps as a PNG.

    Args:
        encoder: A `VisionEncoder` (put in eval mode here).
        images: PIL images or uint8 arrays `(H, W, 3)`; all share one PCA basis.
        layer: Block index (negatives count from the end).
        path: Output `.png`.
        names: A title per image.
        image_size: Input `(H, W)`; default the encoder's native size.
        panel_px: Side of each panel in pixels.

    Returns:
        The path written.
    """
    encoder.eval()
    pixels, crops = prepare_images(images, encoder, image_size)
    param = next(encoder.parameters())
    out = encoder(pixels.to(device=param.device, dtype=param.dtype), layers=(layer,))
    rgb = pca_rgb(out.patches(layer), out.grid_size)  # (B, h, w, 3)
    resolved = out.layers[0]
    label = f"layer {resolved} of {out.num_blocks} blocks, {out.grid_size[0]}x{out.grid_size[1]} patches"
    fig = pca_figure(crops, rgb, names=names, layer_label=label, panel_px=panel_px)
    return save_figure(fig, path)
