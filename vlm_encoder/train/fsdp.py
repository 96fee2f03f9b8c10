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
from typing import Any

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
def no_sync(forward: nn.Module) -> Iterator[None]:
    """Skip the gradient reduce-scatter of the backward passes inside (GradCache's micro-batches
    but the last): gradients accumulate unsharded and the last backward syncs their sum."""
    _root(forward).set_requires_gradient_sync(False)
    try:
        yield
    finally:
        _root(forward).set_requires_gradient_sync(True)


@contextlib.contextmanager
def gathered(forward: nn.Module) -> Iterator[None]:
    """Gather the root unit's weights for calls outside the training forward (evaluation,
    the model's own methods); the block units still gather themselves as they run."""
    _root(forward).unshard()
    try:
        yield
    finally:
        _root(forward).reshard()


def _root(forward: nn.Module) -> nn.Module:
    return getattr(forward, "_orig_mod", forward)  # under torch.compile: the sharded module


def _full() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True)


def full_state_dict(forward: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict (plain tensors on the CPU, on every process), keyed as the
    unsharded `ContrastiveModel`'s."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(_root(forward), options=_full())
    return {name.removeprefix("model."): value.detach().cpu() for name, value in state.items()}


def load_full_state_dict(forward: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a whole (unsharded) `ContrastiveModel` state dict into the sharded model: each
    process keeps its shard (every process holds `state`)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(_root(forward), {f"model.{name}": value for name, value in state.items()}, options=_full())


def _param_names(forward: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter the optimizer holds, in its `state_dict()` numbering."""
    names = {id(p): name for name, p in _root(forward).named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state_dict(forward: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state with whole tensors, numbered as `optimizer.state_dict()` numbers
    them unsharded (the file DDP writes; collective: every process calls it)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    number = {name: k for k, name in enumerate(_param_names(forward, optimizer))}
    state = get_optimizer_state_dict(_root(forward), optimizer, options=_full())
    return {
        "state": {number[name]: {key: value.cpu() if isinstance(value, torch.Tensor) else value
                                 for key, value in per_param.items()}
                  for name, per_param in state["state"].items()},
        "param_groups": [{**group, "params": [number[name] for name in group["params"]]}
                         for group in state["param_groups"]],
    }


def load_full_optimizer_state_dict(forward: nn.Module, optimizer: torch.optim.Optimizer,
                                   state: dict[str, Any]) -> None:
    """Load an unsharded `optimizer.state_dict()` (DDP's file) into the sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _param_names(forward, optimizer)
    numbers = [k for group in state["param_groups"] for k in group["params"]]
    if sorted(numbers) != list(range(len(names))):
        raise ValueError(f"the state holds {len(numbers)} parameters, the optimizer {len(names)}")
    named = {
        "state": {names[int(k)]: per_param for k, per_param in state["state"].items()},
        "param_groups": [{**group, "params": [names[k] for k in group["params"]]} for group in state["param_groups"]],
    }
    set_optimizer_state_dict(_root(forward), optimizer, named, options=_full())
