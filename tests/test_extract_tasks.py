"""The three extraction tasks (`plan_extraction`, `ShardWorker` / `run_shard`, `finalize_extraction`)
and their commands (`extract --plan-only`, `extract-shard`, `extract-finalize`): shards run in
any order, by any worker, with any batch size, give the local runner's store byte for byte; a
committed shard is skipped; the plan decodes no image; a missing plan is one line."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from test_extract import checksums, cli_args, make_images, tiny_config

from vlm_encoder.cli import main
from vlm_encoder.extract import (
    ExtractPlan,
    FeatureStore,
    ShardResult,
    ShardWorker,
    finalize_extraction,
    plan_extraction,
    run_extraction,
    run_shard,
)

PYTHON = sys.executable
SHARD = 8  # 22 rows: 3 shards


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("data") / "images", 18, bad=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, images) -> Path:
    """The local runner's store (batch 3, no DataLoader workers)."""
    tmp = tmp_path_factory.mktemp("reference")
    assert run_extraction(tiny_config(tmp, images, shard_size=SHARD)).complete
    return tmp / "out"


def manifest_without_time(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.pop("created")
    return manifest


def test_shards_in_any_order_by_a_worker_equal_the_local_runner(tmp_path, images, reference):
    config = tiny_config(tmp_path, images, shard_size=SHARD)
    plan = plan_extraction(config)
    assert (plan.num_rows, plan.num_shards) == (22, 3)
    written = (tmp_path / "out" / "plan.json").read_bytes()
    assert plan_extraction(config) == plan and (tmp_path / "out" / "plan.json").read_bytes() == written  # idempotent

    worker = ShardWorker(ExtractPlan.load(tmp_path / "out"), batch_size=5)  # other batches than the reference
    results = [worker.run(k) for k in (2, 0, 1)]
    assert [(r.index, r.rows + r.rows_failed, r.skipped) for r in results] == [(2, 6, False), (0, 8, False), (1, 8, False)]
    assert finalize_extraction(tmp_path / "out").complete
    assert checksums(tmp_path / "out") == checksums(reference)
    assert manifest_without_time(tmp_path / "out") == manifest_without_time(reference)
    assert (tmp_path / "out" / "failures.jsonl").read_bytes() == (reference / "failures.jsonl").read_bytes()
    assert FeatureStore(tmp_path / "out").verify() == []

    # A committed shard is skipped, untouched; a corrupt one is redone to the same bytes.
    shard = tmp_path / "out" / "shard-00001.safetensors"
    before = shard.stat().st_mtime_ns
    again = run_shard(tmp_path / "out", 1)
    assert isinstance(again, ShardResult) and again.skipped and again.rows == results[2].rows
    assert shard.stat().st_mtime_ns == before
    shard.write_bytes(shard.read_bytes()[:100])
    assert not worker.run(1).skipped
    assert checksums(tmp_path / "out") == checksums(reference)


def test_a_worker_reads_the_planned_rows_and_refuses_other_weights(tmp_path, images):
    folder = tmp_path / "images"
    folder.mkdir()
    for path in sorted(images.iterdir())[:12]:
        (folder / path.name).write_bytes(path.read_bytes())
    plan = plan_extraction(tiny_config(tmp_path, folder, shard_size=4))
    assert plan.row_files and len(list((plan.out / "plan-rows").glob("shard-*.json"))) == 3
    with pytest.raises(ValueError, match="differ from the plan.*weights_sha256"):
        ShardWorker(dataclasses.replace(plan, config={**plan.config, "seed": 1}))
    worker = ShardWorker(plan)
    with pytest.raises(ValueError, match=r"shard index 3 is out of range: the plan has shards 0\.\.2"):
        worker.run(3)

    # The store holds the planned rows: a file added later is not one of them; one that changed
    # or vanished since the plan stops its shard (a rerun finishes once the data is back).
    Image.new("RGB", (20, 20)).save(folder / "a_new.jpg")  # sorts first: listing again would shift every row
    original = (folder / "img_005.jpg").read_bytes()
    (folder / "img_005.jpg").write_bytes(original + b"\0")
    (folder / "img_008.jpg").unlink()
    assert worker.run(0).rows == 4
    with pytest.raises(OSError, match="img_005.jpg changed since the run was planned"):
        worker.run(1)
    with pytest.raises(FileNotFoundError, match="img_008.jpg existed when the run was planned and is gone"):
        worker.run(2)
    (folder / "img_005.jpg").write_bytes(original)
    (folder / "img_008.jpg").write_bytes((images / "img_008.jpg").read_bytes())
    assert [r.rows for r in worker.run_many([0, 1, 2])] == [4, 4, 4]
    summary = finalize_extraction(plan.out)
    assert summary.complete and summary.rows_written == 12 and summary.missing_shards == ()
    assert FeatureStore(plan.out).verify() == []


def test_a_second_driver_is_refused_naming_the_holder(tmp_path, images, capsys):
    from vlm_encoder.locks import DirectoryInUseError, DirectoryLock

    config = tiny_config(tmp_path, images, shard_size=SHARD)
    plan = plan_extraction(config)
    assert plan.config["device"] == "cpu"  # the device type the fingerprint was taken for: the workers' default
    holder = DirectoryLock(plan.out, what="extraction").acquire()
    try:
        with pytest.raises(DirectoryInUseError, match=f"in use by extraction pid {os.getpid()}"):
            plan_extraction(config)
        assert main(["extract-finalize", "--out", str(plan.out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"in use by extraction pid {os.getpid()}" in err
    finally:
        holder.release()


@pytest.mark.parametrize("kind", ["folder", "parquet"])
def test_the_plan_decodes_no_image(tmp_path, images, monkeypatch, kind):
    dataset = images
    if kind == "parquet":
        import datasets

        files = sorted(str(p) for p in images.iterdir())
        table = datasets.Dataset.from_dict({"image": files}).cast_column("image", datasets.Image())
        table.to_parquet(tmp_path / "images.parquet")
        dataset = tmp_path / "images.parquet"

    def no_decoding(*args, **kwargs):
        raise AssertionError("the plan decoded an image")

    monkeypatch.setattr(Image, "open", no_decoding)
    plan = plan_extraction(tiny_config(tmp_path, dataset, shard_size=SHARD))
    assert plan.num_rows == 22 and plan.fingerprint["dataset"]["rows"] == 22


def test_a_missing_plan_is_one_line(tmp_path, capsys):
    assert main(["extract-shard", "--out", str(tmp_path / "none"), "--index", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "plan.json does not exist" in err and "--plan-only" in err
    assert main(["extract-finalize", "--out", str(tmp_path / "none")]) == 2
    assert "plan.json does not exist" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "plan.json").write_text("{not json")
    assert main(["extract-shard", "--out", str(tmp_path / "bad"), "--index", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be read" in err


@pytest.mark.slow
def test_plan_only_then_shards_in_processes_then_finalize_equal_the_local_runner(tmp_path, images, reference, capsys):
    out = tmp_path / "out"
    assert main([*cli_args(images, out, "--shard-size", str(SHARD), "--batch-size", "2"), "--plan-only"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "3\n" and "extract-shard" in captured.err
    assert not list(out.glob("shard-*"))
    assert main(["extract-finalize", "--out", str(out)]) == 1  # nothing run yet: names the missing shards
    assert "3 shards are not committed yet (0 1 2)" in capsys.readouterr().err

    # One process per shard, as a Slurm array runs them, and shard 1 twice at once (a requeued task).
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = [subprocess.Popen([PYTHON, "-m", "vlm_encoder.cli", "extract-shard", "--out", str(out), "--index", str(k),
                              "--batch-size", batch, "--no-progress"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
            for k, batch in ((0, "4"), (1, "1"), (1, "3"), (2, "8"))]
    for run in runs:
        stdout, stderr = run.communicate(timeout=180)
        assert run.returncode == 0, stderr
        assert "rows written" in stdout
    assert main(["extract-finalize", "--out", str(out)]) == 0
    assert "18 rows written, 4 failed, of 22 (complete)" in capsys.readouterr().out
    assert checksums(out) == checksums(reference)
    assert manifest_without_time(out) == manifest_without_time(reference)

    rerun = subprocess.run([PYTHON, "-m", "vlm_encoder.cli", "extract-shard", "--out", str(out), "--index", "2", "0"],
                           env=env, capture_output=True, text=True, timeout=180, check=False)
    assert rerun.returncode == 0 and rerun.stdout.count("already committed, skipped") == 2, rerun.stderr
