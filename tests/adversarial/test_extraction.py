"""Adversarial extraction checks (issue 8, items 16 and 20, single process).

- Item 16: `vlm-encoder extract` (a subprocess) SIGKILLed three times at seeded random
  moments, resumed each time with another batch size and worker count, ends with every row
  exactly once, checksums that verify, no temporary file left, and shards bitwise equal to an
  uninterrupted CPU run.
- Item 20 (single process): the image folder disappearing during a run stops the run with an
  error (it used to record every remaining row as a failed image of a "complete" store); the
  same command finishes the store once the folder is back. A file missing from the start is
  still one image's failure.

Helpers of tests/test_extract.py are reused (images, tiny config, CLI arguments, checksums).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from process_helpers import PYTHON, kill_group
from test_extract import checksums, cli_args, make_images, tiny_config

from vlm_encoder import FeatureStore
from vlm_encoder.extract import run_extraction, runner
from vlm_encoder.extract.shards import ShardLayout, valid_sidecar

HERE = Path(__file__).resolve().parent
SEED = 8
NUM_GOOD, NUM_BAD = 38, 4  # 42 rows: 11 shards of 4 (the last of 2 rows, all broken)
NUM_ROWS = NUM_GOOD + NUM_BAD
NUM_SHARDS = 11
SLEEP_PER_BATCH = 0.2
# (batch size, workers) of the three killed runs, then of the run that finishes.
RUNS = [(2, 1), (3, 2), (5, 0), (4, 1)]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("kill") / "images", NUM_GOOD, bad=True)


def _sidecars(out: Path) -> int:
    return len(list(out.glob("shard-*.json")))


def _start(images: Path, out: Path, batch_size: int, workers: int, sleep: float) -> subprocess.Popen:
    """`vlm-encoder extract` in a subprocess, each batch `sleep` seconds slower (extract_with_faults.py)."""
    argv = [PYTHON, str(HERE / "extract_with_faults.py"), *cli_args(images, out, "--batch-size", str(batch_size),
                                                                    "--num-workers", str(workers))]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", SLOW_BATCH_S=str(sleep))
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_at_a_random_moment(process: subprocess.Popen, out: Path, rng: random.Random) -> str:
    """SIGKILL the main process (as the OOM killer would; its workers are orphaned) at a
    seeded moment: once the run has created its manifest (`new = 0`) or written `new` more
    shards, plus a random fraction of a batch's time. Returns the moment, for messages."""
    new = rng.choice([0, 1, 2])
    delay = rng.uniform(0.0, SLEEP_PER_BATCH)
    before = _sidecars(out)
    deadline = time.monotonic() + 90
    while not ((out / "manifest.json").exists() and _sidecars(out) - before >= new):
        assert process.poll() is None, f"the run ended before its kill: {process.stdout.read().decode()}"
        assert time.monotonic() < deadline, "the run made no progress in 90 s"
        time.sleep(0.01)
    time.sleep(delay)
    assert process.poll() is None, "the run ended before its kill"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    return f"after {new} new shards + {delay:.3f} s"


def test_three_sigkills_then_resumes_give_the_uninterrupted_store(tmp_path, images):
    reference = tmp_path / "reference"
    assert run_extraction(tiny_config(tmp_path, images, out="reference")).complete  # batch 3, no workers
    out = tmp_path / "killed"
    rng = random.Random(SEED)
    moments = []
    for batch_size, workers in RUNS[:-1]:
        process = _start(images, out, batch_size, workers, SLEEP_PER_BATCH)
        try:
            moments.append(_kill_at_a_random_moment(process, out, rng))
        finally:
            kill_group(process)  # the orphaned DataLoader workers too
        with pytest.raises(ValueError, match="incomplete"):
            FeatureStore(out)
    done = _sidecars(out)
    assert 0 < done < NUM_SHARDS, (done, moments)
    # What a kill between creating and renaming a shard's temporary file leaves behind.
    (out / ".shard-00003.safetensors.x1y2z3.tmp").write_bytes(b"partial shard")

    batch_size, workers = RUNS[-1]
    process = _start(images, out, batch_size, workers, 0.0)
    try:
        output, _ = process.communicate(timeout=120)
    finally:
        kill_group(process)
    assert process.returncode == 0, output.decode()
    assert f"{NUM_GOOD} rows written, {NUM_BAD} failed, of {NUM_ROWS} (complete)" in output.decode()
    assert f"{NUM_SHARDS - done} shards" in output.decode(), (output.decode(), moments)

    store = FeatureStore(out)
    # Every row exactly once: written or failed, never both, never twice.
    rows = store.row_ids.tolist() + [f["row"] for f in store.failures]
    assert sorted(rows) == list(range(NUM_ROWS)), moments
    # Checksums verify, from the manifest and from every sidecar; nothing half-written is left.
    assert store.verify() == []
    layout = ShardLayout(NUM_ROWS, 4)
    assert all(valid_sidecar(out, k, layout.rows(k)) for k in range(NUM_SHARDS))
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    # Bitwise equal to the uninterrupted run: the same file bytes, hence the same tensors.
    assert checksums(out) == checksums(reference)
    expected = FeatureStore(reference)
    for key in expected.keys:
        assert torch.equal(store[key][:], expected[key][:]), key
    assert json.loads((out / "failures.jsonl").read_text().splitlines()[0])["row"] == NUM_GOOD


# ------------------------------------------------------------------ item 20, single process
def test_image_folder_vanishing_mid_run_stops_it_and_a_rerun_finishes(tmp_path, monkeypatch):
    images = make_images(tmp_path / "images", 12)
    reference = tmp_path / "reference"
    assert run_extraction(tiny_config(tmp_path, images, out="reference", batch_size=2)).complete
    moved = tmp_path / "unmounted"
    batches = []
    collate = runner.collate_rows

    def collate_then_unmount(items):
        batches.append(len(items))
        if len(batches) == 3:  # inside shard 1: its first batch is read, its second is not
            images.rename(moved)
        return collate(items)

    monkeypatch.setattr(runner, "collate_rows", collate_then_unmount)
    with pytest.raises(FileNotFoundError, match="existed when the run started and is gone now"):
        run_extraction(tiny_config(tmp_path, images, batch_size=2))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert not manifest["complete"] and not (tmp_path / "out" / "failures.jsonl").exists()
    assert not (tmp_path / "out" / "shard-00001.json").exists()  # the interrupted shard is not written

    monkeypatch.setattr(runner, "collate_rows", collate)
    moved.rename(images)
    summary = run_extraction(tiny_config(tmp_path, images, batch_size=4))
    assert summary.complete and summary.rows_failed == 0 and summary.shards_kept >= 1
    assert checksums(tmp_path / "out") == checksums(reference)


def test_a_file_missing_from_the_start_is_one_image_failure(tmp_path):
    images = make_images(tmp_path / "images", 5)
    listing = tmp_path / "list.txt"
    listing.write_text("images/img_000.jpg\nimages/never_downloaded.jpg\nimages/img_001.jpg\n")
    summary = run_extraction(tiny_config(tmp_path, listing))
    assert summary.complete and summary.rows_written == 2 and summary.rows_failed == 1
    (failure,) = FeatureStore(tmp_path / "out").failures
    assert failure["row"] == 1 and failure["reason"] == "no such file"
    assert images.is_dir()
