"""Image-caption sources: the builtin datasets, or anything `datasets` reads (a hub name, a
local `imagefolder` with `metadata.jsonl` / `metadata.csv`, parquet / csv / jsonl files,
webdataset tar shards, a saved dataset).

A source is indexable: `image(i)` (anything `ImageProcessor` takes, or raises
`ImageLoadError`), `captions(i)` (one or more strings), and for zero-shot evaluation
`labels` / `class_names` (or `None`).
"""

from __future__ import annotations

import os
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


# File suffixes a spec can end in, and the `datasets` builder that reads them.
FILE_BUILDERS = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".tar": "webdataset",
}
GLOB_CHARS = set("*?[")


def _builder_for(spec: str) -> str:
    suffix = Path(spec).suffix.lower()
    if suffix not in FILE_BUILDERS:
        raise ValueError(
            f"{spec}: cannot tell the format from the suffix {suffix or '(none)'!r}; allowed: "
            f"{', '.join(FILE_BUILDERS)}, a directory, a saved dataset or a hub name"
        )
    return FILE_BUILDERS[suffix]


def _pick_split(loaded: Any, spec: str, split: str) -> Any:
    import datasets

    if isinstance(loaded, (datasets.DatasetDict, dict)):
        if split not in loaded:
            raise ValueError(f"{spec}: no split {split!r}; splits: {sorted(loaded)}")
        return loaded[split]
    return loaded


def _load_split(spec: str, path_or_name: str, split: str, options: dict[str, Any]) -> Any:
    """`load_dataset(path_or_name, split=split)`: only that split is prepared (a hub repo
    with per-split files downloads just those); an unknown split is named with the others."""
    import datasets

    try:
        return datasets.load_dataset(path_or_name, split=split, **options)
    except ValueError as err:
        if "Unknown split" not in str(err):
            raise
        raise ValueError(f"{spec}: no split {split!r} ({err})") from None


def _load_dataset(spec: str, split: str, options: dict[str, Any] | None = None) -> tuple[Any, Path | None]:
    """The `datasets.Dataset` of `spec`'s `split`, and the folder that relative image paths
    in its rows are resolved against (`None` for hub datasets)."""
    import datasets

    options = dict(options or {})
    if options.get("trust_remote_code"):
        raise ValueError(f"{spec}: trust_remote_code is not allowed; vlm-encoder never runs a dataset's own code")
    options.pop("trust_remote_code", None)
    if options.get("streaming"):
        raise ValueError(
            f"{spec}: streaming=True is not supported: training draws a seeded permutation of the rows and resumes "
            "mid-epoch, which needs random access. Let `datasets` download and prepare it (the default), or "
            "convert it to parquet / webdataset shards on disk"
        )
    options.pop("streaming", None)
    path = Path(spec).expanduser()
    if path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
        return _pick_split(datasets.load_from_disk(str(path)), spec, split), path  # save_to_disk
    if path.is_dir():  # imagefolder (+ metadata.jsonl / .csv), parquet or csv files, a hub-style repo
        return _load_split(spec, str(path), split, options), path
    if path.is_file() or GLOB_CHARS & set(spec):
        builder = _builder_for(spec)
        if builder == "csv" and Path(spec).suffix.lower() == ".tsv":
            options.setdefault("delimiter", "\t")
        if not path.is_file() and not sorted(path.parent.glob(path.name)):
            raise FileNotFoundError(f"{spec}: no file matches")
        loaded = datasets.load_dataset(builder, data_files={split: str(path)}, **options)
        return loaded[split], path.parent
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise FileNotFoundError(f"{spec}: no such file or directory (and not a hub name such as owner/name)")
    try:
        loaded = _load_split(spec, spec, split, options)  # the same call as a hub-style folder above
    except ConnectionError as err:
        raise ConnectionError(
            f"{spec}: no local file or folder of that name, and the Hugging Face hub could not be reached "
            f"({err}); with HF_HUB_OFFLINE=1 only "
            "datasets already in the local cache load. Give a local directory, parquet / csv / tar files or a "
            "saved dataset instead"
        ) from err
    return loaded, None


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
    """Open a source by its spec and split.

    Specs: `builtin:digits` / `builtin:shapes`; a folder (an `imagefolder` with `metadata.jsonl`
    or `metadata.csv`, a folder of parquet / csv files, or a hub-style dataset repository); a
    folder written by `Dataset.save_to_disk`; a `.parquet`, `.csv`, `.tsv`, `.json(l)` or
    webdataset `.tar` file or glob (`shards/*.tar`); or a hub name (`owner/name`).

    Args:
        spec: The source.
        split: Its split (`train`, `test`, ...). A single file or glob is that split.
        options: Options of a builtin (`num_train`, `seed`, ...), or keyword arguments of
            `datasets.load_dataset` (`name`, `revision`, `data_dir`, ...) for the others.
            `trust_remote_code` is refused.
        image_column / text_column / label_column: Column names (webdataset shards: the file
            suffixes, e.g. `jpg` and `txt`).
        class_names: Class names for zero-shot evaluation (default: the label feature's).

    Raises:
        ValueError: Unknown builtin or suffix, missing split or column, `trust_remote_code`.
        FileNotFoundError: A path or glob that names nothing.
        ConnectionError: A hub name that is neither cached nor reachable.
    """
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX):]
        if name not in BUILTINS:
            raise ValueError(f"unknown builtin dataset {spec!r}; allowed: {', '.join(BUILTIN_PREFIX + n for n in BUILTINS)}")
        source = BUILTINS[name](split, **(options or {}))
        if class_names is not None:
            source.class_names = tuple(class_names)
        return source
    dataset, root = _load_dataset(spec, split, options)
    return HFSource(dataset, f"{spec}[{split}]", image_column, text_column, label_column, class_names, root=root)
