"""`SparkEngine`: an extraction's shards as Spark tasks, one model per Python worker.

    summary = SparkEngine(workers=2).run(config)                   # local[2,4] on this machine
    summary = SparkEngine(master="spark://head:7077").run(config)  # a standalone cluster
    vlm-encoder extract ... --engine spark --workers 2             # or --spark-master URL
    spark-submit --master yarn job.py      # job.py calls SparkEngine().run(config): see docs/scale.md

The driver (this process) holds the lock of `config.out` from the plan to the summary, plans once
(`tasks.plan_extraction`), and maps the shard indices with `SparkContext.parallelize(indices,
numSlices=len(indices))`, one task per shard as clip-retrieval does: Spark's scheduler spreads
them over the executors' cores and retries a failed task alone (`spark.task.maxFailures`; in
local mode `local[N,F]` allows F attempts). A task only returns its `ShardResult`; the features
go to the store's folder, committed atomically by the worker that computed them, so a retried
shard, or the same command run again after any failure, redoes only what is not committed.

The model is loaded once per Python worker process, not per task: Spark reuses its Python
workers between tasks (`spark.python.worker.reuse`, on by default) and each keeps the
`tasks.ShardWorker` of the plan it last ran. Spark sets each worker's `OMP_NUM_THREADS` to
`spark.task.cpus` (1 by default), so N task slots use N cores' worth of torch threads. On GPU
executors with resource scheduling (`spark.task.resource.gpu.amount`), each task encodes on
the GPU Spark assigned it.

Session: an active SparkSession of this process, or the one `spark-submit` set up, is used as
is and left open; otherwise a session on `master` (default `local[workers,4]`: a task may fail 3
times, as on a cluster, where `spark.task.maxFailures` is 4) is started and stopped afterwards.
A local session binds to 127.0.0.1 and runs its Python workers with this interpreter.
Executors need this package and the store's folder at the same path (a shared filesystem); the
data spec must name data every executor can read.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import socket
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ...specs.options import ConfigMixin, at_least
from ..config import ExtractConfig
from .base import drive, require_engine

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from ..store import FeatureStore
    from ..tasks import ExtractPlan, ExtractSummary, ShardResult, ShardWorker

APP_NAME = "vlm-encoder extract"
LOOPBACK = "127.0.0.1"
LOCAL_ATTEMPTS = 4  # of a task, in the default local master: Spark's default on a cluster (local mode's is 1)


@dataclass(frozen=True)
class SparkEngine(ConfigMixin):
    """Where and how wide to run an extraction on Spark.

    Attributes:
        master: Spark master URL (`local[4]`, `local[4,2]`, `spark://HOST:7077`, `yarn`, ...).
            Default: the active session of this process or the one `spark-submit` set up,
            else `local[workers,4]`.
        workers: Task slots of the default local master (`local[N,4]`; default every core).
            A cluster's executors decide their own width (`spark.executor.cores`).
    """

    master: str | None = None
    workers: int | None = at_least(1, None)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.workers is not None and self.master is not None:
            raise ValueError(f"--workers sets the width of the default local master; with --spark-master "
                             f"{self.master} give it there (local[{self.workers}]) or through the executors' cores")

    def run(self, config: ExtractConfig) -> ExtractSummary:
        """Extract `config` on Spark (see the module docstring).

        Returns:
            The summary: the store's counts, and what this run did (`*_this_run`, `shards_kept`).

        Raises:
            EngineUnavailable: pyspark is not installed.
            DirectoryInUseError: Another run holds `config.out` (one line naming it).
            ValueError: Arguments that differ from those of the store in `config.out`.
            py4j.protocol.Py4JJavaError: A shard whose task failed `spark.task.maxFailures` times
                (the committed shards are kept: run again).
        """
        require_engine("spark", "pyspark")

        def on_spark(plan: ExtractPlan) -> list[ShardResult]:
            with spark_session(self.master, self.workers, progress=config.progress) as spark:
                return map_shards(spark, plan, range(plan.num_shards))

        return drive(config, on_spark)


def map_shards(spark: SparkSession, plan: ExtractPlan, indices: Iterable[int]) -> list[ShardResult]:
    """Run the shards `indices` of `plan` as Spark tasks (one per shard) in `spark`.

    Args:
        spark: The session.
        plan: The plan (`tasks.plan_extraction`), in a folder every executor sees.
        indices: Shards to run (each committed by the worker that computes it).

    Returns:
        One `ShardResult` per index, in the order of `indices`.
    """
    indices = list(indices)
    if not indices:
        return []
    context = spark.sparkContext
    context.setJobDescription(f"vlm-encoder extract: {len(indices)} shards into {plan.out}")
    task = functools.partial(_run_partition, plan, plan_key(plan), plan.config.get("device"))
    return context.parallelize(indices, numSlices=len(indices)).mapPartitions(task).collect()


def plan_key(plan: ExtractPlan) -> str:
    """What identifies a plan for a worker's cached `ShardWorker`: its folder and contents."""
    text = json.dumps({"out": str(plan.out), **plan.to_dict()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# ------------------------------------------------------------------------- in the Python worker

_WORKER: dict[tuple[str, str | None], ShardWorker] = {}  # this process's one ShardWorker, by (plan, device)


def _run_partition(plan: ExtractPlan, key: str, device: str | None, indices: Iterator[int]) -> Iterator[ShardResult]:
    """A Spark task: run its shards on this process's `ShardWorker` (built on first use)."""
    device = _task_device(device)
    worker = _WORKER.get((key, device))
    if worker is None:
        from ..tasks import ShardWorker

        _WORKER.clear()  # another plan's (or device's) model goes before this one loads
        writer = {"engine": "spark", "host": socket.gethostname(), "pid": os.getpid()}
        worker = _WORKER[key, device] = ShardWorker(plan, device, writer=writer)
    for index in indices:
        yield worker.run(index)


def _task_device(device: str | None) -> str | None:
    """The plan's device, or the GPU Spark's resource scheduling assigned this task."""
    if device not in (None, "cuda"):
        return device
    from pyspark import TaskContext

    context = TaskContext.get()
    gpus = context.resources().get("gpu") if context is not None else None
    return f"cuda:{gpus.addresses[0]}" if gpus is not None and gpus.addresses else device


# ------------------------------------------------------------------------------------ session


@contextlib.contextmanager
def spark_session(master: str | None = None, workers: int | None = None, progress: bool = True
                  ) -> Iterator[SparkSession]:
    """The SparkSession to run on (see the module docstring): the active one or `spark-submit`'s
    (left open), else a new one on `master` (default `local[workers,4]`, every core without
    `workers`; 4 attempts per task), stopped on exit. A local session binds to 127.0.0.1.

    Raises:
        EngineUnavailable: pyspark is not installed.
        ValueError: `master` or `workers` given while another master's session is active.
    """
    require_engine("spark", "pyspark")
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    submitted = active is None and master is None and "PYSPARK_GATEWAY_PORT" in os.environ  # under spark-submit
    if active is not None or submitted:
        session = active or SparkSession.builder.appName(APP_NAME).getOrCreate()
        running = session.sparkContext.master
        if (master is not None and master != running) or workers is not None:
            asked = master or f"{workers} workers"
            raise ValueError(f"a SparkSession on {running} is active in this process: run with its master, not "
                             f"{asked} (omit --spark-master and --workers)")
        yield session
        return
    master = master or f"local[{workers or '*'},{LOCAL_ATTEMPTS}]"
    builder = SparkSession.builder.appName(APP_NAME).master(master)
    if not progress:
        builder = builder.config("spark.ui.showConsoleProgress", "false")
    environment = {}
    if master.startswith("local"):
        # Bind the driver (and its UI) to loopback, and run the Python workers with this interpreter.
        environment = {"SPARK_LOCAL_IP": LOOPBACK, "PYSPARK_PYTHON": sys.executable}
        builder = builder.config("spark.driver.host", LOOPBACK).config("spark.driver.bindAddress", LOOPBACK)
    with _environment(environment):
        session = builder.getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    try:
        yield session
    finally:
        session.stop()


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """`values` set in `os.environ` where not set already, restored on exit."""
    added = [k for k in values if k not in os.environ]
    os.environ.update({k: values[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


# ------------------------------------------------------------------------------------ downstream


def spark_dataframe(store: FeatureStore, path: str | os.PathLike, spark: SparkSession | None = None,
                    layers: list[int] | None = None, kinds: list[str] | None = None) -> DataFrame:
    """A finished store as a Spark DataFrame: Spark reads the store's parquet export
    (`FeatureStore.to_parquet`, written to `path` by this driver one shard at a time) itself,
    never through Python lists.

    Args:
        store: The store.
        path: Where to write the parquet file: a path every executor can read.
        spark: The session (default the active one).
        layers: Layers to include (default all stored).
        kinds: Kinds to include (default all stored).

    Returns:
        A DataFrame with `row_id` and one column per feature, named as the store's keys
        (`layer11.cls`: quote it with backticks in Spark SQL); vectors are `array<float>`,
        patches `array<array<float>>`.
    """
    require_engine("spark", "pyspark")
    from pyspark.sql import SparkSession

    spark = spark or SparkSession.getActiveSession()
    if spark is None:
        raise ValueError("no active SparkSession: pass spark= (e.g. SparkSession.builder.getOrCreate())")
    path = Path(path)
    store.to_parquet(path, layers=layers, kinds=kinds)
    return spark.read.parquet(str(path.resolve()))
