"""Test set-up: never touch the network; deterministic, small threads."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def empty_cache(monkeypatch, tmp_path):
    """Offline, with empty Hugging Face and torch hub caches (timm reads weights through both):
    what a real hub id or `timm:` name meets on a machine that never downloaded it."""
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE  # set above, before any import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch" / "hub"))
    return tmp_path


def pytest_terminal_summary(terminalreporter, config):
    """With `-v`: the largest differences the parity tests measured (tests/parity_helpers.py)."""
    from parity_helpers import MEASURED

    if MEASURED and config.option.verbose > 0:
        terminalreporter.section("largest parity differences measured")
        for case, diff in sorted(MEASURED.items()):
            terminalreporter.write_line(f"  {case}: {diff:.2e}")
