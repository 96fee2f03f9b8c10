"""`run_extraction`: images -> encoder features in checksummed shards, resumable and multi-process.

Per process (rank `r` of `W`, from `accelerate.PartialState`): take the shards `k` with
`k % W == r` that are missing or fail their checksum, decode and preprocess their rows in
DataLoader workers, encode them in batches (never crossing a shard), and write each shard
as soon as its last row is encoded (in a writer thread, so encoding goes on meanwhile).
Rows that fail to decode, and rows whose features come out non-finite (an fp16 overflow), are
recorded with the reason and left out of the shard.

One run per `out`: the run holds the directory's lock (`vlm_encoder.locks`) from before it reads
the manifest until its summary; a second run is refused with the holder's pid, host and
command, or waits (`wait_lock`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..cpu_speed import fast_cpu
from ..encoder import VisionEncoder
from ..packing.sizing import native_sizing
from ..locks import hold_directory
from ..processing import ImageLoadError, ImageProcessor, load_image
from .config import IMAGE_KINDS, ExtractConfig
from .model import build_encoder, build_processor, describe_model
from .shards import (
    FAILURES_NAME,
    FORMAT,
    NONFINITE_REASON,
    ROW_IDS,
    ShardLayout,
    check_fingerprint,
    finalize_manifest,
    read_manifest,
    remove_stale_temporaries,
    retryable,
    valid_sidecar,
    write_json_atomic,
    write_shard,
)
from .resolution import GRID, NUM_PATCHES, ImagePreparer, VariablePlan, anyres_config
from .sources import ImageSource, open_image_source

MAX_PENDING_WRITES = 2


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


class RowDataset(Dataset):
    """Row id -> `(row, pixels (3, H, W) or None, failure reason or None)`; runs in the workers.
    With `prepare` (variable resolution), the pixels are what `prepare(image)` returns."""

    def __init__(self, source: ImageSource, processor: ImageProcessor, max_pixels: int | None,
                 prepare: ImagePreparer | None = None) -> None:
        self.source = source
        self.processor = processor
        self.max_pixels = max_pixels
        self.prepare = prepare

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, row: int) -> tuple[int, torch.Tensor | None, str | None]:
        # Outside the `try`: an error of the source (storage gone, dataset changed) is no
        # image's failure; it stops the run, so a rerun redoes these rows.
        data = self.source.read(row)
        try:
            image = load_image(data, max_pixels=self.max_pixels)
            return row, self.prepare(image) if self.prepare is not None else self.processor(image)[0], None
        except ImageLoadError as err:
            return row, None, err.reason
        except (ValueError, TypeError, OSError, Image.DecompressionBombError) as err:
            return row, None, f"cannot be preprocessed ({type(err).__name__}: {err})"


def collate_rows(items: list[tuple[int, Any, str | None]], stack: bool = True) -> dict[str, Any]:
    """A batch: every row id, the rows that decoded with their pixels `(b, 3, H, W)` (a list
    of per-image inputs when not `stack`), the failures."""
    ok = [(row, px) for row, px, _ in items if px is not None]
    pixels = [px for _, px in ok]
    return {
        "rows": [row for row, _, _ in items],
        "ok_rows": [row for row, _ in ok],
        "pixels": (torch.stack(pixels) if stack else pixels) if ok else None,
        "failures": [(row, reason) for row, px, reason in items if px is None],
    }


class FeaturePlan:
    """Which encoder call gives the requested features, and how each is named in a shard.

    Names: `layer{block}.cls` `(n, D)`, `layer{block}.patch` `(n, N, D)`,
    `layer{block}.registers` `(n, R, D)` with the block index resolved (non-negative);
    `pooled` `(n, D)` and `embeds` `(n, E)`.
    """

    def __init__(self, encoder: VisionEncoder, layers: tuple[int, ...], select: tuple[str, ...], norm: bool) -> None:
        c = encoder.config
        self.blocks = encoder.resolve_layers(layers)
        self.select = select
        self.norm = norm
        if "cls" in select and not c.class_token:
            raise ValueError("select 'cls' needs a CLS token; this encoder has none (e.g. SigLIP): use pooled or patch")
        if "registers" in select and not c.num_register_tokens:
            raise ValueError("select 'registers' needs register tokens; this encoder has none")
        if set(select) & set(IMAGE_KINDS) and c.pool == "none":
            raise ValueError("select 'pooled' / 'embeds' need a pooled output; this encoder has pool='none'")
        needs_last = bool(set(select) & set(IMAGE_KINDS)) and encoder.num_blocks - 1 not in self.blocks
        self.run_blocks = self.blocks + ((encoder.num_blocks - 1,) if needs_last else ())

    @torch.inference_mode()
    def __call__(self, encoder: VisionEncoder, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        out = encoder(pixels, layers=self.run_blocks, norm=self.norm)
        features: dict[str, torch.Tensor] = {}
        for block in self.blocks:
            if "cls" in self.select:
                features[f"layer{block}.cls"] = out.cls(block)
            if "patch" in self.select:
                features[f"layer{block}.patch"] = out.patches(block)
            if "registers" in self.select:
                features[f"layer{block}.registers"] = out.register_tokens[out.layers.index(block)]
        if "pooled" in self.select:
            features["pooled"] = out.pooled
        if "embeds" in self.select:
            features["embeds"] = encoder.project(out.pooled)
        return features


def _process_state(device: str | None) -> Any:
    """This process's rank and world (`accelerate.PartialState`). On a machine without an
    accelerator, or with `device="cpu"`, the processes that `torchrun` / `accelerate launch`
    started join through gloo (PartialState alone would treat each as a world of one)."""
    from accelerate import PartialState

    accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return PartialState(cpu=(device or "").startswith("cpu") or not accelerator)


def _batches(layout: ShardLayout, shards: list[int], batch_size: int) -> list[list[int]]:
    """Row batches of the given shards, in order; a batch never spans two shards."""
    out = []
    for shard in shards:
        rows = list(layout.rows(shard))
        out += [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    return out


class _ShardAssembler:
    """Collects a shard's features batch by batch and hands it to the writer when full."""

    def __init__(
        self,
        config: ExtractConfig,
        layout: ShardLayout,
        source: ImageSource,
        empty: dict[str, torch.Tensor],
        writer: dict[str, Any],
    ) -> None:
        self.config = config
        self.writer_info = writer
        self.layout = layout
        self.source = source
        self.empty = empty
        self.parts: dict[int, dict[str, Any]] = {}
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self.pending: list[Future] = []

    def add(self, batch: dict[str, Any], features: dict[str, torch.Tensor] | None) -> None:
        shard = batch["rows"][0] // self.layout.shard_size
        part = self.parts.setdefault(shard, {"rows": [], "features": [], "failures": [], "seen": 0})
        part["seen"] += len(batch["rows"])
        part["rows"] += batch["ok_rows"]
        if features is not None:
            part["features"].append(features)
        part["failures"] += [
            {"row": row, "name": self.source.name(row), "reason": reason} for row, reason in batch["failures"]
        ]
        part["failures"].sort(key=lambda f: f["row"])
        if part["seen"] == len(self.layout.rows(shard)):
            self._write(shard, self.parts.pop(shard))

    def _write(self, shard: int, part: dict[str, Any]) -> None:
        tensors = {ROW_IDS: torch.tensor(part["rows"], dtype=torch.int64)}
        for key, empty in self.empty.items():
            chunks = [f[key] for f in part["features"]]
            tensors[key] = torch.cat(chunks) if chunks else empty
        while len(self.pending) >= MAX_PENDING_WRITES:
            self.pending.pop(0).result()
        rows = self.layout.rows(shard)
        self.pending.append(self.writer.submit(write_shard, self.config.out, shard, rows, tensors, part["failures"],
                                                    self.writer_info))

    def close(self) -> None:
        try:
            for future in self.pending:
                future.result()
        finally:
            self.writer.shutdown(wait=True)


