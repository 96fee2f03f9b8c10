"""Matplotlib rendering of feature pictures, saved as PNG atomically.

Figures are built on `matplotlib.figure.Figure` with the Agg canvas directly, so nothing
touches pyplot's global state or needs a display. Every panel is `panel_px` pixels square
and the PNG size is fixed by the layout (`figure_size_px`), which makes files comparable.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..pretrained import write_atomic

DPI = 100
TITLE_PX = 24  # room above each row of panels for its titles


def figure_size_px(rows: int, cols: int, panel_px: int) -> tuple[int, int]:
    """PNG size `(width, height)` in pixels of a `rows x cols` grid of panels."""
    return cols * panel_px, rows * (panel_px + TITLE_PX)


def _as_image(array: np.ndarray | torch.Tensor) -> np.ndarray:
    """An image `(H, W, 3)` as float in `[0, 1]` (uint8 input is divided by 255)."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"images must be (H, W, 3) RGB arrays, got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    return np.clip(array.astype(np.float32), 0.0, 1.0)


def render_grid(
    panels: Sequence[Sequence[np.ndarray | torch.Tensor]],
    titles: Sequence[Sequence[str]] | None = None,
    panel_px: int = 320,
    suptitle: str | None = None,
) -> Figure:
    """A figure of image panels in rows, each shown square without axes.

    Feature maps coarser than the image (a `(h, w, 3)` patch map) are drawn with
    nearest-neighbour upsampling, so each patch stays a visible square.

    Args:
        panels: `rows x cols` RGB arrays `(H, W, 3)`, uint8 or float in `[0, 1]`.
        titles: One title per panel, same layout, or `None`.
        panel_px: Side of each panel in pixels.
        suptitle: Optional text in the top-left corner of the figure.

    Returns:
        The matplotlib figure (Agg canvas attached).
    """
    rows = len(panels)
    cols = max((len(row) for row in panels), default=0)
    if rows == 0 or cols == 0:
        raise ValueError("render_grid needs at least one panel")
    width, height = figure_size_px(rows, cols, panel_px)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    row_h = 1.0 / rows
    title_frac = TITLE_PX / height
    for r, row in enumerate(panels):
        for c, panel in enumerate(row):
            bottom = 1.0 - (r + 1) * row_h
            ax = fig.add_axes((c / cols, bottom, 1.0 / cols, row_h - title_frac))
            ax.imshow(_as_image(panel), interpolation="nearest", aspect="auto")
            ax.set_axis_off()
            if titles is not None and r < len(titles) and c < len(titles[r]):
                fig.text((c + 0.5) / cols, bottom + row_h - title_frac / 2, titles[r][c],
                         ha="center", va="center", fontsize=9)
    if suptitle:
        fig.text(0.005, 0.999, suptitle, ha="left", va="top", fontsize=7, color="0.4")
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write `fig` as a PNG to `path` atomically (a temporary file renamed into place).

    Returns:
        The path written.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"figures are written as PNG; give a path ending in .png, got {path}")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    write_atomic(path, buffer.getvalue())
    return path


def pca_figure(
    images: Sequence[np.ndarray | torch.Tensor],
    rgb_maps: torch.Tensor | np.ndarray,
    names: Sequence[str] | None = None,
    layer_label: str = "",
    panel_px: int = 320,
) -> Figure:
    """One row per image: the image, then its PCA colour map beside it.

    Args:
        images: The images as the encoder saw them, `(H, W, 3)` each.
        rgb_maps: `pca_rgb` output `(B, h, w, 3)` in `[0, 1]`.
        names: A name per image for the titles.
        layer_label: Text naming the layer, e.g. `"layer 6 of 12 blocks"`.
        panel_px: Side of each panel in pixels.
    """
    if len(images) != len(rgb_maps):
        raise ValueError(f"got {len(images)} images but {len(rgb_maps)} PCA maps")
    names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
    pca_title = f"PCA, {layer_label}" if layer_label else "PCA of patch features"
    panels = [[image, rgb] for image, rgb in zip(images, rgb_maps)]
    titles = [[name, pca_title] for name in names]
    return render_grid(panels, titles, panel_px=panel_px)
