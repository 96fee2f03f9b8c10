"""Shared pieces of the per-layer parity tests: weights moved off their init values, and an
`assert_close` that remembers the largest difference of each case (printed at the end of a
verbose run, `pytest -v`, for the figures docs/towers.md quotes)."""

from __future__ import annotations

import torch

ATOL = 1e-5
MEASURED: dict[str, float] = {}  # case -> max abs diff seen


def perturb(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Move every weight off its init value (norms, LayerScale, tokens, biases), so that a wrong
    mapping shows; returns the model in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model.eval()


def close(case: str, ours: torch.Tensor, ref: torch.Tensor, what: str, atol: float = ATOL) -> None:
    """`assert_close` within `atol`, recording the case's largest difference in `MEASURED`."""
    diff = float((ours - ref).abs().max())
    MEASURED[case] = max(MEASURED.get(case, 0.0), diff)
    torch.testing.assert_close(ours, ref, atol=atol, rtol=0, msg=f"{case}: {what} (max diff {diff:.2e})")
