"""Matplotlib rendering of feature pictures, saved as PNG atomically.

Figures are built on `matplotlib.figure.Figure` with the Agg canvas directly, so nothing
touches pyplot's global state or needs a display. Every panel is `panel_px` pixels square
and the PNG size is fixed by the layout (`figure_size_px`), which makes files comparable.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..pretrained import write_atomic
from .overlays import DEFAULT_ALPHA, heat_overlay, mark_patch

DPI = 100
TITLE_PX = 24  # room above each row of panels for its titles
HEADER_PX = 18  # room for each line of a figure's header


def figure_size_px(rows: int, cols: int, panel_px: int, header_lines: int = 0) -> tuple[int, int]:
    """PNG size `(width, height)` in pixels of a `rows x cols` grid of panels under a
    header of `header_lines` lines of text."""
    return cols * panel_px, rows * (panel_px + TITLE_PX) + header_lines * HEADER_PX


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
    header: str | None = None,
    keep_aspect: bool = False,
) -> Figure:
    """A figure of image panels in rows, each in a square cell without axes.

    Feature maps coarser than the image (a `(h, w, 3)` patch map) are drawn with
    nearest-neighbour upsampling, so each patch stays a visible square.

    Args:
        panels: `rows x cols` RGB arrays `(H, W, 3)`, uint8 or float in `[0, 1]`; rows may
            be shorter than the longest (the cells on their right stay empty).
        titles: One title per panel, same layout, or `None`.
        panel_px: Side of each panel in pixels.
        header: Text above all panels saying what the figure shows; lines (split at
            `\\n`) are wrapped to the figure's width.
        keep_aspect: Draw each panel at its own aspect ratio, centred in its square cell
            (images of different shapes); default: stretched to fill the cell.

    Returns:
        The matplotlib figure (Agg canvas attached).
    """
    rows = len(panels)
    cols = max((len(row) for row in panels), default=0)
    if rows == 0 or cols == 0:
        raise ValueError("render_grid needs at least one panel")
    # Wrap each header line to the figure's width (9 pt DejaVu Sans is under 7 px per character).
    chars = max(20, cols * panel_px // 7)
    lines = [part for line in (header.split("\n") if header else []) for part in textwrap.wrap(line, chars) or [""]]
    width, height = figure_size_px(rows, cols, panel_px, len(lines))
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    top = 1.0 - len(lines) * HEADER_PX / height  # panels start below the header
    row_h = top / rows
    title_frac = TITLE_PX / height
    for i, line in enumerate(lines):
        fig.text(0.5 / width, 1.0 - (i + 0.5) * HEADER_PX / height, line, ha="left", va="center",
                 fontsize=9, color="0.25")
    for r, row in enumerate(panels):
        for c, panel in enumerate(row):
            bottom = top - (r + 1) * row_h
            ax = fig.add_axes((c / cols, bottom, 1.0 / cols, row_h - title_frac))
            ax.imshow(_as_image(panel), interpolation="nearest", aspect="equal" if keep_aspect else "auto")
            ax.set_axis_off()
            if titles is not None and r < len(titles) and c < len(titles[r]):
                fig.text((c + 0.5) / cols, bottom + row_h - title_frac / 2, titles[r][c],
                         ha="center", va="center", fontsize=9)
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
    keep_aspect: bool = False,
    header: str | None = None,
) -> Figure:
    """One row per image: the image, then its PCA colour map beside it.

    Args:
        images: The images as the encoder saw them, `(H, W, 3)` each.
        rgb_maps: `pca_rgb` output `(B, h, w, 3)` in `[0, 1]`.
        names: A name per image for the titles.
        layer_label: Text naming the layer, e.g. `"layer 6 of 12 blocks"`.
        panel_px: Side of each panel in pixels.
        keep_aspect: Keep each image's aspect ratio (images of different shapes).
        header: Text above the panels (e.g. the model), or `None`.
    """
    if len(images) != len(rgb_maps):
        raise ValueError(f"got {len(images)} images but {len(rgb_maps)} PCA maps")
    names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
    pca_title = f"PCA, {layer_label}" if layer_label else "PCA of patch features"
    panels = [[image, rgb] for image, rgb in zip(images, rgb_maps)]
    titles = [[name, pca_title] for name in names]
    return render_grid(panels, titles, panel_px=panel_px, header=header, keep_aspect=keep_aspect)


def attention_figure(
    images: Sequence[np.ndarray],
    head_maps: Sequence[torch.Tensor],
    rollout_maps: Sequence[torch.Tensor],
    stride: int,
    header: str,
    names: Sequence[str] | None = None,
    rollout_label: str = "rollout",
    head_cols: int = 6,
    panel_px: int = 200,
    alpha: float = DEFAULT_ALPHA,
    cmap: str = "inferno",
) -> Figure:
    """Per image: a row with the image, the mean of the heads and the rollout, then the
    heads in rows of `head_cols`. Every map is scaled to its own min..max.

    Args:
        images: The images as the encoder saw them `(H, W, 3)` uint8.
        head_maps: Per image, one map per head `(heads, h, w)`.
        rollout_maps: Per image, the rollout map `(h, w)`.
        stride: Pixels per patch side.
        header: What the maps are (query, layer, excluded tokens).
        names: A name per image.
        rollout_label: Title of the rollout panel.
        head_cols: Heads per row.
        panel_px: Side of each panel in pixels.
        alpha: Weight of the colour over the image.
        cmap: Matplotlib colour map.
    """
    if not len(images) == len(head_maps) == len(rollout_maps):
        raise ValueError(f"got {len(images)} images, {len(head_maps)} head maps and {len(rollout_maps)} rollout maps")
    if head_cols < 1:
        raise ValueError(f"head_cols must be >= 1, got {head_cols}")
    names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
    panels, titles = [], []
    for image, heads, rollout, name in zip(images, head_maps, rollout_maps, names):
        heads = heads.detach().float().cpu()
        def overlay(heat: torch.Tensor, image: np.ndarray = image) -> np.ndarray:
            return heat_overlay(image, heat, stride, cmap, alpha)

        panels.append([image, overlay(heads.mean(dim=0)), overlay(rollout)])
        titles.append([name, f"mean of {heads.shape[0]} heads", rollout_label])
        for start in range(0, heads.shape[0], head_cols):
            chunk = range(start, min(start + head_cols, heads.shape[0]))
            panels.append([overlay(heads[i]) for i in chunk])
            titles.append([f"head {i} (max {heads[i].max().item():.3f})" for i in chunk])
    return render_grid(panels, titles, panel_px=panel_px, header=header, keep_aspect=True)


def similarity_figure(
    images: Sequence[np.ndarray],
    maps: Sequence[torch.Tensor],
    query_image: int,
    query_patch: tuple[int, int],
    stride: int,
    header: str,
    names: Sequence[str] | None = None,
    panel_px: int = 320,
    alpha: float = DEFAULT_ALPHA,
    cmap: str = "viridis",
) -> Figure:
    """One row per image: the image, then the similarity map over it; the query patch is
    boxed in its image. One colour range for all maps: the lowest similarity shown to the
    highest apart from the query patch itself (which is 1).

    Args:
        images: The images as the encoder saw them `(H, W, 3)` uint8.
        maps: Per image, the similarity to the query `(h, w)`.
        query_image: Which image holds the query patch.
        query_patch: Its `(row, col)`.
        stride: Pixels per patch side.
        header: What the maps are (layer, query); the colour range is appended.
        names: A name per image.
        panel_px: Side of each panel in pixels.
        alpha: Weight of the colour over the image.
        cmap: Matplotlib colour map.
    """
    if len(images) != len(maps):
        raise ValueError(f"got {len(images)} images but {len(maps)} similarity maps")
    names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
    flat = [m.detach().float().cpu().reshape(-1) for m in maps]
    others = flat[query_image].clone()
    row, col = query_patch
    others[row * maps[query_image].shape[-1] + col] = float("-inf")
    vmin = min(f.min().item() for f in flat)
    vmax = max([others.max().item()] + [f.max().item() for i, f in enumerate(flat) if i != query_image])
    if vmax == float("-inf"):  # a one-patch image
        vmax = 1.0
    panels, titles = [], []
    for i, (image, heat, name) in enumerate(zip(images, maps, names)):
        overlay = heat_overlay(image, heat, stride, cmap, alpha, vmin=vmin, vmax=vmax)
        if i == query_image:
            image, overlay = mark_patch(image, row, col, stride), mark_patch(overlay, row, col, stride)
        panels.append([image, overlay])
        titles.append([name, "query patch boxed" if i == query_image else "similarity to the query"])
    header = f"{header}\ncolour ({cmap}): cosine {vmin:.2f} (dark) to {vmax:.2f} (bright), the same scale in every panel"
    return render_grid(panels, titles, panel_px=panel_px, header=header, keep_aspect=True)
