"""Two processes (`torchrun`, the launcher `accelerate launch` uses for several GPUs; gloo on the
CPU) write one store, without a merge step, equal to a single process's."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from test_extract import checksums, cli_args, make_images, tiny_config

from vlm_encoder.extract import run_extraction

PYTHON = sys.executable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_through_accelerate_equal_one(tmp_path):
    images = make_images(tmp_path / "images", 18, bad=True)
    assert run_extraction(tiny_config(tmp_path, images, out="single")).complete
    reference = tmp_path / "single"
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "-m", "vlm_encoder.cli", *cli_args(images, out, "--batch-size", "2", "--num-workers", "0", "--device", "cpu")],
        env=env, capture_output=True, text=True, timeout=180, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["rows_written"] + manifest["rows_failed"] == 22
    assert checksums(out) == checksums(reference)
    writers = [json.loads(p.read_text())["writer"] for p in sorted(out.glob("shard-*.json"))]
    assert [w["rank"] for w in writers] == [0, 1, 0, 1, 0, 1] and {w["world_size"] for w in writers} == {2}
    # Only the main process reports, and for the whole launch: all 22 rows in all 6 shards.
    summaries = [line for line in result.stdout.splitlines() if "rows written" in line]
    assert len(summaries) == 1, result.stdout
    assert "this run: 22 rows in 6 shards, 0 shards kept" in summaries[0], summaries[0]
