"""What a run is made of: everything a `TrainConfig` describes, built once and placed on the
accelerator's device (the model with its preprocessing and tokenizer, the data sources and
their sample order, AdamW, the schedule, the loss and the forward accelerate wraps)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..contrastive import ContrastiveModel
from ..cpu_speed import fast_cpu
from ..lora import apply_lora
from ..processing import ImageProcessor
from .build import build_model, build_optimizer, build_scheduler
from .config import TrainConfig
from .sampler import EpochSampler
from .sources import PairSource, open_pair_source
from .step import ContrastiveForward, clamp_logit_scale


@dataclass
class TrainSetup:
    """The pieces of a run.

    Attributes:
        config: The run.
        accelerator: The `accelerate.Accelerator` (device, precision, processes).
        model: The `ContrastiveModel` being trained (unwrapped).
        processor: Image preprocessing (the image tower's own, else the default).
        tokenizer: The text tower's tokenizer.
        train_source / eval_source: The pairs (`eval_source` is `None` without evaluation).
        sampler: This process's sample order.
        total_steps: Optimizer steps of the whole run.
        optimizer: AdamW, as `accelerator.prepare` returned it.
        scheduler: Warm-up + cosine schedule (unwrapped: accelerate's wrapper would step it
            once per process).
        loss_fn: `ClipLoss` or `SigLipLoss`.
        forward: The `ContrastiveForward` as accelerate wrapped it (DDP over processes).
        bare_forward: The same module unwrapped (compiled with `compile`), for GradCache's
            no-gradient pass.
        trainable: The parameters the optimizer updates.
        ema: With `ema_decay`, the `AveragedModel` holding the moving average of the weights
            (its `module` is a `ContrastiveModel`); else `None`.
        whole_params: With `fsdp`, the parameters left unsharded (0-dim), whose gradients
            `fsdp.average_gradients` syncs after the backward; else empty.
    """

    config: TrainConfig
    accelerator: Any
    model: ContrastiveModel
    processor: ImageProcessor
    tokenizer: Callable
    train_source: PairSource
    eval_source: PairSource | None
    sampler: EpochSampler
    total_steps: int
    optimizer: Any
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loss_fn: nn.Module
    forward: nn.Module
    bare_forward: nn.Module
    trainable: list[nn.Parameter]
    ema: Any = None
    whole_params: list[nn.Parameter] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def sharded(self) -> bool:
        """FSDP over several processes: the weights are `DTensor` shards (`fsdp.py`)."""
        return self.config.fsdp and self.accelerator.num_processes > 1

    def gathered(self) -> contextlib.AbstractContextManager:
        """Context for calling the model's own methods (evaluation, LiT's feature cache): under
        FSDP the root unit's weights are gathered (`fsdp.gathered`); else nothing."""
        if not self.sharded:
            return contextlib.nullcontext()
        from .fsdp import gathered

        return gathered(self.bare_forward)

    @property
    def use_feature_cache(self) -> bool:
        """LiT with the locked tower's features computed once (`feature_cache.py`)."""
        return self.config.lock_image and self.config.cache_image_features


def enable_cpu_fp16(accelerator: Any) -> None:
    """Make `mixed_precision="fp16"` mean the same on the CPU as on a GPU.

    accelerate runs an fp16 request on the CPU in float32, with no gradient scaler, and says
    nothing. Here the CPU gets what a GPU gets: float16 autocast and a `torch.amp.GradScaler`
    (scaled backward, unscaled clipping, overflow steps skipped, the scale saved in checkpoints).
    Must run before `accelerator.prepare`.
    """
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu" and accelerator.scaler is None:
        accelerator.native_amp = True
        accelerator.scaler = torch.amp.GradScaler("cpu")


