"""`save_pretrained` / `from_pretrained` for the package's modules: `config.json` +
`model.safetensors`, written atomically, read strictly.

The transformers on-disk convention, so what users train can be versioned and shared. The
hub is reached only through `huggingface_hub`'s own download and cache.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path
from collections.abc import Iterator
from typing import Any, ClassVar, TypeVar

import torch
from safetensors.torch import save_model

from .weights import WeightsError, build_and_load, read_state_dict

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PROCESSOR_NAME = "processor_config.json"  # the image tower's preprocessing, when it has one

T = TypeVar("T", bound="PretrainedMixin")


def read_umask() -> int:
    """The process umask, read without changing it where Linux shows it (`/proc/self/status`);
    elsewhere set and restored once per process (the umask is process-wide, so that is not
    thread-safe)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return _umask_set_and_restored()


@functools.cache
def _umask_set_and_restored() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give `path` (a file, or a directory and everything under it) the mode `open` / `mkdir`
    would have: 0o666 / 0o777 less the umask (0644 / 0755 under the usual 022).

    Call it on what is about to be renamed into place: `tempfile`'s files and directories are
    private (0600 / 0700), and so are safetensors' (0.8 writes through a temporary file,
    safetensors#782); the rename would keep that mode, unlike every neighbouring file's.
    """
    mask = read_umask()
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    path = Path(path)
    if not path.is_dir():
        path.chmod(file_mode)
        return
    path.chmod(dir_mode)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(root, name), dir_mode)
        for name in files:
            os.chmod(os.path.join(root, name), file_mode)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file renamed into place (the file gets the
    umask's mode, like one written with `open`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        apply_umask(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def resolve_pretrained_dir(
    source: str | os.PathLike,
    files: tuple[str, ...] = (CONFIG_NAME, WEIGHTS_NAME),
    revision: str | None = None,
    optional: tuple[str, ...] = (),
) -> Path:
    """A local directory holding `files` (and `optional` ones when the repo has them):
    `source` itself, or the hub cache of a repo id (through `specs.files.SourceFiles`).

    Raises:
        FileNotFoundError: A local directory without the files, or a hub id whose files are
            not in the cache while offline (with how to point at a local directory).
    """
    from .specs.files import SourceFiles

    found = SourceFiles(os.fspath(source), revision)
    if found.directory is not None:
        missing = [f for f in files if not (found.directory / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{found.directory} has no {', '.join(missing)} (expected a directory written by save_pretrained)"
            )
        return found.directory
    paths = [found.get(name) for name in files]
    for name in optional:
        found.get(name, required=False)
    return paths[0].parent


@contextlib.contextmanager
def staging_directory(target: Path) -> Iterator[Path]:
    """A fresh hidden directory beside `target` to write a save into (removed afterwards,
    with whatever it still holds)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def move_into_place(staging: Path, target: Path, entries: list[str], stale: tuple[str, ...] = ()) -> None:
    """Publish a save written in `staging` (see `staging_directory`) as `target`.

    A new `target` appears whole in one rename. In an existing one each of `entries` replaces
    its old version: a file in one rename, a sub-directory after its old version is moved
    aside (into `staging`, deleted with it); the `stale` entries (this save's files that the
    model no longer has) are removed; anything else there is kept. What is published gets the
    umask's modes (`apply_umask`).
    """
    apply_umask(staging)
    if not target.exists():
        os.replace(staging, target)
        return
    for name in [*entries, *stale]:
        old = target / name
        if old.is_dir():  # a directory cannot be renamed over
            os.replace(old, staging / f".old-{name}")
        elif name not in entries:
            old.unlink(missing_ok=True)
        if name in entries:
            os.replace(staging / name, target / name)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


