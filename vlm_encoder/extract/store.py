"""`FeatureStore`: read the features `vlm-encoder extract` wrote, lazily (memory-mapped).

    store = FeatureStore("feats/")
    len(store), store.row_ids[:5], store.keys          # rows, dataset row ids, feature names
    store.get(17)                                        # every feature of dataset row 17
    store[-2, "cls"][100:200]                            # (100, D) CLS tokens of layer -2, by position
    store[-2, "cls"][mask]                               # the rows where a boolean mask (n,) is True
    store.dataset(-2, "patch", labels=labels)            # a torch Dataset for training a projector
    store.to_hf_dataset(layers=[-1], kinds=["cls"]).to_parquet("feats.parquet")
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from .config import IMAGE_KINDS, LAYER_KINDS
from .shards import FAILURES_NAME, ROW_IDS, ShardLayout, file_sha256, read_manifest, read_sidecar, shard_path

VERIFY_MODES = ("none", "read")
_SHARD_FIELDS = ("shard", "file", "sha256", "bytes", "row_start", "row_stop", "rows_written", "rows_failed")


class ShardReadError(OSError):
    """A shard file that is missing, truncated, corrupt or changed since it was written (the
    message names the file)."""


def _positions(index: Any, n: int) -> Any:
    """`index` as an int, a slice or a list of positions: a boolean mask (numpy, torch or a
    list of bools, length `n`) becomes the positions of its True entries; tensors become
    numpy. Anything else (floats, a mask of another length) is refused."""
    if isinstance(index, torch.Tensor):
        index = index.detach().cpu().numpy()
    if isinstance(index, (int, np.integer)) and not isinstance(index, (bool, np.bool_)):
        return int(index)
    if isinstance(index, slice):
        return index
    if isinstance(index, (bool, np.bool_)):
        raise TypeError("a single bool is not a row index; index with a boolean mask of one entry per row")
    array = np.asarray(index)
    if array.dtype == object or array.ndim != 1:
        if array.size == 0:
            return []
        raise TypeError(f"index a column with an int, a slice, positions or a boolean mask (n,), not {type(index).__name__}"
                        f" of shape {array.shape}")
    if array.dtype == np.bool_:
        if len(array) != n:
            raise IndexError(f"boolean mask of length {len(array)} for a column of {n} rows")
        return np.flatnonzero(array).tolist()
    if array.size == 0:
        return []
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"positions must be integers or a boolean mask, not {array.dtype}")
    return array.tolist()


class FeatureColumn:
    """One feature (`layer{b}.cls`, `pooled`, ...) over the store's rows, read on indexing.

    Index by position (`0 .. len(store)-1`, rows in dataset-row-id order): an int gives one
    row's tensor, a slice, a sequence of positions or a boolean mask of `len(store)` entries
    (numpy, torch or a list; its True rows) a stacked tensor. The patches of a
    variable-resolution store (`--resolution native`, `--anyres`) are ragged: an int gives
    that image's `(N_i, D)`, a slice or sequence a list of them.
    """

    def __init__(self, store: FeatureStore, key: str) -> None:
        self.store = store
        self.key = key

    def __len__(self) -> int:
        return len(self.store)

    @property
    def ragged(self) -> bool:
        """Rows of different lengths (variable-resolution patches)."""
        return self.key in self.store.ragged_keys

    @property
    def shape(self) -> tuple[int | None, ...]:
        """`(n, ...)`; `(n, None, D)` for ragged patches."""
        row = self.store.manifest["features"][self.key]["shape"]
        return (len(self.store), None, *row) if self.ragged else (len(self.store), *row)

    def __getitem__(
        self, index: int | slice | Sequence[int] | Sequence[bool] | np.ndarray | torch.Tensor
    ) -> torch.Tensor | list[torch.Tensor]:
        index = _positions(index, len(self.store))
        if isinstance(index, int):
            position = self.store._position(index)
            shard, offset = self.store._locate(position)
            if self.ragged:
                bounds = self.store._offsets(shard)
                return self.store._read(shard, self.key, int(bounds[offset]), int(bounds[offset + 1]))
            return self.store._read(shard, self.key, offset, offset + 1)[0]
        if self.ragged:
            positions = range(*index.indices(len(self.store))) if isinstance(index, slice) else index
            return [self[int(p)] for p in positions]
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self.store))
            if step == 1:
                return self.store._read_range(self.key, start, max(start, stop))
            index = range(start, stop, step)
        positions = [self.store._position(int(i)) for i in index]
        if not positions:
            return self.store._empty(self.key)
        return torch.stack([self[p] for p in positions])

    def load(self) -> torch.Tensor:
        """Every row `(n, ...)` in memory."""
        return self[:]


class FeatureStore:
    """A folder written by `vlm-encoder extract`.

    Args:
        path: The folder (`manifest.json`, `shard-*.safetensors`).
        allow_incomplete: Read a store whose run has not finished: every shard written so far
            (found from the shards' sidecars, since the manifest lists them only at the end);
            by default an incomplete store is an error.
        verify: `"read"`: check each shard's SHA-256 against the manifest the first time it
            is read (a `ShardReadError` naming the file on a mismatch); `"none"` (default):
            check only its size. `verify()` checks every shard at once.

    Attributes:
        manifest: The parsed `manifest.json` (model, layers, preprocessing, dtype, shards, ...).
    """

    def __init__(self, path: str | os.PathLike, *, allow_incomplete: bool = False, verify: str = "none") -> None:
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify={verify!r} is not allowed; choose one of {', '.join(VERIFY_MODES)}")
        self.verify_mode = verify
        self.path = Path(path)
        manifest = read_manifest(self.path)
        if manifest is None:
            raise FileNotFoundError(f"{self.path} has no manifest.json; is it the --out of `vlm-encoder extract`?")
        if not manifest.get("complete") and not allow_incomplete:
            raise ValueError(
                f"{self.path} is incomplete ({len(manifest.get('shards', []))} of {manifest['num_shards']} shards): "
                "run the same extract command again to finish it, or pass allow_incomplete=True"
            )
        if not manifest.get("complete"):
            manifest = dict(manifest, shards=self._written_shards(manifest))
        self.manifest = manifest
        self.shards = [s for s in manifest.get("shards", []) if s["rows_written"] > 0]
        self._starts = [0]
        for shard in self.shards:
            self._starts.append(self._starts[-1] + shard["rows_written"])
        self._handles: dict[int, Any] = {}
        self._bounds: dict[int, np.ndarray] = {}
        self._row_ids: np.ndarray | None = None

    def _written_shards(self, manifest: dict[str, Any]) -> list[dict[str, Any]]:
        """The shards of an unfinished run whose sidecar and file exist (a sidecar is written
        only after its shard file is complete), with the file's size as the sidecar says."""
        layout = ShardLayout(manifest["num_rows"], manifest["fingerprint"]["shard_size"])
        shards = []
        for k in range(layout.num_shards):
            sidecar = read_sidecar(self.path, k)
            rows = layout.rows(k)
            if sidecar is None or (sidecar.get("row_start"), sidecar.get("row_stop")) != (rows.start, rows.stop):
                continue
            try:
                if shard_path(self.path, k).stat().st_size != sidecar.get("bytes"):
                    continue
            except OSError:
                continue
            shards.append(dict({f: sidecar[f] for f in _SHARD_FIELDS}, failures=sidecar.get("failures", [])))
        return shards

    # ---- what the store holds --------------------------------------------------------
    def __len__(self) -> int:
        return self._starts[-1]

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, rows={len(self)}, keys={self.keys})"

    @property
    def keys(self) -> list[str]:
        """Feature names: `layer{block}.{cls,patch,registers,summary}`, `pooled`, `embeds`."""
        return list(self.manifest["features"])

    @property
    def ragged_keys(self) -> list[str]:
        """Keys whose rows differ in length: the patches of a variable-resolution store."""
        return list(self.manifest.get("ragged", {}).get("keys", []))

    @property
    def resolution(self) -> dict[str, Any]:
        """How images were sized: `{"mode": "fixed"}`, `native` (with `max_patches`) or `anyres` (with `pinpoints`)."""
        return dict(self.manifest["fingerprint"].get("resolution", {"mode": "fixed"}))

    @property
    def layers(self) -> list[int]:
        """Stored layers as resolved block indices."""
        return list(self.manifest["fingerprint"]["blocks"])

    @property
    def row_ids(self) -> np.ndarray:
        """Dataset row ids `(n,)` int64, ascending; position `i` of every column is row `row_ids[i]`."""
        if self._row_ids is None:
            parts = [self._read(i, ROW_IDS, 0, s["rows_written"]).numpy() for i, s in enumerate(self.shards)]
            self._row_ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return self._row_ids

    @property
    def failures(self) -> list[dict[str, Any]]:
        """Rows that failed: `{"row", "name", "reason", "shard"}`."""
        if not self.manifest.get("complete"):  # failures.jsonl is written at the end: the sidecars' lists
            return [dict(f, shard=s["shard"]) for s in self.manifest["shards"] for f in s.get("failures", [])]
        path = self.path / FAILURES_NAME
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def key(self, layer: int | None, kind: str) -> str:
        """The feature name of `kind` at `layer` (negatives count from the end; `None` for pooled / embeds)."""
        if kind in IMAGE_KINDS:
            name = kind
        elif kind in LAYER_KINDS:
            if layer is None:
                raise ValueError(f"kind {kind!r} needs a layer; stored layers: {self.layers}")
            blocks = self.manifest["num_blocks"]
            name = f"layer{layer % blocks if -blocks <= layer < blocks else layer}.{kind}"
        else:
            raise ValueError(f"unknown kind {kind!r}; allowed: {', '.join(LAYER_KINDS + IMAGE_KINDS)}")
        if name not in self.manifest["features"]:
            raise KeyError(f"{name!r} is not in this store; it holds {self.keys}")
        return name

    def column(self, layer: int | None, kind: str) -> FeatureColumn:
        """The lazy column of `kind` at `layer`."""
        return FeatureColumn(self, self.key(layer, kind))

    def __getitem__(self, item: str | tuple[int | None, str]) -> FeatureColumn:
        """`store["layer11.cls"]`, `store[-2, "patch"]` or `store[None, "pooled"]`."""
        if isinstance(item, str):
            if item not in self.manifest["features"]:
                raise KeyError(f"{item!r} is not in this store; it holds {self.keys}")
            return FeatureColumn(self, item)
        layer, kind = item
        return self.column(layer, kind)

    def get(self, row_id: int) -> dict[str, torch.Tensor]:
        """Every feature of one dataset row, by name. In a variable-resolution store the
        patches are that image's `(N_i, D)`, with `grid` `(2,)` its patch grid `(h, w)` and
        `num_patches` `()` its `N_i` (`--anyres`: `N_i` = base tokens + `h * w`).

        Raises:
            KeyError: The row is not in the store (failed, or not in the dataset).
        """
        index = int(np.searchsorted(self.row_ids, row_id))
        if index >= len(self) or self.row_ids[index] != row_id:
            raise KeyError(f"row {row_id} is not in the store (failed to decode, or outside the dataset)")
        return {key: FeatureColumn(self, key)[index] for key in self.keys}

    def position(self, row_id: int) -> int:
        """Position of a dataset row id in the columns."""
        index = int(np.searchsorted(self.row_ids, row_id))
        if index >= len(self) or self.row_ids[index] != row_id:
            raise KeyError(f"row {row_id} is not in the store")
        return index

    # ---- uses ------------------------------------------------------------------------
    def dataset(
        self,
        layer: int | None,
        kind: str,
        labels: Sequence[Any] | Callable[[int], Any] | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> CachedFeatures:
        """A `torch.utils.data.Dataset` over one feature (e.g. to train a projector on cached patches).

        Args:
            layer: Block index (negatives from the end), `None` for pooled / embeds.
            kind: `cls`, `patch`, `registers`, `summary`, `pooled` or `embeds`.
            labels: Per dataset row id (indexable or a function of the row id); items are
                then `(features, label)`.
            transform: Applied to each feature tensor.
        """
        return CachedFeatures(self.column(layer, kind), labels, transform)

    def to_hf_dataset(self, layers: Sequence[int] | None = None, kinds: Sequence[str] | None = None,
                      start: int = 0, stop: int | None = None) -> Any:
        """A `datasets.Dataset` with `row_id` and one column per feature, in memory (for a store
        of any size, `to_parquet` writes one shard at a time; `start` / `stop` take a part).

        The patches of a variable-resolution store become `Array2D((None, D))` columns (one
        `(N_i, D)` array per row), beside its `grid` and `num_patches` columns.

        Args:
            layers: Layers to include (default all stored).
            kinds: Kinds to include (default all stored).
            start: First position (row in row-id order) to include.
            stop: Position after the last one to include (default: the end).

        Raises:
            ValueError: `start` / `stop` outside `0 <= start <= stop <= len(store)`.
        """
        stop = len(self) if stop is None else stop
        if not 0 <= start <= stop <= len(self):
            raise ValueError(f"rows [{start}, {stop}) are not within the store's {len(self)} rows "
                             "(0 <= start <= stop <= len(store))")
        return self._export_rows(self._export_keys(layers, kinds), start, stop)

    def to_parquet(self, path: str | os.PathLike, layers: Sequence[int] | None = None,
                   kinds: Sequence[str] | None = None) -> Path:
        """Write the columns of `to_hf_dataset` as one parquet file, one shard at a time (one row
        group per shard: memory holds one shard's selection, whatever the store's size). The file
        appears complete or not at all (written beside it, then renamed).

        Args:
            path: The parquet file to write.
            layers: Layers to include (default all stored).
            kinds: Kinds to include (default all stored).

        Returns:
            `path`.
        """
        import pyarrow.parquet as pq

        path = Path(path)
        keys = self._export_keys(layers, kinds)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            writer = None
            for start, stop in self.shard_ranges():
                table = self._export_rows(keys, start, stop).data.table  # (rows of one shard)
                if writer is None:
                    writer = pq.ParquetWriter(str(partial), table.schema)
                writer.write_table(table)
            if writer is None:  # no rows: the empty table with the columns' schema
                self._export_rows(keys, 0, 0).to_parquet(str(partial))
            else:
                writer.close()
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        return path

    def shard_ranges(self) -> list[tuple[int, int]]:
        """The positions `[start, stop)` of each shard that holds rows, in order (columns read
        per shard)."""
        return [(start, stop) for start, stop in zip(self._starts[:-1], self._starts[1:]) if stop > start]

    def _export_keys(self, layers: Sequence[int] | None, kinds: Sequence[str] | None) -> list[str]:
        """The stored keys of `layers` and `kinds` (all when `None`), in store order."""
        blocks = None if layers is None else {layer % self.manifest["num_blocks"] for layer in layers}
        chosen = []
        for key in self.keys:
            block, _, kind = key.rpartition(".") if "." in key else ("", "", key)
            if kinds is not None and kind not in kinds:
                continue
            if blocks is not None and block and int(block.removeprefix("layer")) not in blocks:
                continue
            chosen.append(key)
        return chosen

    def _export_rows(self, keys: list[str], start: int, stop: int) -> Any:
        """Positions `[start, stop)` of `keys` as an in-memory `datasets.Dataset`."""
        import datasets

        data: dict[str, Any] = {"row_id": self.row_ids[start:stop]}
        features: dict[str, Any] = {"row_id": datasets.Value("int64")}
        for key in keys:
            values = FeatureColumn(self, key)[start:stop]
            if key in self.ragged_keys:  # a list of (N_i, D)
                rows = [_numpy(v) for v in values]
                width = int(self.manifest["features"][key]["shape"][-1])
                dtype = str(rows[0].dtype) if rows else "float32"
                data[key] = rows
                features[key] = datasets.Array2D(shape=(None, width), dtype=dtype)
            else:
                data[key] = _numpy(values)
                features[key] = _feature_type(data[key])
        return datasets.Dataset.from_dict(data, features=datasets.Features(features))

    def verify(self) -> list[str]:
        """Recompute every shard's SHA-256; the files that are missing or do not match the
        manifest (empty when intact)."""
        bad = []
        for s in self.manifest["shards"]:
            try:
                if file_sha256(self.path / s["file"]) != s["sha256"]:
                    bad.append(s["file"])
            except OSError:
                bad.append(s["file"])
        return bad

    # ---- reading ---------------------------------------------------------------------
    def _position(self, index: int) -> int:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"position {index} is out of range for {n} rows")
        return index % n

    def _locate(self, position: int) -> tuple[int, int]:
        shard = bisect.bisect_right(self._starts, position) - 1
        return shard, position - self._starts[shard]

    def _handle(self, shard: int) -> Any:
        if shard not in self._handles:
            info = self.shards[shard]
            path = shard_path(self.path, info["shard"])
            redo = "run the same extract command again to redo it"
            try:
                size = path.stat().st_size
            except OSError as err:
                raise ShardReadError(f"{path}: shard listed in the manifest cannot be read ({err.strerror}); {redo}") \
                    from None
            if size != info["bytes"]:
                raise ShardReadError(f"{path}: {size} bytes, the manifest says {info['bytes']} (truncated or "
                                     f"replaced); {redo}")
            if self.verify_mode == "read" and file_sha256(path) != info["sha256"]:
                raise ShardReadError(f"{path}: SHA-256 does not match the manifest (the file changed); {redo}")
            try:
                self._handles[shard] = safe_open(str(path), framework="pt")  # memory-mapped
            except Exception as err:  # safetensors raises its own error types, naming no file
                raise ShardReadError(f"{path}: not a readable safetensors shard ({err}); {redo}") from None
        return self._handles[shard]

    def _offsets(self, shard: int) -> np.ndarray:
        """Row boundaries `(n + 1,)` of a shard's ragged patches (cumulative `num_patches`)."""
        if shard not in self._bounds:
            counts = self._read(shard, self.manifest["ragged"]["counts"], 0, self.shards[shard]["rows_written"])
            self._bounds[shard] = np.concatenate([[0], np.cumsum(counts.numpy())])
        return self._bounds[shard]

    def _read(self, shard: int, key: str, start: int, stop: int) -> torch.Tensor:
        handle = self._handle(shard)
        try:
            return handle.get_slice(key)[start:stop]
        except Exception as err:  # a file changed under the memory map
            path = shard_path(self.path, self.shards[shard]["shard"])
            raise ShardReadError(f"{path}: cannot read {key!r} ({err}); run the same extract command again") from None

    def _empty(self, key: str) -> torch.Tensor:
        info = self.manifest["features"][key]
        return torch.empty((0, *info["shape"]), dtype=getattr(torch, info["dtype"]))

    def _read_range(self, key: str, start: int, stop: int) -> torch.Tensor:
        parts = []
        position = start
        while position < stop:
            shard, offset = self._locate(position)
            take = min(stop - position, self.shards[shard]["rows_written"] - offset)
            parts.append(self._read(shard, key, offset, offset + take))
            position += take
        if not parts:
            return self._empty(key)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def __getstate__(self) -> dict[str, Any]:
        # File handles do not cross process boundaries (DataLoader workers reopen them).
        return dict(self.__dict__, _handles={})


