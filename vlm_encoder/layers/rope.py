"""2D rotary position embedding (RoPE) for vision transformers.

Each patch at grid row `y`, column `x` rotates its query and key: the head dimension `d` is
split into `d / 4` frequencies per axis, and pair `j` of the vector turns by the angle
`pos_axis * freq_j`. Attention scores then depend on the relative offset of two patches.
Prefix tokens (CLS, registers) are not rotated: their rows of the table are the identity
(`cos = 1, sin = 0`, which leaves `q` bit-for-bit unchanged).

The variants the references use differ only in the positions and the frequencies:

  * `eva` (timm `eva.py` `RotaryEmbeddingCat`; EVA02, Perception Encoder): integer positions
    `0..n-1` (+ an offset; PE uses 1), optionally rescaled so the grid spans `ref_grid` as it
    did in pre-training (`pos * ref / n`), frequencies `theta ** -(j / (d/4))`.
  * `dinov3` (timm `RotaryEmbeddingDinoV3`, transformers `dinov3_vit`): patch centres normalised
    to `[-1, 1]` per axis, angles `2 pi pos / theta ** (j / (d/4))`. Its training-time
    shift / jitter / rescale augmentations are off (inference).

Both lay the `d / 2` angles out as `[axis0 freqs, axis1 freqs]`, then either `half`
(`[a, a]`, rotating the two halves of the head dim), `interleaved` (`[a0, a0, a1, a1, ...]`,
rotating adjacent pairs) or `split` (`[f0, f0, f1, f1]` by axis: each axis owns a contiguous half
of the head dim and rotates its two quarters, Gemma 4's `apply_multidimensional_rope`). The table is per token, so any token order works: a packed batch
concatenates per-image tables, and a windowed order (Qwen2.5-VL's merged windows) would be a
gather of the rows. A new resolution computes a new table (no resampling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

RopeKind = Literal["none", "eva", "dinov3"]
RopeLayout = Literal["half", "interleaved", "split"]


@dataclass(frozen=True)
class RopeTable:
    """Per-token rotation of queries and keys.

    Attributes:
        cos: `(T, d)` for one sequence, or `(B, T, d)` per batch row (packed sequences).
        sin: Same shape as `cos`.
        interleaved: Rotate adjacent pairs `(x0, x1)` instead of the two halves of `d`.
        split: Rotate the two quarters of each half of `d` (one half per axis).
    """

    cos: torch.Tensor
    sin: torch.Tensor
    interleaved: bool = False
    split: bool = False

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate `x` `(B, heads, T, d)`; computed in the table's float32, returned in `x`'s dtype."""
        cos, sin = self.cos.unsqueeze(-3), self.sin.unsqueeze(-3)  # (1 or B, 1, T, d)
        if self.interleaved:  # [x0, x1, x2, x3] -> [-x1, x0, -x3, x2]
            turned = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).reshape(x.shape)
        elif self.split:  # [a1, a2, b1, b2] -> [-a2, a1, -b2, b1]
            a1, a2, b1, b2 = x.chunk(4, dim=-1)
            turned = torch.cat([-a2, a1, -b2, b1], dim=-1)
        else:  # [x_a, x_b] -> [-x_b, x_a]
            a, b = x.chunk(2, dim=-1)
            turned = torch.cat([-b, a], dim=-1)
        return (x * cos + turned * sin).to(x.dtype)


