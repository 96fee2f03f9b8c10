"""Parquet files and webdataset tars as image rows addressed by file and offset, without `datasets`
converting them into its Arrow cache (a full second copy of the data, on the driver and on every
worker, before the first image is encoded).

Opening a source reads no image: a parquet file's footer (rows per row group), a tar's member
headers (which members make sample `i`). Row `i` is `(file, row group, row)` of a parquet file or
`(tar, sample)` of a webdataset shard, and `read(i)` reads only that cell or member. The rows, their
order and the image column are the ones `datasets.load_dataset` gives for the same spec (its
`parquet` and `webdataset` builders: the same data-file resolution and order, the same schema and
feature inference, the same key grouping of tar members), so a store is byte for byte the one the
`datasets` route wrote (`tests/test_table_sources.py`).

`save(path)` writes the files' sizes, times and row counts to the plan (`plan-rows/files.json`);
a worker `load`s it and opens only the files of its rows (a tar's member headers are read again
there, one tar at a time, instead of recording 10^8 member offsets in the plan). A file changed
or gone since the plan stops its shard naming the file.

Sources this module does not take (`open_table_source` returns `None`) go through `datasets` as
before: options of `load_dataset`, remote data, a column of file paths (strings, or `Image` cells
whose first holds a path and no bytes: `datasets` checks each file stays there), a compressed tar.
"""

from __future__ import annotations

import bisect
import json
import os
import tarfile
from itertools import accumulate
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..specs.data import DataSpec, _choose_split

TABLE_INDEX = "files.json"
FORMATS = ("parquet", "webdataset")
TAR_EXAMPLES_FOR_FEATURES = 5  # `datasets`' WebDataset.NUM_EXAMPLES_FOR_FEATURES_INFERENCE


class TableSource:
    """The image cells of parquet files or webdataset tars, one row per table row / tar sample.

    Args:
        index: What `open_table_source` found (`format`, `kind`, `spec`, `split`, `image_column`,
            `root`, `fingerprint`, `files`: each `{"path", "size", "mtime_ns", "rows", "groups"}`,
            `groups` the rows of each parquet row group), as `save` writes and `load` reads it.
    """

    def __init__(self, index: dict[str, Any]) -> None:
        self.index = index
        self.spec = index["spec"]
        self.format = index["format"]
        self.split = index["split"]
        self.image_column = index["image_column"]
        self.files = index["files"]
        self._starts = [0, *accumulate(f["rows"] for f in self.files)]
        self._cache: dict[str, Any] = {}  # per process: files checked, the last row group / tar read

    def __len__(self) -> int:
        return self._starts[-1]

    def __getstate__(self) -> dict[str, Any]:
        return {"index": self.index}  # DataLoader workers open their own files

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["index"])

    def save(self, path: Path) -> None:
        """Write the index for `load` (atomically)."""
        from ..pretrained import write_atomic

        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(self.index).encode())

    @classmethod
    def load(cls, path: Path) -> TableSource:
        try:
            return cls(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError) as err:
            raise OSError(f"{path} cannot be read ({err}); plan the run again with --plan-only") from None

    def read(self, row: int) -> bytes | str:
        """The row's encoded image (`b""` for a missing cell or member: the row fails to decode),
        or, for a cell holding a path instead of bytes, that path (as the `datasets` route).

        Raises:
            FileNotFoundError: The row's file existed when the source was opened and is gone.
            OSError: The file changed (size or modification time) since the source was opened.
        """
        file = bisect.bisect_right(self._starts, row) - 1
        path = self._checked(file)
        offset = row - self._starts[file]
        if self.format == "parquet":
            cell = self._parquet_cell(path, self.files[file]["groups"], offset)
        else:
            cell = self._tar_cell(path, offset)
        if cell is None:
            return b""
        return cell.get("bytes") or cell.get("path") or b""

    def name(self, row: int) -> str:
        return f"{self.split}[{row}]"

    def describe(self) -> dict[str, Any]:
        """Spec, kind, split, image column, rows and the fingerprint `datasets.load_dataset` gives
        the same split (as `DatasetSource.describe`)."""
        return {"spec": self.spec, "kind": self.index["kind"], "split": self.split, "image_column": self.image_column,
                "rows": len(self), "fingerprint": self.index["fingerprint"]}

    def _checked(self, file: int) -> str:
        """The path of file `file`, once checked (per process) to be the file that was planned."""
        f = self.files[file]
        checked = self._cache.setdefault("checked", set())
        if file not in checked:
            try:
                stat = os.stat(f["path"])
            except OSError:
                raise FileNotFoundError(
                    f"dataset {self.spec!r}: {f['path']} existed when the run was planned and is gone now; the "
                    "dataset changed or its storage went away. Restore it and run the same command again."
                ) from None
            if (stat.st_size, stat.st_mtime_ns) != (f["size"], f["mtime_ns"]):
                raise OSError(
                    f"dataset {self.spec!r}: {f['path']} changed since the run was planned ({f['size']} bytes then, "
                    f"{stat.st_size} now, or a new modification time); restore it, or plan again into another --out"
                )
            checked.add(file)
        return f["path"]

    def _parquet_cell(self, path: str, groups: list[int], offset: int) -> dict[str, Any] | None:
        import pyarrow.parquet as pq
        from datasets import Image
        from datasets.table import cast_array_to_feature

        starts = [0, *accumulate(groups)]
        group = bisect.bisect_right(starts, offset) - 1
        if self._cache.get("group_key") != (path, group):
            self._cache.pop("group", None)  # one row group's image column held at a time
            table = pq.ParquetFile(path).read_row_group(group, columns=[self.image_column])
            # The cast `datasets` applies to the table (e.g. a binary column to Image's struct).
            self._cache["group"] = cast_array_to_feature(table.column(0), Image())
            self._cache["group_key"] = (path, group)
        return self._cache["group"][offset - starts[group]].as_py()

    def _tar_cell(self, path: str, sample: int) -> dict[str, Any] | None:
        if self._cache.get("tar_path") != path:
            self._cache["tar"] = tar_samples(path)
            self._cache["tar_path"] = path
        key, fields = self._cache["tar"][sample]
        member = fields.get(self.image_column)
        if member is None:
            return None
        start, size = member
        with open(path, "rb") as handle:
            handle.seek(start)
            data = handle.read(size)
        return {"bytes": data, "path": f"{key}.{self.image_column}"}


