"""`run_extraction`: one process, or the processes of one `accelerate launch` / `torchrun`, over
the three tasks of `tasks.py`.

The main process plans (`DIR/plan.json`, the manifest skeleton); every process (rank `r` of
`W`, from `accelerate.PartialState`) runs a `ShardWorker` over the shards `k` with
`k % W == r`; the main process finalizes. Each process loads the model once, for the plan's
fingerprint and its shards alike.

One run per `out`: the main process holds the directory's lock (`vlm_encoder.locks`) from before
it reads the manifest until the summary; a second run is refused with the holder's pid, host and
command, or waits (`wait_lock`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from ..locks import hold_directory
from .config import ExtractConfig
from .runner import _process_state, open_encoding
from .shards import check_fingerprint, read_manifest, remove_stale_temporaries
from .tasks import (
    LOCK_HINT,
    ExtractSummary,
    ShardWorker,
    _finalize,
    _plan_of,
    _summarize,
    _write_manifest_skeleton,
)


def run_extraction(config: ExtractConfig) -> ExtractSummary:
    """Extract features of every row of `config.dataset` into `config.out` (see the module docstring).

    Args:
        config: The run.

    Returns:
        The summary (identical on every process, except the `*_this_run` counts).

    Raises:
        ValueError: Arguments that differ from those of the run recorded in `config.out`
            (the message names each), or features the encoder cannot give.
    """
    started = time.perf_counter()
    state = _process_state(config.device)
    with hold_directory(config.out, state, what="extraction", hint=LOCK_HINT, wait=config.wait_lock):
        return _extract(config, state, started)


def _extract(config: ExtractConfig, state: Any, started: float) -> ExtractSummary:
    """`run_extraction`, under the lock of `config.out`."""
    rank, world = state.process_index, state.num_processes
    device = torch.device(config.device) if config.device else state.device
    encoding = open_encoding(config, device)
    plan = _plan_of(encoding)  # every process takes the fingerprint, so a refusal stops all at once
    if state.is_main_process:
        remove_stale_temporaries(config.out)  # of killed runs: this run holds the lock and writes nothing yet
        _write_manifest_skeleton(plan)
    state.wait_for_everyone()
    check_fingerprint(plan.out, read_manifest(plan.out), plan.fingerprint)
    if state.is_main_process:
        plan.save()

    writer = {"rank": rank, "world_size": world}
    worker = ShardWorker(plan, progress=config.progress and state.is_main_process, writer=writer, _encoding=encoding)
    mine = plan.layout.shards_of_rank(rank, world)
    loop_started = time.perf_counter()
    results = worker.run_many(mine)
    extract_seconds = time.perf_counter() - loop_started
    state.wait_for_everyone()
    if state.is_main_process:
        remove_stale_temporaries(plan.out)  # every process has finished writing
        summary = _finalize(plan, started)
    state.wait_for_everyone()
    if not state.is_main_process:
        summary = _summarize(plan, read_manifest(plan.out), started)
    done = [r for r in results if not r.skipped]
    # The summary speaks for the whole launch: counts summed, times of the slowest process.
    rows_run, shards_run, kept = _sum_over_processes(
        world, sum(r.rows + r.rows_failed for r in done), len(done), len(results) - len(done))
    seconds, extract_seconds = _max_over_processes(world, time.perf_counter() - started, extract_seconds)
    return dataclasses.replace(summary, rows_this_run=int(rows_run), shards_this_run=int(shards_run),
                               shards_kept=int(kept), seconds=seconds, extract_seconds=extract_seconds)


def _reduce(world: int, values: tuple[float, ...], op: str) -> list[float]:
    if world == 1:
        return list(values)
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor.tolist()


def _sum_over_processes(world: int, *values: float) -> list[float]:
    return _reduce(world, values, "sum")


def _max_over_processes(world: int, *values: float) -> list[float]:
    return _reduce(world, values, "max")
