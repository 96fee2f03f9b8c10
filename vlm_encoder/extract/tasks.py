"""Extraction as three tasks, the same under every runner: plan once, run shards anywhere, finalize.

    plan = plan_extraction(config)              # the driver, once: writes DIR/plan.json + the manifest
    for k in range(plan.num_shards):            # anywhere, in any order, any number of times
        run_shard(plan.out, k)                  # or ShardWorker(plan).run(k) to load the model once
    print(finalize_extraction(plan.out))        # the driver: merge the shards' records, report

`plan_extraction` resolves the model and data specs, takes the arguments fingerprint, counts the
rows (listing files or reading a table's length: no image is decoded), fixes the shard layout
and writes the manifest skeleton and `plan.json` (everything a worker needs: the config, the
fingerprint, the layout and the features' shapes). A worker (`ShardWorker`) loads the model and
opens the source once, checks its fingerprint equals the plan's, and encodes shard `k` into its
atomically committed file and sidecar; a shard already committed and intact is skipped at once.
Shard `k`'s bytes depend only on the plan and `k` (never on the engine, the number of workers,
the batch size or which worker ran it), so two workers running the same `k` write the same bytes.

`run_extraction` (one process, or an `accelerate launch`), `vlm-encoder extract-shard` (a Slurm
array) and the Ray / Spark adapters are callers of these three.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..locks import hold_directory
from .config import ExtractConfig
from .resolution import GRID, NUM_PATCHES
from .runner import Encoding, _process_state, encode_shards, needs_work, open_encoding, probe_features
from .shards import (
    FAILURES_NAME,
    FORMAT,
    MANIFEST_NAME,
    ShardLayout,
    check_fingerprint,
    finalize_manifest,
    fingerprint_differences,
    read_manifest,
    remove_stale_temporaries,
    valid_sidecar,
    write_json_atomic,
)
from .sources import FileListSource, PlannedFileSource, write_planned_rows
from .table_sources import TABLE_INDEX, TableSource

PLAN_NAME = "plan.json"
ROWS_DIR = "plan-rows"  # a file source's rows per shard (`sources.PlannedFileSource`)
PLAN_FORMAT = "vlm_encoder.extract_plan/1"
LOCK_HINT = "pass --wait-lock to wait for it, or choose another --out"


@dataclass(frozen=True)
class ExtractPlan:
    """Everything a worker needs to encode any shard of a store (`DIR/plan.json`).

    Attributes:
        out: The store's folder (where the plan was read from, which may be another mount
            of the folder the driver wrote).
        config: The run's `ExtractConfig.to_dict()`, its `device` the one the fingerprint was
            taken for (by default the planning machine's accelerator type: `cpu`, `cuda`, ...).
        fingerprint: The arguments fingerprint every worker must reproduce.
        features: Stored feature name -> `{"shape": [...], "dtype": "float32"}` (per row).
        num_rows: Rows of the dataset.
        shard_size: Rows per shard: shard `k` holds rows `[k*S, (k+1)*S)`.
        num_blocks: Blocks of the encoder.
        ragged: Patches are stored per image with their grid (native / anyres resolution).
        row_files: The plan wrote each shard's rows (path, name, size) to `out/plan-rows/`, so
            a worker reads only its shards' rows (folders and list files).
    """

    out: Path
    config: dict[str, Any]
    fingerprint: dict[str, Any]
    features: dict[str, dict[str, Any]]
    num_rows: int
    shard_size: int
    num_blocks: int
    ragged: bool = False
    row_files: bool = False

    @property
    def num_shards(self) -> int:
        return self.layout.num_shards

    @property
    def layout(self) -> ShardLayout:
        return ShardLayout(self.num_rows, self.shard_size)

    def extract_config(self, **changes: Any) -> ExtractConfig:
        """The run's config, writing to `out`, with `changes` (e.g. `device`, `batch_size`)."""
        return ExtractConfig.from_dict({**self.config, "out": self.out, **changes})

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "config": self.config,
            "fingerprint": self.fingerprint,
            "features": self.features,
            "num_rows": self.num_rows,
            "shard_size": self.shard_size,
            "num_shards": self.num_shards,
            "num_blocks": self.num_blocks,
            "ragged": self.ragged,
            "row_files": self.row_files,
        }

    def save(self) -> None:
        """Write `out/plan.json` atomically."""
        write_json_atomic(Path(self.out) / PLAN_NAME, self.to_dict())

    @classmethod
    def load(cls, out: str | os.PathLike) -> ExtractPlan:
        """Read `out/plan.json`.

        Raises:
            FileNotFoundError: No plan there (the message says how to write one).
            ValueError: A plan that is not valid JSON or not of this format.
        """
        out = Path(out)
        path = out / PLAN_NAME
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path} does not exist: plan the run first with `vlm-encoder extract ... --out {out} --plan-only`"
            ) from None
        except (OSError, ValueError) as err:
            raise ValueError(f"{path} cannot be read ({err}); plan the run again with --plan-only") from None
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise ValueError(f"{path} is not an extraction plan of format {PLAN_FORMAT!r}; plan again with --plan-only")
        try:
            return cls(out=out, config=data["config"], fingerprint=data["fingerprint"], features=data["features"],
                       num_rows=int(data["num_rows"]), shard_size=int(data["shard_size"]),
                       num_blocks=int(data["num_blocks"]), ragged=bool(data.get("ragged", False)),
                       row_files=bool(data.get("row_files", False)))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path} is incomplete ({type(err).__name__}: {err}); plan again with --plan-only") from None


