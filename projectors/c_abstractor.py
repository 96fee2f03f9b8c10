"""`c_abstractor`: convolutional blocks, adaptive pooling, convolutional blocks, MLP.

Honeybee's C-Abstractor (Cha et al. 2024, "Honeybee: Locality-enhanced Projector for
Multimodal LLM"): residual conv blocks keep locality, adaptive average pooling sets the
token count `M = h' * w'`, then a readout MLP. Honeybee's blocks are RegNet bottlenecks
with squeeze-excitation; here they are plain residual bottlenecks (1x1, 3x3, 1x1 convs with
LayerNorm2d and SiLU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

from .config import ProjectorConfig
from .kind import ProjectorKind, build_mlp, grid_to_tokens, tokens_to_grid
from .registry import register_projector


class ConvResBlock(nn.Module):
    """Residual bottleneck `(B, C_in, h, w) -> (B, C_out, h, w)`."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.norm1 = LayerNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = LayerNorm2d(out_channels)
        self.conv3 = nn.Conv2d(out_channels, out_channels, 1, bias=False)
        self.norm3 = LayerNorm2d(out_channels)
        self.shortcut = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), LayerNorm2d(out_channels))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.silu(self.norm1(self.conv1(x)))
        y = F.silu(self.norm2(self.conv2(y)))
        y = self.norm3(self.conv3(y))
        return F.silu(y + self.shortcut(x))


@register_projector("c_abstractor")
class CAbstractorProjector(ProjectorKind):
    """`depth` conv blocks at the input grid, adaptive average pooling to `target_grid`,
    `depth` conv blocks, then `mlp2x_gelu` to `out_dim`."""

    options = ("target_grid", "depth", "hidden_dim")
    needs_grid = True
    reference = "Honeybee C-Abstractor (Cha et al. 2024)"
    tokens = "h' * w' (target_grid)"

    @classmethod
    def validate(cls, config: ProjectorConfig) -> None:
        if config.target_grid is None:
            raise ValueError("kind='c_abstractor' needs target_grid, the output grid (h', w') or an int for a square grid")

    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__()
        assert config.target_grid is not None
        hidden = config.mlp_hidden_dim
        self.target_grid = config.target_grid
        self.stage1 = nn.Sequential(
            *(ConvResBlock(config.fused_dim if i == 0 else hidden, hidden) for i in range(config.depth))
        )
        self.stage2 = nn.Sequential(*(ConvResBlock(hidden, hidden) for _ in range(config.depth)))
        self.readout = build_mlp(hidden, config.out_dim, config.out_dim, 2, config.bias)

    def num_output_tokens(self, num_tokens: int, grid: tuple[int, int] | None) -> int:
        return self.target_grid[0] * self.target_grid[1]

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
        assert grid is not None
        y = self.stage1(tokens_to_grid(x, grid))  # (B, hidden, h, w)
        y = self.stage2(F.adaptive_avg_pool2d(y, self.target_grid))  # (B, hidden, h', w')
        return self.readout(grid_to_tokens(y))  # (B, h'*w', out_dim)
