"""Encoding a store's shards: the machinery under every runner (`tasks.ShardWorker`).

`open_encoding` builds, once per worker, what encoding needs (encoder, processor, the features
requested, the image source) and the arguments fingerprint that identifies the store;
`encode_shards` takes the rows of some shards, decodes and preprocesses them in DataLoader
workers, encodes them in batches (never crossing a shard), and writes each shard as soon as its
last row is encoded (in a writer thread, so encoding goes on meanwhile). Rows that fail to
decode, and rows whose features come out non-finite (an fp16 overflow), are recorded with the
reason and left out of the shard.

A shard's bytes depend only on the arguments fingerprint and its index: batches never span
shards and the encoder is batch-invariant (`vlm_encoder.determinism`), so the batch size, the
DataLoader workers, the number of workers and which one wrote a shard do not change a bit.
"""

from __future__ import annotations

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
from ..processing import ImageLoadError, ImageProcessor, load_image
from .config import IMAGE_KINDS, ExtractConfig
from .model import build_encoder, build_processor, describe_model
from .shards import NONFINITE_REASON, ROW_IDS, ShardLayout, retryable, valid_sidecar, write_shard
from .resolution import NUM_PATCHES, ImagePreparer, VariablePlan, anyres_config, smart_resize_native
from .sources import ImageSource, open_image_source

MAX_PENDING_WRITES = 2


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
    `layer{block}.registers` `(n, R, D)`, `layer{block}.summary` `(n, S, D)` with the block
    index resolved (non-negative);
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
        if "summary" in select and not c.summary_idxs:
            raise ValueError("select 'summary' needs summary tokens (RADIO's summary_idxs); this encoder has none")
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
            if "summary" in self.select:
                features[f"layer{block}.summary"] = out.summary(block)
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
        self.written: list[Future] = []  # every write: (sidecar, time committed)

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
        future = self.writer.submit(_write_timed, self.config.out, shard, rows, tensors, part["failures"],
                                    self.writer_info)
        self.pending.append(future)
        self.written.append(future)

    def close(self) -> list[tuple[dict[str, Any], float]]:
        """Wait for every write; `(sidecar, time committed)` of each shard written."""
        try:
            return [future.result() for future in self.written]
        finally:
            self.writer.shutdown(wait=True)


def _write_timed(*args: Any) -> tuple[dict[str, Any], float]:
    return write_shard(*args), time.perf_counter()


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


@dataclass
class Encoding:
    """What encoding a store's rows needs, built once per worker by `open_encoding`.

    Attributes:
        config: The run.
        encoder: The image tower, on `compute_device` in the run's dtype.
        processor: Its image processor.
        features: The encoder call giving the requested features (`FeaturePlan`, or a
            `VariablePlan` at native / anyres resolution).
        prepare: Per-image preparation at native / anyres resolution (`None` when fixed).
        source: The image rows.
        device: The device the fingerprint was taken for (its type decides the CPU GEMM route).
        compute_device: The device the encoder runs on.
        fingerprint: What identifies the store's bytes (see `open_encoding`).
    """

    config: ExtractConfig
    encoder: VisionEncoder
    processor: ImageProcessor
    features: Any
    prepare: ImagePreparer | None
    source: ImageSource
    device: torch.device
    compute_device: torch.device
    fingerprint: dict[str, Any]


