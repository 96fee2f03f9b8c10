"""`pool`: 2D average pooling of the patch grid to a target size, then an MLP.

As the average-pooling projectors of LLaVA-OneVision / LLaVA-NeXT-Video (spatial pooling
of the patch grid) and the "pooling" baseline of Honeybee's study: `M = h' * w'`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import ProjectorConfig
from .kind import ProjectorKind, build_mlp, grid_to_tokens, tokens_to_grid
from .registry import register_projector


@register_projector("pool")
class PoolProjector(ProjectorKind):
    """Adaptive 2D average pooling to `target_grid`, then `mlp2x_gelu`."""

    options = ("target_grid", "hidden_dim")
    needs_grid = True
    reference = "2D average pooling (LLaVA-OneVision / LLaVA-NeXT-Video style)"
    tokens = "h' * w' (target_grid)"

    @classmethod
    def validate(cls, config: ProjectorConfig) -> None:
        if config.target_grid is None:
            raise ValueError("kind='pool' needs target_grid, the output grid (h', w') or an int for a square grid")

    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__()
        assert config.target_grid is not None
        self.target_grid = config.target_grid
        self.mlp = build_mlp(config.fused_dim, config.mlp_hidden_dim, config.out_dim, 2, config.bias)

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
