"""Where the images come from: files on disk or a `datasets` dataset, as an indexed list of rows.

Row `i` of a source is its `i`-th image: the `i`-th path of a folder (sorted, recursive) or of a
list file, or row `i` of a dataset split. `source.read(i)` gives what `load_image` takes (a
path or the encoded bytes); decoding happens in the DataLoader workers.

A source error is not an image's failure: `read` raises when the source itself fails (a file
that existed when the source was opened is gone, a dataset file cannot be read), and the run
stops, instead of recording every remaining row as a failed image of a "complete" store.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
LIST_SUFFIXES = (".txt", ".lst", ".list")


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
            raise FileNotFoundError(
                f"dataset {self.spec!r}: {path} existed when the run started and is gone now; the dataset "
                "changed or its storage went away during the run. Restore it and run the same command again."
            )
        return path

    def name(self, row: int) -> str:
        return os.path.relpath(self.paths[row], self.root)

    def describe(self) -> dict[str, Any]:
        """Spec, kind, size and a fingerprint of the row list (relative path and byte size of each file)."""
        digest = hashlib.sha256()
        for path, size in zip(self.paths, self.sizes):
            digest.update(f"{os.path.relpath(path, self.root)}\0{size}\n".encode())
        return {"spec": self.spec, "kind": self.kind, "rows": len(self), "fingerprint": digest.hexdigest()}


class DatasetSource:
    """Rows of a `datasets.Dataset` split with an image column (read undecoded, as bytes or path).

    Args:
        dataset: The split.
        spec: The dataset spec as given.
        kind: `saved`, `parquet`, `imagefolder` or `hub`.
        split: The split's name.
        image_column: The column holding the images.
    """

    def __init__(self, dataset: Any, spec: str, kind: str, split: str, image_column: str) -> None:
        from datasets import Image

        self.fingerprint = getattr(dataset, "_fingerprint", None)
        self.dataset = dataset.select_columns([image_column]).cast_column(image_column, Image(decode=False))
        self.spec = spec
        self.kind = kind
        self.split = split
        self.image_column = image_column

    def __len__(self) -> int:
        return len(self.dataset)

    def read(self, row: int) -> bytes | str:
        value = self.dataset[row][self.image_column]
        if value is None:
            return b""
        if value.get("bytes"):
            return value["bytes"]
        return value.get("path") or b""

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


ImageSource = FileListSource | DatasetSource


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


def _folder_source(folder: Path, spec: str) -> FileListSource:
    paths = sorted(
        (p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    if not paths:
        raise ValueError(f"dataset folder {folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return FileListSource(paths, spec, "folder", folder)


def _list_source(path: Path, spec: str) -> FileListSource:
    lines = [line.strip() for line in path.read_text().splitlines()]
    entries = [line for line in lines if line and not line.startswith("#")]
    if not entries:
        raise ValueError(f"list file {path} names no images (one path a line, '#' starts a comment)")
    root = path.parent.resolve()
    paths = [Path(e) if Path(e).is_absolute() else root / e for e in entries]
    return FileListSource(paths, spec, "list", root)


def _pick_split(loaded: Any, split: str | None, spec: str) -> tuple[Any, str]:
    from datasets import DatasetDict

    if not isinstance(loaded, DatasetDict):
        return loaded, split or str(getattr(loaded, "split", None) or "train")
    names = list(loaded)
    if split is None:
        split = "train" if "train" in loaded else names[0] if len(names) == 1 else None
        if split is None:
            raise ValueError(f"dataset {spec!r} has splits {names}; choose one with --split")
    if split not in loaded:
        raise ValueError(f"dataset {spec!r} has no split {split!r}; it has {names}")
    return loaded[split], split


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


def open_source(spec: str, *, split: str | None = None, image_column: str | None = None) -> ImageSource:
    """The rows of a dataset spec.

    Args:
        spec: A folder of images; a list file (`.txt`, `.lst`, `.list`); a folder written by
            `Dataset.save_to_disk` / `DatasetDict.save_to_disk`; a `.parquet` file;
            `imagefolder:DIR`; or a hub dataset name (`NAME` or `NAME:CONFIG`).
        split: Split of a `datasets` source (default `train` or the only one).
        image_column: Image column of a `datasets` source (default the first `Image` feature).

    Returns:
        A `FileListSource` or `DatasetSource`.

    Raises:
        ValueError: No images, an unknown split or column.
        FileNotFoundError: A path that does not exist.
    """
    path = Path(spec)
    if path.exists():
        spec = str(path.resolve())  # the same data under another spelling of its path
    if spec.startswith("imagefolder:"):
        from datasets import load_dataset

        folder = spec.partition(":")[2]
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"imagefolder: no such folder {folder!r}")
        spec = "imagefolder:" + str(Path(folder).resolve())
        dataset, split = _pick_split(load_dataset("imagefolder", data_dir=folder), split, spec)
        kind = "imagefolder"
    elif path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        from datasets import load_from_disk

        dataset, split = _pick_split(load_from_disk(str(path)), split, spec)
        kind = "saved"
    elif path.is_dir():
        return _folder_source(path.resolve(), spec)
    elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        return _list_source(path, spec)
    elif path.is_file() and path.suffix.lower() == ".parquet":
        from datasets import load_dataset

        dataset, split = _pick_split(load_dataset("parquet", data_files={"train": str(path)}), split, spec)
        kind = "parquet"
    elif path.exists():
        raise ValueError(
            f"dataset {spec!r} is a file of an unknown kind; give a folder of images, a list file "
            f"({', '.join(LIST_SUFFIXES)}), a .parquet file, a saved dataset folder, imagefolder:DIR or a hub name"
        )
    elif spec.startswith((".", "/", "~")):  # a local path; hub names look like NAME or ORG/NAME
        raise FileNotFoundError(f"dataset {spec!r}: no such file or folder")
    else:
        from datasets import load_dataset

        name, _, config_name = spec.partition(":")
        dataset, split = _pick_split(load_dataset(name, config_name or None), split, spec)
        kind = "hub"
    column = _pick_image_column(dataset, image_column, spec)
    return DatasetSource(dataset, spec, kind, split, column)