@dataclass(frozen=True)
class ShardResult:
    """What running one shard did (plain values: engines ship it between processes).

    Attributes:
        index: The shard.
        rows: Rows of the shard with features.
        rows_failed: Rows of the shard that failed (recorded in its sidecar).
        skipped: The shard was already committed and intact: nothing was encoded.
        seconds: Wall time spent on the shard.
    """

    index: int
    rows: int
    rows_failed: int
    skipped: bool
    seconds: float


@dataclass(frozen=True)
class ExtractSummary:
    """What a run did and what the store holds.

    Attributes:
        out: The store's folder.
        total_rows: Rows of the dataset.
        rows_written: Rows with features in the store (all processes, all runs).
        rows_failed: Rows that failed to decode (all processes, all runs).
        complete: Every shard is written; `rows_written + rows_failed == total_rows`.
        rows_this_run: Rows handled now (written or failed), by every process of the launch.
        shards_this_run: Shards written now, by every process.
        shards_kept: Shards found intact and kept.
        seconds: Wall time of the run (model loading, checks and extraction; the slowest process).
        extract_seconds: Of which decoding, encoding and writing this run's shards.
        rows_nonfinite: Of the failed rows, those whose features were not finite (inf/NaN).
        rows_retryable: Of the failed rows, those a rerun retries once their file is there.
        first_failure: One failed row and its reason, for messages (empty without failures).
        missing_shards: The shards not committed yet (empty when complete).
    """

    out: str
    total_rows: int
    rows_written: int
    rows_failed: int
    complete: bool
    rows_this_run: int
    shards_this_run: int
    shards_kept: int
    seconds: float
    extract_seconds: float = 0.0
    rows_nonfinite: int = 0
    rows_retryable: int = 0
    first_failure: str = ""
    missing_shards: tuple[int, ...] = ()

    @property
    def all_failed(self) -> bool:
        """Every row of the dataset failed: the store holds no features."""
        return self.complete and self.rows_written == 0 and self.rows_failed > 0

    @property
    def images_per_second(self) -> float:
        """Rows handled per second of extraction (decode, encode, write)."""
        return self.rows_this_run / self.extract_seconds if self.extract_seconds > 0 else 0.0

    def __str__(self) -> str:
        rate = self.images_per_second
        state = "complete" if self.complete else "INCOMPLETE (run again with the same arguments)"
        return (
            f"{self.out}: {self.rows_written} rows written, {self.rows_failed} failed, of {self.total_rows} "
            f"({state}); this run: {self.rows_this_run} rows in {self.shards_this_run} shards, "
            f"{self.shards_kept} shards kept, {self.seconds:.1f} s ({rate:.1f} images/s)"
        )


# ------------------------------------------------------------------------------------ plan


def plan_extraction(config: ExtractConfig) -> ExtractPlan:
    """Plan `config` (see the module docstring), holding the lock of `config.out` meanwhile.

    Planning the same arguments again is a no-op (the plan is rewritten with the same fingerprint
    and layout; batch size and workers may differ). The model is loaded on the CPU to take its
    weights' hash and the features' shapes; the fingerprint is taken for `config.device` (default:
    this machine's accelerator), whose type the workers' device must share (on the CPU the GEMM
    route is part of the fingerprint), so plan a GPU run on a CPU-only machine with `device="cuda"`.

    Raises:
        ValueError: `config.out` holds a store of other arguments (each difference named).
        DirectoryInUseError: Another run holds `config.out`.
    """
    with hold_directory(config.out, None, what="extraction plan", hint=LOCK_HINT, wait=config.wait_lock):
        return _plan_locked(config)


