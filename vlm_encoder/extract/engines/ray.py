"""`RayEngine`: an extraction's shards on a Ray cluster, one model per worker.

    summary = RayEngine(workers=2).run(config)                       # a local Ray instance
    summary = RayEngine(address="auto", gpus_per_worker=1).run(config)  # the cluster `ray start` made
    vlm-encoder extract ... --engine ray --ray-address auto --workers 8 --gpus-per-worker 1

The driver (this process, `base.drive`) holds the lock of `config.out` from the plan to the
summary and plans once; then `RayEngine` connects to the cluster, starts `workers` actors that
each build a `tasks.ShardWorker` (the model loaded and the source opened once per actor), maps
the shard indices over them with `ray.util.ActorPool` (one shard per task; a worker commits each
shard it computes, atomically), and the driver finalizes. A shard already committed and intact
is skipped by its worker at once, so running the same command again after any failure redoes
only what is missing.

Failures: an actor whose process dies (SIGKILL, OOM killer, a lost node) is restarted by Ray
(`max_restarts`), loading its model again, and the shard it was running is retried on it
(`max_task_retries`); a shard that raised an `OSError` (a storage hiccup) is retried too. The
other actors' shards are untouched. Why an actor pool and not Ray Data `map_batches`:
docs/scale.md.

Workers need this package and the store's folder at the same path (a shared filesystem); the
data spec must name data every worker can read.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...specs.options import ConfigMixin, at_least
from ..config import ExtractConfig
from .base import drive, require_engine

if TYPE_CHECKING:
    from ..store import FeatureStore
    from ..tasks import ExtractPlan, ExtractSummary, ShardResult


@dataclass(frozen=True)
class RayEngine(ConfigMixin):
    """Where and how wide to run an extraction on Ray.

    Attributes:
        address: The cluster (`auto`: the one `ray start` made on this machine; `HOST:PORT`;
            `ray://HOST:PORT` for Ray Client). Default: a session already open in this process
            (`ray.init` called before), else a new local Ray instance, shut down afterwards.
        workers: Actors, each holding one model (default: as many as the cluster's GPUs, or
            CPUs, allow at the per-worker amounts below; never more than the shards).
        gpus_per_worker: GPUs each actor reserves (fractions share a GPU: 0.5 puts two on one).
        cpus_per_worker: CPUs each actor reserves (Ray also sets its torch threads to this).
        retries: Restarts of a dead actor and retries of its shard (also of a shard that
            raised an `OSError`) before the run fails.
    """

    address: str | None = None
    workers: int | None = at_least(1, None)
    gpus_per_worker: float = at_least(0, 0.0)
    cpus_per_worker: float = at_least(0, 1.0)
    retries: int = at_least(0, 3)

    def run(self, config: ExtractConfig) -> ExtractSummary:
        """Extract `config` on Ray (see the module docstring).

        Returns:
            The summary: the store's counts, and what this run did (`*_this_run`, `shards_kept`).

        Raises:
            EngineUnavailable: Ray is not installed.
            DirectoryInUseError: Another run holds `config.out` (one line naming it).
            ValueError: Arguments that differ from those of the store in `config.out`.
            ray.exceptions.RayError: A shard that still failed after `retries`.
        """
        require_engine("ray")
        if self.gpus_per_worker and config.device is None:
            config = config.replace(device="cuda")  # the plan's fingerprint is the workers' device type's

        def map_all(plan: ExtractPlan) -> list[ShardResult]:
            with ray_session(self.address):
                return self.map_shards(plan, range(plan.num_shards), progress=config.progress)

        return drive(config, map_all)

    def map_shards(self, plan: ExtractPlan, indices: Iterable[int], progress: bool = True) -> list[ShardResult]:
        """Run the shards `indices` of `plan` on actors of the Ray session of this process.

        Args:
            plan: The plan (`tasks.plan_extraction`), in a folder every worker sees.
            indices: Shards to run (each committed by the actor that computes it).
            progress: A progress bar of shards and images.

        Returns:
            One `ShardResult` per index, in the order they finished.
        """
        import ray
        from ray.util import ActorPool
        from tqdm.auto import tqdm

        indices = list(indices)
        if not indices:
            return []
        actor = ray.remote(ShardActor).options(
            num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker,
            max_restarts=self.retries, max_task_retries=self.retries,
        )
        device = plan.config.get("device")
        actors = [actor.remote(plan, device, i) for i in range(min(self._width(ray), len(indices)))]
        results: list[ShardResult] = []
        rows = sum(len(plan.layout.rows(k)) for k in indices)
        bar = tqdm(total=rows, unit="img", desc="extract (ray)", disable=not progress, smoothing=0.1)
        try:
            pool = ActorPool(actors)
            run = lambda a, k: a.run.options(retry_exceptions=[OSError]).remote(k)  # noqa: E731
            for result in pool.map_unordered(run, indices):
                results.append(result)
                bar.update(len(plan.layout.rows(result.index)))
                bar.set_postfix_str(f"{len(results)}/{len(indices)} shards", refresh=False)
        finally:
            bar.close()
            for a in actors:  # their processes and models go now, not when the session ends
                ray.kill(a)
        return results

    def _width(self, ray: Any) -> int:
        """Actors to start: `workers`, else what the cluster's resources allow."""
        if self.workers is not None:
            return self.workers
        resources = ray.cluster_resources()
        if self.gpus_per_worker:
            return max(1, int(resources.get("GPU", 0) // self.gpus_per_worker))
        return max(1, int(resources.get("CPU", 1) // self.cpus_per_worker)) if self.cpus_per_worker else 1


class ShardActor:
    """A Ray actor's state: one `ShardWorker` (model and source opened once), running shards.

    Args:
        plan: The plan.
        device: Torch device (default: the worker's accelerator, which Ray assigns).
        worker: This actor's number, recorded as the shards' writer.
    """

    def __init__(self, plan: ExtractPlan, device: str | None, worker: int) -> None:
        from ..tasks import ShardWorker

        writer = {"engine": "ray", "worker": worker, "host": socket.gethostname(), "pid": os.getpid()}
        self.worker = ShardWorker(plan, device, writer=writer)

    def run(self, index: int) -> ShardResult:
        return self.worker.run(index)


@contextlib.contextmanager
def ray_session(address: str | None = None) -> Iterator[None]:
    """The Ray session of this process: the one already open (left open), else one connected
    to `address` (default a new local instance), shut down on exit."""
    ray = require_engine("ray")
    if ray.is_initialized():
        yield
        return
    options: dict[str, Any] = {"include_dashboard": False} if address is None else {}
    ray.init(address=address, logging_level="WARNING", **options)
    try:
        yield
    finally:
        ray.shutdown()


def ray_dataset(store: FeatureStore, layers: list[int] | None = None, kinds: list[str] | None = None) -> Any:
    """A finished store as a `ray.data.Dataset`, from its Arrow export (the columns
    `FeatureStore.to_parquet` writes) as Ray tensor columns, never through Python lists: each
    feature is read as one numpy array off the Arrow buffers and wrapped as Ray's Arrow tensor
    type, so numpy batches hold `(n, D)` / `(n, N, D)` arrays (ragged patches: one `(N_i, D)`
    array per row). One block per shard, read and put into Ray's object store one at a time, so
    the driver holds one shard's selection, whatever the store's size.

    Args:
        store: The store.
        layers: Layers to include (default all stored).
        kinds: Kinds to include (default all stored).

    Returns:
        A Ray Dataset with `row_id` and one column per feature (named as the store's keys), in
        the Ray session of this process (started if none is).
    """
    ray = require_engine("ray")
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray, ArrowVariableShapedTensorArray

    ragged = set(store.ragged_keys)

    def block(start: int, stop: int) -> pa.Table:
        part = store.to_hf_dataset(layers=layers, kinds=kinds, start=start, stop=stop)
        columns = part.with_format("numpy")[:]  # name -> np.ndarray
        table = {"row_id": pa.array(columns["row_id"])}
        for name in part.column_names[1:]:
            if name in ragged:  # variable-shaped in every block, even one whose images agree in size
                table[name] = ArrowVariableShapedTensorArray.from_numpy(list(columns[name]))
            else:
                table[name] = ArrowTensorArray.from_numpy(columns[name])
        return pa.table(table)

    ranges = store.shard_ranges() or [(0, 0)]  # no rows: one empty block
    return ray.data.from_arrow_refs([ray.put(block(start, stop)) for start, stop in ranges])
