"""A run's checkpoints: what the loop saves (weights, optimizer, schedule, gradient scaler, its
counters, the position of the next batch and the run's config) and how a run resumes (which
checkpoint, past broken ones when asked, the config checked against the checkpoint's, each part
restored with the new config's hyperparameters). Nothing is written while resuming: the loop
writes `config.yaml` and cuts the metrics log back once the resume succeeded. The files
themselves: `checkpoint.py`."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import checkpoint as ckpt
from . import fsdp
from .config import RESUMABLE_FIELDS, TrainConfig
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
    """Where a run starts: the checkpoint (`None`: from scratch), its progress, the RNG state
    to restore once the data loader exists, the config fields changed from the checkpoint's
    (`{field: (old, new)}`, all in `RESUMABLE_FIELDS`) and the broken checkpoints skipped
    (`(name, reason)`), for the loop to log."""

    path: Path | None
    progress: Progress
    rng: dict[str, Any] | None = None
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _plain(config: TrainConfig) -> dict[str, Any]:
    return json.loads(json.dumps(config.to_dict()))  # as trainer_state.json holds it


def config_changes(saved: dict[str, Any], config: TrainConfig, where: str) -> dict[str, tuple[Any, Any]]:
    """The fields of `config` that differ from `saved` (a checkpoint's config), all resumable.

    Raises:
        ValueError: A field outside `RESUMABLE_FIELDS` differs; the message names each such
            field with both values.
    """
    new = _plain(config)
    changed = {name: (saved[name], value) for name, value in new.items() if name in saved and saved[name] != value}
    refused = {name: values for name, values in changed.items() if name not in RESUMABLE_FIELDS}
    if refused:
        listed = "; ".join(f"{name}: {old!r} -> {value!r}" for name, (old, value) in refused.items())
        raise ValueError(
            f"cannot resume from {where} with a changed {', '.join(refused)} ({listed}): the run would not "
            f"continue the same training. Only {', '.join(sorted(RESUMABLE_FIELDS))} may change on resume; "
            "restore the other values, or start a new run in another output_dir"
        )
    return changed


def _saved_config(path: Path, state: dict[str, Any]) -> dict[str, Any] | None:
    """The config a checkpoint was saved with: in its `trainer_state.json`, or (checkpoints
    written before it was kept there) its run directory's `config.yaml`."""
    if isinstance(state.get("config"), dict):
        return state["config"]
    run_config = path.parent.parent / "config.yaml"
    try:
        saved = yaml.safe_load(run_config.read_text()) if run_config.is_file() else None
    except (OSError, yaml.YAMLError):
        return None
    return json.loads(json.dumps(saved)) if isinstance(saved, dict) else None


def _check_same_model(model: Any, state: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint of another architecture with the keys and shapes that differ."""
    own = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    theirs = {name: tuple(value.shape) for name, value in state.items()}
    missing, unexpected = sorted(own.keys() - theirs.keys()), sorted(theirs.keys() - own.keys())
    shapes = [f"{name} {theirs[name]} vs {own[name]}" for name in sorted(own.keys() & theirs.keys())
              if own[name] != theirs[name]]
    if missing or unexpected or shapes:
        parts = [f"{label} ({len(items)}): {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
                 for label, items in (("missing from the checkpoint", missing), ("not in this model", unexpected),
                                      ("other shapes, checkpoint vs model", shapes)) if items]
        raise ValueError(f"checkpoint {path} holds another architecture than this run's model: {'; '.join(parts)}")


class RunCheckpoints:
    """Saves a run's state into `directory` and resumes from it.

    Args:
        parts: The run's pieces (their states are saved and restored in place).
        directory: The run's `checkpoints/` folder.
    """

    def __init__(self, parts: TrainSetup, directory: Path) -> None:
        self.parts = parts
        self.directory = directory

    def save(self, progress: Progress) -> Path:
        """Checkpoint the run at `progress.step` (every process calls this)."""
        p, acc = self.parts, self.parts.accelerator
        epoch, position = progress.next_batch
        scaler = acc.scaler.state_dict() if acc.scaler is not None else None
        if p.sharded:  # whole tensors, gathered on every process: the same files as DDP writes
            model_state = fsdp.full_state_dict(p.bare_forward)
            optimizer_state = fsdp.full_optimizer_state_dict(p.bare_forward, p.optimizer.optimizer)
        else:
            model_state, optimizer_state = p.model.state_dict(), p.optimizer.state_dict()
        return ckpt.save_checkpoint(
            self.directory,
            progress.step,
            model_state=model_state,
            optimizer_state=optimizer_state,
            scheduler_state=p.scheduler.state_dict(),
            scaler_state=scaler,
            ema_state=p.ema.state_dict() if p.ema is not None else None,
            trainer_state={"step": progress.step, "skipped_steps": progress.skipped_steps,
                           "skipped_images": progress.skipped_images, "total_steps": p.total_steps,
                           "config": _plain(p.config)},
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
        the next older checkpoint (with a warning; the loop records it as `resume_fallback`).
        A config change outside `RESUMABLE_FIELDS`, or a checkpoint of another architecture,
        is a `ValueError` (never a fallback). Nothing is written here."""
        config = self.parts.config
        skipped: list[tuple[str, str]] = []
        for k, path in enumerate(candidates):
            try:
                resumed = self._restore(path)
                resumed.skipped = skipped
                return resumed
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
                skipped.append((path.name, str(err)))
                if self.parts.accelerator.is_main_process:
                    print(message, flush=True)
                if k == len(candidates) - 1:
                    raise ckpt.CheckpointError(
                        f"no checkpoint of {self.directory} loads (the oldest failed with: {err})"
                    ) from None
        return Resumed(None, Progress())

    def _restore(self, path: Path) -> Resumed:
        """Model, optimizer, scheduler, scaler and sample position from `path`, after checking
        the config and the architecture. The optimizer's moments and the schedule's position
        come from the checkpoint; its hyperparameters (lr, weight decay, betas, eps, the
        schedule's peak and floor) from this run's config, so a resumable change takes effect."""
        p, acc = self.parts, self.parts.accelerator
        loaded = ckpt.load_checkpoint(path, rank=acc.process_index, allow_partial=p.config.allow_partial_resume)
        state = loaded.trainer_state
        saved = _saved_config(path, state)
        changes = config_changes(saved, p.config, str(path)) if saved is not None else {}
        _check_same_model(p.model, loaded.model, path)
        if p.sharded:  # each process keeps its shard of the whole tensors
            fsdp.load_full_state_dict(p.bare_forward, loaded.model)
        else:
            p.model.load_state_dict(loaded.model, strict=True)
        fresh_groups = [{k: v for k, v in g.items() if k != "params"} for g in p.optimizer.param_groups]
        fresh_base_lrs = list(p.scheduler.base_lrs)
        try:
            if p.sharded:
                fsdp.load_full_optimizer_state_dict(p.bare_forward, p.optimizer.optimizer, loaded.optimizer)
            else:
                p.optimizer.load_state_dict(loaded.optimizer)
        except ValueError as err:  # other parameter groups: another set of trainable parameters
            raise ValueError(f"checkpoint {path} holds an optimizer over other parameters ({err})") from None
        p.scheduler.load_state_dict(loaded.scheduler)
        p.scheduler.base_lrs = fresh_base_lrs
        lrs = [base * factor(p.scheduler.last_epoch) for base, factor in zip(fresh_base_lrs, p.scheduler.lr_lambdas)]
        for group, fresh, lr in zip(p.optimizer.param_groups, fresh_groups, lrs):
            group.update(fresh, lr=lr)
        p.scheduler._last_lr = lrs  # what get_last_lr() reports until the next step
        if acc.scaler is not None and loaded.scaler is not None:
            acc.scaler.load_state_dict(loaded.scaler)
        if p.ema is not None:
            if loaded.ema is None:
                raise ValueError(f"checkpoint {path} holds no moving average of the weights (ema.safetensors), "
                                 "but this run keeps one (ema_decay): resuming would not continue it")
            p.ema.load_state_dict(loaded.ema, strict=True)
        step = int(state["step"])
        if loaded.sampler is not None:
            p.sampler.load_state_dict(loaded.sampler)
        else:  # accepted partial resume: start the epoch the step falls in
            p.sampler.epoch, p.sampler.position = divmod(step, p.sampler.batches_per_epoch)
        progress = Progress(step, (p.sampler.epoch, p.sampler.position), list(state.get("skipped_steps", [])),
                            int(state.get("skipped_images", 0)))
        return Resumed(path, progress, loaded.rng, changes)
