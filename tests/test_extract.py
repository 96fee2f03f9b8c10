"""`vlm-encoder extract`: output equal to the encoder's, invariance to batch size and workers,
resume after SIGKILL, corrupt shards redone, mismatched arguments refused, bad images counted.
(Two processes: test_extract_distributed.py.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_encoder import FeatureStore
from vlm_encoder.extract import ExtractConfig, run_extraction
from vlm_encoder.extract.model import build_encoder, build_processor
from vlm_encoder.processing import load_image

PYTHON = sys.executable
SLOW_CLI = Path(__file__).resolve().parent / "adversarial" / "extract_with_faults.py"
TINY = {"depth": 3, "width": 32, "num_heads": 2, "image_size": 32, "patch_size": 8}
TINY_ARGS = [a for k, v in TINY.items() for a in ("--override", f"{k}={v}")]


def make_images(folder: Path, n: int, bad: bool = False) -> Path:
    """`n` small JPEGs of varied sizes (and, with `bad`, four broken files at the end of the order)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        array = rng.integers(0, 256, (24 + i % 7 * 5, 30 + i % 5 * 4, 3), dtype=np.uint8)
        Image.fromarray(array).save(folder / f"img_{i:03d}.jpg", quality=90)
    if bad:
        (folder / "z_empty.jpg").write_bytes(b"")
        (folder / "z_html.jpg").write_bytes(b"<!DOCTYPE html><html>not found</html>")
        data = (folder / "img_000.jpg").read_bytes()
        (folder / "z_truncated.jpg").write_bytes(data[: len(data) // 2])
        Image.new("L", (300, 300)).save(folder / "z_bomb.png")  # over max_pixels below
    return folder


def tiny_config(tmp_path: Path, images: Path, out: str = "out", **changes) -> ExtractConfig:
    base = {
        "model": "preset:vit_tiny_patch16_224", "overrides": TINY, "dataset": str(images), "out": tmp_path / out,
        "layers": (-2, -1), "select": ("cls", "patch", "pooled", "embeds"), "shard_size": 4, "batch_size": 3,
        "num_workers": 0, "progress": False, "max_pixels": 20_000,
    }
    base.update(changes)
    return ExtractConfig(**base)


def checksums(out: Path) -> dict[str, str]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {s["file"]: s["sha256"] for s in manifest["shards"]}


def cli_args(images: Path, out: Path, *extra: str) -> list[str]:
    return [
        "extract", "--model", "preset:vit_tiny_patch16_224", *TINY_ARGS, "--dataset", str(images),
        "--out", str(out), "--layers", "-2", "-1", "--select", "cls,patch,pooled,embeds",
        "--shard-size", "4", "--max-pixels", "20000", "--no-progress", *extra,
    ]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("data") / "images", 18, bad=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, images) -> Path:
    """An uninterrupted run (batch 3, no workers)."""
    tmp = tmp_path_factory.mktemp("reference")
    summary = run_extraction(tiny_config(tmp, images))
    assert summary.complete
    return tmp / "out"


def test_features_equal_the_encoder_output(reference, images):
    store = FeatureStore(reference)
    config = tiny_config(reference.parent, images)
    encoder = build_encoder(config)
    processor = build_processor(encoder, None)
    paths = sorted(p for p in images.iterdir() if not p.name.startswith("z_"))
    pixels = processor([load_image(p) for p in paths])
    with torch.inference_mode():
        out = encoder(pixels, layers=(-2, -1))
        embeds = encoder.project(out.pooled)
    assert list(store.row_ids) == list(range(len(paths)))
    torch.testing.assert_close(store[-2, "cls"][:], out.cls(-2), rtol=0, atol=0)
    torch.testing.assert_close(store[1, "patch"][:], out.patches(1), rtol=0, atol=0)
    torch.testing.assert_close(store[-1, "patch"][:], out.patches(-1), rtol=0, atol=0)
    torch.testing.assert_close(store[None, "pooled"][:], out.pooled, rtol=0, atol=0)
    torch.testing.assert_close(store[None, "embeds"][:], embeds, rtol=0, atol=0)


def test_bad_images_are_logged_and_counted(reference):
    store = FeatureStore(reference)
    manifest = store.manifest
    reasons = {f["name"]: f["reason"] for f in store.failures}
    assert set(reasons) == {"z_empty.jpg", "z_html.jpg", "z_truncated.jpg", "z_bomb.png"}
    assert "empty" in reasons["z_empty.jpg"]
    assert "not an image" in reasons["z_html.jpg"]
    assert "truncated" in reasons["z_truncated.jpg"]
    assert "decompression bomb" in reasons["z_bomb.png"]
    assert manifest["rows_written"] == len(store) == 18
    assert manifest["rows_written"] + manifest["rows_failed"] == manifest["num_rows"] == 22
    failed = {f["row"] for f in store.failures}
    assert failed.isdisjoint(store.row_ids.tolist())


def test_batch_size_and_workers_do_not_change_a_bit(tmp_path, images, reference):
    summary = run_extraction(tiny_config(tmp_path, images, batch_size=1, num_workers=2))
    assert summary.complete and summary.rows_this_run == 22
    assert checksums(tmp_path / "out") == checksums(reference)


def test_rerun_keeps_intact_shards_and_redoes_corrupt_ones(tmp_path, images, reference):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    summary = run_extraction(tiny_config(tmp_path, images, batch_size=4))
    assert summary.shards_this_run == 0 and summary.shards_kept == 6
    # A truncated file, a flipped byte, a file without sidecar, a missing file, a stale temp file.
    data = (out / "shard-00001.safetensors").read_bytes()
    (out / "shard-00001.safetensors").write_bytes(data[: len(data) // 2])
    data = bytearray((out / "shard-00002.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (out / "shard-00002.safetensors").write_bytes(bytes(data))
    (out / "shard-00003.json").unlink()
    (out / "shard-00004.safetensors").unlink()
    (out / ".shard-00005.safetensors.abc.tmp").write_bytes(b"partial")
    summary = run_extraction(tiny_config(tmp_path, images, batch_size=2))
    assert summary.shards_this_run == 4 and summary.shards_kept == 2 and summary.complete
    assert checksums(out) == checksums(reference)
    assert FeatureStore(out).verify() == []


def test_other_arguments_in_the_same_directory_are_refused(tmp_path, images, reference):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    before = checksums(out)
    with pytest.raises(ValueError, match=r"layers: \[-2, -1\] in the store, \[-1\] now"):
        run_extraction(tiny_config(tmp_path, images, layers=(-1,)))
    with pytest.raises(ValueError, match="dtype"):
        run_extraction(tiny_config(tmp_path, images, dtype="bf16"))
    with pytest.raises(ValueError, match="weights_sha256"):
        run_extraction(tiny_config(tmp_path, images, seed=1))
    with pytest.raises(ValueError, match="preprocessing.size"):
        run_extraction(tiny_config(tmp_path, images, image_size=(48, 48)))
    with pytest.raises(ValueError, match="shard_size"):
        run_extraction(tiny_config(tmp_path, images, shard_size=5))
    (images.parent / "more").mkdir(exist_ok=True)
    shutil.copy(images / "img_000.jpg", images.parent / "more" / "extra.jpg")
    with pytest.raises(ValueError, match="dataset"):
        run_extraction(tiny_config(tmp_path, images.parent / "more"))
    assert checksums(out) == before


def test_cli_resumes_after_sigkill_bitwise_equal(tmp_path, images, reference):
    out = tmp_path / "killed"
    # `vlm-encoder extract`, each batch 0.3 s slower so the kill lands mid-run.
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    command = [PYTHON, str(SLOW_CLI), *cli_args(images, out, "--batch-size", "2", "--num-workers", "1")]
    process = subprocess.Popen(command, env={**env, "SLOW_BATCH_S": "0.3"}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while len(list(out.glob("shard-*.json"))) < 2:
            assert process.poll() is None, process.stdout.read().decode()
            assert time.monotonic() < deadline, "the run wrote no shards in 60 s"
            time.sleep(0.05)
        time.sleep(0.35)  # land inside the next shard
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    done = len(list(out.glob("shard-*.json")))
    assert 2 <= done < 6, done
    with pytest.raises(ValueError, match="incomplete"):
        FeatureStore(out)
    rerun = subprocess.run(
        [PYTHON, "-m", "vlm_encoder.cli", *cli_args(images, out, "--batch-size", "4", "--num-workers", "0")],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert "18 rows written, 4 failed, of 22 (complete)" in rerun.stdout
    assert checksums(out) == checksums(reference)
    store = FeatureStore(out)
    assert sorted(store.row_ids.tolist() + [f["row"] for f in store.failures]) == list(range(22))
