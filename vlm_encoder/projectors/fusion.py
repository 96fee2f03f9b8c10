"""Fusing several streams of vision tokens: layers of one encoder, or several encoders.

Each stream is `(B, N_i, D_i)` tokens, on a patch grid `(h_i, w_i)` when known. Streams
are brought to a common grid, then fused on the channel axis:

* `concat`: `(B, N, sum D_i)`, the semantics of LLaVA's `vision_feature_layer` list in
  transformers (`torch.cat(hidden_states, dim=-1)`).
* `weighted_sum`: `sum_i softmax(w)_i * x_i` with learned `w` (initialised to zeros, i.e.
  the mean; ELMo's scalar mix), for streams of equal width.

The common grid is `fusion_grid`, or the first stream's grid when that is `None`. A stream
on another grid (e.g. DINOv2 at 16x16 next to CLIP at 24x24) is resampled with bilinear
interpolation on its `(B, D, h, w)` feature map (antialiased when shrinking), so patch
counts that differ between encoders fuse without error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ProjectorConfig
from .kind import grid_to_tokens, tokens_to_grid

Grid = tuple[int, int]


@dataclass
class TokenStream:
    """One input stream: tokens `(B, N, D)` and their patch grid `(h, w)` (`None`: unknown,
    or the tokens include prefix tokens such as CLS)."""

    tokens: torch.Tensor
    grid: Grid | None = None


def resample_tokens(tokens: torch.Tensor, grid: Grid, new_grid: Grid) -> torch.Tensor:
    """Resample row-major patch tokens `(B, h*w, D)` on `grid` to `(B, h'*w', D)` on `new_grid`.

    Bilinear interpolation of the feature map (`align_corners=False`), antialiased when a
    side shrinks; computed in float32 and cast back.
    """
    if tuple(grid) == tuple(new_grid):
        return tokens
    shrinking = new_grid[0] < grid[0] or new_grid[1] < grid[1]
    fmap = tokens_to_grid(tokens.float(), grid)  # (B, D, h, w)
    fmap = F.interpolate(fmap, size=tuple(new_grid), mode="bilinear", align_corners=False, antialias=shrinking)
    return grid_to_tokens(fmap).to(tokens.dtype)  # (B, h'*w', D)


class FeatureFusion(nn.Module):
    """Brings the input streams to a common grid and fuses them (see the module docstring)."""

    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__()
        self.in_dims = config.in_dims
        self.mode = config.fusion
        self.fusion_grid = config.fusion_grid
        self.layer_weights = (
            nn.Parameter(torch.zeros(len(self.in_dims))) if self.mode == "weighted_sum" and len(self.in_dims) > 1 else None
        )

    def _align(self, streams: list[TokenStream]) -> tuple[list[torch.Tensor], Grid | None]:
        target = self.fusion_grid or streams[0].grid
        if target is None:
            counts = [s.tokens.shape[1] for s in streams]
            if len(set(counts)) > 1:
                raise ValueError(
                    f"the input streams have different token counts {counts} and no patch grid; pass grid_size "
                    "(one (h, w) per stream) so they can be resampled to a common grid"
                )
            return [s.tokens for s in streams], None
        aligned = []
        for i, stream in enumerate(streams):
            grid, n = stream.grid, stream.tokens.shape[1]
            if grid is None:
                if n != target[0] * target[1]:
                    raise ValueError(
                        f"input stream {i} has {n} tokens and no patch grid, so it cannot be resampled to the "
                        f"common grid {target[0]}x{target[1]}; pass its grid_size (prefix tokens such as CLS "
                        "cannot be resampled: use patch tokens only)"
                    )
                grid = target
            aligned.append(resample_tokens(stream.tokens, grid, target))
        return aligned, target

    def forward(self, streams: list[TokenStream]) -> tuple[torch.Tensor, Grid | None]:
        """Fuse the streams.

        Returns:
            Tokens `(B, N, C)` (`C` the summed widths for `concat`) and their grid, or `None`
            when no stream had one.
        """
        batch = {s.tokens.shape[0] for s in streams}
        if len(batch) > 1:
            raise ValueError(f"the input streams have different batch sizes {sorted(batch)}")
        tokens, grid = self._align(streams)
        if len(tokens) == 1:
            return tokens[0], grid
        if self.mode == "concat":
            return torch.cat(tokens, dim=-1), grid  # (B, N, sum D_i)
        weights = self.layer_weights.softmax(0).to(tokens[0].dtype)  # (k,)
        return torch.einsum("k,kbnd->bnd", weights, torch.stack(tokens)), grid  # (B, N, D)
