"""Patch embedding: a convolution with kernel = stride = patch size, and FlexiViT resizing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..determinism import batch_invariant_call


class PatchEmbed(nn.Module):
    """Cut an image (or a stem feature map) into patches and project each to width `D`.

    Args:
        in_channels: Input channels `C`.
        dim: Output token width `D`.
        patch_size: Patch side `p` (kernel and stride of the convolution).
        bias: Bias on the projection.
    """

    def __init__(self, in_channels: int, dim: int, patch_size: int, bias: bool = True) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """`(B, C, H, W) -> (B, N, D)` tokens in row-major order, with the grid `(H/p, W/p)`."""
        x = batch_invariant_call(self.proj, x)  # (B, D, h, w); small convolutions may round by batch size
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid  # (B, h*w, D)


def _resize_matrix(old: int, new: int, mode: str, antialias: bool) -> torch.Tensor:
    """Matrix `(new*new, old*old)` that resizes a flattened `old x old` patch (float64)."""
    eye = torch.eye(old * old, dtype=torch.float64).reshape(old * old, 1, old, old)
    resized = F.interpolate(eye, size=(new, new), mode=mode, align_corners=False, antialias=antialias)
    return resized.reshape(old * old, new * new).T


def resample_patch_projection(
    weight: torch.Tensor, new_patch_size: int, mode: str = "bicubic", antialias: bool = True
) -> torch.Tensor:
    """Resize a patch-embedding kernel to a new patch size (FlexiViT's pseudo-inverse resize).

    The new kernel `w'` is chosen so that `<x, w> = <resize(x), w'>` for every patch `x`
    in the least-squares sense: `w' = pinv(R)^T w` with `R` the resize matrix
    (bicubic, antialiased, as timm's `resample_patch_embed`).

    Args:
        weight: Kernel `(D, C, p, p)`.
        new_patch_size: `p'`.
        mode: Interpolation of the resize that `R` models.
        antialias: Antialias that resize when shrinking.

    Returns:
        Kernel `(D, C, p', p')` in the input dtype.
    """
    old = weight.shape[-1]
    if weight.shape[-2] != old:
        raise ValueError(f"patch kernel must be square, got {tuple(weight.shape[-2:])}")
    if new_patch_size == old:
        return weight
    resize = _resize_matrix(old, new_patch_size, mode, antialias)  # (p'^2, p^2)
    pinv = torch.linalg.pinv(resize.T)  # (p'^2, p^2)
    D, C = weight.shape[:2]
    flat = weight.double().reshape(D * C, old * old)  # (D*C, p^2)
    new = flat @ pinv.T  # (D*C, p'^2)
    return new.reshape(D, C, new_patch_size, new_patch_size).to(weight.dtype)
