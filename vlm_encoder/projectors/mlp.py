"""Per-token projectors: `linear` (LLaVA-1), `mlp{N}x_gelu` (LLaVA-1.5), `identity`.

Each maps every input token on its own, so `M = N` and prefix tokens (CLS) are fine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..specs.options import at_least
from .config import KindOptions, ProjectorConfig
from .kind import ProjectorKind, build_mlp
from .registry import register_projector

MLP_PATTERN = r"mlp(\d+)x_gelu"


def mlp_depth(kind: str) -> int:
    """Number of Linear layers of a `linear` / `mlp{N}x_gelu` kind."""
    if kind == "linear":
        return 1
    match = re.fullmatch(MLP_PATTERN, kind)
    if match is None:
        raise ValueError(f"{kind!r} is not an MLP kind (linear or mlp{{N}}x_gelu)")
    return int(match.group(1))


@dataclass(frozen=True)
class MLPOptions(KindOptions):
    """`mlp{N}x_gelu`.

    Attributes:
        hidden_dim: Width of the hidden layers (default `out_dim`, as LLaVA's `mlp2x_gelu`).
    """

    hidden_dim: int | None = at_least(1, None)


class _PerTokenMLP(ProjectorKind):
    """Shared body of `linear` and `mlp{N}x_gelu`: `mlp` is LLaVA's `mm_projector` layout."""

    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__()
        self.mlp = build_mlp(config.fused_dim, config.hidden_width, config.out_dim, mlp_depth(config.kind), config.bias)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
        return self.mlp(x)  # (B, N, out_dim)


@register_projector("linear")
class LinearProjector(_PerTokenMLP):
    """One Linear layer per token (LLaVA-1, Liu et al. 2023, "Visual Instruction Tuning")."""

    reference = "LLaVA-1 (Liu et al. 2023)"
    tokens = "N"


@register_projector("mlp{N}x_gelu", pattern=MLP_PATTERN)
class MLPProjector(_PerTokenMLP):
    """`N` Linear layers with GELU between them (LLaVA-1.5's `mlp2x_gelu`: Linear, GELU, Linear;
    Liu et al. 2023, "Improved Baselines with Visual Instruction Tuning")."""

    options_class = MLPOptions
    reference = "LLaVA-1.5 (Liu et al. 2023)"
    tokens = "N"

    @classmethod
    def validate(cls, config: ProjectorConfig) -> None:
        if mlp_depth(config.kind) < 1:
            raise ValueError(f"{config.kind!r}: an MLP needs at least one Linear layer (mlp1x_gelu or more)")


@register_projector("identity")
class IdentityProjector(ProjectorKind):
    """No parameters: the fused tokens pass through (for an encoder already at the LLM's width)."""

    reference = "LLaVA's `identity` projector"
    tokens = "N"

    @classmethod
    def validate(cls, config: ProjectorConfig) -> None:
        if config.fused_dim != config.out_dim:
            raise ValueError(
                f"kind='identity' needs the fused input width to equal out_dim, got {config.fused_dim} "
                f"(in_dim={config.in_dim}, fusion={config.fusion!r}) and out_dim={config.out_dim}"
            )

    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__()
        self.identity = nn.Identity()

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
        return self.identity(x)
