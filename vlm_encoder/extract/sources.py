"""Where the images come from: files on disk, a `datasets` dataset or a builtin, as an indexed
list of rows. The spec is read by `vlm_encoder.specs.data`, the same grammar as `train` / `eval`.

Row `i` of a source is its `i`-th image: the `i`-th path of a folder (sorted, recursive) or of a
list file, row `i` of a dataset split, or image `i` of a builtin. `source.read(i)` gives what
`load_image` takes (a path or the encoded bytes); decoding happens in the DataLoader workers.

A source error is not an image's failure: `read` raises when the source itself fails (a file
that existed when the source was opened is gone, a dataset file cannot be read), and the run
stops, instead of recording every remaining row as a failed image of a "complete" store. This
holds for every source whose rows are files: a folder, a list file, and a `datasets` dataset
whose image column holds paths (`imagefolder`, a table of file paths).

File names need not be valid UTF-8: they are fingerprinted by their bytes (`surrogateescape`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

from ..specs.data import load_split, parse_data_spec
from .table_sources import TableSource, open_table_source


class FileListSource:
    """Images named by paths: a folder's image files (sorted, recursive) or a list file's lines.

    Args:
        paths: Absolute image paths, one per row.
        spec: The dataset spec as given.
        kind: `folder` or `list`.
        root: Folder the rows are described relative to.
    """

    def __init__(self, paths: list[Path], spec: str, kind: str, root: Path) -> None:
        self.paths = [str(p) for p in paths]
        self.spec = spec
        self.kind = kind
        self.root = root
        # Byte size of each file when the source was opened (-1: missing then).
        self.sizes = [_file_size(p) for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, row: int) -> str:
        """The path of row `row`.

        Raises:
            FileNotFoundError: The file existed when the source was opened and is gone now:
                the dataset changed, or its storage went away, during the run (a file missing
                from the start is the image's failure, reported by `load_image`).
        """
        path = self.paths[row]
        if self.sizes[row] >= 0 and not os.path.exists(path):
            raise _gone(self.spec, path)
        return path

    def name(self, row: int) -> str:
        return os.path.relpath(self.paths[row], self.root)

    def describe(self) -> dict[str, Any]:
        """Spec, kind, size and a fingerprint of the row list (relative path and byte size of each file)."""
        digest = hashlib.sha256()
        for path, size in zip(self.paths, self.sizes):
            digest.update(f"{os.path.relpath(path, self.root)}\0{size}\n".encode("utf-8", "surrogateescape"))
        return {"spec": self.spec, "kind": self.kind, "rows": len(self), "fingerprint": digest.hexdigest()}


class DatasetSource:
    """Rows of a `datasets.Dataset` split with an image column (read undecoded, as bytes or path).

    Args:
        dataset: The split.
        spec: The dataset spec as given.
        kind: `saved`, `imagefolder`, `hub`, or the format of files (`parquet`, `csv`, `json`,
            `webdataset`).
        split: The split's name.
        image_column: The column holding the images (a `datasets.Image` column, or file paths).
        root: Folder relative file paths in the image column are read against.
    """

    def __init__(
        self, dataset: Any, spec: str, kind: str, split: str, image_column: str, root: Path | None = None
    ) -> None:
        from datasets import Image

        self.fingerprint = getattr(dataset, "_fingerprint", None)
        self.dataset = dataset.select_columns([image_column])
        if isinstance(self.dataset.features[image_column], Image):
            self.dataset = self.dataset.cast_column(image_column, Image(decode=False))
        self.root = root
        self.spec = spec
        self.kind = kind
        self.split = split
        self.image_column = image_column
        # Byte size of each row's file when the source was opened (-1: missing then), for a
        # column of paths; `None` when the images are stored in the dataset as bytes.
        paths = _column_paths(self.dataset, image_column)
        self.sizes = None if paths is None else [_file_size(self._resolve(p)) if p else -1 for p in paths]

    def __len__(self) -> int:
        return len(self.dataset)

    def _resolve(self, value: str) -> str:
        path = Path(value).expanduser()  # a table of file paths: relative to the table's folder
        return str(path if path.is_absolute() or self.root is None else self.root / path)

    def read(self, row: int) -> bytes | str:
        """The row's encoded image, or its file's path.

        Raises:
            FileNotFoundError: The row's file existed when the source was opened and is gone
                now (the folder moved, the storage unmounted).
        """
        value = self.dataset[row][self.image_column]
        if value is None:
            return b""
        if isinstance(value, str):
            path = self._resolve(value)
        elif value.get("bytes"):
            return value["bytes"]
        else:
            path = value.get("path") or ""
            if not path:
                return b""
        if self.sizes is not None and self.sizes[row] >= 0 and not os.path.exists(path):
            raise _gone(self.spec, path)
        return path

    def name(self, row: int) -> str:
        return f"{self.split}[{row}]"

    def describe(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "kind": self.kind,
            "split": self.split,
            "image_column": self.image_column,
            "rows": len(self),
            "fingerprint": self.fingerprint,
        }


class BuiltinImageSource:
    """The images of a builtin dataset (`builtin:digits`, `builtin:shapes`), one per row, as
    PNG bytes (the builtins are generated, so the rows are the same in every run).

    Args:
        source: The builtin's pair source.
        spec: The dataset spec as given.
        split: The split's name.
    """

    def __init__(self, source: Any, spec: str, split: str) -> None:
        self.source = source
        self.spec = spec
        self.split = split

    def __len__(self) -> int:
        return len(self.source)

    def read(self, row: int) -> bytes:
        from PIL import Image

        image = self.source.image(row)
        if not isinstance(image, Image.Image):
            image = Image.fromarray(image)  # digits: (8, 8) uint8 grey levels
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    def name(self, row: int) -> str:
        return f"{self.split}[{row}]"

    def describe(self) -> dict[str, Any]:
        digest = hashlib.sha256(f"{self.spec}\0{self.split}\0{len(self)}".encode())
        return {
            "spec": self.spec,
            "kind": "builtin",
            "split": self.split,
            "rows": len(self),
            "fingerprint": digest.hexdigest(),
        }


class PlannedFileSource:
    """The rows of a folder or list-file source as the plan recorded them (`tasks.plan_extraction`
    writes each shard's paths, names and byte sizes to `rows_dir/shard-K.json`), so a worker
    reads only the rows of its shards instead of listing and `stat`ing the whole source.

    Args:
        rows_dir: The plan's folder of per-shard row lists.
        num_rows: Rows of the source.
        shard_size: Rows per shard.
        description: The source's `describe()` at planning time (the plan's fingerprint).
    """

    def __init__(self, rows_dir: Path, num_rows: int, shard_size: int, description: dict[str, Any]) -> None:
        self.rows_dir = rows_dir
        self.num_rows = num_rows
        self.shard_size = shard_size
        self.description = description
        self.spec = description.get("spec", str(rows_dir))
        self._shards: dict[int, list[list[Any]]] = {}

    def __len__(self) -> int:
        return self.num_rows

    def _row(self, row: int) -> list[Any]:
        shard, offset = divmod(row, self.shard_size)
        if shard not in self._shards:
            path = self.rows_dir / f"shard-{shard:05d}.json"
            try:
                self._shards[shard] = json.loads(path.read_text())["rows"]
            except (OSError, ValueError, KeyError) as err:
                raise OSError(f"{path} cannot be read ({err}); plan the run again with --plan-only") from None
        return self._shards[shard][offset]

    def read(self, row: int) -> str:
        """The path of row `row`.

        Raises:
            FileNotFoundError: The file existed at planning time and is gone now.
            OSError: The file's size changed since the plan (the store would mix contents).
        """
        path, _, size = self._row(row)
        if size >= 0:
            now = _file_size(path)
            if now < 0:
                raise _gone(self.spec, path, "when the run was planned")
            if now != size:
                raise OSError(f"dataset {self.spec!r}: {path} changed since the run was planned ({size} bytes then, "
                              f"{now} now); restore it, or plan again into another --out")
        return path

    def name(self, row: int) -> str:
        return self._row(row)[1]

    def describe(self) -> dict[str, Any]:
        return dict(self.description)


def write_planned_rows(source: FileListSource, rows_dir: Path, shard_size: int) -> None:
    """Write each shard's rows of `source` (path, name, byte size) for `PlannedFileSource`."""
    from ..pretrained import write_atomic

    rows_dir.mkdir(parents=True, exist_ok=True)
    for shard, start in enumerate(range(0, len(source), shard_size)):
        stop = min(start + shard_size, len(source))
        rows = [[source.paths[r], source.name(r), source.sizes[r]] for r in range(start, stop)]
        write_atomic(rows_dir / f"shard-{shard:05d}.json", json.dumps({"shard": shard, "rows": rows}).encode())


ImageSource = FileListSource | DatasetSource | BuiltinImageSource | PlannedFileSource | TableSource


def _gone(spec: str, path: str, since: str = "when the run started") -> FileNotFoundError:
    return FileNotFoundError(
        f"dataset {spec!r}: {path} existed {since} and is gone now; the dataset "
        "changed or its storage went away during the run. Restore it and run the same command again."
    )


def _column_paths(dataset: Any, column: str) -> list[str | None] | None:
    """The file paths of an image column that holds paths (a `datasets.Image(decode=False)`
    column without bytes, or a column of strings), or `None` when it holds encoded images.
    Read through Arrow, without the images' bytes."""
    from datasets import Image

    if len(dataset) == 0:
        return None
    if not isinstance(dataset.features[column], Image):
        first = dataset[0][column]
        return list(dataset[column]) if isinstance(first, str) else None
    first = dataset[0][column]
    if first is None or first.get("bytes"):
        return None
    values = dataset.with_format("arrow")[:][column].combine_chunks()
    return values.field("path").to_pylist()


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


def _pick_image_column(dataset: Any, image_column: str | None, spec: str) -> str:
    from datasets import Image

    columns = list(dataset.features)
    if image_column is not None:
        if image_column not in dataset.features:
            raise ValueError(f"dataset {spec!r} has no column {image_column!r}; its columns are {columns}")
        return image_column
    images = [name for name, feature in dataset.features.items() if isinstance(feature, Image)]
    if images:
        return images[0]
    raise ValueError(f"dataset {spec!r} has no Image column (columns {columns}); name one with --image-column")


def open_image_source(
    spec: str, *, split: str | None = None, image_column: str | None = None, options: dict[str, Any] | None = None
) -> ImageSource:
    """The image rows of a data spec (the grammar of `vlm_encoder.specs.data`).

    Args:
        spec: A folder of images; a list file (`.txt`, `.lst`, `.list`); a folder with a
            `metadata.jsonl` / `.csv`, or `imagefolder:DIR`; a folder written by `save_to_disk`;
            a `.parquet`, `.csv`, `.tsv`, `.json(l)` or webdataset `.tar` file or glob; a local
            dataset repository; `builtin:digits` / `builtin:shapes`; or a hub dataset name
            (`NAME`, `OWNER/NAME` or `NAME:CONFIG`).
        split: Split of a `datasets` source or builtin (default `train` or the only one).
        image_column: Image column of a `datasets` source (default the first `Image` feature);
            a column of file paths is read from disk, relative paths against the table's folder.
        options: Keyword arguments of `datasets.load_dataset`, or a builtin's options.

    Returns:
        A `FileListSource`, `DatasetSource`, `BuiltinImageSource`, or a `table_sources.TableSource`
        for local parquet files and webdataset tars with an `Image` column (read by file and offset,
        not converted by `datasets`).

    Raises:
        ValueError: A spec of no allowed form, no images, an unknown split or column.
        FileNotFoundError: A path that does not exist.
    """
    data = parse_data_spec(spec)
    table = open_table_source(data, split, image_column, options)
    if table is not None:
        return table
    loaded = load_split(data, split, options)
    if data.kind == "builtin":
        return BuiltinImageSource(loaded.builtin, data.canonical, loaded.split)
    if loaded.files is not None:
        return FileListSource([Path(p) for p in loaded.files], data.canonical, data.kind, data.root)
    column = _pick_image_column(loaded.dataset, image_column, data.canonical)
    # A `files` source is described by its format (`parquet`, ...), as stores written before this grammar were.
    kind = data.file_format if data.kind == "files" else data.kind
    return DatasetSource(loaded.dataset, data.canonical, kind, loaded.split, column, root=data.root)