class PretrainedMixin:
    """Adds `save_pretrained(dir)` and `from_pretrained(dir)` to an `nn.Module` whose only
    constructor argument is a frozen dataclass config with `to_dict` / `from_dict`."""

    config_class: ClassVar[type]
    model_type: ClassVar[str]

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write `config.json` and `model.safetensors` into `save_directory`, and the image
        tower's preprocessing as `processor_config.json` when it has one (a loaded pretrained
        tower does), so `from_pretrained` gives back the same preprocessing.

        The files are written and flushed to disk in a temporary directory beside it, then
        moved into place, so an interrupted save never leaves a half-written file behind: a new
        directory appears complete (one rename) or not at all; in an existing one each file is
        replaced atomically (weights first) and other files there are kept.

        Returns:
            The directory.
        """
        target = Path(save_directory)
        with staging_directory(target) as staging:
            config = {"model_type": self.model_type, **self.config.to_dict()}
            (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
            save_model(self, str(staging / WEIGHTS_NAME))
            names = [WEIGHTS_NAME, CONFIG_NAME]
            processor = self.get_image_processor()
            if processor is not None:
                (staging / PROCESSOR_NAME).write_text(json.dumps(processor.to_dict(), indent=2, sort_keys=True))
                names.append(PROCESSOR_NAME)
            for name in names:
                _fsync(staging / name)
            # A preprocessing file left by an earlier save is not this model's.
            move_into_place(staging, target, names, stale=(PROCESSOR_NAME,) if processor is None else ())
        return target

    @classmethod
    def read_config(cls, directory: Path) -> Any:
        try:
            data = json.loads((directory / CONFIG_NAME).read_text())
        except json.JSONDecodeError as err:
            raise WeightsError(f"{directory / CONFIG_NAME}: not valid JSON ({err})") from None
        model_type = data.get("model_type")
        if model_type != cls.model_type:
            raise WeightsError(
                f"{directory / CONFIG_NAME} has model_type={model_type!r}; {cls.__name__} reads {cls.model_type!r}. "
                "For HF, open_clip or timm checkpoints use vlm_encoder.load_encoder."
            )
        return cls.config_class.from_dict(data)

    @classmethod
    def from_pretrained(
        cls: type[T],
        source: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        revision: str | None = None,
        checkpoint: str | os.PathLike | None = None,
    ) -> T:
        """Load a model written by `save_pretrained` (a local directory or a hub repo id).

        Args:
            source: Directory, or hub repo id (downloaded through the HF cache).
            device: Where to put the model.
            dtype: Floating dtype to cast to.
            revision: Hub revision.
            checkpoint: A weight file (same names) to load instead of `model.safetensors`.

        Returns:
            The model in eval mode.
        """
        needed = (CONFIG_NAME,) if checkpoint is not None else (CONFIG_NAME, WEIGHTS_NAME)
        directory = resolve_pretrained_dir(source, needed, revision=revision, optional=(PROCESSOR_NAME,))
        config = cls.read_config(directory)
        weights = Path(checkpoint) if checkpoint is not None else directory / WEIGHTS_NAME
        # Built on `meta` and checked before anything is allocated: a config.json that does
        # not fit its weights is refused naming the file, and the weights are held once.
        model = build_and_load(lambda: cls.from_config(config), read_state_dict(weights), source=str(weights))
        model.set_image_processor(read_image_processor(directory))
        model.to(device=device, dtype=dtype)
        return model.eval()

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Upload what `save_pretrained` writes, with a model card, to the hub repo `repo_id`
        (`vlm_encoder.hub.push_to_hub`: `training=`, `metrics=`, `private=`, `token=`, ...);
        `from_pretrained(repo_id)` reads it back."""
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    @classmethod
    def from_config(cls: type[T], config: Any) -> T:
        """A randomly initialised model of `config` (what `from_pretrained` loads weights into)."""
        return cls(config)

    def get_image_processor(self) -> Any:
        """The image tower's preprocessing (an `ImageProcessor`) or `None`."""
        return getattr(self, "image_processor", None)

    def set_image_processor(self, processor: Any) -> None:
        """Attach the image tower's preprocessing (`None`: keep what is there)."""
        if processor is not None:
            self.image_processor = processor


def read_image_processor(directory: Path) -> Any:
    """The `ImageProcessor` saved in `directory` (`processor_config.json`), or `None`."""
    path = Path(directory) / PROCESSOR_NAME
    if not path.is_file():
        return None
    from .processing import ImageProcessor

    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise WeightsError(f"{path}: not valid JSON ({err})") from None
    return ImageProcessor.from_dict(data)
