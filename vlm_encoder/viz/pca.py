"""Patch features to RGB through their first three principal components.

The picture people use to see what a ViT layer encodes: every patch token is projected on
the three directions of largest variance, and each direction becomes a colour channel.
Several images share one basis, so the same colour means the same feature in all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Scaling = Literal["percentile", "minmax"]
SCALINGS: tuple[str, ...] = ("percentile", "minmax")


@dataclass(frozen=True)
class PcaBasis:
    """A fitted principal-component basis with the colour range of each component.

    Attributes:
        mean: Feature mean `(D,)` removed before projecting.
        components: Principal directions `(k, D)`, unit rows, largest variance first, signs
            fixed so that each row's largest-magnitude entry is positive.
        low: Per-component value mapped to 0 `(k,)`.
        high: Per-component value mapped to 1 `(k,)`.
    """

    mean: torch.Tensor
    components: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens `(..., D)` to component scores `(..., k)` (not scaled)."""
        return (tokens.float() - self.mean) @ self.components.T

    def colors(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens `(..., D)` to colours `(..., k)` in `[0, 1]` (clipped outside the fitted range)."""
        span = (self.high - self.low).clamp_min(1e-12)
        return ((self.project(tokens) - self.low) / span).clamp(0.0, 1.0)


def _check_tokens(patch_tokens: torch.Tensor, grid: tuple[int, int] | None = None) -> None:
    if not isinstance(patch_tokens, torch.Tensor) or patch_tokens.ndim != 3:
        shape = tuple(patch_tokens.shape) if isinstance(patch_tokens, torch.Tensor) else type(patch_tokens).__name__
        raise ValueError(f"patch_tokens must be a tensor (B, N, D), got {shape}")
    if grid is not None:
        h, w = grid
        if h * w != patch_tokens.shape[1]:
            raise ValueError(
                f"grid {tuple(grid)} has {h * w} patches but patch_tokens has N={patch_tokens.shape[1]} (B, N, D)"
            )


def fit_pca_basis(
    patch_tokens: torch.Tensor,
    num_components: int = 3,
    scaling: Scaling = "percentile",
    percentile: float = 1.0,
) -> PcaBasis:
    """Fit one principal-component basis over the patches of all given images.

    Exact SVD (not randomised), so the result is deterministic; each component's sign is
    fixed so that its largest-magnitude loading is positive (as scikit-learn's `svd_flip`).

    Args:
        patch_tokens: Patch tokens `(B, N, D)`; all `B * N` patches are pooled.
        num_components: Components to keep `k` (3 for RGB).
        scaling: How component scores map to `[0, 1]`: `percentile` (robust to outlier
            patches: the `percentile`-th and `100 - percentile`-th values map to 0 and 1)
            or `minmax`.
        percentile: Tail cut in percent for `percentile` scaling, in `[0, 50)`.

    Returns:
        The fitted `PcaBasis`.

    Raises:
        ValueError: A wrong shape, too few patches or channels for `k` components, or an
            unknown scaling.
    """
    _check_tokens(patch_tokens)
    if scaling not in SCALINGS:
        raise ValueError(f"scaling={scaling!r} is not supported; allowed: {', '.join(SCALINGS)}")
    if not 0.0 <= percentile < 50.0:
        raise ValueError(f"percentile must be in [0, 50), got {percentile}")
    B, N, D = patch_tokens.shape
    if min(B * N, D) < num_components:
        raise ValueError(
            f"{num_components} principal components need at least {num_components} patches and channels; "
            f"got {B * N} patches of width {D}"
        )
    flat = patch_tokens.detach().reshape(B * N, D).float().cpu()  # (B*N, D)
    mean = flat.mean(dim=0)
    # float64 SVD: stable and bit-reproducible enough for a picture.
    _, _, vh = torch.linalg.svd((flat - mean).double(), full_matrices=False)
    components = vh[:num_components]  # (k, D)
    pivot = components.abs().argmax(dim=1, keepdim=True)
    signs = torch.sign(components.gather(1, pivot)).clamp_min(0) * 2 - 1  # +-1, never 0
    components = (components * signs).float()
    scores = (flat - mean) @ components.T  # (B*N, k)
    if scaling == "minmax":
        low, high = scores.min(dim=0).values, scores.max(dim=0).values
    else:
        q = torch.tensor([percentile / 100.0, 1.0 - percentile / 100.0])
        low, high = torch.quantile(scores, q, dim=0)
    return PcaBasis(mean=mean, components=components, low=low, high=high)


def pca_rgb(
    patch_tokens: torch.Tensor,
    grid: tuple[int, int],
    scaling: Scaling = "percentile",
    percentile: float = 1.0,
    basis: PcaBasis | None = None,
) -> torch.Tensor:
    """Colour the patches of several images by their first three principal components.

    Args:
        patch_tokens: Patch tokens `(B, N, D)` in row-major order (`EncoderOutput.patches`).
        grid: The patch grid `(h, w)`, `h * w = N`.
        scaling: `percentile` or `minmax` mapping of each component to `[0, 1]`.
        percentile: Tail cut in percent for `percentile` scaling.
        basis: A basis fitted before (e.g. on other images); default: fit one shared
            basis over all `B` images given.

    Returns:
        RGB maps `(B, h, w, 3)` in `[0, 1]`, float32 on the CPU.
    """
    _check_tokens(patch_tokens, grid)
    if basis is None:
        basis = fit_pca_basis(patch_tokens, 3, scaling=scaling, percentile=percentile)
    if basis.components.shape[0] != 3:
        raise ValueError(f"pca_rgb needs a 3-component basis, got {basis.components.shape[0]} components")
    B = patch_tokens.shape[0]
    h, w = grid
    rgb = basis.colors(patch_tokens.detach().float().cpu())  # (B, N, 3)
    return rgb.reshape(B, h, w, 3)
