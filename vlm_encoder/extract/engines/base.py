"""What every engine adapter shares: the engines' names and the one-line refusal of an engine
whose extra is not installed (the core package never imports an engine)."""

from __future__ import annotations

import dataclasses
import importlib
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import ExtractConfig
    from ..tasks import ExtractPlan, ExtractSummary, ShardResult

# `local`: `run_extraction` (one process, or the processes of an `accelerate launch`).
ENGINES: tuple[str, ...] = ("local", "ray", "spark")


class EngineUnavailable(ImportError):
    """An engine whose package is not installed (the message says what to install)."""


class EngineFailure(RuntimeError):
    """The engine gave up on a shard after its own retries (its error, e.g. a Ray actor that
    died every time or a Spark job aborted, is the cause); committed shards are kept."""


def require_engine(engine: str, module: str | None = None) -> ModuleType:
    """Import the package of `engine` (`module`, default the engine's name).

    Raises:
        EngineUnavailable: It is not installed: one line naming the extra to install.
    """
    module = module or engine
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise EngineUnavailable(
            f"--engine {engine} needs the {module} package, which is not installed here ({err}): "
            f"pip install 'vlm-encoder[{engine}]'"
        ) from None


def drive(config: ExtractConfig, map_shards: Callable[[ExtractPlan], list[ShardResult]]) -> ExtractSummary:
    """An engine's driver: hold the lock of `config.out` from the plan to the summary, plan once,
    let the engine run every shard (`map_shards(plan)`: a worker skips a shard committed and
    intact), finalize. `tasks.plan_extraction` / `finalize_extraction` each take the lock for
    themselves; a driver holds it throughout, so a second driver is refused until this one ends.

    Returns:
        The summary, with what this run did (`*_this_run`, `shards_kept`) from the engine's results.

    Raises:
        DirectoryInUseError: Another run holds `config.out` (one line naming it).
        ValueError: Arguments that differ from those of the store in `config.out`.
    """
    from ...locks import hold_directory
    from ..shards import remove_stale_temporaries, sidecar_path
    from ..tasks import LOCK_HINT, _finalize, _plan_locked

    started = time.perf_counter()
    with hold_directory(config.out, None, what="extraction", hint=LOCK_HINT, wait=config.wait_lock):
        remove_stale_temporaries(config.out)  # of killed runs' writers
        plan = _plan_locked(config)  # plan_extraction's body: this driver holds the lock throughout
        before = _sidecar_stamps(plan.out)
        loop_started = time.perf_counter()
        try:
            results = map_shards(plan)
        except (ValueError, OSError):  # the package's own errors, raised through the engine
            raise
        except Exception as err:  # noqa: BLE001 - the engine's error types (Ray, py4j) are its own
            raise EngineFailure(
                f"a shard failed on every attempt the engine allows ({type(err).__name__}: {_last_line(err)}); "
                "committed shards are kept: fix the cause and run the same command to finish"
            ) from err
        extract_seconds = time.perf_counter() - loop_started
        summary = _finalize(plan, started)
        after = _sidecar_stamps(plan.out)
    # Written by this run: a shard whose sidecar is new or rewritten since the plan, even when the
    # result came from a retry that found it committed (its first attempt was killed after the commit).
    def written(r: ShardResult) -> bool:
        name = sidecar_path(plan.out, r.index).name
        return not r.skipped or (name in after and before.get(name) != after[name])

    done = [r for r in results if written(r)]
    return dataclasses.replace(
        summary,
        rows_this_run=sum(r.rows + r.rows_failed for r in done),
        shards_this_run=len(done),
        shards_kept=len(results) - len(done),
        seconds=time.perf_counter() - started,
        extract_seconds=extract_seconds,
    )


def _sidecar_stamps(out: Path) -> dict[str, tuple[int, int]]:
    """Each shard sidecar in `out` -> (inode, mtime): a rewrite (atomic rename) changes both."""
    stamps = {}
    for path in out.glob("shard-*.json"):
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        stamps[path.name] = (stat.st_ino, stat.st_mtime_ns)
    return stamps


def _last_line(err: BaseException) -> str:
    """The innermost error of an engine's report: the last `SomethingError: ...` line of the
    worker's traceback it carries, else its first line (a JVM stack trace follows that)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    errors = [line for line in lines if line.split(":", 1)[0].endswith(("Error", "Exception"))
              and not line.startswith(("py4j", "org.apache", "java."))]
    return errors[-1] if errors else (lines[0] if lines else type(err).__name__)
