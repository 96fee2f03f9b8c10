"""`examples/demo.py` (what `make demo` runs) runs and writes its picture."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "demo.py"


def _load_demo():
    spec = importlib.util.spec_from_file_location("vlm_encoder_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_runs_on_a_small_preset(tmp_path, capsys):
    demo = _load_demo()
    assert demo.main(["--out", str(tmp_path), "--model", "vit_tiny_patch16_224", "--layer", "-2", "--sections", "encoder"]) == 0
    printed = capsys.readouterr().out
    for expected in ("== Features of every layer", "patch grid 14x14", "cls(l)      (3, 192)",
                     "patches(l)  (3, 196, 192)", "pooled      (3, 192)", "== Per-layer statistics", "wrote"):
        assert expected in printed, expected
    assert printed.count("\n   11  ") == 1  # one statistics row per layer, up to the last
    with Image.open(tmp_path / "pca_layer10.png") as image:
        assert image.size == (2 * 320, 3 * (320 + 24))  # three photos, each beside its PCA map


@pytest.mark.slow
def test_make_demo_command(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, str(DEMO), "--out", str(tmp_path)], capture_output=True, text=True,
                            env=env, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert list(tmp_path.glob("pca_layer*.png"))
    results = (tmp_path / "results.md").read_text()
    assert "zero-shot top-1 on the 360 held-out digits" in results and "exact captions" in results


def test_results_file_names_the_numbers_date_and_machine(tmp_path):
    demo = _load_demo()
    rows = [{"section": "digits", "summary": "97.5% zero-shot top-1", "steps": 660, "seconds": 84.4}]
    text = demo.write_results(tmp_path / "results.md", rows, 151.0, train_threads=1, load=3.2).read_text()
    assert "| digits | 97.5% zero-shot top-1 | 660 | 84 |" in text
    assert "load average 3.2 at the start" in text and "1 thread(s) for the trainings" in text
    assert "cores" in text and "took 151 s" in text and " UTC" in text