def _plan_locked(config: ExtractConfig) -> ExtractPlan:
    """`plan_extraction` for a caller that holds the lock of `config.out` (an engine's driver,
    which holds it from the plan to the summary)."""
    device = torch.device(config.device) if config.device else _process_state(None).device
    encoding = open_encoding(config, device, compute_device=torch.device("cpu"))
    plan = _plan_of(encoding)
    _write_manifest_skeleton(plan)
    check_fingerprint(plan.out, read_manifest(plan.out), plan.fingerprint)
    if isinstance(encoding.source, FileListSource):  # before the plan that names them
        write_planned_rows(encoding.source, plan.out / ROWS_DIR, plan.shard_size)
        plan = dataclasses.replace(plan, row_files=True)
    elif isinstance(encoding.source, TableSource):  # parquet / tar files: their sizes and row counts
        encoding.source.save(plan.out / ROWS_DIR / TABLE_INDEX)
    plan.save()
    return plan


def _plan_of(encoding: Encoding) -> ExtractPlan:
    """The plan of an opened encoding (no I/O)."""
    empty = probe_features(encoding)
    config = encoding.config
    return ExtractPlan(
        out=Path(config.out),
        config={**config.to_dict(), "device": config.device or encoding.device.type},  # workers' default
        fingerprint=json.loads(json.dumps(encoding.fingerprint, default=str)),  # as JSON reads it back
        features={k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype).removeprefix("torch.")}
                  for k, v in empty.items()},
        num_rows=len(encoding.source),
        shard_size=config.shard_size,
        num_blocks=encoding.encoder.num_blocks,
        ragged=encoding.prepare is not None,
    )


def _write_manifest_skeleton(plan: ExtractPlan) -> None:
    """The manifest without shards, unless the store has one already."""
    plan.out.mkdir(parents=True, exist_ok=True)
    if read_manifest(plan.out) is not None:
        return
    manifest = {
        "format": FORMAT,
        "fingerprint": plan.fingerprint,
        "num_rows": plan.num_rows,
        "num_shards": plan.num_shards,
        "num_blocks": plan.num_blocks,
        "features": plan.features,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "shards": [],
        **({"ragged": {"keys": [k for k in plan.features if k.endswith(".patch")], "counts": NUM_PATCHES,
                       "grid": GRID}} if plan.ragged else {}),
        "complete": False,
    }
    write_json_atomic(plan.out / MANIFEST_NAME, manifest)


# ---------------------------------------------------------------------------------- shards


class ShardWorker:
    """Encodes shards of a plan; loads the model and opens the source once (an engine's actor).

    Args:
        plan: The plan (`ExtractPlan.load(out)`).
        device: Torch device (default: the plan's `device`, else this machine's accelerator).
            Its type must be the plan's (on the CPU the GEMM route is part of the fingerprint).
        batch_size: Images per forward pass (default the plan's; does not change the bytes).
        num_workers: DataLoader processes decoding images (default the plan's; idem).
        progress: Show a progress bar of rows.
        writer: Provenance recorded in each sidecar (default host and pid); not in the shard.

    Raises:
        ValueError: This worker's model, dataset or device gives another fingerprint than the
            plan's (each difference named): the shards it wrote would not belong to the store.
    """

    def __init__(self, plan: ExtractPlan, device: str | None = None, *, batch_size: int | None = None,
                 num_workers: int | None = None, progress: bool = False, writer: dict[str, Any] | None = None,
                 _encoding: Encoding | None = None) -> None:
        changes = {k: v for k, v in (("device", device), ("batch_size", batch_size), ("num_workers", num_workers))
                   if v is not None}
        config = plan.extract_config(**changes)
        if _encoding is None:
            torch_device = torch.device(config.device) if config.device else _process_state(None).device
            source = None
            if plan.row_files:  # only this worker's shards' rows are read, not the whole folder or list
                source = PlannedFileSource(plan.out / ROWS_DIR, plan.num_rows, plan.shard_size,
                                           plan.fingerprint["dataset"])
            elif (plan.out / ROWS_DIR / TABLE_INDEX).is_file():  # parquet / tars: opens only its rows' files
                source = TableSource.load(plan.out / ROWS_DIR / TABLE_INDEX)
            _encoding = open_encoding(config, torch_device, source=source)
        else:
            _encoding.config = config
        diffs = fingerprint_differences(plan.fingerprint, json.loads(json.dumps(_encoding.fingerprint, default=str)))
        if diffs:
            raise ValueError(
                f"this worker's arguments differ from the plan in {plan.out / PLAN_NAME} (same model weights, dataset "
                f"and device type needed; plan again or fix the worker): " + "; ".join(diffs)
            )
        self.plan = plan
        self.encoding = _encoding
        self.progress = progress
        self.writer = writer if writer is not None else {"host": socket.gethostname(), "pid": os.getpid()}
        self.writer = {**self.writer, "batch_size": config.batch_size, "device": str(_encoding.compute_device)}
        self._empty = {k: torch.empty((0, *f["shape"]), dtype=getattr(torch, f["dtype"]))
                       for k, f in plan.features.items()}

    def run(self, index: int) -> ShardResult:
        """Encode shard `index` and commit it, or skip it when it is committed and intact."""
        return self.run_many([index])[0]

    def run_many(self, indices: list[int]) -> list[ShardResult]:
        """`run` each shard of `indices`, through one DataLoader (its prefetch carries over from
        shard to shard). Returns the results in the order of `indices`."""
        layout = self.plan.layout
        bad = [k for k in indices if not 0 <= k < layout.num_shards]
        if bad:
            raise ValueError(f"shard index {bad[0]} is out of range: the plan has shards 0..{layout.num_shards - 1}")
        started = time.perf_counter()
        results: dict[int, ShardResult] = {}
        todo = []
        for k in indices:
            if k in results or k in todo:
                continue
            if needs_work(self.encoding, layout, k):
                todo.append(k)
            else:
                sidecar = valid_sidecar(self.plan.out, k, layout.rows(k))
                results[k] = ShardResult(k, sidecar["rows_written"], sidecar["rows_failed"], True,
                                         time.perf_counter() - started)
        began = time.perf_counter()
        for sidecar, committed in encode_shards(self.encoding, layout, todo, self._empty, self.writer, self.progress):
            k = sidecar["shard"]
            results[k] = ShardResult(k, sidecar["rows_written"], sidecar["rows_failed"], False, committed - began)
            began = committed
        return [results[k] for k in indices]


