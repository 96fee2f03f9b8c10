"""`pixel_shuffle`: merge `s x s` neighbouring patches into one token, then an MLP.

InternVL 1.5 (Chen et al. 2024) and Idefics3 (Laurençon et al. 2024): a space-to-depth of
the patch grid `(h, w, C) -> (h/s, w/s, C*s*s)`, so `M = N / s^2`, followed by
LayerNorm (InternVL's `mlp1`) and Linear, GELU, Linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ProjectorConfig
from .kind import ProjectorKind, build_mlp, grid_to_tokens, tokens_to_grid
from .registry import register_projector


@register_projector("pixel_shuffle")
class PixelShuffleProjector(ProjectorKind):
    """Space-to-depth token merging (InternVL / Idefics3), then LayerNorm and `mlp2x_gelu`.

    The channel order of a merged token is `torch.nn.functional.pixel_unshuffle`'s:
    channel `c * s^2 + i * s + j` holds channel `c` of the patch at offset `(i, j)`.
    """

    options = ("scale_factor", "norm", "hidden_dim")
    needs_grid = True
    reference = "InternVL 1.5 / Idefics3 pixel shuffle"
    tokens = "N / s^2"

    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__()
        self.scale_factor = config.scale_factor
        merged = config.fused_dim * config.scale_factor**2
        self.norm = nn.LayerNorm(merged) if config.norm else nn.Identity()
        self.mlp = build_mlp(merged, config.mlp_hidden_dim, config.out_dim, 2, config.bias)

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
