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


@pytest.mark.slow  # ~10-30 s on 2 shared cores (timm import, 6 contenders)
def test_cpu_fast_path_smoke_writes_every_contender(tmp_path):
    """`benchmarks/cpu_fast_path.py --smoke`: every route runs on a tiny tower, fp32 routes equal timm."""
    spec = importlib.util.spec_from_file_location("cpu_fast_path", SCRIPT.with_name("cpu_fast_path.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--smoke", "--batch", "2", "--repeats", "1", "--warmup", "0", "--results-dir", str(tmp_path)]) == 0
    text = (tmp_path / "cpu_fast_path_smoke.md").read_text()
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in text.splitlines() if line.startswith("| ")}
    for name in ("timm fp32", "ours fp32", "ours fast_cpu fp32", "timm bf16 autocast", "ours bf16", "ours bf16 fast_cpu"):
        assert float(rows[name][0]) > 0, name  # img/s
    for name in ("ours fp32", "ours fast_cpu fp32"):
        assert float(rows[name][3]) <= 1e-5, name  # max abs diff to timm fp32
    assert float(rows["ours bf16"][5]) > 0.99  # mean cosine to fp32
    assert "torch" in text and "load average" in text


@pytest.mark.slow  # ~40 s on 2 shared cores: a local Ray instance, 2 actors
def test_extract_engines_smoke_runs_every_contender(tmp_path):
    """`benchmarks/extract_engines.py --smoke` (in its own process: it starts Ray): each engine's
    run completes on the tiny workload and the report names the ratio and the per-task overhead."""
    import subprocess

    script = SCRIPT.with_name("extract_engines.py")
    run = subprocess.run([sys.executable, str(script), "--smoke", "--results-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "extract_engines_smoke.json").read_text())
    assert result["images_per_s"]["local"] > 0 and set(result["ratio_to_local"]) >= {"ray"}
    assert "ray_overhead_per_task_s" in result
    assert "of the local runner's images/s" in (tmp_path / "extract_engines_smoke.md").read_text()
