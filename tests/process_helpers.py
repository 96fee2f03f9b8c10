"""Helpers of the multi-process tests: free local ports, ranks launched as plain processes
(as a cluster launcher would, without torchrun's agent killing the survivors), and clean-up
that never leaves a child behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PYTHON = sys.executable


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL a process started with `start_new_session=True` and everything it started
    (e.g. its DataLoader workers), then reap it."""
    if process.poll() is None or _group_alive(process.pid):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class RankResult:
    rank: int
    returncode: int | None  # None: still running at the deadline (then killed)
    output: str


def run_ranks(
    argv: Sequence[str],
    world_size: int,
    timeout_s: float,
    extra_env: dict[str, str] | None = None,
    log_dir: Path | None = None,
) -> tuple[list[RankResult], float]:
    """Start `world_size` processes of `argv` with the environment torchrun would give them
    (gloo on 127.0.0.1, a fresh port), wait until all exit or `timeout_s` passes, kill any
    left (with their children) and return each rank's exit code and output, and the seconds
    until the last exit."""
    port = free_port()
    env = dict(os.environ, **(extra_env or {}))
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
               LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    logs = [open(_log_path(log_dir, rank), "w+b") for rank in range(world_size)]  # noqa: SIM115 - closed below
    processes: list[subprocess.Popen] = []
    started = time.monotonic()
    try:
        for rank in range(world_size):
            processes.append(subprocess.Popen(
                list(argv), env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                stdout=logs[rank], stderr=subprocess.STDOUT, start_new_session=True,
            ))
        deadline = started + timeout_s
        while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
            time.sleep(0.1)
        elapsed = time.monotonic() - started
        codes = [p.poll() for p in processes]
    finally:
        for process in processes:
            kill_group(process)
    results = []
    for rank, log in enumerate(logs):
        log.seek(0)
        results.append(RankResult(rank, codes[rank], log.read().decode(errors="replace")))
        log.close()
    return results, elapsed


def _log_path(log_dir: Path | None, rank: int) -> str:
    if log_dir is None:
        import tempfile

        log_dir = Path(tempfile.mkdtemp(prefix="ranks-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    return str(log_dir / f"rank{rank}.log")