def set_up(
    config: TrainConfig,
    *,
    model: ContrastiveModel | None = None,
    train_source: PairSource | None = None,
    eval_source: PairSource | None = None,
    accelerator: Any = None,
) -> TrainSetup:
    """Build the pieces of a run (the order is fixed: the seed is set before the model is built).

    Args:
        config: The run.
        model: Use this model instead of building one (set up for `lock_image` and gradient
            checkpointing as the config says).
        train_source / eval_source: Use these sources instead of opening `config.data`.
        accelerator: An `accelerate.Accelerator` (default: one from the config).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    c = config
    acc = accelerator or Accelerator(cpu=c.cpu, mixed_precision=c.mixed_precision)
    enable_cpu_fp16(acc)
    set_seed(c.seed)
    if model is None:
        model = build_model(c)
    else:
        if c.lock_image:
            model.freeze_vision()
        if c.grad_checkpointing:
            model.set_grad_checkpointing(True)
        model.train()
    if c.lora_r is not None:  # on the loaded weights, before the optimizer: only the adapters train
        adapted = apply_lora(model, c.lora_r, c.lora_targets, c.lora_alpha)
        if c.lock_image and any(name.startswith("vision.") for name in adapted):
            raise ValueError(f"lora_targets {c.lora_targets!r} adapt the locked image tower (lock_image); "
                             "name only text layers, e.g. 'text\\..*qkv'")
    tokenizer = model.text.tokenizer()
    # A pretrained tower's own preprocessing (its mean / std, resize); else the default.
    processor = model.get_image_processor() or ImageProcessor.default_for(model.vision.config)
    model.set_image_processor(processor)  # saved with the model and its image tower
    options = dict(options=c.data_options, image_column=c.image_column, text_column=c.text_column,
                   label_column=c.label_column, class_names=c.class_names)
    train_source = train_source or open_pair_source(c.data, c.train_split, **options)
    if eval_source is None and c.eval_split is not None:
        eval_source = open_pair_source(c.eval_data or c.data, c.eval_split, **options)
    sampler = EpochSampler(len(train_source), c.batch_size, c.seed, acc.process_index, acc.num_processes)
    total_steps = c.max_steps or c.epochs * sampler.batches_per_epoch
    model.to(acc.device)  # before the optimizer, so it can pick the fused GPU kernel
    sharded = c.fsdp and acc.num_processes > 1
    # The CPU GEMM route: a module tree sharing `model`'s parameters (saving, loading, the
    # optimizer and evaluation keep using `model`).
    bare_forward = ContrastiveForward(fast_cpu(model, enabled=c.fast_cpu and acc.device.type == "cpu" and not sharded))
    if sharded:  # before the optimizer: sharding swaps the parameters for DTensors
        from .fsdp import shard

        whole_params = shard(bare_forward)
    optimizer = build_optimizer(model, c)
    scheduler = build_scheduler(optimizer, c, total_steps)
    loss_fn = model.build_loss()
    if c.compile:
        bare_forward = torch.compile(bare_forward)
    if sharded:  # already sharded: accelerate would wrap it in DDP too
        forward, optimizer = bare_forward, acc.prepare(optimizer)
    else:
        forward, optimizer = acc.prepare(bare_forward, optimizer)
    ema = None
    if c.ema_decay is not None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        # A copy of the weights (buffers too), averaged after every applied step (loop.train_step).
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(c.ema_decay), use_buffers=True).eval()
    return TrainSetup(
        config=c, accelerator=acc, model=model, processor=processor, tokenizer=tokenizer,
        train_source=train_source, eval_source=eval_source, sampler=sampler, total_steps=total_steps,
        optimizer=optimizer, scheduler=scheduler, loss_fn=loss_fn, forward=forward, bare_forward=bare_forward,
        trainable=[p for p in model.parameters() if p.requires_grad], ema=ema,
        whole_params=whole_params if sharded else [],
    )


def check_finite_parameters(parts: TrainSetup, resumed_from: Path | None) -> None:
    """Refuse to start from weights holding NaN or inf: every step would be skipped (the
    guard keeps parameters as they are), so the run would never move. A logit scale
    pushed to +inf is first clamped to its maximum, as after every step."""
    from .fsdp import to_local

    model, c = parts.model, parts.config
    clamp_logit_scale(model)
    # to_local: under FSDP each process checks the whole tensor (one at a time), so all agree.
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(to_local(p)).all()]
    if bad:
        origin = (f"checkpoint {resumed_from}" if resumed_from is not None
                  else f"init_model {c.init_model}" if c.init_model
                  else f"vision_init {c.vision_init}" if c.vision_init else "the model given to Trainer")
        raise ValueError(
            f"{origin} has non-finite (NaN or inf) values in {len(bad)} parameter(s): {', '.join(bad[:8])}"
            + (" ..." if len(bad) > 8 else "") + "; training from them would skip every step"
        )
