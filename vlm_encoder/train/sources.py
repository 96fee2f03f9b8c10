"""Image-caption sources: the builtin datasets, or anything `datasets` reads (a hub name, a
local `imagefolder` with `metadata.jsonl` / `metadata.csv`, parquet files, a saved dataset).

A source is indexable: `image(i)` (anything `ImageProcessor` takes, or raises
`ImageLoadError`), `captions(i)` (one or more strings), and for zero-shot evaluation
`labels` / `class_names` (or `None`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from ..processing import ImageLoadError, load_image
from .builtin import BUILTINS

BUILTIN_PREFIX = "builtin:"


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
    of strings per row), optionally an integer label column.

    Images are read undecoded and decoded with `load_image`, so a broken file raises
    `ImageLoadError` (the loop skips and counts it) instead of failing inside `datasets`.
    """

    in_memory = False

    def __init__(
        self, dataset: Any, name: str, image_column: str, text_column: str, label_column: str | None = None,
        class_names: tuple[str, ...] | None = None,
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
        if label_column is None and "label" in columns and hasattr(dataset.features["label"], "names"):
            label_column = "label"  # imagefolder's class-folder labels
        self.labels = [int(v) for v in dataset[label_column]] if label_column else None
        if class_names is None and label_column is not None:
            class_names = tuple(getattr(dataset.features[label_column], "names", None) or ()) or None
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
        if isinstance(value, str):
            return load_image(value)
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


def _load_dataset(spec: str, split: str) -> Any:
    import datasets

    path = Path(spec)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{spec}: no split {split!r}; splits: {sorted(loaded)}")
            return loaded[split]
        return loaded
    if path.is_dir():
        loaded = datasets.load_dataset("imagefolder", data_dir=str(path))
    elif spec.endswith(".parquet"):
        loaded = datasets.load_dataset("parquet", data_files={split: spec})
    else:
        loaded = datasets.load_dataset(spec)
    if split not in loaded:
        raise ValueError(f"{spec}: no split {split!r}; splits: {sorted(loaded)}")
    return loaded[split]


def open_source(
    spec: str,
    split: str,
    *,
    options: dict[str, Any] | None = None,
    image_column: str = "image",
    text_column: str = "text",
    label_column: str | None = None,
    class_names: tuple[str, ...] | None = None,
) -> PairSource:
    """Open a source by its spec (`builtin:digits`, `builtin:shapes`, a hub name, a directory or
    a parquet path/glob) and split.

    Raises:
        ValueError: Unknown builtin, missing split or column.
    """
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX):]
        if name not in BUILTINS:
            raise ValueError(f"unknown builtin dataset {spec!r}; allowed: {', '.join(BUILTIN_PREFIX + n for n in BUILTINS)}")
        source = BUILTINS[name](split, **(options or {}))
        if class_names is not None:
            source.class_names = tuple(class_names)
        return source
    dataset = _load_dataset(spec, split)
    return HFSource(dataset, f"{spec}[{split}]", image_column, text_column, label_column, class_names)
