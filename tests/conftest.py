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


def pytest_terminal_summary(terminalreporter, config):
    """With `-v`: the largest differences the parity tests measured (tests/parity_helpers.py)."""
    from parity_helpers import MEASURED

    if MEASURED and config.option.verbose > 0:
        terminalreporter.section("largest parity differences measured")
        for case, diff in sorted(MEASURED.items()):
            terminalreporter.write_line(f"  {case}: {diff:.2e}")