def tar_samples(path: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """The samples of a webdataset tar, in order: `(key, {field: (data offset, size)})`, grouped as
    `datasets`' WebDataset builder groups them (regular files only, hidden names skipped, a sample
    is a run of members sharing the part of the name before the first dot of the base name).
    Reads member headers only.

    Raises:
        ValueError: A field twice in one sample (as `datasets`).
        tarfile.ReadError: Not an uncompressed tar.
    """
    from datasets.packaged_modules.webdataset.webdataset import base_plus_ext

    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    with tarfile.open(path, mode="r:") as archive:
        for info in archive:
            if not info.isreg() or os.path.basename(info.name).startswith((".", "__")):
                continue
            key, field = base_plus_ext(info.name)
            if key is None:
                continue
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            fields = samples[-1][1]
            if field in fields:
                raise ValueError(f"Duplicate field {field!r} for sample {key!r} in TAR archive {path!r}")
            fields[field] = (info.offset_data, info.size)
            archive.members = []  # headers only: keep no member list
    return samples


def open_table_source(data: DataSpec, split: str | None, image_column: str | None,
                      options: dict[str, Any] | None) -> TableSource | None:
    """The rows of local parquet files or webdataset tars (a `files` spec, or a dataset folder that
    `datasets` reads with its parquet / webdataset builder), or `None` for any other source (and for
    those this module leaves to `datasets`: see the module docstring).

    Raises:
        ValueError: An unknown split or column, no image column, a tar `datasets` refuses too.
    """
    if options or not data.local or data.kind not in ("files", "hub"):
        return None
    if data.kind == "files" and data.file_format not in FORMATS:
        return None
    import datasets

    if data.kind == "files":
        builder = datasets.load_dataset_builder(data.file_format, data_files={split or "train": data.location})
    else:
        builder = datasets.load_dataset_builder(data.location)
    if builder.name not in FORMATS or builder.config.data_files is None:
        return None
    split = _choose_split(data, [str(s) for s in builder.config.data_files], split)
    paths = [str(p) for p in builder.config.data_files[split]]
    if any("://" in p for p in paths):
        return None
    if builder.name == "parquet":
        files, features = _parquet_files(paths, builder.info.features)
    else:
        try:
            files, features = _tar_files(paths, builder.info.features)
        except tarfile.ReadError:
            return None  # a compressed tar: no member offsets to seek to
    from .sources import _pick_image_column

    column = _pick_image_column(SimpleNamespace(features=features), image_column, data.canonical)
    if not isinstance(features[column], datasets.Image):
        return None  # a column of paths or of other values: `datasets` as before
    if builder.name == "parquet" and _first_cell_is_a_path(files, column):
        return None  # a table of image paths: `datasets` as before (it checks each file stays there)
    # The fingerprint `load_dataset` gives the split (its cache folder's name: the files, their
    # times, the split), so a store begun through `datasets` is continued by this route.
    fingerprint = builder._get_dataset_fingerprint(split)
    kind = builder.name if data.kind == "files" else data.kind  # as `open_image_source` names it
    return TableSource({"format": builder.name, "kind": kind, "spec": data.canonical, "split": split,
                        "image_column": column,
                        "root": str(data.root), "fingerprint": fingerprint, "files": files})


def _stat(path: str, rows: int, groups: list[int] | None = None) -> dict[str, Any]:
    stat = os.stat(path)
    return {"path": path, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "rows": rows, "groups": groups}


def _parquet_files(paths: list[str], features: Any) -> tuple[list[dict[str, Any]], Any]:
    """Each file's rows per row group (from its footer), and the features `datasets` reads
    (the first file's schema, unless the dataset's card declares them)."""
    import pyarrow.parquet as pq
    from datasets import Features

    files = []
    for path in paths:
        metadata = pq.ParquetFile(path).metadata
        groups = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
        files.append(_stat(path, sum(groups), groups))
        if features is None:
            features = Features.from_arrow_schema(pq.read_schema(path))  # with `datasets`' metadata
    return files, features


def _first_cell_is_a_path(files: list[dict[str, Any]], column: str) -> bool:
    """Whether the first row's image cell holds a path and no bytes (as `sources._column_paths`
    decides). Told by the first row group's statistics (no nulls among the bytes: no), else by
    reading that row group's image cells."""
    import pyarrow.parquet as pq
    from datasets import Image
    from datasets.table import cast_array_to_feature

    first = next((f for f in files if f["rows"]), None)
    if first is None:
        return False
    parquet = pq.ParquetFile(first["path"])
    group = next(g for g, rows in enumerate(first["groups"]) if rows)
    metadata = parquet.metadata.row_group(group)
    for j in range(metadata.num_columns):
        chunk = metadata.column(j)
        if chunk.path_in_schema == f"{column}.bytes" and chunk.statistics is not None \
                and chunk.statistics.has_null_count and chunk.statistics.null_count == 0:
            return False
    cell = cast_array_to_feature(parquet.read_row_group(group, columns=[column]).column(0), Image())[0].as_py()
    return cell is not None and not cell.get("bytes")


def _tar_files(paths: list[str], features: Any) -> tuple[list[dict[str, Any]], Any]:
    """Each tar's samples (from its member headers), and the features `datasets` infers: the fields
    of the first tar's first samples (which must agree), image fields by their extension."""
    from datasets import Features, Image, Value
    from datasets.packaged_modules.webdataset.webdataset import IMAGE_EXTENSIONS

    files = []
    for number, path in enumerate(paths):
        samples = tar_samples(path)
        files.append(_stat(path, len(samples)))
        if number == 0 and features is None:
            first = [list(fields) for _, fields in samples[:TAR_EXAMPLES_FOR_FEATURES]]
            if any(set(fields) != set(first[0]) for fields in first):
                raise ValueError(
                    "The TAR archives of the dataset should be in WebDataset format, "
                    "but the files in the archive don't share the same prefix or the same types."
                )
            # Only the image fields matter here; the others' types are left to `datasets`.
            names = (first[0] if first else []) + ["__key__", "__url__"]
            features = Features({n: Image() if n.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS else Value("null")
                                 for n in names})
    return files, features
