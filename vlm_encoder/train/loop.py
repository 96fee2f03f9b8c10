"""`Trainer`: contrastive image-text training on accelerate (one GPU, several GPUs or nodes via
`accelerate launch`, or the CPU), with exact resume.

Run directory:

    config.yaml          the resolved TrainConfig
    metrics.jsonl        one record per log / evaluation / skipped step
    checkpoints/         step_XXXXXXXX/ (see checkpoint.py), the last `keep_checkpoints`
    plots/               loss.png, eval.png
    export/              model/ (ContrastiveModel + processor), vision/, text/ (save_pretrained)
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..contrastive import ContrastiveModel
from ..contrastive.distributed import gather_features
from ..pretrained import write_atomic
from ..processing import ImageProcessor
from . import checkpoint as ckpt
from .batches import ImageReader, PairBatch, PairBatches, batch_loader
from .build import build_model, build_optimizer, build_scheduler, use_batched_cpu_attention
from .config import TrainConfig
from .evaluate import evaluate, shard
from .metrics import MetricsLog, read_metrics
from .plots import plot_run
from .sampler import EpochSampler
from .sources import PairSource, open_pair_source
from .step import ContrastiveForward, StepInputs, loss_and_backward


@dataclass
class TrainResult:
    """What a run did.

    Attributes:
        output_dir: The run directory.
        step: Optimizer steps done (including skipped ones).
        metrics: The last evaluation's metrics (empty without evaluation).
        skipped_steps: Steps whose update was skipped (non-finite loss or gradients).
        skipped_images: Unreadable images left out (training batches and feature cache).
        seconds: Wall time of this process's run.
        interrupted: Stopped by `stop_after` before the end.
        resumed_from: The checkpoint the run started from, if any.
    """

    output_dir: Path
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    skipped_steps: list[int] = field(default_factory=list)
    skipped_images: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    resumed_from: Path | None = None


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    skipped: bool


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


class Trainer:
    """Builds everything a `TrainConfig` describes and runs it.

    Args:
        config: The run.
        model: Use this model instead of building one (it is set up for `lock_image` and
            gradient checkpointing as the config says).
        train_source / eval_source: Use these sources instead of opening `config.data`.
        accelerator: An `accelerate.Accelerator` (default: one from the config).
        stop_after: Stop after this many optimizer steps, as if killed (tests of resume).
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        model: ContrastiveModel | None = None,
        train_source: PairSource | None = None,
        eval_source: PairSource | None = None,
        accelerator: Any = None,
        stop_after: int | None = None,
    ) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.config = c = config
        self.accelerator = accelerator or Accelerator(cpu=c.cpu, mixed_precision=c.mixed_precision)
        acc = self.accelerator
        enable_cpu_fp16(acc)
        self.stop_after = stop_after
        self.run_dir = Path(c.output_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        set_seed(c.seed)
        if model is None:
            model = build_model(c)
        else:
            if c.lock_image:
                model.freeze_vision()
            if c.grad_checkpointing:
                model.set_grad_checkpointing(True)
            model.train()
        use_batched_cpu_attention(model)
        self.model = model
        self.tokenizer = model.text.tokenizer()
        # A pretrained tower's own preprocessing (its mean / std, resize); else the default.
        self.processor = model.get_image_processor() or ImageProcessor.default_for(model.vision.config)
        model.set_image_processor(self.processor)  # saved with the model and its image tower
        options = dict(options=c.data_options, image_column=c.image_column, text_column=c.text_column,
                       label_column=c.label_column, class_names=c.class_names)
        self.train_source = train_source or open_pair_source(c.data, c.train_split, **options)
        if eval_source is None and c.eval_split is not None:
            eval_source = open_pair_source(c.eval_data or c.data, c.eval_split, **options)
        self.eval_source = eval_source
        self.sampler = EpochSampler(len(self.train_source), c.batch_size, c.seed, acc.process_index, acc.num_processes)
        self.total_steps = c.max_steps or c.epochs * self.sampler.batches_per_epoch
        model.to(acc.device)  # before the optimizer, so it can pick the fused GPU kernel
        self.optimizer = build_optimizer(model, c)
        self.scheduler = build_scheduler(self.optimizer, c, self.total_steps)
        self.loss_fn = model.build_loss()
        forward = ContrastiveForward(model)
        if c.compile:
            forward = torch.compile(forward)
        self.bare_forward = forward
        # The scheduler stays unwrapped: accelerate's wrapper would step it once per process.
        self.forward, self.optimizer = acc.prepare(forward, self.optimizer)
        self.device = acc.device
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.use_feature_cache = c.lock_image and c.cache_image_features
        self.image_features: torch.Tensor | None = None  # (N, Dv) with lock_image + cache
        self.feature_valid: torch.Tensor | None = None
        self.log = MetricsLog(self.run_dir / "metrics.jsonl", enabled=acc.is_main_process,
                              tensorboard_dir=self.run_dir / "tensorboard")
        self.step = 0
        self.next_batch = (0, 0)  # (epoch, position) of the next batch to consume
        self.skipped_steps: list[int] = []
        self.skipped_images = 0

    # ------------------------------------------------------------------ set-up
    def _autocast(self):
        return self.accelerator.autocast()

    @torch.no_grad()
    def cache_image_features(self) -> None:
        """LiT: run the locked image tower once over the training images (sharded over
        processes, then gathered) and keep `(N, Dv)` features for every epoch.

        Unreadable images, and images whose features are not finite (NaN / inf would poison
        every batch they join, every epoch), are left out, logged and counted."""
        acc, source = self.accelerator, self.train_source
        reader = ImageReader(source, self.processor)
        mine = list(shard(len(source), acc.process_index, acc.num_processes))
        feats, index, skipped = [], [], 0
        vision = self.model.vision
        for start in range(0, len(mine), self.config.eval_batch_size):
            kept, pixels, bad = reader.read(mine[start : start + self.config.eval_batch_size])
            skipped += len(bad)
            for i, reason in bad:
                self.log.write("skipped_image", self.step, index=i, reason=reason)
            if kept:
                with self._autocast():
                    batch_feats = vision.image_embeds(pixels.to(self.device)).float()
                finite = torch.isfinite(batch_feats).all(dim=-1)
                for i, ok in zip(kept, finite.tolist()):
                    if not ok:
                        self.log.write("skipped_image", self.step, index=i,
                                       reason="non-finite features from the locked image tower")
                feats.append(batch_feats[finite])
                index.append(torch.tensor(kept, device=self.device)[finite])
        width = vision.config.embed_dim or vision.config.width
        local = torch.cat(feats) if feats else torch.zeros(0, width, device=self.device)
        local_index = torch.cat(index) if index else torch.zeros(0, dtype=torch.long, device=self.device)
        all_feats = gather_features(local, with_grad=False).features
        all_index = gather_features(local_index, with_grad=False).features
        self.image_features = torch.zeros(len(source), width, device=self.device)
        self.image_features[all_index] = all_feats
        self.feature_valid = torch.zeros(len(source), dtype=torch.bool, device=self.device)
        self.feature_valid[all_index] = True
        total_skipped = len(source) - int(self.feature_valid.sum())
        self.skipped_images += total_skipped
        self.log.write("feature_cache", self.step, images=int(self.feature_valid.sum()), skipped_images=total_skipped)

    def _inputs(self, batch: PairBatch) -> StepInputs:
        ids, mask = batch.input_ids.to(self.device), batch.attention_mask.to(self.device)
        if self.use_feature_cache:
            indices = batch.indices.to(self.device)
            keep = self.feature_valid[indices]
            return StepInputs(ids[keep], mask[keep], image_features=self.image_features[indices[keep]])
        pixels = batch.pixel_values.to(self.device) if batch.pixel_values is not None else None  # None: none readable
        return StepInputs(ids, mask, pixel_values=pixels)

    # ---------------------------------------------------------------- one step
    def train_step(self, inputs: StepInputs) -> StepResult:
        """Loss, backward, clipping, the non-finite guard, the optimizer and schedule step,
        and the logit-scale clamp; `self.step` counts it (skipped or not)."""
        acc, c = self.accelerator, self.config
        self.optimizer.zero_grad(set_to_none=True)
        loss, _ = loss_and_backward(
            self.forward, self.loss_fn, inputs, accum_steps=c.accum_steps, backward=acc.backward,
            autocast=self._autocast, no_sync=acc.no_sync, unwrapped=self.bare_forward,
        )
        max_norm = c.grad_clip if c.grad_clip > 0 else float("inf")
        grad_norm = acc.clip_grad_norm_(self.trainable, max_norm)
        grad_norm = torch.as_tensor(grad_norm, device=loss.device, dtype=torch.float32)
        bad = (~torch.isfinite(loss.float()) | ~torch.isfinite(grad_norm)).float()
        if acc.num_processes > 1:
            bad = acc.reduce(bad, reduction="sum")
        skipped = bool(bad.item() > 0)
        if skipped:
            if acc.scaler is not None:
                self.optimizer.step()  # the fp16 scaler sees the inf, skips and lowers its scale
            return self.skip_step("non-finite loss or gradient", float(loss), float(grad_norm))
        self.step += 1
        self.optimizer.step()
        self.scheduler.step()
        self._clamp_logit_scale()
        return StepResult(float(loss), float(grad_norm), skipped)

    def skip_step(self, reason: str, loss: float = float("nan"), grad_norm: float = float("nan")) -> StepResult:
        """Count a step without updating the parameters (the schedule still advances), and
        log it with its number and `reason`."""
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.skipped_steps.append(self.step)
        self.log.write("skipped_step", self.step, loss=loss, grad_norm=grad_norm,
                       reason=f"{reason}; parameters left unchanged")
        if self.accelerator.is_main_process:
            print(f"step {self.step}: {reason}, update skipped", flush=True)
        with warnings.catch_warnings():  # the schedule counts steps, taken or not: intended here
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.scheduler.step()
        self._clamp_logit_scale()
        return StepResult(loss, grad_norm, True)

    def _clamp_logit_scale(self) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0.0, self.model.max_logit_scale)

    def _any_rank_empty(self, inputs: StepInputs) -> bool:
        """True when this or another process has no pair left in its batch (every image
        unreadable): all ranks then skip the step together, so none waits on the others."""
        empty = torch.tensor(float(inputs.input_ids.shape[0] == 0), device=self.device)
        if self.accelerator.num_processes > 1:
            empty = self.accelerator.reduce(empty, reduction="sum")
        return bool(empty.item() > 0)

    # -------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        epoch, position = self.next_batch
        sampler_state = {**self.sampler.state_dict(), "epoch": epoch, "position": position}
        scaler = acc.scaler.state_dict() if acc.scaler is not None else None
        return ckpt.save_checkpoint(
            self.checkpoint_dir,
            self.step,
            model_state=self.model.state_dict(),
            optimizer_state=self.optimizer.state_dict(),
            scheduler_state=self.scheduler.state_dict(),
            scaler_state=scaler,
            trainer_state={"step": self.step, "skipped_steps": self.skipped_steps, "skipped_images": self.skipped_images,
                           "total_steps": self.total_steps},
            sampler_state=sampler_state,
            rank=acc.process_index,
            is_main=acc.is_main_process,
            barrier=acc.wait_for_everyone,
            keep=self.config.keep_checkpoints,
        )

    def _resume_candidates(self) -> list[Path]:
        """Checkpoints to try, in order: `resume=auto` gives the newest complete one (and, with
        `resume_fallback`, every older one after it); a path gives that path only."""
        resume = self.config.resume
        existing = ckpt.list_checkpoints(self.checkpoint_dir)
        if resume == "never":
            if existing:
                raise ValueError(
                    f"{self.checkpoint_dir} already holds checkpoints ({existing[-1].name}); "
                    "use resume=auto to continue the run or choose another output_dir"
                )
            return []
        if resume == "auto":
            newest_first = existing[::-1]
            return newest_first if self.config.resume_fallback else newest_first[:1]
        return [Path(resume)]

    def _resume_first_loadable(self, candidates: list[Path]) -> tuple[Path | None, dict[str, Any] | None]:
        """Resume from the first candidate that loads. A broken one (a truncated or missing
        file) is an error naming the file, unless `resume_fallback` lets `resume=auto` fall
        back to the next older checkpoint (with a warning and a `resume_fallback` record)."""
        for k, path in enumerate(candidates):
            try:
                return path, self.resume(path)
            except ckpt.CheckpointError as err:
                if self.config.resume != "auto":
                    raise
                older = ckpt.list_checkpoints(self.checkpoint_dir)
                older = [p for p in older if ckpt.checkpoint_step(p) < ckpt.checkpoint_step(path)]
                if not self.config.resume_fallback:
                    hint = (f"set resume_fallback=true (--resume-fallback) to resume from the newest older one that "
                            f"loads (next: {older[-1].name}), or delete it" if older
                            else "no older checkpoint exists: delete it to start the run over")
                    raise ckpt.CheckpointError(f"{err}; it is the run's newest checkpoint: {hint}") from None
                message = f"skipping broken checkpoint {path.name}: {err}"
                warnings.warn(message, stacklevel=2)
                self.log.write("resume_fallback", 0, checkpoint=path.name, reason=str(err))
                if self.accelerator.is_main_process:
                    print(message, flush=True)
                if k == len(candidates) - 1:
                    raise ckpt.CheckpointError(
                        f"no checkpoint of {self.checkpoint_dir} loads (the oldest failed with: {err})"
                    ) from None
        return None, None

    def resume(self, path: Path) -> dict[str, Any] | None:
        """Restore model, optimizer, scheduler, scaler, counters and sample position from a
        checkpoint; returns its RNG state (restored by the loop once the loader exists)."""
        acc = self.accelerator
        parts = ckpt.load_checkpoint(path, rank=acc.process_index, allow_partial=self.config.allow_partial_resume)
        self.model.load_state_dict(parts.model, strict=True)
        self.optimizer.load_state_dict(parts.optimizer)
        self.scheduler.load_state_dict(parts.scheduler)
        if acc.scaler is not None and parts.scaler is not None:
            acc.scaler.load_state_dict(parts.scaler)
        self.step = int(parts.trainer_state["step"])
        self.skipped_steps = list(parts.trainer_state.get("skipped_steps", []))
        self.skipped_images = int(parts.trainer_state.get("skipped_images", 0))
        if parts.sampler is not None:
            self.sampler.load_state_dict(parts.sampler)
        else:  # accepted partial resume: start the epoch the step falls in
            per_epoch = self.sampler.batches_per_epoch
            self.sampler.epoch, self.sampler.position = divmod(self.step, per_epoch)
        self.next_batch = (self.sampler.epoch, self.sampler.position)
        if acc.is_main_process:  # records of steps after the checkpoint are replayed
            kept = [r for r in read_metrics(self.log.path) if r.get("step", 0) <= self.step]
            write_atomic(self.log.path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        return parts.rng

    # ---------------------------------------------------------------- the run
    def run_eval(self) -> dict[str, float]:
        if self.eval_source is None:
            return {}
        metrics = evaluate(self.model, self.eval_source, self.processor, self.tokenizer,
                           templates=self.config.templates, batch_size=self.config.eval_batch_size, device=self.device)
        self.log.write("eval", self.step, **metrics)
        return metrics

    def _check_finite_parameters(self, resumed_from: Path | None) -> None:
        """Refuse to start from weights holding NaN or inf: every step would be skipped (the
        guard keeps parameters as they are), so the run would never move. A logit scale
        pushed to +inf is first clamped to its maximum, as after every step."""
        self._clamp_logit_scale()
        bad = [name for name, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            c = self.config
            origin = (f"checkpoint {resumed_from}" if resumed_from is not None
                      else f"init_model {c.init_model}" if c.init_model
                      else f"vision_init {c.vision_init}" if c.vision_init else "the model given to Trainer")
            raise ValueError(
                f"{origin} has non-finite (NaN or inf) values in {len(bad)} parameter(s): {', '.join(bad[:8])}"
                + (" ..." if len(bad) > 8 else "") + "; training from them would skip every step"
            )

    def fit(self) -> TrainResult:
        """Train to `total_steps` (resuming first when the run directory holds a checkpoint),
        evaluate, export the towers, write the plots."""
        acc, c = self.accelerator, self.config
        start = time.perf_counter()
        candidates = self._resume_candidates()
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            c.save(self.run_dir / "config.yaml")
        resume_path, rng = self._resume_first_loadable(candidates)
        self._check_finite_parameters(resume_path)
        if self.use_feature_cache:
            self.cache_image_features()
        batches = PairBatches(self.train_source, self.processor, self.tokenizer, c.seed,
                              with_images=not self.use_feature_cache)
        loader = iter(batch_loader(batches, self.sampler, c.num_workers))
        if rng is not None:
            ckpt.restore_rng(rng)
        result = TrainResult(self.run_dir, self.step, resumed_from=resume_path)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (c.progress and acc.is_main_process),
                   desc="train", dynamic_ncols=True)
        window_start, window_samples = time.perf_counter(), 0
        metrics: dict[str, float] = {}
        saved_at = self.step if resume_path is not None else -1
        while self.step < self.total_steps:
            batch = next(loader)
            for index, reason in batch.skipped:
                self.skipped_images += 1
                self.log.write("skipped_image", self.step, index=index, reason=reason)
            inputs = self._inputs(batch)
            if self._any_rank_empty(inputs):
                out = self.skip_step("no readable image in the batch of this or another process")
            else:
                out = self.train_step(inputs)
            epoch, position = batch.epoch, batch.position + 1
            self.next_batch = (epoch + 1, 0) if position >= self.sampler.batches_per_epoch else (epoch, position)
            window_samples += len(batch.indices) * acc.num_processes
            bar.update(1)
            if self.step % c.log_every == 0 or self.step == self.total_steps:
                elapsed = time.perf_counter() - window_start
                record = self.log.write(
                    "train", self.step, epoch=batch.epoch, loss=out.loss, grad_norm=out.grad_norm,
                    lr=self.scheduler.get_last_lr()[0], logit_scale=float(self.model.current_logit_scale().detach()),
                    samples_per_s=window_samples / max(elapsed, 1e-9),
                )
                bar.set_postfix(loss=f"{out.loss:.3f}", lr=f"{record['lr']:.2e}")
                window_start, window_samples = time.perf_counter(), 0
            if c.checkpoint_every and self.step % c.checkpoint_every == 0:
                self.save_checkpoint()
                saved_at = self.step
            if c.eval_every and self.step % c.eval_every == 0 and self.step < self.total_steps:
                metrics = self.run_eval()
            if self.stop_after is not None and self.step >= self.stop_after and self.step < self.total_steps:
                bar.close()
                result.interrupted = True
                break
        else:
            bar.close()
            if saved_at != self.step:
                self.save_checkpoint()
            metrics = self.run_eval()
            self.export()
            if acc.is_main_process:
                plot_run(self.log.path, self.run_dir / "plots")
        acc.wait_for_everyone()
        self.log.close()
        result.step = self.step
        result.metrics = metrics
        result.skipped_steps = list(self.skipped_steps)
        result.skipped_images = self.skipped_images
        result.seconds = time.perf_counter() - start
        return result

    def export(self) -> Path:
        """Each tower and the whole model with `save_pretrained` under `export/`."""
        out = self.run_dir / "export"
        if self.accelerator.is_main_process:
            self.model.save_pretrained(out / "model")  # with the image processor of the run
            self.model.vision.save_pretrained(out / "vision")
            self.model.text.save_pretrained(out / "text")
        self.accelerator.wait_for_everyone()
        return out


def train(config: TrainConfig, **kwargs: Any) -> TrainResult:
    """Build a `Trainer` for `config` and run it (see `Trainer` for the keyword arguments)."""
    return Trainer(config, **kwargs).fit()
