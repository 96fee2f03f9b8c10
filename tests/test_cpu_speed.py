"""The fast CPU path (`vlm_encoder.cpu_speed.fast_cpu`) and the encoder's pixel-dtype cast."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlm_encoder import VisionConfig, VisionEncoder, batch_invariance
from vlm_encoder.cpu_speed import OneDNNLinear, PackedLinear, fast_cpu, fast_cpu_available

pytestmark = pytest.mark.skipif(not fast_cpu_available(), reason="torch built without oneDNN")

TINY = dict(image_size=32, patch_size=8, width=32, depth=2, num_heads=4)
VARIANTS = {
    "cls": {},
    "map": dict(pool="map"),
    "swiglu": dict(mlp_type="swiglu", mlp_dim=40),
    "pooler": dict(embed_dim=32, proj_bias=True, proj_act="tanh"),
    "no_bias": dict(qkv_bias=False),
}


def tiny(**overrides) -> VisionEncoder:
    torch.manual_seed(0)
    return VisionEncoder(VisionConfig(**{**TINY, **overrides})).eval()


def global_state() -> dict:
    mkldnn = torch.backends.mkldnn
    return dict(
        enabled=mkldnn.enabled,
        deterministic=mkldnn.deterministic,
        threads=torch.get_num_threads(),
        matmul=getattr(getattr(mkldnn, "matmul", None), "fp32_precision", None),
        float32_matmul=torch.get_float32_matmul_precision(),
        deterministic_algorithms=torch.are_deterministic_algorithms_enabled(),
        grad=torch.is_grad_enabled(),
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_fast_path_equals_the_plain_path(variant):
    encoder = tiny(**VARIANTS[variant])
    fast = fast_cpu(encoder)
    px = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        plain, ours = encoder(px, layers="all"), fast(px, layers="all")
    for i in range(encoder.num_blocks):
        assert (plain.patches(i) - ours.patches(i)).abs().max() <= 1e-5
    if plain.pooled is not None:
        assert (plain.pooled - ours.pooled).abs().max() <= 1e-5
    assert any(isinstance(m, PackedLinear) for m in fast.modules())


def test_fast_path_is_batch_invariant_without_per_image_fallback():
    # ViT-ish shape (50 tokens, width 96): the batched call itself gives each image its bits alone.
    encoder = tiny(image_size=56, patch_size=8, width=96, num_heads=4, embed_dim=32)
    fast = fast_cpu(encoder)
    px = torch.randn(5, 3, 56, 56)
    with torch.inference_mode(), batch_invariance("off"):
        batch = fast(px, layers=(0, -1))
        for i in range(5):
            alone = fast(px[i : i + 1], layers=(0, -1))
            assert torch.equal(batch.patches(-1)[i], alone.patches(-1)[0])
            assert torch.equal(batch.pooled[i], alone.pooled[0])
    with torch.inference_mode():  # and with the default probe-and-fallback switch
        batch = fast(px)
        assert all(torch.equal(batch.pooled[i], fast(px[i : i + 1]).pooled[0]) for i in range(5))


def test_torch_global_state_and_the_original_module_are_left_alone():
    encoder = tiny()
    before = global_state()
    fast = fast_cpu(encoder)
    with torch.inference_mode():
        fast(torch.randn(2, 3, 32, 32))
    assert global_state() == before
    assert not any(isinstance(m, PackedLinear) for m in encoder.modules())
    theirs, ours = encoder.state_dict(), fast.state_dict()
    assert list(theirs) == list(ours)
    assert all(theirs[k].data_ptr() == ours[k].data_ptr() for k in theirs)  # shared, not copied


def test_changed_weights_are_repacked():
    encoder = tiny()
    fast = fast_cpu(encoder)
    px = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        fast(px)
    with torch.no_grad():
        for p in encoder.parameters():
            p.mul_(0.5)
    with torch.inference_mode():
        assert (fast(px).patches(-1) - encoder(px).patches(-1)).abs().max() <= 1e-5


def test_gradients_take_the_onednn_route_and_match_the_plain_path():
    encoder = tiny().train()
    fast = fast_cpu(encoder)
    px = torch.randn(2, 3, 32, 32)
    out = fast(px).patches(-1)
    assert "OneDNNLinear" in type(fast.blocks[0].attn.qkv(torch.randn(2, 4, 32, requires_grad=True)).grad_fn).__name__
    out.square().sum().backward()
    fast_grads = [None if p.grad is None else p.grad.clone() for p in encoder.parameters()]
    encoder.zero_grad(set_to_none=True)
    encoder(px).patches(-1).square().sum().backward()
    for a, p in zip(fast_grads, encoder.parameters()):
        assert (a is None) == (p.grad is None) and (a is None or torch.allclose(a, p.grad, rtol=1e-5, atol=1e-5))


@pytest.mark.parametrize("case", ["3d", "transposed", "no_bias", "frozen_weight", "bias_only"])
def test_onednn_linear_gradients_equal_f_linear(case):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 24) if case != "transposed" else torch.randn(24, 15).t()
    w, b = torch.randn(16, 24), None if case == "no_bias" else torch.randn(16)
    x.requires_grad_(case != "bias_only")
    w.requires_grad_(case not in ("frozen_weight", "bias_only"))
    if b is not None:
        b.requires_grad_(True)
    inputs = [t for t in (x, w, b) if t is not None and t.requires_grad]
    g = torch.randn(*x.shape[:-1], 16)
    y_ref = torch.nn.functional.linear(x, w, b)
    y = OneDNNLinear.apply(x, w, b)
    assert (y - y_ref).abs().max() <= 1e-5
    for a, r in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(y_ref, inputs, g)):
        assert a.shape == r.shape and (a - r).abs().max() <= 1e-4 * r.abs().max()


def test_autocast_keeps_autocasts_own_gemms():
    encoder = tiny()
    fast = fast_cpu(encoder)
    linear = fast.blocks[0].mlp.fc2
    x = torch.randn(2, 4, linear.in_features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(x).dtype == torch.bfloat16
        assert linear(x.requires_grad_(True)).dtype == torch.bfloat16


def test_bf16_weights_take_onednn_bf16_and_stay_close():
    encoder = tiny().to(torch.bfloat16)
    fast = fast_cpu(encoder)
    px = torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)
    with torch.inference_mode():
        plain, ours = encoder(px).patches(-1).float(), fast(px).patches(-1).float()
    assert ours.dtype == torch.float32 and (plain - ours).abs().max() <= 0.05 * plain.abs().max()


def test_disabled_returns_the_module_and_tied_modules_stay_tied():
    encoder = tiny()
    assert fast_cpu(encoder, enabled=False) is encoder
    shared = nn.Linear(4, 4)
    fast = fast_cpu(nn.Sequential(shared, shared))
    assert fast[0] is fast[1] and isinstance(fast[0], PackedLinear)


@pytest.mark.parametrize("model_dtype,pixel_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_pixels_are_cast_to_the_encoders_dtype(model_dtype, pixel_dtype):
    encoder = tiny().to(model_dtype)
    px = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        out = encoder(px.to(pixel_dtype), layers=(-1,))
        same = encoder(px.to(pixel_dtype).to(model_dtype), layers=(-1,))
    assert out.patches(-1).dtype == model_dtype
    assert torch.equal(out.patches(-1), same.patches(-1))


@pytest.mark.parametrize("act,fused", [("gelu", "none"), ("gelu_tanh", "tanh"), ("quick_gelu", None)])
def test_gelu_is_fused_into_fc1_and_exact(act, fused):
    encoder = tiny(act=act)
    fast = fast_cpu(encoder)
    fc1 = fast.blocks[0].mlp.fc1
    assert isinstance(fc1, PackedLinear) and fc1.gelu == fused
    assert isinstance(fast.blocks[0].mlp.act, nn.Identity) == (fused is not None)
    assert list(fast.state_dict()) == list(encoder.state_dict())
    px = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        plain, ours = encoder(px, layers="all"), fast(px, layers="all")
    assert all((plain.patches(i) - ours.patches(i)).abs().max() <= 1e-5 for i in range(encoder.num_blocks))
    fast(px).patches(-1).sum().backward()  # the training path applies the GELU too
    assert encoder.blocks[0].mlp.fc1.weight.grad is not None


def test_bf16_matmuls_keep_the_residual_stream_in_fp32():
    # matmul_dtype=bf16: GEMMs in bf16, residual / norms in fp32 (autocast's rule): closer to fp32
    # than a bf16 model, fp32 block outputs, fp32 weights untouched, batch-invariant.
    encoder = tiny(image_size=56, width=96, num_heads=4, depth=4)
    mixed = fast_cpu(encoder, matmul_dtype=torch.bfloat16)
    bf16_model = fast_cpu(tiny(image_size=56, width=96, num_heads=4, depth=4).to(torch.bfloat16))
    assert all(p.dtype == torch.float32 for p in encoder.parameters())
    px = torch.randn(4, 3, 56, 56)
    with torch.inference_mode(), batch_invariance("off"):
        ref, ours, low = encoder(px).patches(-1), mixed(px).patches(-1), bf16_model(px).patches(-1).float()
        assert ours.dtype == torch.float32
        err, low_err = (ours - ref).abs().max(), (low - ref).abs().max()
        assert err <= 0.02 * ref.abs().max() and err < 0.25 * low_err
        assert all(torch.equal(ours[i], mixed(px[i : i + 1]).patches(-1)[0]) for i in range(4))
    assert mixed.blocks[0].attn.qkv.matmul_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="matmul_dtype"):
        fast_cpu(encoder, matmul_dtype=torch.float16)
    grads = mixed(px[:1]).patches(-1)  # with gradients: the plain float32 path, equal to the encoder
    assert (grads - encoder(px[:1]).patches(-1)).abs().max() <= 1e-5


def test_hooks_on_the_original_modules_run_in_the_fast_copy():
    encoder = tiny()
    fast = fast_cpu(encoder)
    seen = []
    encoder.blocks[0].mlp.fc2.register_forward_hook(lambda m, a, out: seen.append(("fc2", out.shape)))
    encoder.blocks[1].register_forward_pre_hook(lambda m, a: seen.append(("block", a[0].shape)))
    with torch.inference_mode():
        fast(torch.randn(2, 3, 32, 32))
    assert seen == [("fc2", (2, 17, 32)), ("block", (2, 17, 32))]