def axis_positions(
    n: int, kind: RopeKind, offset: float = 0.0, ref: int | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """Positions `(n,)` float32 of one grid axis of `n` patches (see the module docstring)."""
    if kind == "dinov3":
        centres = (torch.arange(0.5, n, device=device, dtype=torch.float32) + offset) / n
        return 2.0 * centres - 1.0
    pos = torch.arange(n, device=device, dtype=torch.int64).to(torch.float32) + offset
    return pos if ref is None else pos / n * ref


def rope_angles(
    grid: tuple[int, int],
    head_dim: int,
    kind: RopeKind,
    theta: float,
    offset: float = 0.0,
    ref_grid: tuple[int, int] | None = None,
    xy: bool = False,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Rotation angles `(h*w, d/2)` of a patch grid, row-major, `[axis0 freqs, axis1 freqs]`
    with axis order `(y, x)`, or `(x, y)` when `xy` (timm's `grid_indexing='xy'`)."""
    h, w = grid
    n = head_dim // 4
    exponents = torch.arange(n, dtype=torch.int64).to(torch.float32) / n  # (d/4,)
    ref_h, ref_w = ref_grid if ref_grid is not None else (None, None)
    ys = axis_positions(h, kind, offset, ref_h, device)  # (h,)
    xs = axis_positions(w, kind, offset, ref_w, device)  # (w,)
    coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(h * w, 2)  # (N, 2) as (y, x)
    if xy:
        coords = coords.flip(-1)  # (N, 2) as (x, y)
    if kind == "dinov3":
        periods = (theta**exponents).to(device)  # (d/4,)
        angles = 2 * math.pi * coords[:, :, None] / periods  # (N, 2, d/4)
    else:
        bands = (1.0 / theta**exponents).to(device)
        angles = coords[:, :, None] * bands  # (N, 2, d/4)
    return angles.flatten(1)  # (N, d/2)


class Rope2d(nn.Module):
    """The rotary tables of a tower: one per grid, computed on demand and cached.

    Holds no parameters or buffers (the tables follow from the config alone).

    Args:
        head_dim: Per-head width `d` (a multiple of 4).
        kind: `eva` or `dinov3`.
        theta: Frequency base (timm's `rope_temperature`, HF's `rope_theta`).
        layout: `half` or `interleaved`.
        offset: Added to every integer position (`eva`) or centre (`dinov3`).
        ref_grid: `eva` only: the grid positions are rescaled to span (timm `ref_feat_shape`).
        xy: Axis order `(x, y)` in the head dim instead of `(y, x)`.
    """

    def __init__(
        self,
        head_dim: int,
        kind: RopeKind,
        theta: float,
        layout: RopeLayout = "half",
        offset: float = 0.0,
        ref_grid: tuple[int, int] | None = None,
        xy: bool = False,
    ) -> None:
        super().__init__()
        self.head_dim, self.kind, self.theta, self.layout = head_dim, kind, theta, layout
        self.offset, self.ref_grid, self.xy = offset, ref_grid, xy
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def patch_table(self, grid: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """`cos`, `sin` `(h*w, d)` float32 for the patches of a grid."""
        key = (tuple(grid), str(device))
        if key not in self._cache:
            angles = rope_angles(tuple(grid), self.head_dim, self.kind, self.theta, self.offset, self.ref_grid, self.xy, device)
            if self.layout == "half":
                angles = torch.cat([angles, angles], dim=-1)  # (N, d): [a, a]
            elif self.layout == "split":
                first, second = angles.chunk(2, dim=-1)  # (N, d/4) each: one axis
                angles = torch.cat([first, first, second, second], dim=-1)  # (N, d)
            else:
                angles = angles.repeat_interleave(2, dim=-1)  # (N, d): [a0, a0, a1, a1, ...]
            if len(self._cache) > 32:
                self._cache.clear()
            self._cache[key] = (angles.cos(), angles.sin())
        return self._cache[key]

    def forward(self, grid: tuple[int, int], num_prefix: int, device: torch.device) -> RopeTable:
        """The table `(num_prefix + h*w, d)` of one image: identity rows for the prefix tokens."""
        cos, sin = self.patch_table(grid, device)
        if num_prefix:
            cos = torch.cat([cos.new_ones(num_prefix, self.head_dim), cos])
            sin = torch.cat([sin.new_zeros(num_prefix, self.head_dim), sin])
        return RopeTable(cos, sin, interleaved=self.layout == "interleaved", split=self.layout == "split")

    def packed(self, rows: list[list[tuple[int, tuple[int, int]]]], length: int, num_prefix: int, device: torch.device) -> RopeTable:
        """The table `(P, length, d)` of packed rows: each row lists its images as
        `(start, grid)`; padding and prefix tokens get identity rows."""
        cos = torch.ones(len(rows), length, self.head_dim, device=device)  # (P, T, d)
        sin = torch.zeros(len(rows), length, self.head_dim, device=device)
        for p, images in enumerate(rows):
            for start, grid in images:
                patch_cos, patch_sin = self.patch_table(grid, device)
                first = start + num_prefix
                cos[p, first : first + patch_cos.shape[0]] = patch_cos
                sin[p, first : first + patch_sin.shape[0]] = patch_sin
        return RopeTable(cos, sin, interleaved=self.layout == "interleaved", split=self.layout == "split")

    def extra_repr(self) -> str:
        ref = f", ref_grid={self.ref_grid}" if self.ref_grid else ""
        return f"kind={self.kind}, head_dim={self.head_dim}, theta={self.theta}, layout={self.layout}, offset={self.offset}{ref}, xy={self.xy}"
