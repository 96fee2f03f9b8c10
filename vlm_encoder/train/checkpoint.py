"""Training checkpoints: written atomically, verified strictly on resume.

A checkpoint is a directory `checkpoints/step_XXXXXXXX/` holding

    model.safetensors     every parameter and buffer of the model
    ema.safetensors       the moving average of the weights (runs with `ema_decay` only)
    optimizer.pt          AdamW state
    scheduler.pt          learning-rate schedule state
    scaler.pt             fp16 gradient scaler state (fp16 runs only)
    trainer_state.json    step, epoch and counters
    sampler.json          the sample order's position (epoch, batch)
    rng_rank{r}.pt        torch / CUDA / numpy / Python RNG state of each process
    manifest.json         size and SHA-256 of every file above, written last

It is written into `.step_XXXXXXXX.tmp/` and renamed into place, so a directory named
`step_*` is complete; a crash leaves only a hidden temporary directory, which is ignored
(and removed by the next save). Replacing an existing `step_*` (a re-run of the same step)
first renames the old one aside (`.step_XXXXXXXX.old/`), so a crash never leaves a
half-deleted `step_*`; pruning beyond `keep` renames each old `step_*` away before deleting it.
On resume, a file the manifest lists that is missing, of another size or another hash is an
error naming it. A checkpoint without RNG or sampler state is refused unless the caller
accepts a resume that is not exact (`allow_partial`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..pretrained import apply_umask

MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
SCALER_FILE = "scaler.pt"
STATE_FILE = "trainer_state.json"
SAMPLER_FILE = "sampler.json"
REQUIRED = (MODEL_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, STATE_FILE)
PREFIX = "step_"
TEMP_SUFFIXES = (".tmp", ".old")  # hidden `.step_*.tmp` (being written) / `.step_*.old` (being replaced)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the file and why."""


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step of a `step_XXXXXXXX` directory."""
    return int(Path(path).name[len(PREFIX):])


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete (renamed-into-place) checkpoints of `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=checkpoint_step)


def is_temporary(path: Path) -> bool:
    """A hidden directory of an unfinished save (`.step_*.tmp`) or replacement (`.step_*.old`)."""
    return path.name.startswith("." + PREFIX) and path.name.endswith(TEMP_SUFFIXES)


def remove_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporaries interrupted saves left in `directory`; returns what was removed."""
    directory = Path(directory)
    removed = [p for p in directory.iterdir() if p.is_dir() and is_temporary(p)] if directory.is_dir() else []
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def prune_checkpoint(path: Path) -> None:
    """Delete a checkpoint: renamed away first (`.step_*.old`, a temporary the next save removes),
    so a deletion killed midway never leaves a half-deleted `step_*` that fails verification."""
    aside = path.with_name(f".{path.name}.old")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def capture_rng() -> dict[str, Any]:
    """Every RNG this process uses, as tensors and plain types (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class CheckpointParts:
    """What a checkpoint holds, as loaded (`rng` / `sampler` are `None` when absent and
    accepted)."""

    path: Path
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    trainer_state: dict[str, Any]
    sampler: dict[str, Any] | None
    rng: dict[str, Any] | None
    ema: dict[str, torch.Tensor] | None = None


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler_state: dict[str, Any],
    trainer_state: dict[str, Any],
    sampler_state: dict[str, Any],
    scaler_state: dict[str, Any] | None = None,
    ema_state: dict[str, torch.Tensor] | None = None,
    rank: int = 0,
    is_main: bool = True,
    barrier=lambda: None,
    keep: int | None = None,
) -> Path:
    """Write a checkpoint of `step` atomically; every process calls this (each writes its RNG
    state, the main process everything else, the manifest and the rename).

    Args:
        directory: The run's checkpoint folder.
        step: Optimizer steps done.
        model_state: The unwrapped model's state dict.
        optimizer_state / scheduler_state / scaler_state: Their `state_dict()`s.
        ema_state: The `AveragedModel`'s state dict (weights and `n_averaged`), if any.
        trainer_state: JSON-able counters (step, epoch, ...).
        sampler_state: `EpochSampler`-style position of the next batch (JSON-able).
        rank / is_main / barrier: This process and a synchronisation across processes.
        keep: Keep only the newest `keep` checkpoints (main process prunes).

    Returns:
        The final checkpoint directory.
    """
    directory = Path(directory)
    final = directory / checkpoint_name(step)
    tmp = directory / f".{checkpoint_name(step)}.tmp"
    if is_main:
        remove_temporaries(directory)  # of this step and of saves killed earlier
        tmp.mkdir(parents=True)
    barrier()
    rng = capture_rng()
    torch.save(rng, tmp / rng_file(rank))
    if is_main:
        model_cpu = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
        save_file(model_cpu, str(tmp / MODEL_FILE))
        if ema_state is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in ema_state.items()}, str(tmp / EMA_FILE))
        torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        torch.save(scheduler_state, tmp / SCHEDULER_FILE)
        if scaler_state is not None:
            torch.save(scaler_state, tmp / SCALER_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
        (tmp / SAMPLER_FILE).write_text(json.dumps(sampler_state, indent=2))
    barrier()
    if is_main:
        files = {}
        for path in sorted(tmp.iterdir()):
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
            files[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        manifest = json.dumps({"step": step, "files": files}, indent=2)
        (tmp / MANIFEST).write_text(manifest)
        apply_umask(tmp)  # safetensors writes its files private
        _fsync_dir(tmp)
        old = directory / f".{checkpoint_name(step)}.old"
        if final.exists():  # a re-run of the same step: move the old one aside, never half-delete it
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(directory)
        shutil.rmtree(old, ignore_errors=True)
        if keep is not None:
            for pruned in list_checkpoints(directory)[:-keep]:
                prune_checkpoint(pruned)
    barrier()
    return final


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Check every file the manifest lists (present, same size, same SHA-256).

    Returns:
        The manifest.

    Raises:
        CheckpointError: Naming the missing, truncated or corrupt file.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a directory)")
    manifest_path = path / MANIFEST
    if is_temporary(path):
        raise CheckpointError(
            f"{path} is the temporary directory of an interrupted save, not a checkpoint; "
            f"resume from a complete {PREFIX}* directory"
        )
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {MANIFEST} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        sizes = {name: int(info["bytes"]) for name, info in files.items()}
        hashes = {name: str(info["sha256"]) for name, info in files.items()}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{manifest_path} is truncated or corrupt ({type(err).__name__}: {err})") from None
    for name in files:
        info = {"bytes": sizes[name], "sha256": hashes[name]}
        file = path / name
        if not file.is_file():
            if name.startswith("rng_rank") or name == SAMPLER_FILE:
                continue  # judged by load_checkpoint (refused unless a partial resume is allowed)
            raise CheckpointError(f"checkpoint part {file} is missing (listed in {MANIFEST})")
        size = file.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"checkpoint part {file} is truncated or changed: {size} bytes, {MANIFEST} says {info['bytes']}")
        if _sha256(file) != info["sha256"]:
            raise CheckpointError(f"checkpoint part {file} is corrupt: its SHA-256 differs from {MANIFEST}")
    for name in REQUIRED:
        if name not in files:
            raise CheckpointError(f"checkpoint part {path / name} is missing (not in {MANIFEST})")
    return manifest


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is named
        raise CheckpointError(f"checkpoint part {path} cannot be read ({type(err).__name__}: {err})") from None


def load_checkpoint(path: str | os.PathLike, *, rank: int = 0, allow_partial: bool = False) -> CheckpointParts:
    """Verify and read a checkpoint for process `rank`.

    Args:
        path: A `step_*` directory.
        rank: This process (selects its RNG file).
        allow_partial: Accept a checkpoint without RNG or sampler state (the resumed run then
            differs from an uninterrupted one); a warning says what is missing.

    Raises:
        CheckpointError: Missing / truncated / corrupt part (always), or missing RNG / sampler
            state without `allow_partial`; the message names the file.
    """
    path = Path(path)
    manifest = verify_checkpoint(path)
    files = manifest["files"]
    try:
        model = load_file(str(path / MODEL_FILE))
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"checkpoint part {path / MODEL_FILE} cannot be read ({err})") from None
    optimizer = _torch_load(path / OPTIMIZER_FILE)
    scheduler = _torch_load(path / SCHEDULER_FILE)
    scaler = _torch_load(path / SCALER_FILE) if SCALER_FILE in files else None
    try:
        ema = load_file(str(path / EMA_FILE)) if EMA_FILE in files else None
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"checkpoint part {path / EMA_FILE} cannot be read ({err})") from None
    trainer_state = json.loads((path / STATE_FILE).read_text())

    missing = [name for name in (SAMPLER_FILE, rng_file(rank)) if not (path / name).is_file()]
    if missing:
        parts = ", ".join(str(path / name) for name in missing)
        if not allow_partial:
            raise CheckpointError(
                f"checkpoint {path} has no {'/'.join('RNG' if n.startswith('rng') else 'sampler' for n in missing)} "
                f"state ({parts} missing): resuming would not continue the run exactly; "
                "pass --allow-partial-resume (allow_partial_resume=true) to accept it"
            )
        warnings.warn(f"resuming from {path} without {parts}: the run will not match an uninterrupted one", stacklevel=2)
    sampler = json.loads((path / SAMPLER_FILE).read_text()) if SAMPLER_FILE not in missing else None
    rng = _torch_load(path / rng_file(rank)) if rng_file(rank) not in missing else None
    return CheckpointParts(path, model, optimizer, scheduler, scaler, trainer_state, sampler, rng, ema)
