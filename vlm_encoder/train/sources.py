"""Image-caption sources: the builtin datasets, or anything `datasets` reads (a hub name, a
local `imagefolder` with `metadata.jsonl` / `metadata.csv`, parquet / csv / jsonl files,
webdataset tar shards, a saved dataset), by the data-spec grammar of `vlm_encoder.specs.data`.

A source is indexable: `image(i)` (anything `ImageProcessor` takes, or raises
`ImageLoadError`), `captions(i)` (one or more strings), and for zero-shot evaluation
`labels` / `class_names` (or `None`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from ..processing import ImageLoadError, load_image
from ..specs.data import check_class_names, label_indices, load_split, parse_data_spec


class PairSource(Protocol):
    name: str
    labels: list[int] | None
    class_names: tuple[str, ...] | None
    in_memory: bool

    def __len__(self) -> int: ...

    def image(self, index: int) -> Any: ...

    def captions(self, index: int) -> list[str]: ...


class HFSource:
    """Rows of a `datasets.Dataset`: an image column and a caption column (a string or a list
    of strings per row), optionally a label column (ints, or strings mapped to class indices).

    Images are read undecoded and decoded with `load_image`, so a broken file raises
    `ImageLoadError` (the loop skips and counts it) instead of failing inside `datasets`.
    A column of file paths (a csv / tsv / jsonl file list, as open_clip's csv datasets have)
    is read from disk, relative paths against `root` (the folder of the source file).
    """

    in_memory = False

    def __init__(
        self, dataset: Any, name: str, image_column: str, text_column: str, label_column: str | None = None,
        class_names: tuple[str, ...] | None = None, root: str | os.PathLike | None = None,
    ) -> None:
        from datasets import Image as ImageFeature

        columns = list(dataset.column_names)
        for role, column in (("image_column", image_column), ("text_column", text_column), ("label_column", label_column)):
            if column is not None and column not in columns:
                raise ValueError(f"{name}: {role}={column!r} is not a column; columns: {columns}")
        if isinstance(dataset.features[image_column], ImageFeature):
            dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
        self.dataset = dataset
        self.name = name
        self.image_column = image_column
        self.text_column = text_column
        self.root = Path(root) if root is not None else None
        if label_column is None and "label" in columns and hasattr(dataset.features["label"], "names"):
            label_column = "label"  # imagefolder's class-folder labels
        if class_names is None and label_column is not None:
            class_names = tuple(getattr(dataset.features[label_column], "names", None) or ()) or None
        self.labels = None
        if label_column is not None:
            where = f"{name}, column {label_column!r}"
            self.labels, class_names = label_indices(list(dataset[label_column]), class_names, where)
        self.class_names = class_names
        self._texts = dataset[text_column]

    def __len__(self) -> int:
        return len(self.dataset)

    def image(self, index: int) -> Any:
        value = self.dataset[index][self.image_column]
        where = f"{self.name} row {index}"
        if isinstance(value, dict):  # undecoded datasets.Image: {"bytes", "path"}
            if value.get("bytes"):
                try:
                    return load_image(value["bytes"])
                except ImageLoadError as err:
                    raise ImageLoadError(value.get("path") or where, err.reason) from None
            if value.get("path"):
                return load_image(value["path"])
            raise ImageLoadError(where, "no bytes and no path")
        if isinstance(value, (bytes, bytearray)):
            return load_image(bytes(value))
        if isinstance(value, str):  # a file path; a relative one is relative to the source's folder
            path = Path(value).expanduser()
            if not path.is_absolute() and self.root is not None:
                path = self.root / path
            return load_image(str(path))
        if value is None:
            raise ImageLoadError(where, "empty image cell")
        return value  # a PIL image or an array

    def captions(self, index: int) -> list[str]:
        """The row's captions: a string, or a non-empty list of strings (anything else, e.g.
        `None` or a number, is an error naming the row: a caption is never made up)."""
        value = self._texts[index]
        where = f"{self.name} row {index}, column {self.text_column!r}"
        if isinstance(value, str):
            return [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: a caption must be a string or a list of strings, got {type(value).__name__}")
        if not value:
            raise ValueError(f"{where}: no caption (an empty list)")
        wrong = [type(v).__name__ for v in value if not isinstance(v, str)]
        if wrong:
            raise ValueError(f"{where}: every caption must be a string, got {', '.join(sorted(set(wrong)))}")
        return list(value)


def open_pair_source(
    spec: str,
    split: str,
    *,
    options: dict[str, Any] | None = None,
    image_column: str = "image",
    text_column: str = "text",
    label_column: str | None = None,
    class_names: tuple[str, ...] | None = None,
) -> PairSource:
    """Open the image-caption pairs of a data spec (the grammar of `vlm_encoder.specs.data`) and split.

    Specs: `builtin:digits` / `builtin:shapes`; a folder with `metadata.jsonl` / `metadata.csv`
    captions, or `imagefolder:DIR`; a folder written by `Dataset.save_to_disk`; a folder of
    parquet / csv files or a hub-style dataset repository; a `.parquet`, `.csv`, `.tsv`,
    `.json(l)` or webdataset `.tar` file or glob (`shards/*.tar`); or a hub name (`owner/name`,
    `name:config`). A folder of images only or a list file has no captions, and is refused.

    Args:
        spec: The source.
        split: Its split (`train`, `test`, ...). A single file or glob is that split.
        options: Options of a builtin (`num_train`, `seed`, ...), or keyword arguments of
            `datasets.load_dataset` (`name`, `revision`, `data_dir`, ...) for the others.
            `trust_remote_code` and `streaming` are refused.
        image_column / text_column / label_column: Column names (webdataset shards: the file
            suffixes, e.g. `jpg` and `txt`). A label column of strings is mapped to class
            indices (in the order of `class_names`, or sorted).
        class_names: Class names for zero-shot evaluation (default: the label feature's).

    Raises:
        ValueError: A spec of no allowed form, a source without captions, a missing split or
            column, `trust_remote_code`.
        FileNotFoundError: A path or glob that names nothing.
        ConnectionError: A hub name that is neither cached nor reachable.
    """
    data = parse_data_spec(spec)
    if data.kind in ("folder", "list"):
        what = "a folder of image files only" if data.kind == "folder" else "a list file of image paths"
        raise ValueError(
            f"{spec}: {what} has no captions (no column {text_column!r}); put a metadata.jsonl "
            f'({{"file_name": "a.jpg", "{text_column}": "a caption"}} a line) in the image folder, or give a '
            "csv / jsonl / parquet table with image and caption columns (image_column=..., text_column=...)"
        )
    loaded = load_split(data, split, options)
    if data.kind == "builtin":
        source = loaded.builtin
        if class_names is not None:
            check_class_names(source.labels, tuple(class_names), f"{spec}[{split}]")
            source.class_names = tuple(class_names)
        return source
    return HFSource(loaded.dataset, f"{spec}[{loaded.split}]", image_column, text_column, label_column,
                    class_names, root=data.root)
