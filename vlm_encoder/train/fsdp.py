"""Fully sharded training (FSDP2, `torch.distributed.fsdp.fully_shard`) for towers that do not
fit one device: each transformer block of both towers is its own unit (its weights are
gathered just before it runs and freed after), the rest of the model is the root unit.

Applied to the `ContrastiveForward` directly rather than through accelerate's
`FullyShardedDataParallelPlugin`, because accelerate turns the plugin on only for GPU-like
backends (a CPU/gloo run would silently fall back to DDP, so it could not be tested here);
`fully_shard` itself runs the same on gloo and NCCL. The loss is untouched: the towers return
plain `(B, E)` tensors and `ClipLoss` / `SigLipLoss` gather them with gradients as under DDP.

FSDP2 cannot shard 0-dim parameters (the logit scale and bias): they stay whole on every
process, and their gradients are averaged here, as DDP would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn


def shard(forward: nn.Module) -> list[nn.Parameter]:
    """Shard `forward` (a `ContrastiveForward`) in place over all processes.

    Must run before the optimizer is built: sharding replaces the parameters with `DTensor`s.

    Returns:
        The parameters left whole (0-dim ones), whose gradients `average_gradients` syncs.
    """
    from torch.distributed.fsdp import fully_shard

    model = forward.model
    for tower in (model.vision, model.text):
        for block in getattr(tower, "blocks", ()):
            fully_shard(block)
    whole = [p for p in forward.parameters() if p.dim() == 0]
    fully_shard(forward, ignored_params=set(whole))
    return whole


def average_gradients(params: list[nn.Parameter]) -> None:
    """Average the gradients of the parameters left whole over the processes (DDP's rule)."""
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world)


def to_local(value: torch.Tensor) -> torch.Tensor:
    """A `DTensor` result (e.g. the clipped gradient norm) as a plain tensor; others as they are."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


@contextlib.contextmanager
def gathered(forward: nn.Module) -> Iterator[None]:
    """Gather the root unit's weights for calls outside the training forward (evaluation,
    the model's own methods); the block units still gather themselves as they run."""
    forward.unshard()
    try:
        yield
    finally:
        forward.reshard()


def full_state_dict(forward: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict (plain tensors on the CPU, on every process), keyed as the
    unsharded `ContrastiveModel`'s."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(forward, options=StateDictOptions(full_state_dict=True))
    return {name.removeprefix("model."): value.detach().cpu() for name, value in state.items()}
