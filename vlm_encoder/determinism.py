"""Bitwise batch invariance on the CPU: one switch, read by the layers through one helper.

An image's features should not change in the last bits with the batch it is in: resumable
extraction stores features batch by batch and promises they equal the image encoded alone.
On the CPU most kernels keep that promise when called on the whole batch (the attention
kernel and the token-wise linears do, for every ViT shape measured), but some do not: a
linear over a few pooled vectors takes a matrix-vector kernel for one row and a GEMM for
several, and small convolutions split their work by batch size.

`batch_invariance(mode)` is the switch, a context manager (also usable as a decorator):

- `"auto"` (the default): batched calls; the first call of an op with a given input layout,
  dtype and thread count also runs a probe on random inputs (the batch at once against one
  image at a time) and only an op found batch-variant falls back to one call per image.
- `"always"`: one call per image for every such op, without probing.
- `"off"`: batched calls, no guarantee (training, evaluation: the math is the same, only the
  rounding may depend on the batch).

Layers route each op that may be batch-variant through `batch_invariant_call(fn, *inputs)`.
GPUs, `torch.compile` and single images always take the batched call.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Literal

import torch
from torch import nn

Mode = Literal["auto", "always", "off"]
MODES: tuple[str, ...] = ("auto", "always", "off")

PROBE_OUTPUTS = 4096  # output values a probe compares (more draws for a small op)

_mode: ContextVar[str] = ContextVar("vlm_encoder_batch_invariance", default="auto")
# (op, input layouts, options, threads) -> True when the batched call was found batch-invariant
_probed: dict[Hashable, bool] = {}


@contextmanager
def batch_invariance(mode: Mode) -> Iterator[None]:
    """Set how CPU batches keep each image's features independent of its batch.

    Args:
        mode: `"auto"` (batched, falling back per image only for ops a one-time probe found
            batch-variant), `"always"` (one call per image for those ops) or `"off"`
            (batched, no guarantee; fastest).

    Example:
        >>> with batch_invariance("off"):  # training: the rounding may depend on the batch
        ...     loss = model(pixels, ids).loss
    """
    if mode not in MODES:
        raise ValueError(f"batch_invariance mode must be one of {', '.join(MODES)}, got {mode!r}")
    token = _mode.set(mode)
    try:
        yield
    finally:
        _mode.reset(token)


def batch_invariance_mode() -> str:
    """The mode in effect here (`"auto"` unless a `batch_invariance` block says otherwise)."""
    return _mode.get()


def batch_invariant_call(
    fn: Callable[..., torch.Tensor], *inputs: torch.Tensor | None, **options: Hashable
) -> torch.Tensor:
    """`fn(*inputs, **options)` on a batch, each image's output bitwise what it is alone (CPU).

    Args:
        fn: A module or a module-level function whose output row `i` depends only on row `i`
            of each input (e.g. `F.scaled_dot_product_attention`, a convolution, a linear).
        inputs: Tensors with the batch first `(B, ...)`; `None` passes through.
        options: Keyword arguments of `fn` (hashable: they are part of the probe's key).

    Returns:
        `fn`'s output `(B, ...)`. A module's hooks also see the probe's random inputs (once
        per key) and, where it falls back, each image's call.
    """
    batch = next(t for t in inputs if t is not None)
    if torch.compiler.is_compiling() or batch.device.type != "cpu" or batch.shape[0] == 1:
        return fn(*inputs, **options)
    mode = _mode.get()
    if mode == "off" or mode == "auto" and is_batch_invariant(fn, *inputs, **options):
        return fn(*inputs, **options)
    return _per_image(fn, inputs, options)


def is_batch_invariant(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor | None, **options: Hashable) -> bool:
    """Whether one call of `fn` on this batch gives every image bitwise what it gets alone.

    Probed once per op (a module's type and parameter shapes, or the function), input layouts
    and dtypes, options and thread count, on random inputs of the same layout (masks and other
    non-float inputs keep their values; small ops get several draws); the answer is cached for
    the process.
    """
    key = (_op_key(fn), tuple(_layout(t) for t in inputs), tuple(sorted(options.items())), torch.get_num_threads())
    found = _probed.get(key)
    if found is None:
        found = _probed[key] = _probe(fn, inputs, options)
    return found


def _per_image(fn: Callable[..., torch.Tensor], inputs: tuple, options: dict) -> torch.Tensor:
    B = next(t for t in inputs if t is not None).shape[0]
    return torch.cat([fn(*(None if t is None else t[i : i + 1] for t in inputs), **options) for i in range(B)])


@torch.no_grad()
def _probe(fn: Callable[..., torch.Tensor], inputs: tuple, options: dict) -> bool:
    # Random values, not the caller's: a degenerate batch (all zeros) would pass any kernel.
    # Draws until 4096 outputs are compared: a few outputs can round alike by chance.
    generator = torch.Generator().manual_seed(0)
    compared = 0
    while compared < PROBE_OUTPUTS:
        fake = tuple(_random_like(t, generator) for t in inputs)
        batched = fn(*fake, **options)
        if not torch.equal(batched, _per_image(fn, fake, options)):
            return False
        compared += max(batched.numel(), 1)
    return True


def _random_like(t: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor | None:
    """Standard normal values in `t`'s shape, strides and dtype (kernels choose by layout)."""
    if t is None or not t.is_floating_point() or t.numel() == 0:
        return t
    extent = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1
    flat = torch.randn(extent, generator=generator).to(device=t.device, dtype=t.dtype)
    return flat.as_strided(t.shape, t.stride(), t.storage_offset())


def _layout(t: torch.Tensor | None) -> tuple | None:
    return None if t is None else (tuple(t.shape), t.stride(), t.dtype, t.device.type)


def _op_key(fn: Callable[..., torch.Tensor]) -> Hashable:
    if isinstance(fn, nn.Module):  # the kernel depends on the hyper-parameters and weight layout
        params = tuple((tuple(p.shape), p.stride(), p.dtype) for p in fn.parameters())
        return type(fn).__qualname__, fn.extra_repr(), params
    return fn
