"""`pool`: 2D average pooling of the patch grid to a target size, then an MLP.

As the average-pooling projectors of LLaVA-OneVision / LLaVA-NeXT-Video (spatial pooling
of the patch grid) and the "pooling" baseline of Honeybee's study: `M = h' * w'`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..specs.options import at_least
from .config import KindOptions, ProjectorConfig, grid_field
from .kind import ProjectorKind, build_mlp, grid_to_tokens, tokens_to_grid
from .registry import register_projector


@dataclass(frozen=True)
class PoolOptions(KindOptions):
    """`pool`.

    Attributes:
        target_grid: Output grid `(h', w')` (an int means square); at most the input grid.
        hidden_dim: Hidden width of the MLP (default `out_dim`).
    """

    target_grid: tuple[int, int] = grid_field()
    hidden_dim: int | None = at_least(1, None)


@register_projector("pool")
class PoolProjector(ProjectorKind):
    """Adaptive 2D average pooling to `target_grid`, then `mlp2x_gelu`."""

    options_class = PoolOptions
    needs_grid = True
    reference = "2D average pooling (LLaVA-OneVision / LLaVA-NeXT-Video style)"
    tokens = "h' * w' (target_grid)"

    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__()
        self.target_grid = config.options.target_grid
        self.mlp = build_mlp(config.fused_dim, config.hidden_width, config.out_dim, 2, config.bias)

    def _check(self, grid: tuple[int, int]) -> None:
        if self.target_grid[0] > grid[0] or self.target_grid[1] > grid[1]:
            raise ValueError(
                f"pool target_grid {self.target_grid} is larger than the input grid {grid}; pooling only shrinks"
            )

    def num_output_tokens(self, num_tokens: int, grid: tuple[int, int] | None) -> int:
        assert grid is not None
        self._check(grid)
        return self.target_grid[0] * self.target_grid[1]

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
        assert grid is not None
        self._check(grid)
        pooled = F.adaptive_avg_pool2d(tokens_to_grid(x, grid), self.target_grid)  # (B, C, h', w')
        return self.mlp(grid_to_tokens(pooled))  # (B, h'*w', out_dim)