class CachedFeatures(Dataset):
    """`torch.utils.data.Dataset` over one stored feature: item `i` is the feature of position
    `i` (or `(feature, label)` with labels, looked up by the row's dataset id)."""

    def __init__(
        self,
        column: FeatureColumn,
        labels: Sequence[Any] | Callable[[int], Any] | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.column = column
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.column)

    def __getitem__(self, index: int) -> torch.Tensor | tuple[torch.Tensor, Any]:
        features = self.column[index]
        if self.transform is not None:
            features = self.transform(features)
        if self.labels is None:
            return features
        row = int(self.column.store.row_ids[index])
        label = self.labels(row) if callable(self.labels) else self.labels[row]
        return features, label


def _numpy(values: torch.Tensor) -> np.ndarray:
    """A tensor as numpy (bfloat16, which numpy lacks, as float32)."""
    return (values.float() if values.dtype == torch.bfloat16 else values).numpy()


def _feature_type(values: np.ndarray) -> Any:
    """The `datasets` feature of a column whose rows are `values[i]` (a scalar, vector or matrix)."""
    import datasets

    dtype = str(values.dtype)
    row_shape = values.shape[1:]
    if not row_shape:
        return datasets.Value(dtype)
    if len(row_shape) == 1:
        return datasets.Sequence(datasets.Value(dtype), length=row_shape[0])
    return {2: datasets.Array2D, 3: datasets.Array3D, 4: datasets.Array4D}[len(row_shape)](shape=row_shape, dtype=dtype)
