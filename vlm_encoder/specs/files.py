"""Files of a model spec that is a local directory or a hub repo id: the one resolver of both.

Local directories are read in place; a hub repo is read through `huggingface_hub`'s download
and cache one file at a time (a LLaVA checkpoint only fetches the shards holding its vision
tower), and offline a file missing from the cache is a `FileNotFoundError` saying how to get it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


class SourceFiles:
    """Files of a local directory or a hub repo (fetched into the HF cache on demand).

    Args:
        source: Directory path or hub repo id.
        revision: Hub revision.
    """

    def __init__(self, source: str, revision: str | None = None) -> None:
        self.source = source
        self.revision = revision
        path = Path(source).expanduser()
        if path.is_dir():
            self.directory: Path | None = path
        elif path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
            raise FileNotFoundError(f"{source} is not a directory (expected a model directory or a hub repo id 'owner/name')")
        else:
            self.directory = None
        self.not_cached: list[str] = []

    @property
    def is_hub(self) -> bool:
        return self.directory is None

    def get(self, name: str, required: bool = True) -> Path | None:
        """The local path of `name`, or `None` when the source has no such file and it is
        not `required`.

        Raises:
            FileNotFoundError: A required file is missing, or not cached while offline.
        """
        if self.directory is not None:
            path = self.directory / name
            if path.is_file():
                return path
            if required:
                raise FileNotFoundError(f"{self.directory} has no {name} (expected a Hugging Face model directory or one written by save_pretrained)")
            return None
        return self._download(name, required)

    def _download(self, name: str, required: bool) -> Path | None:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            HFValidationError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        try:
            return Path(hf_hub_download(self.source, name, revision=self.revision))
        except HFValidationError:
            raise FileNotFoundError(f"{self.source!r} is neither a local directory nor a valid hub repo id ('owner/name')") from None
        except (RepositoryNotFoundError, RevisionNotFoundError) as err:
            raise FileNotFoundError(f"{self.source}: no such hub repo or revision ({type(err).__name__})") from None
        except LocalEntryNotFoundError:
            self.not_cached.append(name)
            if required:
                raise FileNotFoundError(self.offline_message([name])) from None
            return None
        except EntryNotFoundError:
            if required:
                raise FileNotFoundError(f"{self.source}: the hub repo has no {name}") from None
            return None

    def offline_message(self, names: Iterable[str]) -> str:
        return (
            f"{self.source}: {', '.join(names)} not in the Hugging Face cache and the hub cannot be reached "
            "(offline, or HF_HUB_OFFLINE=1): the weights are not in the cache. Download the repo where a "
            "network is (e.g. `hf download " + self.source + "`), or pass the path of a local "
            "model directory instead."
        )
