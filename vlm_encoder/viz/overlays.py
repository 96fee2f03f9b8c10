"""Heat maps over images, as RGB arrays ready for `render_grid`.

A patch map `(h, w)` is coloured with a matplotlib colour map and blended over the image
the encoder saw; each patch covers its `stride x stride` pixels exactly (nearest
upsampling), so a bright square is one patch. Pixels past the last patch (a model with
`patch_remainder='drop'`) keep the bare image.
"""

from __future__ import annotations

import numpy as np
import torch
from matplotlib import colormaps

DEFAULT_ALPHA = 0.6
MARK_COLOR = (0, 255, 255)  # cyan: visible on every colour map used here


def _to_numpy(values: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float32)


def normalise(values: np.ndarray | torch.Tensor, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Scale to `[0, 1]` by `vmin`/`vmax` (default the map's own min and max); clipped."""
    values = _to_numpy(values)
    low = float(values.min()) if vmin is None else vmin
    high = float(values.max()) if vmax is None else vmax
    if high <= low:
        return np.zeros_like(values)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def heat_overlay(
    image: np.ndarray,
    heat: np.ndarray | torch.Tensor,
    stride: int,
    cmap: str = "inferno",
    alpha: float = DEFAULT_ALPHA,
    vmin: float | None = None,
    vmax: float | None = None,
) -> np.ndarray:
    """Blend a coloured patch map over an image.

    Args:
        image: The image the encoder saw `(H, W, 3)` uint8.
        heat: One value per patch `(h, w)`, with `h * stride <= H`, `w * stride <= W`.
        stride: Pixels per patch side (`config.input_stride`).
        cmap: Matplotlib colour map name.
        alpha: Weight of the colour (0 shows the image only, 1 the map only).
        vmin: Value drawn as the colour map's low end (default the map's minimum).
        vmax: Value drawn as its high end (default the map's maximum).

    Returns:
        `(H, W, 3)` uint8.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    heat = normalise(heat, vmin, vmax)
    h, w = heat.shape
    H, W = image.shape[:2]
    if h * stride > H or w * stride > W:
        raise ValueError(f"a {h}x{w} patch map at stride {stride} does not fit an image of {H}x{W} pixels")
    colours = colormaps[cmap](heat)[..., :3]  # (h, w, 3) in [0, 1]
    colours = np.repeat(np.repeat(colours, stride, axis=0), stride, axis=1)  # (h*stride, w*stride, 3)
    out = image.astype(np.float32) / 255.0
    covered = out[: h * stride, : w * stride]
    out[: h * stride, : w * stride] = (1.0 - alpha) * covered + alpha * colours
    return np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)


def mark_patch(image: np.ndarray, row: int, col: int, stride: int, color: tuple[int, int, int] = MARK_COLOR) -> np.ndarray:
    """A copy of `image` `(H, W, 3)` uint8 with a box drawn around patch `(row, col)`."""
    out = image.copy()
    thick = max(1, stride // 5)
    top, left = row * stride, col * stride
    bottom, right = min(top + stride, out.shape[0]), min(left + stride, out.shape[1])
    out[top : top + thick, left:right] = color
    out[bottom - thick : bottom, left:right] = color
    out[top:bottom, left : left + thick] = color
    out[top:bottom, right - thick : right] = color
    return out