def run_shard(out: str | os.PathLike, index: int, device: str | None = None) -> ShardResult:
    """Load the plan in `out`, then encode and commit shard `index` (see `ShardWorker`)."""
    return ShardWorker(ExtractPlan.load(out), device).run(index)


# -------------------------------------------------------------------------------- finalize


def finalize_extraction(out: str | os.PathLike, *, wait_lock: bool = False) -> ExtractSummary:
    """Merge the committed shards' sidecars into the manifest and `failures.jsonl` (holding the
    lock of `out` meanwhile) and report. Shards may still be missing: the summary says which,
    and finalizing again after they are run completes the store. Temporary files of killed
    writers are removed once the store is complete (no worker can still be writing then).

    Raises:
        FileNotFoundError: No plan in `out`.
        DirectoryInUseError: Another run holds `out`.
    """
    started = time.perf_counter()
    plan = ExtractPlan.load(out)
    with hold_directory(plan.out, None, what="extraction finalize", hint=LOCK_HINT, wait=wait_lock):
        summary = _finalize(plan, started)
        if summary.complete:
            remove_stale_temporaries(plan.out)
    return summary


def _finalize(plan: ExtractPlan, started: float) -> ExtractSummary:
    """`finalize_extraction` under the lock; the `*_this_run` counts are left to the caller."""
    manifest = read_manifest(plan.out)
    if manifest is None:
        raise FileNotFoundError(f"{plan.out / MANIFEST_NAME} does not exist: plan the run again with --plan-only")
    check_fingerprint(plan.out, manifest, plan.fingerprint)
    return _summarize(plan, finalize_manifest(plan.out, manifest, plan.layout), started)


def _summarize(plan: ExtractPlan, final: dict[str, Any], started: float) -> ExtractSummary:
    """The summary of a finalized manifest."""
    committed = {s["shard"] for s in final["shards"]}
    return ExtractSummary(
        out=str(plan.out),
        total_rows=plan.num_rows,
        rows_written=final.get("rows_written", 0),
        rows_failed=final.get("rows_failed", 0),
        complete=bool(final.get("complete")),
        rows_this_run=0,
        shards_this_run=0,
        shards_kept=len(committed),
        seconds=time.perf_counter() - started,
        rows_nonfinite=final.get("rows_nonfinite", 0),
        rows_retryable=final.get("rows_retryable", 0),
        first_failure=_first_failure(plan.out),
        missing_shards=tuple(k for k in range(plan.num_shards) if k not in committed),
    )


def _first_failure(out: Path) -> str:
    try:
        with open(out / FAILURES_NAME) as handle:
            first = json.loads(handle.readline() or "{}")
    except (OSError, ValueError):
        return ""
    return f"row {first['row']} ({first.get('name')}): {first['reason']}" if first else ""
