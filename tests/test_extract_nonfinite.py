"""`_drop_nonfinite`: rows whose features hold inf / NaN become failures; its whole-tensor fast check."""

from __future__ import annotations

import pytest
import torch

from vlm_encoder.extract.runner import _all_finite, _drop_nonfinite


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_sees_every_nonfinite_value(dtype: torch.dtype, bad: float) -> None:
    value = torch.randn(3, 5, 4).to(dtype)
    assert _all_finite(value)
    value[1, 2, 3] = bad
    assert not _all_finite(value)
    assert _all_finite(torch.empty(0, 5, 4, dtype=dtype))


def test_drop_nonfinite_drops_the_bad_rows_only() -> None:
    features = {"layer1.patch": torch.randn(4, 3, 2).bfloat16(), "layer1.cls": torch.randn(4, 2).bfloat16()}
    batch = {"ok_rows": [10, 11, 12, 13], "failures": []}
    assert _drop_nonfinite(dict(batch), features, "bf16") is features  # all finite: untouched
    features["layer1.patch"][1, 2, 0] = float("nan")
    features["layer1.cls"][3, 1] = float("-inf")
    kept = _drop_nonfinite(batch, features, "bf16")
    assert batch["ok_rows"] == [10, 12]
    assert [row for row, _ in batch["failures"]] == [11, 13]
    assert torch.equal(kept["layer1.cls"], features["layer1.cls"][[0, 2]])
    assert torch.equal(kept["layer1.patch"], features["layer1.patch"][[0, 2]])
