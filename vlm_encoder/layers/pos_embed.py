"""Position embeddings: resampling a learned 1D table to a new grid, and fixed 2D sin-cos."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resample_pos_embed(
    table: torch.Tensor,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    antialias: bool = True,
    mode: str = "bicubic",
    align_corners: bool = False,
) -> torch.Tensor:
    """Resample a learned position table over a patch grid to another grid.

    Bicubic interpolation in float32, cast back to the table's dtype. `antialias=True` (as
    timm) is torch's antialiased bicubic: PIL's a=-0.5 kernel, widened when shrinking;
    `False` is the classic a=-0.75 kernel (HF's `interpolate_pos_encoding`). At `new_grid == old_grid` the table is returned unchanged.

    Args:
        table: Position table `(1, h*w, D)` in row-major patch order.
        old_grid: `(h, w)` of the table.
        new_grid: `(h', w')` wanted.
        antialias: Use the antialiased (PIL-style) bicubic.
        mode: `bicubic` (default) or `bilinear` (SigLIP2 NaFlex resizes its table with
            antialiased bilinear).
        align_corners: Map the corner patches of both grids onto each other (torch's
            `align_corners=True`; Qwen3-VL resizes its table so) instead of the half-pixel
            centres (`False`, the default).

    Returns:
        The table `(1, h'*w', D)`.
    """
    if tuple(new_grid) == tuple(old_grid):
        return table
    h, w = old_grid
    dim = table.shape[-1]
    grid = table.reshape(1, h, w, dim).permute(0, 3, 1, 2).float()  # (1, D, h, w)
    grid = F.interpolate(grid, size=tuple(new_grid), mode=mode, align_corners=align_corners, antialias=antialias)
    return grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(table.dtype)  # (1, h'w', D)


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (dim/2,)
    angles = positions.reshape(-1, 1).double() * omega.reshape(1, -1)  # (M, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # (M, dim)


def sincos_2d_pos_embed(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding (MAE's `get_2d_sincos_pos_embed` layout).

    The first half of the channels encodes the column (x) coordinate, the second half the
    row (y) coordinate, each as `[sin(p * w_k), cos(p * w_k)]` with `w_k = 10000^(-k / (dim/4))`.

    Args:
        dim: Embedding width, divisible by 4.
        grid: `(h, w)` patch grid.

    Returns:
        `(1, h*w, dim)` float32, row-major.
    """
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")  # (h, w) each
    emb = torch.cat([_sincos_1d(dim // 2, xs), _sincos_1d(dim // 2, ys)], dim=1)  # (h*w, dim)
    return emb.float().unsqueeze(0)
