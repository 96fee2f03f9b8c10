"""Extraction hardening (issue 14, items 2-4); races of item 1 are in test_locks.py.

- Item 2: the images of a `datasets` source (`imagefolder:DIR`, a table of file paths)
  vanishing mid-run stop the run (it used to end "complete" with every remaining row failed);
  the same command finishes the store once they are back. A rerun retries a row that failed
  for a reason that can go away (a missing file, now there) and keeps one that cannot (not an
  image), and redoes nothing when nothing changed.
- Item 3: a boolean mask selects the True rows (numpy, torch, list) or is refused; a truncated
  or missing shard is an error naming the file, and `verify()` lists a missing one;
  `allow_incomplete=True` reads every complete shard of a killed run; `verify="read"` checks
  each shard's SHA-256 on first read.
- Item 4: fp16 features that overflow are left out, recorded and counted with a warning; a run
  where every image fails exits non-zero; a file name that is not UTF-8 is read; temporaries of
  killed manifest and `failures.jsonl` writes are removed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_extract import checksums, cli_args, make_images, tiny_config

from vlm_encoder import FeatureStore
from vlm_encoder.cli import main as cli
from vlm_encoder.extract import ShardReadError, run_extraction, runner
from vlm_encoder.extract.model import build_encoder


# ------------------------------------------------------------------ item 2
def _table(images: Path) -> Path:
    table = images.parent / "images.csv"
    table.write_text("filepath\n" + "".join(f"images/{p.name}\n" for p in sorted(images.iterdir())))
    return table


@pytest.mark.parametrize("kind", [pytest.param("imagefolder", marks=pytest.mark.slow), "table"])
def test_datasets_source_vanishing_mid_run_stops_it_and_a_rerun_finishes(tmp_path, monkeypatch, kind):
    images = make_images(tmp_path / "images", 12)
    spec, column = (f"imagefolder:{images}", None) if kind == "imagefolder" else (str(_table(images)), "filepath")
    config = lambda **c: tiny_config(tmp_path, spec, image_column=column, **c)  # noqa: E731
    assert run_extraction(config(out="reference", batch_size=2)).complete
    moved = tmp_path / "unmounted"
    batches = []
    collate = runner.collate_rows

    def collate_then_unmount(items):
        batches.append(len(items))
        if len(batches) == 3:  # inside shard 1
            images.rename(moved)
        return collate(items)

    monkeypatch.setattr(runner, "collate_rows", collate_then_unmount)
    with pytest.raises(FileNotFoundError, match="existed when the run started and is gone now"):
        run_extraction(config(batch_size=2))
    assert not json.loads((tmp_path / "out" / "manifest.json").read_text())["complete"]
    monkeypatch.setattr(runner, "collate_rows", collate)
    moved.rename(images)
    summary = run_extraction(config(batch_size=4))
    assert summary.complete and summary.rows_failed == 0 and summary.shards_kept >= 1
    assert checksums(tmp_path / "out") == checksums(tmp_path / "reference")


def test_a_rerun_retries_a_missing_file_and_keeps_a_non_image(tmp_path):
    images = make_images(tmp_path / "images", 5)
    (images / "page.jpg").write_bytes(b"<!DOCTYPE html><html>not found</html>")
    table = tmp_path / "images.csv"
    table.write_text("filepath\nimages/img_000.jpg\nimages/later.jpg\nimages/page.jpg\nimages/img_001.jpg\n")
    config = tiny_config(tmp_path, table, image_column="filepath")
    first = run_extraction(config)
    assert first.complete and first.rows_failed == 2 and first.rows_retryable == 1
    assert run_extraction(config).shards_this_run == 0  # still missing: nothing to retry
    shutil.copy(images / "img_002.jpg", images / "later.jpg")  # the download finished
    second = run_extraction(config)
    assert second.shards_this_run == 1 and second.rows_written == 3 and second.rows_failed == 1
    (failure,) = FeatureStore(tmp_path / "out").failures
    assert failure["row"] == 2 and failure["reason"].startswith("not an image")
    assert run_extraction(config).shards_this_run == 0  # a non-image stays failed, and is not redone


# ------------------------------------------------------------------ item 3
@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("store")
    images = make_images(tmp / "images", 10)  # shards of 4, 4, 2
    assert run_extraction(tiny_config(tmp, images)).complete
    return tmp / "out"


def test_boolean_masks_select_the_true_rows(store_dir):
    column = FeatureStore(store_dir)[-1, "cls"]
    everything = column[:]
    mask = np.zeros(10, dtype=bool)
    mask[[1, 4, 9]] = True
    for index in (mask, torch.from_numpy(mask), mask.tolist()):
        assert torch.equal(column[index], everything[[1, 4, 9]])
    assert torch.equal(column[torch.tensor([9, 0])], everything[[9, 0]])
    assert column[np.zeros(10, dtype=bool)].shape == (0, *everything.shape[1:])
    with pytest.raises(IndexError, match="boolean mask of length 3 for a column of 10 rows"):
        column[[True, False, True]]
    with pytest.raises(TypeError, match="integers or a boolean mask"):
        column[np.array([0.0, 1.0])]


def _copy(store_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "store"
    shutil.copytree(store_dir, out)
    return out


def test_a_truncated_or_missing_shard_names_its_file(store_dir, tmp_path):
    out = _copy(store_dir, tmp_path)
    shard = out / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ShardReadError, match="shard-00001.safetensors: 100 bytes, the manifest says"):
        FeatureStore(out)[-1, "cls"][:]
    assert FeatureStore(out).verify() == ["shard-00001.safetensors"]
    shard.unlink()
    assert FeatureStore(out).verify() == ["shard-00001.safetensors"]  # listed, not raised
    with pytest.raises(ShardReadError, match="shard-00001.safetensors"):
        FeatureStore(out)[-1, "cls"][5]


def test_verify_read_checks_each_shard_on_first_read(store_dir, tmp_path):
    out = _copy(store_dir, tmp_path)
    shard = out / "shard-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    shard.write_bytes(bytes(data))
    FeatureStore(out)[-1, "cls"][:]  # by default only sizes are checked
    store = FeatureStore(out, verify="read")
    assert store[-1, "cls"][:4].shape[0] == 4  # shard 0 is intact
    with pytest.raises(ShardReadError, match="shard-00002.safetensors: SHA-256 does not match"):
        store[-1, "cls"][9]
    with pytest.raises(ValueError, match="verify='all' is not allowed"):
        FeatureStore(out, verify="all")


def test_allow_incomplete_reads_every_complete_shard_of_a_killed_run(store_dir, tmp_path):
    out = _copy(store_dir, tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    # What a run killed before its end leaves: the manifest as created, shard 1 never written.
    killed = {k: v for k, v in manifest.items() if k not in ("rows_written", "rows_failed", "rows_nonfinite",
                                                             "rows_retryable")}
    (out / "manifest.json").write_text(json.dumps(dict(killed, shards=[], complete=False)))
    (out / "shard-00001.json").unlink()
    (out / "shard-00001.safetensors").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        FeatureStore(out)
    store = FeatureStore(out, allow_incomplete=True)
    reference = FeatureStore(store_dir)
    assert store.row_ids.tolist() == [0, 1, 2, 3, 8, 9]
    assert torch.equal(store[-1, "patch"][:], reference[-1, "patch"][[0, 1, 2, 3, 8, 9]])
    assert store.verify() == []


# ------------------------------------------------------------------ item 4
@pytest.mark.slow
def test_fp16_overflow_is_left_out_recorded_and_warned(tmp_path, capsys):
    encoder = build_encoder(tiny_config(tmp_path, tmp_path))
    with torch.no_grad():
        encoder.patch_embed.proj.weight.fill_(1000.0)  # a white patch overflows fp16, a mean-grey one does not
    encoder.save_pretrained(tmp_path / "model")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        Image.new("RGB", (32, 32), (255, 255, 255) if i % 3 == 0 else (123, 117, 104)).save(images / f"{i}.png")
    argv = ["extract", "--model", str(tmp_path / "model"), "--dataset", str(images), "--out", str(tmp_path / "out"),
            "--layers", "-2", "-1", "--select", "cls,patch,pooled,embeds", "--shard-size", "4", "--dtype", "fp16",
            "--num-workers", "0", "--no-progress"]
    assert cli(argv) == 0
    err = capsys.readouterr().err
    assert "warning: 2 rows gave non-finite features (inf/NaN) in fp16" in err
    store = FeatureStore(tmp_path / "out")
    assert store.row_ids.tolist() == [1, 2, 4, 5]
    assert all(store[key][:].isfinite().all() for key in store.keys)
    assert [(f["row"], f["reason"].split(";")[0]) for f in store.failures] == [
        (0, "non-finite features (inf/NaN) from the encoder in fp16"), (3, "non-finite features (inf/NaN) from the "
                                                                            "encoder in fp16")]
    assert store.manifest["rows_nonfinite"] == 2


def test_every_image_failing_exits_non_zero_with_the_reason(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (images / name).write_bytes(b"<html>not found</html>")
    assert cli(cli_args(images, tmp_path / "out", "--num-workers", "0")) == 1
    err = capsys.readouterr().err
    assert "error: every one of the 3 images failed, none has features; e.g. row 0 (a.jpg): not an image" in err


def test_a_file_name_that_is_not_utf8_is_read(tmp_path):
    images = make_images(tmp_path / "images", 3)
    os.rename(images / "img_001.jpg", os.path.join(os.fsencode(images), b"img_001\xff.jpg"))
    (Path(os.fsdecode(os.path.join(os.fsencode(images), b"z_\xfe.jpg")))).write_bytes(b"")
    summary = run_extraction(tiny_config(tmp_path, images))
    assert summary.complete and summary.rows_written == 3 and summary.rows_failed == 1
    (failure,) = FeatureStore(tmp_path / "out").failures
    assert os.fsencode(failure["name"]) == b"z_\xfe.jpg" and failure["reason"] == "empty file (0 bytes)"


def test_temporaries_of_killed_manifest_and_failures_writes_are_removed(tmp_path):
    images = make_images(tmp_path / "images", 5)
    config = tiny_config(tmp_path, images)
    assert run_extraction(config).complete
    out = tmp_path / "out"
    left = [out / ".manifest.json.k1ll3d.tmp", out / ".failures.jsonl.k1ll3d.tmp", out / ".shard-00001.json.x.tmp"]
    for path in left:
        path.write_bytes(b"half")
    assert run_extraction(config).complete
    assert not [p for p in left if p.exists()]
