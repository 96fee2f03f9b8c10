"""One training step: the contrastive loss-and-backward over a batch, optionally in
micro-batches that keep every negative of the full batch (GradCache; open_clip's
`accum_freq`), then clipping, the non-finite guard and the parameter update.

With `accum_steps = k > 1`:

1. every micro-batch is embedded without gradients, and the RNG state before each is kept;
2. the loss is taken over the cached `(B, E)` embeddings (all negatives), and its gradients
   with respect to the embeddings, the logit scale and the bias are computed;
3. each micro-batch is embedded again with gradients (same RNG state, so dropout or drop-path
   agree) and `sum(embeds * d loss / d embeds)` is back-propagated, which accumulates exactly
   the full batch's parameter gradients. Only the last micro-batch synchronises gradients
   across processes, and it also carries the scale and bias terms so every trainable
   parameter takes part in that synchronised backward.

A step whose loss or gradient norm is not finite on any process leaves the parameters as they
are (every process agrees, so none waits on the others); the schedule still advances.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..contrastive import ContrastiveModel, ContrastiveOutput
from .fsdp import average_gradients, no_sync, to_local

if TYPE_CHECKING:
    from .setup import TrainSetup


class ContrastiveForward(nn.Module):
    """The module accelerate wraps (DDP): the model's forward, taking either pixels or cached
    image-tower features (LiT with cached features: the locked tower is skipped).

    Returns a plain tuple `(image_embeds (B, E), text_embeds (B, E), logit_scale, logit_bias)`
    so any wrapper can traverse it.
    """

    def __init__(self, model: ContrastiveModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        m = self.model
        if image_features is not None:
            projected = m.image_proj(image_features.to(m.image_proj.weight.dtype))
            image = F.normalize(projected.float(), dim=-1).to(projected.dtype)
        else:
            image = m.encode_image(pixel_values)
        text = m.encode_text(input_ids, attention_mask)
        return image, text, m.current_logit_scale(), m.logit_bias


@dataclass
class StepInputs:
    """A batch as the forward takes it: `input_ids`, `attention_mask` `(B, L)` and either
    `pixel_values` `(B, 3, H, W)` or `image_features` `(B, Dv)`."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_features: torch.Tensor | None = None

    def split(self, parts: int) -> list["StepInputs"]:
        def cut(t: torch.Tensor | None) -> list:
            return list(torch.tensor_split(t, parts)) if t is not None else [None] * parts

        return [StepInputs(*fields) for fields in zip(*(cut(t) for t in self.as_tuple()))]

    def as_tuple(self) -> tuple:
        return (self.input_ids, self.attention_mask, self.pixel_values, self.image_features)

    def kwargs(self) -> dict:
        return dict(zip(("input_ids", "attention_mask", "pixel_values", "image_features"), self.as_tuple()))


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def _up(t: torch.Tensor) -> torch.Tensor:
    # At least float32 (half-precision products would lose the gradient), float64 kept.
    return t if t.dtype == torch.float64 else t.float()


