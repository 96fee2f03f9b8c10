"""Bitwise batch invariance on the CPU, and the switch that trades it for speed.

On the CPU, PyTorch's fused attention and convolution kernels split their work by batch size,
so an image's features can change in the last bits with the batch it is in. The modules that
use such kernels (`Attention`, `VisionEncoder`'s stem and patch embedding) carry a
`batch_invariant_cpu` flag, on by default: they then run one image per kernel call, so
features are identical whether an image is alone or in a batch of 64 (what resumable
extraction relies on). Training does not need this and is many times faster batched.
GPUs always run batched.
"""

from __future__ import annotations

from torch import nn


def set_batch_invariant(model: nn.Module, enabled: bool = True) -> int:
    """Turn CPU batch invariance on or off for every module of `model` that has the switch.

    Args:
        model: Any module (an encoder, a `ContrastiveModel`, a `VisionLanguageModel`).
        enabled: True for per-image kernel calls on the CPU (bitwise batch invariant),
            False for one batched call (faster; the rounding may depend on the batch).

    Returns:
        How many modules were switched.
    """
    switched = 0
    for module in model.modules():
        if hasattr(module, "batch_invariant_cpu"):
            module.batch_invariant_cpu = enabled
            switched += 1
    return switched
