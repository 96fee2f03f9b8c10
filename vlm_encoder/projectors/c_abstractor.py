"""`c_abstractor`: RegNet stages, adaptive pooling, RegNet stages, MLP readout.

Honeybee's C-Abstractor (Cha et al. 2024, "Honeybee: Locality-enhanced Projector for
Multimodal LLM"), built as Honeybee builds it from timm: `depth` RegNet bottleneck blocks
(`timm.models.regnet.RegStage`: 1x1 conv, depthwise 3x3 conv, squeeze-excitation, 1x1 conv,
residual; LayerNorm2d and SiLU) at the input grid keep locality, adaptive average pooling
sets the token count `M = h' * w'`, `depth` more blocks, then the readout `Linear, SiLU,
Linear`. Honeybee's learned position embedding on the input tokens is the option
`pos_embed_grid` (off by default: the encoder's tokens already carry their position).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from timm.models.regnet import RegStage
from torch import nn

from ..specs.options import at_least
from .config import KindOptions, ProjectorConfig, grid_field
from .kind import ProjectorKind, grid_to_tokens, tokens_to_grid
from .registry import register_projector


def reg_stage(depth: int, in_channels: int, out_channels: int) -> RegStage:
    """Honeybee's `RegBlock`: a stride-1 timm RegNet stage with SiLU and LayerNorm2d."""
    return RegStage(depth, in_channels, out_channels, stride=1, dilation=1, act_layer=nn.SiLU, norm_layer=LayerNorm2d)


@dataclass(frozen=True)
class CAbstractorOptions(KindOptions):
    """`c_abstractor`.

    Attributes:
        target_grid: Output grid `(h', w')` of the adaptive pooling (an int means square).
        depth: RegNet bottleneck blocks in each of the two stages (before and after pooling).
        hidden_dim: Channels of the RegNet stages (default `out_dim`).
        pos_embed_grid: A learned position embedding for an input grid `(h, w)` added to the
            tokens first (Honeybee's `pos_emb`); another input grid gets it resampled
            (bicubic). `None`: none.
    """

    target_grid: tuple[int, int] = grid_field()
    depth: int = at_least(1, 2)
    hidden_dim: int | None = at_least(1, None)
    pos_embed_grid: tuple[int, int] | None = grid_field(None)


@register_projector("c_abstractor")
class CAbstractorProjector(ProjectorKind):
    """`depth` RegNet blocks at the input grid, adaptive average pooling to `target_grid`,
    `depth` RegNet blocks, then `Linear(hidden, out), SiLU, Linear(out, out)`."""

    options_class = CAbstractorOptions
    needs_grid = True
    reference = "Honeybee C-Abstractor (Cha et al. 2024)"
    tokens = "h' * w' (target_grid)"

    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__()
        options: CAbstractorOptions = config.options
        hidden = config.hidden_width
        self.target_grid = options.target_grid
        self.pos_embed = None  # (1, h*w, C) for pos_embed_grid (h, w), Honeybee's init
        if options.pos_embed_grid is not None:
            h, w = options.pos_embed_grid
            self.pos_embed = nn.Parameter(torch.zeros(1, h * w, config.fused_dim))
            nn.init.trunc_normal_(self.pos_embed, mean=0.0, std=0.02)
        self.pos_embed_grid = options.pos_embed_grid
        self.stage1 = reg_stage(options.depth, config.fused_dim, hidden)
        self.stage2 = reg_stage(options.depth, hidden, hidden)
        self.readout = nn.Sequential(
            nn.Linear(hidden, config.out_dim, bias=config.bias),
            nn.SiLU(),
            nn.Linear(config.out_dim, config.out_dim, bias=config.bias),
        )

    def num_output_tokens(self, num_tokens: int, grid: tuple[int, int] | None) -> int:
        return self.target_grid[0] * self.target_grid[1]

    def _pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position embedding `(1, h*w, C)` on `grid`, resampled (bicubic) from its own."""
        assert self.pos_embed is not None and self.pos_embed_grid is not None
        if grid == tuple(self.pos_embed_grid):
            return self.pos_embed
        table = tokens_to_grid(self.pos_embed, self.pos_embed_grid)  # (1, C, h, w)
        return grid_to_tokens(F.interpolate(table.float(), size=grid, mode="bicubic", align_corners=False))

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
        assert grid is not None
        if self.pos_embed is not None:
            x = x + self._pos_embed_for(tuple(grid)).to(x.dtype)
        y = self.stage1(tokens_to_grid(x, grid))  # (B, hidden, h, w)
        y = self.stage2(F.adaptive_avg_pool2d(y, self.target_grid))  # (B, hidden, h', w')
        return self.readout(grid_to_tokens(y))  # (B, h'*w', out_dim)
