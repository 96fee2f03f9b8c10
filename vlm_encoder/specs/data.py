"""Data specs: one grammar for where images (and captions) come from, in every command.

`parse_data_spec(text)` turns the string a user wrote (`--dataset`, `--data`, `data=`) into a
`DataSpec`; `load_split(spec, split)` reads one split of it. `extract` builds its image rows on
this (`vlm_encoder.extract.sources.open_image_source`), `train` and `eval` their image-caption
pairs (`vlm_encoder.train.sources.open_pair_source`), so a spec means the same rows everywhere.

| spec | kind | read as |
|---|---|---|
| `builtin:digits`, `builtin:shapes` | `builtin` | the generated datasets of `vlm_encoder.train.builtin` |
| `imagefolder:DIR` | `imagefolder` | `load_dataset("imagefolder", data_dir=DIR)` |
| `DIR` with a `metadata.jsonl` / `.csv` / `.parquet` | `imagefolder` | the same (captions from the metadata) |
| `DIR` of image files only | `folder` | its image files, sorted by relative path, recursive |
| `DIR` written by `save_to_disk` | `saved` | `load_from_disk(DIR)` |
| `DIR` of data files, or with a README `configs:` | `hub` | `load_dataset(DIR)`, as the hub reads a repository |
| `FILE.txt`, `.lst`, `.list` | `list` | one image path a line (relative to the file's folder) |
| `F.parquet`, `.csv`, `.tsv`, `.json`, `.jsonl`, `.tar`, or a glob | `files` | `load_dataset(FORMAT, data_files=F)` |
| `NAME`, `OWNER/NAME`, `NAME:CONFIG` | `hub` | `load_dataset(NAME, CONFIG)` (the hub, or its local cache) |

Where `datasets` falls short the loader wraps it: an imagefolder keeps its class sub-folders as
labels when a metadata file holds captions (`datasets` drops them then), and a JSON-lines file
whose caption cells are strings on some rows and lists on others is read with `json` when
pyarrow cannot type that column.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KINDS = ("builtin", "imagefolder", "folder", "saved", "list", "files", "hub")
BUILTIN_PREFIX = "builtin:"
IMAGEFOLDER_PREFIX = "imagefolder:"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
LIST_SUFFIXES = (".txt", ".lst", ".list")
# File suffixes of the `files` kind, and the `datasets` builder that reads them.
FILE_FORMATS = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".tar": "webdataset",
}
# Files `datasets`' imagefolder reads captions and other columns from.
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
# Files `Dataset.save_to_disk` / `DatasetDict.save_to_disk` write at the top of their folder.
SAVED_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
GLOB_CHARS = frozenset("*?[")
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")
FORMS = (
    f"allowed: {', '.join(FILE_FORMATS)} files or globs, a list file ({', '.join(LIST_SUFFIXES)}), a folder "
    "(of images, with a metadata.jsonl, written by save_to_disk, or a dataset repository), imagefolder:DIR, "
    "builtin:NAME or a hub name (NAME, OWNER/NAME, NAME:CONFIG)"
)


@dataclass(frozen=True)
class DataSpec:
    """A parsed data spec.

    Args:
        kind: One of `KINDS`.
        location: The builtin's name; the absolute path (or glob) of local data; or the hub
            repository id.
        config_name: The hub configuration (`NAME:CONFIG`), `hub` only.
        file_format: The `datasets` builder of a `files` spec (`parquet`, `csv`, `json`,
            `webdataset`).
        text: The spec as written, for messages.
    """

    kind: str
    location: str
    config_name: str | None = None
    file_format: str | None = None
    text: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"DataSpec kind {self.kind!r} is not one of {KINDS}")
        if self.config_name is not None and self.kind != "hub":
            raise ValueError(f"DataSpec: config_name is for hub specs only, got kind {self.kind!r}")
        if (self.file_format is not None) != (self.kind == "files"):
            raise ValueError("DataSpec: file_format is set for, and only for, the kind 'files'")

    @property
    def local(self) -> bool:
        """Whether the data are local files (a hub spec may name a local repository folder)."""
        return self.kind != "builtin" and (self.kind != "hub" or os.path.isabs(self.location))

    @property
    def canonical(self) -> str:
        """The spec with absolute paths: the same data under any spelling of its path."""
        if self.kind == "builtin":
            return BUILTIN_PREFIX + self.location
        if self.kind == "imagefolder" and self.text.startswith(IMAGEFOLDER_PREFIX):
            return IMAGEFOLDER_PREFIX + self.location
        if self.config_name:
            return f"{self.location}:{self.config_name}"
        return self.location

    @property
    def root(self) -> Path | None:
        """The folder relative image paths in the rows are read against (`None`: remote or builtin)."""
        if not self.local:
            return None
        if self.kind in ("list", "files"):
            return Path(self.location).parent
        return Path(self.location)


def parse_data_spec(text: str | os.PathLike) -> DataSpec:
    """Parse a data spec (see the module's table); local paths are looked at, nothing is read.

    Raises:
        ValueError: An empty spec, an unknown builtin, a file of an unknown kind.
        FileNotFoundError: A local path or glob that names nothing.
    """
    text = os.fspath(text).strip()
    if not text:
        raise ValueError(f"empty data spec; {FORMS}")
    if text.startswith(BUILTIN_PREFIX):
        from ..train.builtin import BUILTINS

        name = text[len(BUILTIN_PREFIX):]
        if name not in BUILTINS:
            allowed = ", ".join(BUILTIN_PREFIX + n for n in BUILTINS)
            raise ValueError(f"unknown builtin dataset {text!r}; allowed: {allowed}")
        return DataSpec("builtin", name, text=text)
    if text.startswith(IMAGEFOLDER_PREFIX):
        folder = Path(text[len(IMAGEFOLDER_PREFIX):]).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"{text}: no such folder {str(folder)!r} (imagefolder:DIR takes a folder)")
        return DataSpec("imagefolder", str(folder.resolve()), text=text)
    path = Path(text).expanduser()
    if path.is_dir():
        return DataSpec(_folder_kind(path), str(path.resolve()), text=text)
    if path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        return DataSpec("list", str(path.resolve()), text=text)
    if path.is_file() or (GLOB_CHARS & set(text) and not path.exists()):
        suffix = path.suffix.lower()
        if suffix not in FILE_FORMATS:
            raise ValueError(
                f"{text}: a file of unknown kind: cannot tell the format from the suffix "
                f"{suffix or '(none)'!r}; {FORMS}"
            )
        if not path.is_file() and not sorted(path.parent.glob(path.name)):
            raise FileNotFoundError(f"{text}: no file matches")
        return DataSpec("files", str(path.parent.resolve() / path.name), file_format=FILE_FORMATS[suffix], text=text)
    if path.exists():
        raise ValueError(f"{text}: neither a file nor a folder; {FORMS}")
    if text.startswith((".", "/", "~")) or not HUB_NAME.match(text):
        raise FileNotFoundError(f"{text}: no such file or directory (and not a hub name such as owner/name); {FORMS}")
    name, _, config_name = text.partition(":")
    return DataSpec("hub", name, config_name or None, text=text)


def _folder_kind(folder: Path) -> str:
    """`saved`, `hub` (a dataset repository: README `configs:`, or data files and no images),
    `imagefolder` (images and a metadata file) or `folder` (images only)."""
    if any((folder / name).is_file() for name in SAVED_MARKERS):
        return "saved"
    readme = folder / "README.md"
    if readme.is_file() and re.search(r"^configs:", _front_matter(readme), flags=re.MULTILINE):
        return "hub"
    images = data_files = metadata = False
    for directory, subfolders, names in os.walk(folder):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]  # .git, .cache of a clone
        for name in names:
            suffix = os.path.splitext(name)[1].lower()
            metadata = metadata or name in METADATA_FILES
            images = images or suffix in IMAGE_SUFFIXES
            data_files = data_files or (name not in METADATA_FILES and suffix in (*FILE_FORMATS, ".arrow"))
    if data_files and not images:
        return "hub"
    return "imagefolder" if metadata else "folder"


def _front_matter(readme: Path) -> str:
    text = readme.read_text(errors="replace")
    if not text.startswith("---"):
        return ""
    return text[3:].partition("\n---")[0]


# ------------------------------------------------------------------ loading
@dataclass(frozen=True)
class DataSplit:
    """One split of a spec, as read. Exactly one of `dataset`, `files`, `builtin` is set, by
    the spec's kind: the image files of a `folder` or `list`, a builtin's source, or else a
    `datasets.Dataset`.

    Args:
        spec: The spec.
        split: The split's name.
        dataset: The `datasets.Dataset` of the split.
        files: Absolute image paths, one per row.
        builtin: The builtin source (a `vlm_encoder.train.sources.PairSource`).
    """

    spec: DataSpec
    split: str
    dataset: Any = None
    files: tuple[str, ...] | None = None
    builtin: Any = None


def load_split(spec: DataSpec, split: str | None = None, options: dict[str, Any] | None = None) -> DataSplit:
    """Read one split of `spec`.

    Args:
        spec: A parsed spec.
        split: The split (`train`, `test`, ...); default `train`, or the only one. A file, a
            glob, a folder of images and a list file are whichever split is asked for.
        options: A builtin's options (`num_train`, `seed`, ...), or keyword arguments of
            `datasets.load_dataset` (`revision`, `data_dir`, ...). `trust_remote_code` and
            `streaming` are refused.

    Raises:
        ValueError: An unknown or ambiguous split, a folder or list file without images,
            options a source does not take, `trust_remote_code` or `streaming`.
        ConnectionError: A hub name that is neither in the local cache nor reachable.
    """
    options = dict(options or {})
    if spec.kind == "builtin":
        from ..train.builtin import BUILTINS

        split = split or "train"
        return DataSplit(spec, split, builtin=BUILTINS[spec.location](split, **options))
    if spec.kind in ("folder", "list"):
        if options:
            raise ValueError(
                f"{spec.text}: options {sorted(options)} apply to `datasets` sources, "
                f"not to a {spec.kind} of image files"
            )
        files = _folder_files(spec) if spec.kind == "folder" else _list_files(spec)
        return DataSplit(spec, split or "train", files=tuple(files))
    _check_options(spec, options)
    dataset, split = _load_dataset(spec, split, options)
    if spec.kind == "imagefolder":
        dataset = _with_folder_labels(dataset)
    return DataSplit(spec, split, dataset=dataset)


def _folder_files(spec: DataSpec) -> list[str]:
    folder = Path(spec.location)
    paths = sorted(
        (p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    if not paths:
        raise ValueError(f"{spec.text}: the folder holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return [str(p) for p in paths]


def _list_files(spec: DataSpec) -> list[str]:
    lines = [line.strip() for line in Path(spec.location).read_text().splitlines()]
    entries = [line for line in lines if line and not line.startswith("#")]
    if not entries:
        raise ValueError(f"{spec.text}: the list file names no images (one path a line, '#' starts a comment)")
    root = Path(spec.location).parent
    return [str(Path(e) if Path(e).is_absolute() else root / e) for e in entries]


def _check_options(spec: DataSpec, options: dict[str, Any]) -> None:
    if options.pop("trust_remote_code", False):
        raise ValueError(f"{spec.text}: trust_remote_code is not allowed; vlm-encoder never runs a dataset's own code")
    if options.pop("streaming", False):
        raise ValueError(
            f"{spec.text}: streaming=True is not supported: training draws a seeded permutation of the rows and "
            "resumes mid-epoch, and extraction writes rows by index, which needs random access. Let `datasets` "
            "download and prepare it (the default), or convert it to parquet / webdataset shards on disk"
        )
    if spec.config_name and "name" in options and options["name"] != spec.config_name:
        raise ValueError(
            f"{spec.text}: the spec names config {spec.config_name!r} and options name {options['name']!r}"
        )


def _choose_split(spec: DataSpec, names: list[str], split: str | None) -> str:
    if split is None:
        if "train" in names or len(names) == 1:
            return "train" if "train" in names else names[0]
        raise ValueError(f"{spec.text}: splits {sorted(names)}; choose one (--split, train_split / eval_split)")
    if split not in names:
        raise ValueError(f"{spec.text}: no split {split!r}; splits: {sorted(names)}")
    return split


def _load_dataset(spec: DataSpec, split: str | None, options: dict[str, Any]) -> tuple[Any, str]:
    """The `datasets.Dataset` of a split of a `saved`, `files`, `imagefolder` or `hub` spec."""
    import datasets

    if spec.kind == "saved":
        loaded = datasets.load_from_disk(spec.location, **options)
        if isinstance(loaded, datasets.DatasetDict):
            split = _choose_split(spec, list(loaded), split)
            return loaded[split], split
        return loaded, split or str(loaded.split or "train")
    if spec.kind == "files":
        split = split or "train"
        if spec.file_format == "csv" and spec.location.lower().endswith(".tsv"):
            options.setdefault("delimiter", "\t")
        try:
            loaded = datasets.load_dataset(spec.file_format, data_files={split: spec.location}, **options)
        except Exception as err:
            if spec.file_format != "json" or not _is_mixed_type_error(err):
                raise
            return _json_lines_dataset(sorted(Path(spec.root).glob(Path(spec.location).name)), metadata=False), split
        return loaded[split], split
    if spec.kind == "imagefolder":
        path, options = "imagefolder", {"data_dir": spec.location, **options}
    else:
        path = spec.location
        if spec.config_name:
            options.setdefault("name", spec.config_name)
    try:
        return _load_with_split(spec, path, split, options)
    except ConnectionError as err:
        if spec.local:
            raise
        raise ConnectionError(
            f"{spec.text}: no local file or folder of that name, and the Hugging Face hub could not be reached "
            f"({err}); with HF_HUB_OFFLINE=1 only datasets already in the local cache load. Give a local folder, "
            "parquet / csv / tar files or a saved dataset instead"
        ) from err
    except Exception as err:
        if spec.kind != "imagefolder" or not _is_mixed_type_error(err):
            raise
        return _imagefolder_from_json_lines(spec, split, options)


def _load_with_split(spec: DataSpec, path: str, split: str | None, options: dict[str, Any]) -> tuple[Any, str]:
    """`load_dataset(path, split=split)`: only that split is returned (a hub repository with
    per-split files downloads just those); an unknown split is named with the others."""
    import datasets

    if split is None:
        loaded = datasets.load_dataset(path, **options)
        split = _choose_split(spec, list(loaded), None)
        return loaded[split], split
    try:
        return datasets.load_dataset(path, split=split, **options), split
    except ValueError as err:
        if "Unknown split" not in str(err):
            raise
        raise ValueError(f"{spec.text}: no split {split!r} ({err})") from None


def _is_mixed_type_error(err: BaseException | None) -> bool:
    """pyarrow's JSON reader meeting a column of strings on some rows and lists on others."""
    while err is not None:
        if "changed from" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def _imagefolder_from_json_lines(spec: DataSpec, split: str | None, options: dict[str, Any]) -> tuple[Any, str]:
    """An imagefolder whose `metadata.jsonl` pyarrow cannot type: `datasets` still finds the
    split's files; the metadata rows are read here, in the builder's order."""
    import datasets

    builder = datasets.load_dataset_builder("imagefolder", **options)
    data_files = {str(name): files for name, files in builder.config.data_files.items()}
    split = _choose_split(spec, list(data_files), split)
    metadata = sorted(f for f in data_files[split] if os.path.basename(f) == "metadata.jsonl")
    return _json_lines_dataset([Path(f) for f in metadata], metadata=True), split


def _json_lines_dataset(files: list[Path], metadata: bool) -> Any:
    """The rows of JSON-lines files as a `datasets.Dataset`. A column holding strings on some
    rows and lists on others becomes a column of lists. In imagefolder `metadata` files,
    `file_name` becomes the `image` column (paths relative to the file, inside its folder)."""
    import datasets

    rows, digest = [], hashlib.sha256()
    for path in files:
        data = path.read_bytes()
        digest.update(f"{path}\0{len(data)}\n".encode() + data)
        for number, line in enumerate(data.decode().splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if metadata and "file_name" in row:
                row["image"] = str(path.parent / _inside(row.pop("file_name"), path, number))
            rows.append(row)
    columns: dict[str, list[Any]] = {}
    for row in rows:
        for key in row:
            columns.setdefault(key, [])
    for key, values in columns.items():
        values.extend(row.get(key) for row in rows)
        if any(isinstance(v, list) for v in values) and any(isinstance(v, str) for v in values):
            columns[key] = [[v] if isinstance(v, str) else v for v in values]
    dataset = datasets.Dataset.from_dict(columns)
    if "image" in columns:
        dataset = dataset.cast_column("image", datasets.Image())
    # A fingerprint of the files' content, so the same files give the same fingerprint in every run.
    return datasets.Dataset(dataset.data, info=dataset.info, fingerprint=digest.hexdigest()[:32])


def _inside(file_name: str, metadata: Path, line: int) -> str:
    """`file_name` of a metadata row: a relative path inside the metadata file's folder (as
    `datasets` requires)."""
    relative = os.path.normpath(file_name).replace("\\", "/")
    if os.path.isabs(file_name) or "://" in file_name or relative == ".." or relative.startswith("../"):
        raise ValueError(
            f"{metadata} line {line}: file_name {file_name!r} must be a relative path inside {metadata.parent}"
        )
    return relative


def _with_folder_labels(dataset: Any) -> Any:
    """Class labels from an imagefolder's sub-folders, also when a metadata file is present
    (`datasets` then drops them): the images' parent folder names, when they differ and the
    images lie at one depth (`datasets`' rule), as a `ClassLabel` column `label` (names sorted)."""
    import datasets

    image = dataset.features.get("image")
    if "label" in dataset.features or not isinstance(image, datasets.Image) or len(dataset) == 0:
        return dataset
    cells = dataset.select_columns(["image"]).cast_column("image", datasets.Image(decode=False))["image"]
    paths = [(cell or {}).get("path") or "" for cell in cells]
    folders = [os.path.basename(os.path.dirname(p)) for p in paths]
    names = sorted(set(folders))
    if not all(paths) or len(names) < 2 or len({p.replace("\\", "/").count("/") for p in paths}) != 1:
        return dataset
    index = {name: i for i, name in enumerate(names)}
    dataset = dataset.add_column("label", [index[f] for f in folders])
    return dataset.cast_column("label", datasets.ClassLabel(names=names))


# ------------------------------------------------------------------- labels
def label_indices(
    values: list[Any], class_names: tuple[str, ...] | None, where: str
) -> tuple[list[int], tuple[str, ...] | None]:
    """Class indices of a label column: ints stay ints; strings become indices into
    `class_names` (default: the distinct strings, sorted).

    Returns:
        The indices and the class names (`None` for int labels without `class_names`).

    Raises:
        ValueError: A label that is neither an int nor a string, or a string not in `class_names`.
    """
    if all(isinstance(v, str) for v in values):
        names = tuple(class_names) if class_names is not None else tuple(sorted(set(values)))
        index = {name: i for i, name in enumerate(names)}
        unknown = sorted(set(values) - set(index))
        if unknown:
            raise ValueError(f"{where}: labels {unknown[:5]} are not in class_names {list(names)}")
        return [index[v] for v in values], names
    wrong = sorted({type(v).__name__ for v in values if isinstance(v, bool) or not isinstance(v, int)})
    if wrong:
        raise ValueError(f"{where}: labels must all be ints or all be strings, got {', '.join(wrong)}")
    labels = [int(v) for v in values]
    check_class_names(labels, class_names, where)
    return labels, class_names


def check_class_names(labels: list[int] | None, class_names: tuple[str, ...] | None, where: str) -> None:
    """Refuse class names that do not name every label: a label outside `range(len(class_names))`
    could never be predicted, and zero-shot accuracy over the names would be measured over fewer
    classes than the data has.

    Raises:
        ValueError: Naming the labels without a name and the number of names.
    """
    if labels is None or class_names is None:
        return
    outside = sorted({label for label in labels if not 0 <= label < len(class_names)})
    if outside:
        raise ValueError(
            f"{where}: {len(class_names)} class_names {list(class_names)[:10]} do not name labels "
            f"{outside[:10]}{' ...' if len(outside) > 10 else ''} (labels are indices into class_names); "
            "give one name per class"
        )
