"""Convolutional stem of the hybrid ViT: ResNet stages whose feature map is patchified.

The layout follows BiT / timm's `ResNetV2(preact=False)` used by `vit_base_r50_s16_224`:
weight-standardised convolutions with TF-style "same" padding, GroupNorm(32), a 7x7 / 2 root
convolution and a 3x3 / 2 max pool, then bottleneck stages (the first at stride 1, the
others at stride 2). With stages `(3, 4, 9)` the stem has stride 16 and 1024 channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def pad_same(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """TF "same" padding of `(B, C, H, W)` for a square kernel and stride."""
    top, bottom = _same_padding(x.shape[-2], kernel, stride)
    left, right = _same_padding(x.shape[-1], kernel, stride)
    if top or bottom or left or right:
        x = F.pad(x, (left, right, top, bottom), value=value)
    return x


class StdConv2d(nn.Conv2d):
    """Conv2d with weight standardisation (zero mean, unit variance per output filter)
    and TF "same" padding (BiT)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, eps: float = 1e-8) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, bias=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.kernel_size[0], self.stride[0])
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0, eps=self.eps
        ).reshape_as(self.weight)
        return F.conv2d(x, weight, None, self.stride)


class GroupNormAct(nn.GroupNorm):
    """GroupNorm(32) followed by an optional ReLU."""

    def __init__(self, channels: int, act: bool = True, eps: float = 1e-5) -> None:
        super().__init__(32, channels, eps=eps)
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class Downsample(nn.Module):
    """Shortcut projection: 1x1 standardised conv with stride, GroupNorm without activation."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv = StdConv2d(in_channels, out_channels, 1, stride=stride)
        self.norm = GroupNormAct(out_channels, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """Post-activation bottleneck: 1x1, 3x3 (with the stride), 1x1, residual, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        mid = out_channels // 4
        needs_proj = stride != 1 or in_channels != out_channels
        self.downsample = Downsample(in_channels, out_channels, stride) if needs_proj else None
        self.conv1 = StdConv2d(in_channels, mid, 1)
        self.norm1 = GroupNormAct(mid)
        self.conv2 = StdConv2d(mid, mid, 3, stride=stride)
        self.norm2 = GroupNormAct(mid)
        self.conv3 = StdConv2d(mid, out_channels, 1)
        self.norm3 = GroupNormAct(out_channels, act=False)
        self.act3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.norm1(self.conv1(x))
        x = self.norm2(self.conv2(x))
        x = self.norm3(self.conv3(x))
        return self.act3(x + shortcut)


class ResNetStem(nn.Module):
    """ResNet feature extractor used as the hybrid ViT's stem.

    Args:
        in_channels: Image channels.
        layers: Bottleneck blocks per stage, e.g. `(3, 4, 9)`.
        width: Channels of the root convolution (64 for R50); stage `i` outputs
            `4 * width * 2**i` channels.

    Attributes:
        out_channels: Channels of the output feature map.
        stride: Total downsampling factor.
    """

    def __init__(self, in_channels: int, layers: tuple[int, ...], width: int = 64) -> None:
        super().__init__()
        self.conv = StdConv2d(in_channels, width, 7, stride=2)
        self.norm = GroupNormAct(width)
        stages = []
        channels = width
        for i, depth in enumerate(layers):
            out = 4 * width * 2**i
            blocks = [Bottleneck(channels if j == 0 else out, out, (1 if i == 0 else 2) if j == 0 else 1) for j in range(depth)]
            stages.append(nn.Sequential(*blocks))
            channels = out
        self.stages = nn.Sequential(*stages)
        self.out_channels = channels
        self.stride = 4 * 2 ** (len(layers) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, C, H, W) -> (B, C', H/stride, W/stride)`."""
        x = self.norm(self.conv(x))
        x = F.max_pool2d(pad_same(x, 3, 2, value=float("-inf")), kernel_size=3, stride=2)
        return self.stages(x)
