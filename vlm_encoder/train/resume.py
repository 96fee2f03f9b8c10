"""A run's checkpoints: what the loop saves (weights, optimizer, schedule, gradient scaler, its
counters and the position of the next batch) and how a run resumes (which checkpoint, past
broken ones when asked, each part restored, the metrics log cut back to the checkpoint's
step). The files themselves: `checkpoint.py`."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..pretrained import write_atomic
from . import checkpoint as ckpt
from .metrics import MetricsLog, read_metrics
from .setup import TrainSetup


@dataclass
class Progress:
    """Where a run stands; checkpointed with its weights.

    Attributes:
        step: Optimizer steps done (skipped ones included).
        next_batch: `(epoch, position)` of the next batch to consume (the loader may have read
            further ahead).
        skipped_steps: Steps whose update was skipped.
        skipped_images: Unreadable images left out (training batches and feature cache).
    """

    step: int = 0
    next_batch: tuple[int, int] = (0, 0)
    skipped_steps: list[int] = field(default_factory=list)
    skipped_images: int = 0


@dataclass
class Resumed:
    """Where a run starts: the checkpoint (`None`: from scratch), its progress and the RNG state
    to restore once the data loader exists."""

    path: Path | None
    progress: Progress
    rng: dict[str, Any] | None = None


class RunCheckpoints:
    """Saves a run's state into `directory` and resumes from it.

    Args:
        parts: The run's pieces (their states are saved and restored in place).
        directory: The run's `checkpoints/` folder.
        log: The metrics log (a fallback is recorded; records after the resumed step are dropped).
    """

    def __init__(self, parts: TrainSetup, directory: Path, log: MetricsLog) -> None:
        self.parts = parts
        self.directory = directory
        self.log = log

    def save(self, progress: Progress) -> Path:
        """Checkpoint the run at `progress.step` (every process calls this)."""
        p, acc = self.parts, self.parts.accelerator
        epoch, position = progress.next_batch
        scaler = acc.scaler.state_dict() if acc.scaler is not None else None
        return ckpt.save_checkpoint(
            self.directory,
            progress.step,
            model_state=p.model.state_dict(),
            optimizer_state=p.optimizer.state_dict(),
            scheduler_state=p.scheduler.state_dict(),
            scaler_state=scaler,
            trainer_state={"step": progress.step, "skipped_steps": progress.skipped_steps,
                           "skipped_images": progress.skipped_images, "total_steps": p.total_steps},
            sampler_state={**p.sampler.state_dict(), "epoch": epoch, "position": position},
            rank=acc.process_index,
            is_main=acc.is_main_process,
            barrier=acc.wait_for_everyone,
            keep=p.config.keep_checkpoints,
        )

    def candidates(self) -> list[Path]:
        """Checkpoints to try, in order: `resume=auto` gives the newest complete one (and, with
        `resume_fallback`, every older one after it); a path gives that path only.

        Raises:
            ValueError: `resume=never` and the directory holds checkpoints.
        """
        resume = self.parts.config.resume
        existing = ckpt.list_checkpoints(self.directory)
        if resume == "never":
            if existing:
                raise ValueError(
                    f"{self.directory} already holds checkpoints ({existing[-1].name}); "
                    "use resume=auto to continue the run or choose another output_dir"
                )
            return []
        if resume == "auto":
            newest_first = existing[::-1]
            return newest_first if self.parts.config.resume_fallback else newest_first[:1]
        return [Path(resume)]

    def resume(self, candidates: list[Path]) -> Resumed:
        """Restore the first candidate that loads. A broken one (a truncated or missing file)
        is an error naming the file, unless `resume_fallback` lets `resume=auto` fall back to
        the next older checkpoint (with a warning and a `resume_fallback` record)."""
        config = self.parts.config
        for k, path in enumerate(candidates):
            try:
                return self._restore(path)
            except ckpt.CheckpointError as err:
                if config.resume != "auto":
                    raise
                older = [p for p in ckpt.list_checkpoints(self.directory)
                         if ckpt.checkpoint_step(p) < ckpt.checkpoint_step(path)]
                if not config.resume_fallback:
                    hint = (f"set resume_fallback=true (--resume-fallback) to resume from the newest older one that "
                            f"loads (next: {older[-1].name}), or delete it" if older
                            else "no older checkpoint exists: delete it to start the run over")
                    raise ckpt.CheckpointError(f"{err}; it is the run's newest checkpoint: {hint}") from None
                message = f"skipping broken checkpoint {path.name}: {err}"
                warnings.warn(message, stacklevel=2)
                self.log.write("resume_fallback", 0, checkpoint=path.name, reason=str(err))
                if self.parts.accelerator.is_main_process:
                    print(message, flush=True)
                if k == len(candidates) - 1:
                    raise ckpt.CheckpointError(
                        f"no checkpoint of {self.directory} loads (the oldest failed with: {err})"
                    ) from None
        return Resumed(None, Progress())

    def _restore(self, path: Path) -> Resumed:
        """Model, optimizer, scheduler, scaler and sample position from `path`."""
        p, acc = self.parts, self.parts.accelerator
        loaded = ckpt.load_checkpoint(path, rank=acc.process_index, allow_partial=p.config.allow_partial_resume)
        p.model.load_state_dict(loaded.model, strict=True)
        p.optimizer.load_state_dict(loaded.optimizer)
        p.scheduler.load_state_dict(loaded.scheduler)
        if acc.scaler is not None and loaded.scaler is not None:
            acc.scaler.load_state_dict(loaded.scaler)
        state = loaded.trainer_state
        step = int(state["step"])
        if loaded.sampler is not None:
            p.sampler.load_state_dict(loaded.sampler)
        else:  # accepted partial resume: start the epoch the step falls in
            p.sampler.epoch, p.sampler.position = divmod(step, p.sampler.batches_per_epoch)
        progress = Progress(step, (p.sampler.epoch, p.sampler.position), list(state.get("skipped_steps", [])),
                            int(state.get("skipped_images", 0)))
        if acc.is_main_process:  # records of steps after the checkpoint are replayed
            kept = [r for r in read_metrics(self.log.path) if r.get("step", 0) <= step]
            write_atomic(self.log.path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        return Resumed(path, progress, loaded.rng)