def loss_and_backward(
    forward: nn.Module,
    loss_fn: nn.Module,
    inputs: StepInputs,
    *,
    accum_steps: int = 1,
    backward=None,
    autocast=contextlib.nullcontext,
    no_sync=None,
    unwrapped: nn.Module | None = None,
) -> tuple[torch.Tensor, ContrastiveOutput | None]:
    """Compute the loss of one batch and accumulate its gradients into the parameters.

    Args:
        forward: The (possibly DDP-wrapped) `ContrastiveForward`.
        loss_fn: `ClipLoss` or `SigLipLoss`.
        inputs: The whole batch of this process.
        accum_steps: Micro-batches (1: one forward and backward).
        backward: `loss -> None` (accelerate's `backward`, which scales fp16 losses);
            default `loss.backward()`.
        autocast: Context manager factory for mixed precision.
        no_sync: `module -> context` that skips gradient synchronisation (accelerate's
            `no_sync`); default none.
        unwrapped: The bare `ContrastiveForward` for the no-gradient pass (default `forward`).

    Returns:
        `(loss, output)`: the detached scalar loss, and the model output of the batch (only
        for `accum_steps == 1`).
    """
    backward = backward or (lambda value: value.backward())
    if accum_steps == 1:
        with autocast():
            image, text, scale, bias = forward(**inputs.kwargs())
            loss = loss_fn(image, text, scale, bias)
        backward(loss)
        return loss.detach(), ContrastiveOutput(image.detach(), text.detach(), scale.detach(), bias)

    micro = inputs.split(accum_steps)
    bare = unwrapped if unwrapped is not None else forward  # a compiled module has no truth value
    states, images, texts = [], [], []
    with torch.no_grad():
        for part in micro:
            states.append(_rng_state())
            with autocast():
                image, text, scale, bias = bare(**part.kwargs())
            images.append(image)
            texts.append(text)
    image_leaf = torch.cat(images).detach().requires_grad_(True)
    text_leaf = torch.cat(texts).detach().requires_grad_(True)
    scale_leaf = scale.detach().requires_grad_(True)
    bias_leaf = bias.detach().requires_grad_(True) if bias is not None else None
    leaves = [image_leaf, text_leaf, scale_leaf] + ([bias_leaf] if bias_leaf is not None else [])
    with autocast():
        loss = loss_fn(image_leaf, text_leaf, scale_leaf, bias_leaf)
    grads = torch.autograd.grad(loss, leaves)
    image_grads = torch.split(grads[0], [t.shape[0] for t in images])
    text_grads = torch.split(grads[1], [t.shape[0] for t in texts])

    final_state = _rng_state()
    for k, part in enumerate(micro):
        last = k == len(micro) - 1
        context = no_sync(forward) if (no_sync is not None and not last) else contextlib.nullcontext()
        with context:
            _set_rng_state(states[k])
            with autocast():
                image, text, scale, bias = forward(**part.kwargs())
            surrogate = (_up(image) * _up(image_grads[k])).sum() + (_up(text) * _up(text_grads[k])).sum()
            if last:  # scale and bias, once, in the synchronised backward
                surrogate = surrogate + _up(scale) * _up(grads[2])
                if bias is not None:
                    surrogate = surrogate + _up(bias) * _up(grads[3])
            backward(surrogate)
    _set_rng_state(final_state)
    return loss.detach(), None


@dataclass
class StepResult:
    """One optimizer step: its loss and gradient norm (NaN when not computed), and whether the
    update was skipped."""

    loss: float
    grad_norm: float
    skipped: bool


def optimizer_step(parts: TrainSetup, inputs: StepInputs) -> StepResult:
    """Loss, backward, clipping, the non-finite guard, the optimizer and schedule step, and the
    logit-scale clamp. A non-finite loss or gradient norm on any process skips the update
    (`skip_update`); under fp16 the gradient scaler sees it and lowers its scale."""
    acc, c = parts.accelerator, parts.config
    parts.optimizer.zero_grad(set_to_none=True)
    loss, _ = loss_and_backward(
        parts.forward, parts.loss_fn, inputs, accum_steps=c.accum_steps, backward=acc.backward,
        autocast=acc.autocast, no_sync=no_sync if parts.sharded else acc.no_sync, unwrapped=parts.bare_forward,
    )
    if parts.whole_params:  # FSDP: the unsharded 0-dim parameters are synced as DDP would
        average_gradients(parts.whole_params)
    max_norm = c.grad_clip if c.grad_clip > 0 else float("inf")
    grad_norm = to_local(acc.clip_grad_norm_(parts.trainable, max_norm))  # a DTensor under FSDP
    grad_norm = torch.as_tensor(grad_norm, device=loss.device, dtype=torch.float32)
    bad = (~torch.isfinite(loss.float()) | ~torch.isfinite(grad_norm)).float()
    if acc.num_processes > 1:
        bad = acc.reduce(bad, reduction="sum")
    if bad.item() > 0:
        if acc.scaler is not None:
            parts.optimizer.step()  # the fp16 scaler sees the inf, skips and lowers its scale
        skip_update(parts)
        return StepResult(float(loss), float(grad_norm), skipped=True)
    parts.optimizer.step()
    parts.scheduler.step()
    clamp_logit_scale(parts.model)
    return StepResult(float(loss), float(grad_norm), skipped=False)


def skip_update(parts: TrainSetup) -> None:
    """A step that leaves the parameters unchanged: gradients dropped, the schedule advanced."""
    parts.optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # the schedule counts steps, taken or not: intended here
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        parts.scheduler.step()
    clamp_logit_scale(parts.model)


def clamp_logit_scale(model: ContrastiveModel) -> None:
    with torch.no_grad():
        model.logit_scale.clamp_(0.0, model.max_logit_scale)


def any_rank_empty(accelerator, inputs: StepInputs) -> bool:
    """True when this or another process has no pair left in its batch (every image
    unreadable): all ranks then skip the step together, so none waits on the others."""
    empty = torch.tensor(float(inputs.input_ids.shape[0] == 0), device=accelerator.device)
    if accelerator.num_processes > 1:
        empty = accelerator.reduce(empty, reduction="sum")
    return bool(empty.item() > 0)
