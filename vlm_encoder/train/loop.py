"""`Trainer`: contrastive image-text training on accelerate (one GPU, several GPUs or nodes via
`accelerate launch`, or the CPU), with exact resume.

The pieces, each readable alone: `setup.py` builds what the config describes, `step.py` takes
one optimizer step, `resume.py` saves and restores the run's state, `evaluate.py` scores the
model, `feature_cache.py` holds LiT's cached image features. This module is the loop over them.

Run directory:

    config.yaml          the resolved TrainConfig
    metrics.jsonl        one record per log / evaluation / skipped step
    checkpoints/         step_XXXXXXXX/ (see checkpoint.py), the last `keep_checkpoints`
    plots/               loss.png, eval.png
    export/              model/ (ContrastiveModel + processor), vision/, text/ (save_pretrained)
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..contrastive import ContrastiveModel
from ..determinism import batch_invariance
from ..locks import hold_directory
from ..lora import merge_lora
from . import checkpoint as ckpt
from .augment import TrainAugment
from .batches import PairBatch, PairBatches, batch_loader
from .config import TrainConfig
from .evaluate import evaluate
from .feature_cache import ImageFeatureCache, cache_image_features
from .fsdp import full_state_dict
from .metrics import MetricsLog
from .plots import plot_run
from .resume import Progress, Resumed, RunCheckpoints
from .setup import TrainSetup, check_finite_parameters, set_up
from .sources import PairSource
from .step import StepInputs, StepResult, any_rank_empty, optimizer_step, skip_update


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
        resumed_from: The checkpoint the run started from, if any.
    """

    output_dir: Path
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    skipped_steps: list[int] = field(default_factory=list)
    skipped_images: int = 0
    seconds: float = 0.0
    resumed_from: Path | None = None


