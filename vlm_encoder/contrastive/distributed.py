"""Gathering features from every rank for a contrastive loss, with or without gradients.

Works on any backend, gloo included: the backward of the gather is an all-reduce of the
gradient followed by this rank's slice (gloo has no reduce-scatter). Ranks may hold batches of
different sizes (a last, smaller batch).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.autograd import Function


class Gathered(NamedTuple):
    """Features of every rank.

    Attributes:
        features: `(N, E)` rows of rank 0, then rank 1, ...; `N` is the global batch.
        offset: Index of this rank's first row in `features`.
    """

    features: torch.Tensor
    offset: int


def world(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """`(rank, world_size)` of `group`, or `(0, 1)` when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _batch_sizes(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> list[int]:
    size = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    return [int(s) for s in sizes]


def _all_gather(tensor: torch.Tensor, sizes: list[int], group: dist.ProcessGroup | None) -> torch.Tensor:
    """Concatenate every rank's rows (padded to the largest batch for the collective)."""
    longest = max(sizes)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)


class _GatherWithGrad(Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: list[int], rank: int, group) -> torch.Tensor:
        ctx.group = group
        ctx.offset = sum(sizes[:rank])
        ctx.rows = sizes[rank]
        return _all_gather(tensor, sizes, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Every rank's loss depends on this rank's rows: sum their gradients.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.offset : ctx.offset + ctx.rows], None, None, None


def gather_features(
    tensor: torch.Tensor, with_grad: bool = True, group: dist.ProcessGroup | None = None
) -> Gathered:
    """Rows of `tensor` from every rank of `group`.

    Args:
        tensor: This rank's features `(n, E)`.
        with_grad: Let gradients flow back to the rank that produced each row (the gradient
            of a row is summed over every rank's loss). Without, other ranks' rows are
            constants and only this rank's own rows carry gradients (open_clip's
            `gather_with_grad=False`).
        group: Process group (default: the world).

    Returns:
        `Gathered(features (N, E), offset)`; a single process returns `tensor` itself.
    """
    rank, world_size = world(group)
    if world_size == 1:
        return Gathered(tensor, 0)
    sizes = _batch_sizes(tensor, group)
    offset = sum(sizes[:rank])
    if with_grad:
        return Gathered(_GatherWithGrad.apply(tensor, sizes, rank, group), offset)
    with torch.no_grad():
        everything = _all_gather(tensor, sizes, group)
    features = torch.cat([everything[:offset], tensor, everything[offset + sizes[rank] :]], dim=0)
    return Gathered(features, offset)
