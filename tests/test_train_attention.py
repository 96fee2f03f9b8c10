"""The explicit attention route for CPU bf16 training (`layers.train_attention`): same values and
gradients as the fused kernel within bf16 rounding, and taken only where it is faster."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlm_encoder.layers import Attention
from vlm_encoder.layers import train_attention
from vlm_encoder.layers.train_attention import explicit_attention, self_attention, uses_explicit_route


def _qkv(dtype: torch.dtype, T: int = 9, grad: bool = True) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, 2, T, 16, generator=g).to(dtype).requires_grad_(grad) for _ in range(3)]


@pytest.mark.parametrize("causal", [False, True])
def test_explicit_route_matches_the_fused_kernel_with_gradients(causal: bool) -> None:
    q, k, v = _qkv(torch.float32)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    want_grads = torch.autograd.grad(want.square().sum(), (q, k, v))
    got = explicit_attention(q, k, v, causal)
    got_grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    qb, kb, vb = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))  # bf16: within its rounding
    got = self_attention(qb, kb, vb, is_causal=causal)
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)
    got.float().square().sum().backward()
    torch.testing.assert_close(qb.grad.float(), want_grads[0], atol=6e-2, rtol=6e-2)


def test_route_only_for_cpu_low_precision_training_without_mask() -> None:
    q, k, v = _qkv(torch.bfloat16)
    assert uses_explicit_route(q, k, v, None)
    assert not uses_explicit_route(*_qkv(torch.float32), None)  # fp32: the fused kernel
    assert not uses_explicit_route(*_qkv(torch.bfloat16, grad=False), None)  # no gradients: inference
    with torch.no_grad():
        assert not uses_explicit_route(q, k, v, None)
    assert not uses_explicit_route(q, k, v, torch.ones(9, 9, dtype=torch.bool))  # a mask: the fused kernel
    long = _qkv(torch.bfloat16, T=train_attention.EXPLICIT_MAX_TOKENS + 1)
    assert not uses_explicit_route(*long, None)


def test_inference_output_is_the_fused_kernels_bitwise() -> None:
    q, k, v = _qkv(torch.bfloat16, grad=False)
    assert torch.equal(self_attention(q, k, v, is_causal=True), F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_attention_layer_trains_through_the_explicit_route(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(train_attention, "explicit_attention",
                        lambda *a: calls.append(1) or explicit_attention(*a))
    layer = Attention(32, 2)
    x = torch.randn(2, 5, 32)
    with torch.autocast("cpu", torch.bfloat16):
        out, _ = layer(x, causal=True)
    out.float().sum().backward()
    assert calls == [1] and layer.qkv.weight.grad is not None
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        layer(x)
    assert calls == [1]  # inference: the fused kernel
