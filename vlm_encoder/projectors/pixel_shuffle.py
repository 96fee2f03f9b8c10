"""`pixel_shuffle`: merge `s x s` neighbouring patches into one token, then an MLP.

InternVL 1.5 (Chen et al. 2024) and Idefics3 (Laurençon et al. 2024): a space-to-depth of
the patch grid `(h, w, C) -> (h/s, w/s, C*s*s)`, so `M = N / s^2`, followed by
LayerNorm (InternVL's `mlp1`) and Linear, GELU, Linear.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..specs.options import at_least
from .config import KindOptions, ProjectorConfig
from .kind import ProjectorKind, build_mlp, grid_to_tokens, tokens_to_grid
from .registry import register_projector


@dataclass(frozen=True)
class PixelShuffleOptions(KindOptions):
    """`pixel_shuffle`.

    Attributes:
        scale_factor: Side `s` of the `s x s` patch neighbourhoods merged into one token.
        norm: LayerNorm on the merged tokens before the MLP (InternVL's `mlp1`).
        hidden_dim: Hidden width of the MLP (default `out_dim`).
    """

    scale_factor: int = at_least(1, 2)
    norm: bool = True
    hidden_dim: int | None = at_least(1, None)


@register_projector("pixel_shuffle")
class PixelShuffleProjector(ProjectorKind):
    """Space-to-depth token merging (InternVL / Idefics3), then LayerNorm and `mlp2x_gelu`.

    The channel order of a merged token is `torch.nn.functional.pixel_unshuffle`'s:
    channel `c * s^2 + i * s + j` holds channel `c` of the patch at offset `(i, j)`.
    """

    options_class = PixelShuffleOptions
    needs_grid = True
    reference = "InternVL 1.5 / Idefics3 pixel shuffle"
    tokens = "N / s^2"

    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__()
        options: PixelShuffleOptions = config.options
        self.scale_factor = options.scale_factor
        merged = config.fused_dim * options.scale_factor**2
        self.norm = nn.LayerNorm(merged) if options.norm else nn.Identity()
        self.mlp = build_mlp(merged, config.hidden_width, config.out_dim, 2, config.bias)

    def _check(self, grid: tuple[int, int]) -> None:
        s = self.scale_factor
        if grid[0] % s or grid[1] % s:
            raise ValueError(
                f"pixel_shuffle with scale_factor={s} needs a patch grid divisible by {s}, got {grid[0]}x{grid[1]}; "
                f"choose a scale_factor that divides both sides or resample to another grid (fusion_grid)"
            )

    def num_output_tokens(self, num_tokens: int, grid: tuple[int, int] | None) -> int:
        assert grid is not None
        self._check(grid)
        return num_tokens // self.scale_factor**2

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
        assert grid is not None
        self._check(grid)
        merged = F.pixel_unshuffle(tokens_to_grid(x, grid), self.scale_factor)  # (B, C*s*s, h/s, w/s)
        return self.mlp(self.norm(grid_to_tokens(merged)))  # (B, N/s^2, out_dim)