class Trainer:
    """Builds everything a `TrainConfig` describes and runs it.

    Args:
        config: The run.
        model: Use this model instead of building one (it is set up for `lock_image` and
            gradient checkpointing as the config says).
        train_source / eval_source: Use these sources instead of opening `config.data`.
        accelerator: An `accelerate.Accelerator` (default: one from the config).

    Attributes:
        model / accelerator: The model being trained and the accelerator (from `parts`).
        parts: The run's pieces (`TrainSetup`): model, processor, sources, optimizer, ...
        progress: Where the run stands (`Progress`: step, skipped steps and images).
        log: The metrics log (`metrics.jsonl`).
        checkpoints / checkpoint_dir: Saving and resuming (`RunCheckpoints`), and its folder.
        feature_cache: LiT's cached image features, once `fit` has computed them.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        model: ContrastiveModel | None = None,
        train_source: PairSource | None = None,
        eval_source: PairSource | None = None,
        accelerator: Any = None,
    ) -> None:
        self.config = config
        self.parts: TrainSetup = set_up(config, model=model, train_source=train_source, eval_source=eval_source,
                                        accelerator=accelerator)
        if self.parts.sharded and config.lora_r is not None:
            raise NotImplementedError("fsdp with lora_r: the export does not merge sharded adapters yet; "
                                      "use one of them")
        self.run_dir = Path(config.output_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.log = MetricsLog(self.run_dir / "metrics.jsonl", enabled=self.accelerator.is_main_process,
                              tensorboard_dir=self.run_dir / "tensorboard")
        self.checkpoints = RunCheckpoints(self.parts, self.checkpoint_dir)
        self.progress = Progress()
        self.feature_cache: ImageFeatureCache | None = None

    @property
    def model(self) -> ContrastiveModel:
        return self.parts.model

    @property
    def accelerator(self) -> Any:
        return self.parts.accelerator

    # ---------------------------------------------------------------- one step
    def step_inputs(self, batch: PairBatch) -> StepInputs:
        """The batch on the device: pixels, or LiT's cached features of its images."""
        if self.feature_cache is not None:
            return self.feature_cache.step_inputs(batch)
        device = self.parts.device
        pixels = batch.pixel_values.to(device) if batch.pixel_values is not None else None  # None: none readable
        return StepInputs(batch.input_ids.to(device), batch.attention_mask.to(device), pixel_values=pixels)

    def train_step(self, inputs: StepInputs) -> StepResult:
        """One optimizer step over `inputs`, counted in `progress` (skipped or not); an empty
        batch on any process, or a non-finite loss or gradient, skips the update."""
        if any_rank_empty(self.accelerator, inputs):
            skip_update(self.parts)
            out = StepResult(float("nan"), float("nan"), skipped=True)
            reason = "no readable image in the batch of this or another process"
        else:
            out, reason = optimizer_step(self.parts, inputs), "non-finite loss or gradient"
            if not out.skipped and self.parts.ema is not None:
                self.parts.ema.update_parameters(self.model)
        self.progress.step += 1
        if out.skipped:
            step = self.progress.step
            self.progress.skipped_steps.append(step)
            self.log.write("skipped_step", step, loss=out.loss, grad_norm=out.grad_norm,
                           reason=f"{reason}; parameters left unchanged")
            if self.accelerator.is_main_process:
                print(f"step {step}: {reason}, update skipped", flush=True)
        return out

    # ---------------------------------------------------------------- the run
    @batch_invariance("off")  # training needs no bitwise batch invariance: batched CPU kernels
    def fit(self) -> TrainResult:
        """Train to `total_steps` (resuming first when the run directory holds a checkpoint),
        evaluate, export the towers, write the plots.

        Raises:
            ValueError: A config change a resume refuses; or every step was skipped (no
                readable image, non-finite losses): nothing is exported.
            OSError: `checkpoints/` is not a writable directory (before the first step)."""
        # One run per output_dir (vlm_encoder.locks): a second one is refused, naming this one.
        with hold_directory(self.run_dir, self.accelerator, what="training run",
                            hint="wait for it to finish, or choose another output_dir"):
            return self._fit()

    def _fit(self) -> TrainResult:
        """`fit`, holding the lock of the run directory."""
        acc, c, parts = self.accelerator, self.config, self.parts
        start = time.perf_counter()
        resumed, loader = self._start()
        progress = self.progress
        bar = tqdm(total=parts.total_steps, initial=progress.step, disable=not (c.progress and acc.is_main_process),
                   desc="train", dynamic_ncols=True)
        window_start, window_samples = time.perf_counter(), 0
        saved_at = progress.step if resumed.path is not None else -1
        while progress.step < parts.total_steps:
            batch = next(loader)
            for index, reason in batch.skipped:
                progress.skipped_images += 1
                self.log.write("skipped_image", progress.step, index=index, reason=reason)
            out = self.train_step(self.step_inputs(batch))
            position = batch.position + 1
            per_epoch = parts.sampler.batches_per_epoch
            progress.next_batch = (batch.epoch + 1, 0) if position >= per_epoch else (batch.epoch, position)
            window_samples += len(batch.indices) * acc.num_processes
            bar.update(1)
            step = progress.step
            if step % c.log_every == 0 or step == parts.total_steps:
                elapsed = time.perf_counter() - window_start
                record = self.log.write(
                    "train", step, epoch=batch.epoch, loss=out.loss, grad_norm=out.grad_norm,
                    lr=parts.scheduler.get_last_lr()[0], logit_scale=float(self.model.current_logit_scale().detach()),
                    samples_per_s=window_samples / max(elapsed, 1e-9),
                )
                bar.set_postfix(loss=f"{out.loss:.3f}", lr=f"{record['lr']:.2e}")
                window_start, window_samples = time.perf_counter(), 0
            if c.checkpoint_every and step % c.checkpoint_every == 0:
                self.checkpoints.save(progress)
                saved_at = step
            if c.eval_every and step % c.eval_every == 0 and step < parts.total_steps:
                self.evaluate()
        bar.close()
        if progress.step and len(progress.skipped_steps) >= progress.step:
            self.log.close()
            reasons = sorted({r["reason"] for r in self.log.records if r["kind"] == "skipped_step"})
            raise ValueError(
                f"every one of the run's {progress.step} steps was skipped ({'; '.join(reasons) or 'see metrics.jsonl'}, "
                f"{progress.skipped_images} unreadable images): the model is untrained, so nothing was exported; "
                f"check the data (the skipped_step / skipped_image records in {self.log.path})"
            )
        if saved_at != progress.step:
            self.checkpoints.save(progress)
        metrics = self.evaluate()
        self.export()
        if acc.is_main_process:
            plot_run(self.log.path, self.run_dir / "plots")
        acc.wait_for_everyone()
        self.log.close()
        return TrainResult(self.run_dir, progress.step, metrics, list(progress.skipped_steps), progress.skipped_images,
                           time.perf_counter() - start, resumed.path)

    def _start(self) -> tuple[Resumed, Iterator[PairBatch]]:
        """Write the config, resume (or start afresh), check the weights, fill LiT's feature
        cache, and open the loader at the next batch with the checkpoint's RNG state."""
        acc, c, parts = self.accelerator, self.config, self.parts
        candidates = self.checkpoints.candidates()  # refuses resume=never before anything is written
        resumed = self.checkpoints.resume(candidates)  # refuses a changed config before anything is written
        self.progress = resumed.progress
        if acc.is_main_process:
            self._open_run_dir(resumed)
        check_finite_parameters(parts, resumed.path)
        if parts.use_feature_cache:
            self.feature_cache = cache_image_features(parts, self.log, self.progress.step)
            self.progress.skipped_images += self.feature_cache.skipped
        augment = TrainAugment(parts.processor, c.seed) if c.augment else None
        batches = PairBatches(parts.train_source, parts.processor, parts.tokenizer, c.seed,
                              with_images=not parts.use_feature_cache, augment=augment)
        loader = iter(batch_loader(batches, parts.sampler, c.num_workers))
        if resumed.rng is not None:  # after the loader exists: it is the RNG state the checkpoint saw
            ckpt.restore_rng(resumed.rng)
        return resumed, loader

    def _open_run_dir(self, resumed: Resumed) -> None:
        """The main process's writes before the first step: `checkpoints/` checked writable (not
        found out at the first save, after training), `config.yaml` as this run runs, and the
        metrics log cut back to the resumed step (a run started over keeps no record of the
        interrupted one; a torn last line goes too), then what the resume did is logged."""
        c, step = self.config, resumed.progress.step
        check_writable(self.checkpoint_dir)
        c.save(self.run_dir / "config.yaml")
        self.log.cut_after(step if resumed.path is not None else None)
        for name, reason in resumed.skipped:
            self.log.write("resume_fallback", step, checkpoint=name, reason=reason)
        if resumed.path is None:
            return
        changed = {name: {"old": old, "new": new} for name, (old, new) in resumed.changes.items()}
        self.log.write("resume", step, checkpoint=resumed.path.name, changed=changed)
        said = "".join(f"; {name} {old!r} -> {new!r}" for name, (old, new) in resumed.changes.items())
        print(f"resuming from {resumed.path} at step {step} of {self.parts.total_steps}{said}",
              file=sys.stderr, flush=True)

    def evaluate(self) -> dict[str, float]:
        """Zero-shot and retrieval metrics on the evaluation source, logged (empty without one)."""
        p = self.parts
        if p.eval_source is None:
            return {}
        with p.gathered():
            metrics = evaluate(self.final_model, p.eval_source, p.processor, p.tokenizer,
                               templates=self.config.templates, batch_size=self.config.eval_batch_size,
                               device=p.device, progress=self.config.progress)
        self.log.write("eval", self.progress.step, **metrics)
        return metrics

    @property
    def final_model(self) -> ContrastiveModel:
        """What is evaluated and exported: the moving average of the weights with `ema_decay`,
        else the trained model itself."""
        return self.parts.ema.module if self.parts.ema is not None else self.model

    def export(self) -> Path:
        """Each tower and the whole model (`final_model`) with `save_pretrained` under `export/`."""
        out = self.run_dir / "export"
        model = self.final_model
        if self.config.lora_r is not None:  # adapters merged: a plain ContrastiveModel
            model = merge_lora(model)
        if self.parts.sharded:  # the whole weights (gathered by every process) in an unsharded copy
            state = full_state_dict(self.parts.bare_forward)
            if self.accelerator.is_main_process:
                whole = ContrastiveModel.from_config(model.config)
                whole.load_state_dict(state, strict=True)
                whole.set_image_processor(model.get_image_processor())
                model = whole
        if self.accelerator.is_main_process:
            model.save_pretrained(out / "model")  # with the image processor of the run
            model.vision.save_pretrained(out / "vision")
            model.text.save_pretrained(out / "text")
        self.accelerator.wait_for_everyone()
        return out


def check_writable(directory: Path) -> None:
    """Create `directory` if needed and write (then remove) a file in it.

    Raises:
        OSError: It is a file, or cannot be created or written; the message names it.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        what = "is a file, not a directory" if directory.is_file() else f"is not writable ({err.strerror or err})"
        raise OSError(f"{directory} {what}: checkpoints could not be saved; fix it or choose another output_dir") from None


def train(config: TrainConfig, **kwargs: Any) -> TrainResult:
    """Build a `Trainer` for `config` and run it (see `Trainer` for the keyword arguments)."""
    return Trainer(config, **kwargs).fit()