def open_encoding(config: ExtractConfig, device: torch.device, compute_device: torch.device | None = None,
                  source: ImageSource | None = None) -> Encoding:
    """Load the encoder, open the image source (listing it: no image is decoded) and take the
    arguments fingerprint: model (with its weights' hash), features, dtype, preprocessing,
    dataset, shard size, pixel limit, resolution mode and (on the CPU) the GEMM route.

    Args:
        config: The run.
        device: The device the shards are encoded on (the fingerprint's CPU GEMM entry).
        compute_device: Where to put the encoder now (default `device`); a driver that only
            plans puts it on the CPU.
        source: The image rows (default: `config.dataset` opened whole).
    """
    compute_device = compute_device or device
    encoder = build_encoder(config)
    processor = build_processor(encoder, config.image_size, config.mode)
    features = FeaturePlan(encoder, config.layers, config.select, config.norm)
    prepare, tiling = None, None
    if config.mode != "fixed":
        tiling = anyres_config(encoder, config.anyres) if config.mode == "anyres" else None
        policy, budget = native_sizing(encoder, config.max_patches)  # SigLIP2: its NaFlex processor's rule
        if config.mode == "native" and processor.config.resize_mode == "smart_resize":  # Qwen: its own sizes
            processor, policy, budget = smart_resize_native(processor, encoder.config.input_stride, config.max_patches)
        prepare = ImagePreparer(processor, config.mode, encoder.config.input_stride, budget, tiling, policy)
        features = VariablePlan(features, config.mode, tiling, encoder.config.input_stride)
    if source is None:
        source = open_image_source(config.dataset, split=config.split, image_column=config.image_column)
    fingerprint = {
        "model": describe_model(config, encoder),
        "layers": list(config.layers),
        "blocks": list(features.blocks),
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
    cpu_gemm = config.fast_cpu and device.type == "cpu"
    if cpu_gemm:  # other rounding than the plain route: a store keeps one
        fingerprint["cpu_gemm"] = "onednn_packed"
    encoder = fast_cpu(encoder.to(device=compute_device, dtype=config.torch_dtype),
                       enabled=cpu_gemm and compute_device.type == "cpu")
    return Encoding(config, encoder, processor, features, prepare, source, device, compute_device, fingerprint)


def probe_features(encoding: Encoding) -> dict[str, torch.Tensor]:
    """An empty tensor `(0, ...)` of each stored feature's shape and dtype (one blank image encoded)."""
    e = encoding
    height, width = e.processor.config.output_size or e.encoder.config.image_size  # NaFlex sizes per image
    if e.prepare is None:
        pixels = torch.zeros(1, 3, height, width, device=e.compute_device, dtype=e.config.torch_dtype)
    else:
        pixels = [e.prepare(Image.new("RGB", (width, height)))]
    return {k: torch.empty((0, *v.shape[1:]), dtype=v.dtype) for k, v in e.features(e.encoder, pixels).items()}


def needs_work(encoding: Encoding, layout: ShardLayout, shard: int) -> bool:
    """Whether shard `shard` is (re)done (see `_needs_work`)."""
    return _needs_work(encoding.config.out, shard, layout, encoding.source)


def encode_shards(
    encoding: Encoding,
    layout: ShardLayout,
    shards: list[int],
    empty: dict[str, torch.Tensor],
    writer: dict[str, Any],
    progress: bool = False,
) -> list[tuple[dict[str, Any], float]]:
    """Encode and write the given shards (through one DataLoader, so its workers and prefetch
    carry over from shard to shard).

    Args:
        encoding: From `open_encoding`.
        layout: The store's shard layout.
        shards: Shard indices, in the order to encode them.
        empty: `probe_features`' empty tensors, for a shard whose rows all failed.
        writer: Provenance kept in each sidecar (not in the shard's bytes).
        progress: Show a progress bar of rows.

    Returns:
        `(sidecar, perf_counter time its shard was committed)` for each shard, in order.
    """
    if not shards:
        return []
    from tqdm.auto import tqdm

    e, config = encoding, encoding.config
    assembler = _ShardAssembler(config, layout, e.source, empty, writer)
    bar = tqdm(total=sum(len(layout.rows(k)) for k in shards), unit="img", desc="extract", disable=not progress,
               smoothing=0.1)
    try:
        dataset = RowDataset(e.source, e.processor, config.max_pixels, e.prepare)
        for batch in _loader(config, dataset, _batches(layout, shards, config.batch_size), e.compute_device):
            features = None
            if batch["pixels"] is not None:
                pixels = batch["pixels"]
                if e.prepare is None:
                    pixels = pixels.to(device=e.compute_device, dtype=config.torch_dtype, non_blocking=True)
                features = {k: v.to("cpu") for k, v in e.features(e.encoder, pixels).items()}
                features = _drop_nonfinite(batch, features, config.dtype)
            assembler.add(batch, features)
            bar.update(len(batch["rows"]))
    finally:
        bar.close()
        written = assembler.close()
    return written


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


def _all_finite(value: torch.Tensor) -> bool:
    """Whether every element is finite: one `abs().amax()` (NaN propagates, inf stays inf), ~6x
    cheaper than `isfinite` on a bf16 batch here (2.2 against 12 ms for ViT-B/16's two layers of
    patches at batch 16: ~1.5% of the bf16 encoder's time), so the per-row check runs only on a bad batch."""
    return value.numel() == 0 or bool(value.abs().amax().isfinite())


def _drop_nonfinite(batch: dict[str, Any], features: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """Leave out the rows whose features hold inf or NaN, recording them as failures of `batch`."""
    rows = batch["ok_rows"]
    counts = features.get(NUM_PATCHES)  # variable resolution: patches are (sum N_i, D)
    ragged = lambda key: counts is not None and key.endswith(".patch")  # noqa: E731
    bad = torch.zeros(len(rows), dtype=torch.bool)
    for key, value in features.items():
        if not value.is_floating_point() or _all_finite(value):
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