def _loader(config: ExtractConfig, dataset: RowDataset, batches: list[list[int]], device: torch.device) -> Iterator:
    workers = config.num_workers
    return iter(
        DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=workers,
            collate_fn=collate_rows if config.mode == "fixed" else partial(collate_rows, stack=False),
            pin_memory=device.type == "cuda",
            prefetch_factor=4 if workers else None,
        )
    )


def run_extraction(config: ExtractConfig) -> ExtractSummary:
    """Extract features of every row of `config.dataset` into `config.out` (see the module docstring).

    Args:
        config: The run.

    Returns:
        The summary (identical on every process, except the `*_this_run` counts).

    Raises:
        ValueError: Arguments that differ from those of the run recorded in `config.out`
            (the message names each), or features the encoder cannot give.
    """
    started = time.perf_counter()
    state = _process_state(config.device)
    hint = "pass --wait-lock to wait for it, or choose another --out"
    with hold_directory(config.out, state, what="extraction", hint=hint, wait=config.wait_lock):
        return _extract(config, state, started)


def _extract(config: ExtractConfig, state: Any, started: float) -> ExtractSummary:
    """`run_extraction`, under the lock of `config.out`."""
    rank, world = state.process_index, state.num_processes
    device = torch.device(config.device) if config.device else state.device
    out = config.out

    encoder = build_encoder(config)
    processor = build_processor(encoder, config.image_size, config.mode)
    plan = FeaturePlan(encoder, config.layers, config.select, config.norm)
    prepare, tiling = None, None
    if config.mode != "fixed":
        tiling = anyres_config(encoder, config.anyres) if config.mode == "anyres" else None
        policy, budget = native_sizing(encoder, config.max_patches)  # SigLIP2: its NaFlex processor's rule
        prepare = ImagePreparer(processor, config.mode, encoder.config.input_stride, budget, tiling, policy)
        plan = VariablePlan(plan, config.mode, tiling, encoder.config.input_stride)
    source = open_image_source(config.dataset, split=config.split, image_column=config.image_column)
    layout = ShardLayout(len(source), config.shard_size)
    fingerprint = {
        "model": describe_model(config, encoder),
        "layers": list(config.layers),
        "blocks": list(plan.blocks),
        "select": list(config.select),
        "norm": config.norm,
        "dtype": config.dtype,
        "preprocessing": processor.to_dict(),
        "dataset": source.describe(),
        "shard_size": config.shard_size,
        "max_pixels": config.max_pixels or Image.MAX_IMAGE_PIXELS,
    }
    if config.mode != "fixed":  # absent for fixed stores, so their fingerprint is unchanged
        fingerprint["resolution"] = (
            {"mode": "native", "max_patches": prepare.max_patches, "sizing": prepare.policy} if config.mode == "native"
            else {"mode": "anyres", "policy": "llava_next", "pinpoints": [list(p) for p in config.anyres],
                  "tile_size": tiling.tile_size}
        )
    if config.fast_cpu and device.type == "cpu":  # other rounding than the plain route: a store keeps one
        fingerprint["cpu_gemm"] = "onednn_packed"
    encoder = fast_cpu(encoder.to(device=device, dtype=config.torch_dtype), enabled=config.fast_cpu and device.type == "cpu")
    height, width = processor.config.output_size or encoder.config.image_size  # a NaFlex processor sizes per image
    if prepare is None:
        probe = plan(encoder, torch.zeros(1, 3, height, width, device=device, dtype=config.torch_dtype))
    else:
        probe = plan(encoder, [prepare(Image.new("RGB", (width, height)))])
    empty = {k: torch.empty((0, *v.shape[1:]), dtype=v.dtype) for k, v in probe.items()}

    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)  # of killed runs: this run holds the lock and writes nothing yet
        if read_manifest(out) is None:
            manifest = {
                "format": FORMAT,
                "fingerprint": fingerprint,
                "num_rows": layout.num_rows,
                "num_shards": layout.num_shards,
                "num_blocks": encoder.num_blocks,
                "features": {k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype).removeprefix("torch.")}
                             for k, v in empty.items()},
                "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "shards": [],
                **({"ragged": {"keys": [k for k in empty if k.endswith(".patch")], "counts": NUM_PATCHES,
                               "grid": GRID}} if prepare is not None else {}),
                "complete": False,
            }
            write_json_atomic(out / "manifest.json", manifest)
    state.wait_for_everyone()
    manifest = read_manifest(out)
    check_fingerprint(out, manifest, fingerprint)

    mine = layout.shards_of_rank(rank, world)
    todo = [k for k in mine if _needs_work(out, k, layout, source)]
    rows_todo = sum(len(layout.rows(k)) for k in todo)
    loop_started = time.perf_counter()
    if todo:
        from tqdm.auto import tqdm

        writer = {"rank": rank, "world_size": world, "batch_size": config.batch_size, "device": str(device)}
        assembler = _ShardAssembler(config, layout, source, empty, writer)
        bar = tqdm(total=rows_todo, unit="img", desc="extract", disable=not (config.progress and state.is_main_process),
                   smoothing=0.1)
        try:
            dataset = RowDataset(source, processor, config.max_pixels, prepare)
            for batch in _loader(config, dataset, _batches(layout, todo, config.batch_size), device):
                features = None
                if batch["pixels"] is not None:
                    pixels = batch["pixels"]
                    if prepare is None:
                        pixels = pixels.to(device=device, dtype=config.torch_dtype, non_blocking=True)
                    features = {k: v.to("cpu") for k, v in plan(encoder, pixels).items()}
                    features = _drop_nonfinite(batch, features, config.dtype)
                assembler.add(batch, features)
                bar.update(len(batch["rows"]))
        finally:
            bar.close()
            assembler.close()
    extract_seconds = time.perf_counter() - loop_started
    state.wait_for_everyone()
    if state.is_main_process:
        remove_stale_temporaries(out)  # every process has finished writing
        finalize_manifest(out, manifest, layout)
    state.wait_for_everyone()
    final = read_manifest(out)
    # The summary speaks for the whole launch: counts summed, times of the slowest process.
    rows_run, shards_run, kept = _sum_over_processes(world, rows_todo, len(todo), len(mine) - len(todo))
    seconds, extract_seconds = _max_over_processes(world, time.perf_counter() - started, extract_seconds)
    return ExtractSummary(
        out=str(out),
        total_rows=layout.num_rows,
        rows_written=final.get("rows_written", 0),
        rows_failed=final.get("rows_failed", 0),
        complete=bool(final.get("complete")),
        rows_this_run=int(rows_run),
        shards_this_run=int(shards_run),
        shards_kept=int(kept),
        seconds=seconds,
        extract_seconds=extract_seconds,
        rows_nonfinite=final.get("rows_nonfinite", 0),
        rows_retryable=final.get("rows_retryable", 0),
        first_failure=_first_failure(out),
    )


