"""`Projector`: fuse vision token streams and map them to an LLM's width.

`Projector(config)` = `FeatureFusion` (several layers or encoders to one stream) + the
registered kind (`linear`, `mlp2x_gelu`, `pixel_shuffle`, ...). `save_pretrained(dir)` /
`Projector.from_pretrained(dir)` write and read `config.json` + `model.safetensors`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..output import EncoderOutput
from ..pretrained import PretrainedMixin

from .config import ProjectorConfig
from .fusion import FeatureFusion, Grid, TokenStream
from .registry import projector_class

Features = torch.Tensor | EncoderOutput | Sequence[torch.Tensor | EncoderOutput]

# `build_projector` options every kind takes; the others are the kind's `options_class` fields.
COMMON_OPTIONS = ("fusion", "fusion_grid", "bias")


def _is_pair(value: object) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value)


class Projector(PretrainedMixin, nn.Module):
    """Vision tokens `(B, N, D_in)` (one or several streams) to LLM tokens `(B, M, out_dim)`.

    Args:
        config: The projector; build one with `projectors.build_projector(kind, in_dim, out_dim, ...)`.

    Example:
        >>> proj = build_projector("mlp2x_gelu", in_dim=(1024, 1024), out_dim=4096)
        >>> out = encoder(pixels, layers=(-2, -5))
        >>> proj(out).shape  # (B, 576, 4096): the two layers concatenated, then the MLP
    """

    config_class = ProjectorConfig
    model_type = "vlm_encoder.projector"

    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__()
        if not isinstance(config, ProjectorConfig):
            raise TypeError(f"config must be a ProjectorConfig, got {type(config).__name__}")
        self.config = config
        self.fusion = FeatureFusion(config)
        self.body = projector_class(config.kind)(config)

    @property
    def out_dim(self) -> int:
        return self.config.out_dim

    # ----------------------------------------------------------------- inputs
    def _streams(self, features: Features, grid_size: Grid | Sequence[Grid | None] | None) -> list[TokenStream]:
        items = [features] if isinstance(features, (torch.Tensor, EncoderOutput)) else list(features)
        n_tensors = sum(isinstance(item, torch.Tensor) for item in items)
        if grid_size is None or _is_pair(grid_size):
            tensor_grids = [tuple(grid_size) if grid_size is not None else None] * n_tensors
        else:
            tensor_grids = [tuple(g) if g is not None else None for g in grid_size]
            if len(tensor_grids) != n_tensors:
                raise ValueError(f"grid_size has {len(tensor_grids)} entries for {n_tensors} tensor inputs")
        streams: list[TokenStream] = []
        grids = iter(tensor_grids)
        for item in items:
            if isinstance(item, EncoderOutput):
                streams += [TokenStream(p, item.grid_size) for p in item.patch_tokens]
            elif isinstance(item, torch.Tensor):
                if item.ndim != 3:
                    raise ValueError(f"vision tokens must be (B, N, D), got shape {tuple(item.shape)}")
                streams.append(TokenStream(item, next(grids)))
            else:
                raise TypeError(f"features must be tensors (B, N, D) or EncoderOutputs, got {type(item).__name__}")
        c = self.config
        if len(streams) != c.num_inputs:
            raise ValueError(
                f"this projector fuses {c.num_inputs} input stream(s) (in_dim={c.in_dim}), got {len(streams)}; "
                "an EncoderOutput contributes one stream per requested layer"
            )
        for i, (stream, width) in enumerate(zip(streams, c.in_dims)):
            if stream.tokens.shape[-1] != width:
                raise ValueError(f"input stream {i} has width {stream.tokens.shape[-1]}, the projector expects {width} (in_dim={c.in_dim})")
            if stream.grid is not None and stream.grid[0] * stream.grid[1] != stream.tokens.shape[1]:
                raise ValueError(f"input stream {i} has {stream.tokens.shape[1]} tokens, its grid {stream.grid} has {stream.grid[0] * stream.grid[1]}")
        return streams

    def _body_grid(self, num_tokens: int, grid: Grid | None) -> Grid | None:
        """The grid the kind works on; a square grid is assumed for `N = s^2` tokens without one."""
        if grid is not None or not self.body.needs_grid:
            return grid
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(
                f"kind {self.config.kind!r} works on the patch grid, but {num_tokens} tokens form no square grid and "
                "none was given: pass grid_size=(h, w), and only patch tokens (feature_select='patch')"
            )
        return (side, side)

    # ---------------------------------------------------------------- forward
    def forward(self, features: Features, grid_size: Grid | Sequence[Grid | None] | None = None) -> torch.Tensor:
        """Project vision tokens.

        Args:
            features: Tokens `(B, N, D)`, an `EncoderOutput` (each requested layer is one
                stream, its patch tokens on its grid), or a sequence of those (several
                layers or encoders, in the order of `config.in_dim`).
            grid_size: Patch grid `(h, w)` of the tensor inputs (one for all, or one per
                tensor); needed to resample streams on different grids and by the grid kinds
                (a square grid is assumed when omitted and `N` is a square).

        Returns:
            `(B, M, out_dim)`; `M` is given by `num_output_tokens`.
        """
        x, grid = self.fusion(self._streams(features, grid_size))  # (B, N, C)
        return self.body(x, self._body_grid(x.shape[1], grid))

    def num_output_tokens(self, grid_size: Grid | None = None, num_tokens: int | None = None) -> int:
        """How many tokens `M` the projector outputs.

        Args:
            grid_size: Patch grid `(h, w)` of the (first) input stream.
            num_tokens: Tokens per stream when there is no grid (e.g. CLS + patches).
        """
        grid = self.config.fusion_grid or (tuple(grid_size) if grid_size is not None else None)
        if num_tokens is None:
            if grid is None:
                raise ValueError("give grid_size=(h, w) or num_tokens")
            num_tokens = grid[0] * grid[1]
        elif self.config.fusion_grid is not None:
            num_tokens = grid[0] * grid[1]
        return self.body.num_output_tokens(num_tokens, self._body_grid(num_tokens, grid))

    def extra_repr(self) -> str:
        c = self.config
        return f"kind={c.kind!r}, in_dim={c.in_dim}, out_dim={c.out_dim}, fusion={c.fusion!r}"


def build_projector(kind: str, in_dim: int | tuple[int, ...], out_dim: int, **options: Any) -> Projector:
    """Build a projector of a registered kind.

    Args:
        kind: e.g. `linear`, `mlp2x_gelu`, `identity`, `pixel_shuffle`, `pool`, `resampler`,
            `c_abstractor` (see `list_projectors()`).
        in_dim: Input token width, or one width per input stream (layers or encoders).
        out_dim: The LLM's hidden size.
        **options: `fusion`, `fusion_grid`, `bias`, and the fields of the kind's options
            (e.g. `PoolOptions`: `target_grid`, `hidden_dim`).

    Returns:
        A randomly initialised `Projector`.

    Raises:
        ValueError: Unknown kind, an option the kind does not take, or invalid values.
    """
    allowed = [*COMMON_OPTIONS, *projector_class(kind).option_names()]
    unused = sorted(set(options) - set(allowed))
    if unused:
        raise ValueError(f"option(s) {unused} do not apply to kind {kind!r}; its options are: {', '.join(allowed)}")
    common = {name: options.pop(name) for name in COMMON_OPTIONS if name in options}
    return Projector(ProjectorConfig(kind=kind, in_dim=in_dim, out_dim=out_dim, **common, options=options))
