"""`ProjectorKind`: the interface every projector kind implements, and the shared MLP."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from .config import KindOptions, ProjectorConfig


class ProjectorKind(nn.Module):
    """Maps fused vision tokens `(B, N, C)` on a grid `(h, w)` to `(B, M, out_dim)`.

    Subclasses set the class attributes below (they feed `list_projectors()` and the docs)
    and are registered with `register_projector`.

    Attributes:
        options_class: The kind's own options (`config.options`), a `KindOptions` subclass;
            `build_projector` takes its fields as keywords, any other option is an error.
        needs_grid: The kind works on the 2D patch grid (it cannot take prefix tokens such
            as CLS, and needs `h * w == N`).
        reference: The paper or system the kind follows.
        tokens: How many output tokens `M` it gives for `N` input tokens.
    """

    options_class: ClassVar[type[KindOptions]] = KindOptions
    needs_grid: ClassVar[bool] = False
    reference: ClassVar[str] = ""
    tokens: ClassVar[str] = "N"

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls.options_class)]

    @classmethod
    def validate(cls, config: ProjectorConfig) -> None:
        """Raise `ValueError` for options that do not fit the config's common fields (called by
        the config; each field on its own is checked by its type)."""

    def num_output_tokens(self, num_tokens: int, grid: tuple[int, int] | None) -> int:
        """`M` for `num_tokens` fused input tokens on `grid` (default: one per input)."""
        return num_tokens

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


def build_mlp(in_dim: int, hidden_dim: int, out_dim: int, num_linear: int, bias: bool = True) -> nn.Sequential:
    """LLaVA's `mlp{N}x_gelu` layout: Linear, then (GELU, Linear) N-1 times.

    The indices of the `nn.Sequential` are those of LLaVA's `mm_projector` (0, 2, 4, ...), so
    its weights load by name. With `num_linear == 1` it is a single Linear (LLaVA-1).
    """
    if num_linear == 1:
        return nn.Sequential(nn.Linear(in_dim, out_dim, bias=bias))
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=bias)]
    for i in range(1, num_linear):
        layers += [nn.GELU(), nn.Linear(hidden_dim, out_dim if i == num_linear - 1 else hidden_dim, bias=bias)]
    return nn.Sequential(*layers)


def tokens_to_grid(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Row-major tokens `(B, h*w, C)` to a feature map `(B, C, h, w)`."""
    B, _, C = x.shape
    return x.transpose(1, 2).reshape(B, C, grid[0], grid[1])


def grid_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """A feature map `(B, C, h, w)` to row-major tokens `(B, h*w, C)`."""
    return x.flatten(2).transpose(1, 2)