def _needs_work(out: Path, shard: int, layout: ShardLayout, source: ImageSource) -> bool:
    """A shard is (re)done when its file is missing or fails its checksum, or when one of its
    failed rows failed for a reason that can go away (a missing file) and its file is there now."""
    sidecar = valid_sidecar(out, shard, layout.rows(shard))
    if sidecar is None:
        return True
    for failure in sidecar.get("failures", []):
        if retryable(failure["reason"]):
            try:
                data = source.read(failure["row"])
            except OSError:
                continue
            if isinstance(data, str) and os.path.isfile(data):
                return True
    return False


def _drop_nonfinite(batch: dict[str, Any], features: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """Leave out the rows whose features hold inf or NaN, recording them as failures of `batch`."""
    rows = batch["ok_rows"]
    counts = features.get(NUM_PATCHES)  # variable resolution: patches are (sum N_i, D)
    ragged = lambda key: counts is not None and key.endswith(".patch")  # noqa: E731
    bad = torch.zeros(len(rows), dtype=torch.bool)
    for key, value in features.items():
        if not value.is_floating_point():
            continue
        finite = value.isfinite().reshape(value.shape[0], -1).all(1)
        if ragged(key):
            finite = torch.stack([part.all() for part in finite.split(counts.tolist())])
        bad |= ~finite
    if not bad.any():
        return features
    keep = ~bad
    hint = "an activation overflowed: use --dtype bf16 or fp32" if dtype == "fp16" else "the model gives inf/NaN"
    reason = f"{NONFINITE_REASON} from the encoder in {dtype}; {hint}"
    batch["failures"] = batch["failures"] + [(row, reason) for row, b in zip(rows, bad.tolist()) if b]
    batch["ok_rows"] = [row for row, b in zip(rows, bad.tolist()) if not b]
    return {k: v[keep.repeat_interleave(counts)] if ragged(k) else v[keep] for k, v in features.items()}


def _first_failure(out: Path) -> str:
    try:
        with open(out / FAILURES_NAME) as handle:
            first = json.loads(handle.readline() or "{}")
    except (OSError, ValueError):
        return ""
    return f"row {first['row']} ({first.get('name')}): {first['reason']}" if first else ""


def _reduce(world: int, values: tuple[float, ...], op: str) -> list[float]:
    if world == 1:
        return list(values)
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor.tolist()


def _sum_over_processes(world: int, *values: float) -> list[float]:
    return _reduce(world, values, "sum")


def _max_over_processes(world: int, *values: float) -> list[float]:
    return _reduce(world, values, "max")
