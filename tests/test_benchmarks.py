"""`benchmarks/encoder_throughput.py` runs end to end in its tiny mode (a smoke test, no timing claims)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "encoder_throughput.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("encoder_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _run(bench, tmp_path, contenders):
    threads = torch.get_num_threads()
    try:
        code = bench.main(["--tiny", "--workload", "cpu", "--contenders", contenders, "--results-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    report = json.loads((tmp_path / "encoder_throughput_cpu_tiny.json").read_text())
    markdown = (tmp_path / "encoder_throughput_cpu_tiny.md").read_text()
    return report, markdown


def test_tiny_run_writes_json_and_markdown(bench, tmp_path):
    report, markdown = _run(bench, tmp_path, "ours,timm")
    assert report["mode"] == "tiny"
    # On the CPU ours is also timed with batch invariance off (one batched kernel call).
    assert {row["name"] for row in report["results"]} == {"ours", "ours_batched", "timm"}
    assert all(row["images_per_s"] > 0 and len(row["times_s"]) == 3 for row in report["results"])
    assert report["parity"]["ours"] <= bench.PARITY_TOLERANCE
    assert report["parity"]["ours_batched"] <= bench.PARITY_TOLERANCE
    for key in ("date", "torch", "cpu_model", "threads"):
        assert report["machine"][key]
    assert "| ours |" in markdown and "| timm |" in markdown
    assert not (tmp_path / "encoder_throughput_gpu.json").exists()  # tiny runs leave the GPU file alone


def test_parity_check_refuses_different_computations(bench):
    fns = {"timm": lambda px: px.flatten(1), "ours": lambda px: px.flatten(1) * (1 + 1e-3)}
    with pytest.raises(RuntimeError, match="disagree with timm"):
        bench.check_parity(fns, image_size=8, device=torch.device("cpu"))


def test_tiny_run_with_every_peer(bench, tmp_path):
    report, _ = _run(bench, tmp_path, "ours,timm,open_clip,hf")
    assert set(report["parity"]) == {"ours", "ours_batched", "timm", "open_clip", "hf"}
    assert max(report["parity"].values()) <= bench.PARITY_TOLERANCE
