"""One run per output directory (issue 14, item 1), with real processes and hard timeouts.

- Two `vlm-encoder extract` on one `--out`, started together with different weights: exactly
  one runs; the other is refused with one line naming the holder's pid, and the store holds
  only the winner's model, complete and verified (it used to be able to hold rows of both
  models while saying complete). Two rounds.
- The same with equal arguments and `--wait-lock`: both succeed, the second keeps every shard
  of the first (it used to be able to delete the other's in-flight temporary file and die).
- A live holder is named; a holder killed with SIGKILL leaves its record in the lock file, and
  the next run takes over; `--wait-lock` waits for a live one to end.
- Forked children (DataLoader workers) never keep the lock of their parent.
- A failed run that created `--out` and wrote nothing else removes it (the user's own folder
  and a store stay); a run waiting on that lock starts over on the new file, so two runs never
  hold two files of one folder.
- Two `vlm-encoder train` on one `output_dir` started together: one trains, one is refused.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from process_helpers import PYTHON, kill_group
from test_extract import cli_args, make_images, tiny_config

from vlm_encoder import FeatureStore
from vlm_encoder.extract import run_extraction
from vlm_encoder.locks import LOCK_NAME, DirectoryInUseError, DirectoryLock

HERE = Path(__file__).resolve().parent
ROUNDS = 2
DEADLINE_S = 240  # hard limit for every group of processes started together
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("locks") / "images", 12)  # 3 shards of 4


def _extract(images: Path, out: Path, *extra: str, slow: float = 0.0, **popen) -> subprocess.Popen:
    """`vlm-encoder extract` in a subprocess (through extract_with_faults.py: each batch `slow` s slower)."""
    argv = [PYTHON, str(HERE / "extract_with_faults.py"), *cli_args(images, out, "--batch-size", "2",
                                                                    "--num-workers", "0", *extra)]
    env = dict(ENV, SLOW_BATCH_S=str(slow)) if slow else ENV
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(argv, env=env, start_new_session=True, **popen)


def _finish(processes: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    """Wait for all (hard deadline), then return `(returncode, stdout, stderr)` of each."""
    deadline = time.monotonic() + DEADLINE_S
    results = []
    try:
        for p in processes:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((p.returncode, (out or b"").decode(errors="replace"), (err or b"").decode(errors="replace")))
    finally:
        for p in processes:
            kill_group(p)
    return results


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line.lower()]


@pytest.mark.slow
def test_two_runs_with_different_weights_on_one_out_one_is_refused(tmp_path, images):
    references = {}
    for seed in (0, 1):
        assert run_extraction(tiny_config(tmp_path, images, out=f"ref{seed}", seed=seed, shard_size=4)).complete
        references[seed] = FeatureStore(tmp_path / f"ref{seed}")
    for round_ in range(ROUNDS):
        out = tmp_path / f"out{round_}"
        processes = [_extract(images, out, "--seed", str(seed), slow=0.5) for seed in (0, 1)]
        results = _finish(processes)
        codes = [r[0] for r in results]
        assert sorted(codes) == [0, 2], results
        winner = codes.index(0)
        _, _, refused = results[1 - winner]
        (line,) = _error_lines(refused)
        assert f"is in use by extraction pid {processes[winner].pid}" in line, refused
        assert "--wait-lock" in line
        store = FeatureStore(out)
        assert store.verify() == [] and len(store) == 12
        reference = references[winner]
        assert store.manifest["fingerprint"]["model"] == reference.manifest["fingerprint"]["model"]
        assert [s["sha256"] for s in store.manifest["shards"]] == [s["sha256"] for s in reference.manifest["shards"]]


@pytest.mark.slow
def test_two_equal_runs_with_wait_lock_both_succeed_and_share_the_work(tmp_path, images):
    out = tmp_path / "out"
    results = _finish([_extract(images, out, "--wait-lock", slow=0.3) for _ in range(2)])
    assert [r[0] for r in results] == [0, 0], results
    summaries = sorted(r[1] for r in results)
    assert "this run: 0 rows in 0 shards, 3 shards kept" in summaries[0], summaries
    assert "this run: 12 rows in 3 shards, 0 shards kept" in summaries[1], summaries
    assert any("waiting for it to finish" in r[2] for r in results)
    store = FeatureStore(out)
    assert store.verify() == [] and len(store) == 12
    assert not list(out.glob(".*.tmp"))


def _hold(directory: Path) -> subprocess.Popen:
    holder = subprocess.Popen([PYTHON, str(HERE / "hold_lock.py"), str(directory)], env=ENV, stdout=subprocess.PIPE,
                              start_new_session=True)
    assert holder.stdout.readline().strip() == b"locked"
    return holder


@pytest.mark.slow
def test_a_live_holder_is_named_a_dead_one_is_taken_over_and_wait_lock_waits(tmp_path, images):
    out = tmp_path / "out"
    holder = _hold(out)
    try:
        (code, _, stderr), = _finish([_extract(images, out)])
        assert code == 2
        (line,) = _error_lines(stderr)
        assert f"{out} is in use by holder pid {holder.pid} on " in line and "one run per directory" in line
        assert not (out / "manifest.json").exists()  # refused before anything was written
    finally:
        kill_group(holder)  # SIGKILL: its record stays in the lock file, its lock goes with it
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == holder.pid
    (code, stdout, stderr), = _finish([_extract(images, out)])
    assert code == 0 and "(complete)" in stdout, stderr

    waiter_out = tmp_path / "waited"
    holder = _hold(waiter_out)
    log = tmp_path / "waiter.log"
    with open(log, "wb") as handle:
        waiter = _extract(images, waiter_out, "--wait-lock", stderr=handle)
        try:
            deadline = time.monotonic() + DEADLINE_S
            while "waiting for it to finish" not in log.read_text(errors="replace"):
                assert waiter.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")
                time.sleep(0.1)
            assert not (waiter_out / "manifest.json").exists()
            holder.send_signal(signal.SIGKILL)
            (code, stdout, _), = _finish([waiter])
        finally:
            kill_group(holder)
            kill_group(waiter)
    assert code == 0 and "(complete)" in stdout, log.read_text(errors="replace")


def test_forked_children_do_not_keep_the_lock(tmp_path):
    lock = DirectoryLock(tmp_path, what="parent").acquire()
    with pytest.raises(DirectoryInUseError, match=f"is in use by parent pid {os.getpid()}"):
        DirectoryLock(tmp_path).acquire()  # a second descriptor conflicts, also in one process
    child = os.fork()
    if child == 0:  # a DataLoader worker: lives on after its parent lets go
        time.sleep(5)
        os._exit(0)
    # The parent lets go at once: the child may not even have run its fork handler yet (a busy
    # machine), so the release itself must free the lock.
    try:
        lock.release()
        DirectoryLock(tmp_path).acquire().release()  # the live child holds nothing
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_a_failed_run_leaves_no_folder_it_created_and_nothing_else(tmp_path, images):
    from vlm_encoder.cli import main

    new = tmp_path / "new" / "out"
    assert main(cli_args(tmp_path / "no_such_folder", new)) == 2  # a mistyped dataset: refused inside the lock
    assert not (tmp_path / "new").exists()  # both folders it made are gone, the lock file with them
    existing = tmp_path / "existing"
    existing.mkdir()
    assert main(cli_args(tmp_path / "no_such_folder", existing)) == 2
    assert existing.is_dir()  # the user's own folder stays
    store = tmp_path / "store"
    assert main(cli_args(images, store, "--batch-size", "4")) == 0
    before = sorted(p.name for p in store.iterdir())
    # refused after the lock for other layers: the store stays whole
    assert main(cli_args(images, store, "--batch-size", "4", "--layers", "0")) == 2
    assert sorted(p.name for p in store.iterdir()) == before and FeatureStore(store).verify() == []


def test_a_run_waiting_on_a_failed_runs_lock_starts_over_on_a_new_file(tmp_path, capfd):
    import threading

    from vlm_encoder.locks import hold_directory

    out = tmp_path / "out"
    waiter = DirectoryLock(out, what="waiter")
    with pytest.raises(RuntimeError, match="the run failed"):
        with hold_directory(out, what="failing run"):
            thread = threading.Thread(target=waiter.acquire, kwargs={"wait": True, "poll_s": 0.02})
            thread.start()
            deadline = time.monotonic() + 30
            while "waiting for it to finish" not in capfd.readouterr().err:  # it opened this run's file
                assert time.monotonic() < deadline and thread.is_alive()
                time.sleep(0.02)
            raise RuntimeError("the run failed")  # nothing written: this run removes its folder
    thread.join(30)
    assert waiter.held
    # The waiter holds the file now at out/.lock, not the removed one: a third run is refused.
    assert (out / LOCK_NAME).is_file()
    with pytest.raises(DirectoryInUseError, match="is in use by waiter"):
        DirectoryLock(out).acquire()
    waiter.release()


TRAIN_CONFIG = {
    "data": "builtin:shapes", "data_options": {"num_train": 16, "num_test": 8, "canvas": 16},
    "vision_overrides": {"image_size": 16, "patch_size": 8, "width": 32, "depth": 1, "num_heads": 2},
    "text_overrides": {"width": 32, "depth": 1, "num_heads": 2, "context_length": 12},
    "embed_dim": 16, "batch_size": 4, "lr": 1e-2, "warmup_steps": 1, "max_steps": 20, "eval_split": "test",
    "eval_batch_size": 4, "progress": False, "cpu": True, "log_every": 1, "num_workers": 0,
}


@pytest.mark.slow
def test_two_training_runs_on_one_output_dir_one_is_refused(tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(dict(TRAIN_CONFIG, output_dir=str(out))))
    argv = [PYTHON, "-m", "vlm_encoder.cli", "train", "--config", str(config)]
    # Started together, as two users would; the lock is taken before anything is written.
    processes = [subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  start_new_session=True) for _ in range(2)]
    results = _finish(processes)
    codes = [r[0] for r in results]
    assert sorted(codes) == [0, 2], results
    winner = codes.index(0)
    (line,) = _error_lines(results[1 - winner][2])
    assert f"is in use by training run pid {processes[winner].pid}" in line, results
    assert (out / "export" / "model").is_dir()
    assert [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(r)["kind"] == "train"] == list(range(1, 21))
