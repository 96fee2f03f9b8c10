"""Weight initialisation shared by the transformer towers."""

from __future__ import annotations

from torch import nn

from .clipped import ClippedLinear


def init_linears_and_norms(module: nn.Module, std: float = 0.02) -> None:
    """Truncated normal (`std`) for every Linear (and `ClippedLinear`) weight, zeros for its bias; LayerNorm to the
    identity (ones, zeros). Modules are visited in `module.modules()` order."""
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, ClippedLinear)):
            nn.init.trunc_normal_(sub.weight, std=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)
