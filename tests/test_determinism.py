"""The batch-invariance switch (`vlm_encoder.determinism`): modes, the probe, the fallback.

Ops here are stand-ins whose batch dependence is known: `depends_on_batch_size` adds the
batch size (the worst kernel), `row_sum` is invariant. The encoder-level property lives in
`tests/adversarial/test_batch_invariance.py`.
"""

from __future__ import annotations

import pytest
import torch

from vlm_encoder import batch_invariance
from vlm_encoder.determinism import PROBE_OUTPUTS, batch_invariance_mode, batch_invariant_call, is_batch_invariant

calls: list[int] = []


def depends_on_batch_size(x: torch.Tensor) -> torch.Tensor:
    return x * x.shape[0]


def row_sum(x: torch.Tensor, mask: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    calls.append(x.shape[0])
    out = x.sum(dim=-1) * scale
    return out if mask is None else out.masked_fill(~mask, 0.0)


def test_modes():
    x = torch.ones(4, 3)
    assert batch_invariance_mode() == "auto"
    assert torch.equal(batch_invariant_call(depends_on_batch_size, x), x)  # found variant: per image
    with batch_invariance("off"):
        assert batch_invariance_mode() == "off"
        assert torch.equal(batch_invariant_call(depends_on_batch_size, x), 4 * x)
        with batch_invariance("always"):
            assert torch.equal(batch_invariant_call(depends_on_batch_size, x), x)
        assert batch_invariance_mode() == "off"
    assert batch_invariance_mode() == "auto"


def test_a_decorator_too():
    @batch_invariance("off")
    def inside() -> str:
        return batch_invariance_mode()

    assert inside() == "off" and inside() == "off"
    assert batch_invariance_mode() == "auto"


def test_an_unknown_mode_says_what_is_allowed():
    with pytest.raises(ValueError, match="auto, always, off.*'on'"):
        with batch_invariance("on"):
            pass


def test_an_invariant_op_is_probed_once_then_called_batched():
    x = torch.randn(5, 11)
    calls.clear()
    first = batch_invariant_call(row_sum, x, scale=2.0)
    draws = -(-PROBE_OUTPUTS // 5)  # 5 outputs a draw
    assert calls == ([5] + [1] * 5) * draws + [5]  # the probe (batch, then each image), then the call
    calls.clear()
    again = batch_invariant_call(row_sum, torch.randn(5, 11), scale=2.0)
    assert calls == [5]
    assert torch.equal(first, 2 * x.sum(dim=-1))
    assert again.shape == (5,)


def test_single_images_are_never_probed():
    calls.clear()
    batch_invariant_call(row_sum, torch.randn(1, 13))
    assert calls == [1]


def test_none_and_masks_pass_through_and_split_per_image():
    x, mask = torch.randn(3, 7), torch.tensor([True, False, True])
    with batch_invariance("always"):
        out = batch_invariant_call(row_sum, x, mask)
    assert torch.equal(out, torch.where(mask, x.sum(dim=-1), 0.0))
    assert torch.equal(batch_invariant_call(row_sum, x, None), x.sum(dim=-1))


def test_the_probe_uses_random_inputs_not_a_degenerate_batch():
    """All-zero images pass any kernel; the answer must hold for the next, real batch."""
    assert torch.equal(batch_invariant_call(depends_on_batch_size, torch.zeros(6, 2)), torch.zeros(6, 2))
    ones = torch.ones(6, 2)
    assert torch.equal(batch_invariant_call(depends_on_batch_size, ones), ones)


def test_the_probe_leaves_the_global_random_state_alone():
    x = torch.randn(9, 4)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    assert not is_batch_invariant(depends_on_batch_size, x)  # a new key: probes
    assert torch.equal(torch.rand(3), expected)


def test_a_module_is_keyed_by_its_kind_and_weight_shapes():
    wide, narrow = torch.nn.Linear(8, 6), torch.nn.Linear(8, 2)
    x = torch.randn(4, 8)
    with batch_invariance("always"):
        reference = [torch.cat([m(x[i : i + 1]) for i in range(4)]) for m in (wide, narrow)]
    assert torch.equal(batch_invariant_call(wide, x), reference[0])
    assert torch.equal(batch_invariant_call(narrow, x), reference[1])


def test_gradients_flow_through_both_paths():
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    for mode in ("auto", "always", "off"):
        with batch_invariance(mode):
            batch_invariant_call(lin, x).sum().backward()
    torch.testing.assert_close(x.grad, 3 * lin.weight.sum(dim=0).expand(3, 8))
