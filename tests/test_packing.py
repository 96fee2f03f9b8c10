"""Native-resolution packing: each image's features from a pack equal the same image
encoded alone; sizing policies; the pack layout; errors at the boundary."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm_encoder import VisionConfig, VisionEncoder
from vlm_encoder.packing import (
    block_diagonal_mask,
    cu_seqlens,
    embed_images,
    encode_packed,
    naflex_size,
    navit_size,
    plan_packs,
    resize_to_budget,
    segment_ids,
    target_size,
)

TOL = 1e-5
SIZES = [(32, 32), (16, 48), (40, 24), (8, 8), (24, 56)]  # patch 8: grids 4x4, 2x6, 5x3, 1x1, 3x7
VARIANTS = {
    "cls": dict(),
    "cls_registers": dict(num_register_tokens=3),
    "registers_no_cls_gap": dict(class_token=False, num_register_tokens=2, pool="gap"),
    "no_cls_gap_pooled_norm": dict(class_token=False, pool="gap", pooled_norm=True),
    "map": dict(class_token=False, pool="map"),
    "cls_layerscale_normpre_proj": dict(layer_scale_init=0.1, norm_pre=True, embed_dim=16),
    "sincos": dict(pos_embed="sincos", pool="gap"),
}


def tiny_encoder(**overrides) -> VisionEncoder:
    config = VisionConfig(image_size=32, patch_size=8, width=32, depth=3, num_heads=2, **overrides)
    encoder = VisionEncoder(config).eval()
    with torch.no_grad():  # non-trivial prefix tokens, so a misplaced prefix would show
        for name in ("cls_token", "register_tokens"):
            param = getattr(encoder, name)
            if param is not None:
                param.normal_()
    return encoder


def images(sizes=SIZES) -> list[torch.Tensor]:
    return [torch.randn(3, h, w) for h, w in sizes]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def assert_same_as_alone(encoder, imgs, outputs, layers, norm):
    assert len(outputs) == len(imgs)
    for image, packed in zip(imgs, outputs):
        alone = encoder(image[None], layers=layers, norm=norm)
        assert packed.grid_size == alone.grid_size
        assert packed.layers == alone.layers
        for layer in alone.layers:
            assert max_diff(packed.patches(layer), alone.patches(layer)) <= TOL
            if alone.cls_tokens is not None:
                assert max_diff(packed.cls(layer), alone.cls(layer)) <= TOL
            else:
                assert packed.cls_tokens is None
            if alone.register_tokens is not None:
                assert max_diff(packed.register_tokens[packed.layers.index(layer)], alone.register_tokens[alone.layers.index(layer)]) <= TOL
        if alone.pooled is None:
            assert packed.pooled is None
        else:
            assert max_diff(packed.pooled, alone.pooled) <= TOL
            assert max_diff(encoder.project(packed.pooled), encoder.project(alone.pooled)) <= TOL


# ------------------------------------------------------------------- pack == alone
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@torch.no_grad()
def test_pack_equals_alone(variant):
    encoder = tiny_encoder(**VARIANTS[variant])
    imgs = images()
    norm = variant in ("cls", "map")  # the final norm on the returned tokens, on two variants
    outputs = encode_packed(encoder, imgs, layers=(0, -1), norm=norm)
    assert_same_as_alone(encoder, imgs, outputs, (0, -1), norm)


@torch.no_grad()
def test_several_packs_under_a_budget_equal_alone():
    encoder = tiny_encoder(num_register_tokens=1)
    imgs = images()
    lengths = [2 + (h // 8) * (w // 8) for h, w in SIZES]  # CLS + 1 register + patches
    packed = embed_images(encoder, imgs, max_tokens_per_pack=max(lengths))
    assert packed.num_packs > 1
    assert [s.length for s in packed.segments] == lengths
    assert all(t.shape[1] <= max(lengths) for t in packed.tokens)
    outputs = encode_packed(encoder, imgs, layers="all", max_tokens_per_pack=max(lengths))
    assert_same_as_alone(encoder, imgs, outputs, "all", False)


@torch.no_grad()
def test_early_stop_has_no_pooled_and_the_pack_differs_without_the_mask():
    encoder = tiny_encoder()
    imgs = images()
    outputs = encode_packed(encoder, imgs, layers=(0,))
    assert all(o.pooled is None for o in outputs)
    # Control: without the block-diagonal mask the images would see each other.
    packed = embed_images(encoder, imgs)
    x, _ = encoder.blocks[0](packed.tokens[0])
    leaked = packed.unpack([x])[0][:, encoder.num_prefix_tokens :]
    assert max_diff(leaked, outputs[0].patches(0)) > 1e-3


@torch.no_grad()
def test_patch_remainder_drop_packs_images_with_remainders():
    encoder = tiny_encoder(patch_remainder="drop")
    imgs = images([(35, 30), (20, 44)])
    outputs = encode_packed(encoder, imgs)
    assert [o.grid_size for o in outputs] == [(4, 3), (2, 5)]
    assert_same_as_alone(encoder, imgs, outputs, (-1,), False)


def test_gradients_flow_through_the_pack_with_checkpointing():
    encoder = tiny_encoder(class_token=False, pool="map").train()
    encoder.set_grad_checkpointing(True)
    outputs = encode_packed(encoder, images([(16, 24), (8, 8)]))
    loss = sum(o.pooled.square().sum() for o in outputs)
    loss.backward()
    assert encoder.pos_embed.grad is not None and encoder.pos_embed.grad.abs().sum() > 0
    assert encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------- layout
def test_block_diagonal_mask_segments_and_cu_seqlens():
    mask = block_diagonal_mask([2, 3, 1])
    assert mask.shape == (1, 1, 6, 6) and mask.dtype == torch.bool
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[:2, :2] = expected[2:5, 2:5] = expected[5:, 5:] = True
    assert torch.equal(mask[0, 0], expected)
    assert segment_ids([2, 3, 1]).tolist() == [0, 0, 1, 1, 1, 2]
    assert cu_seqlens([2, 3, 1]).tolist() == [0, 2, 5, 6]


def test_plan_packs_first_fit_in_order():
    assert plan_packs([5, 3, 4]) == [[0, 1, 2]]
    assert plan_packs([5, 3, 4, 2, 1], max_tokens_per_pack=8) == [[0, 1], [2, 3, 4]]
    assert plan_packs([6, 6, 2], max_tokens_per_pack=8) == [[0, 2], [1]]


def test_packed_batch_helpers():
    encoder = tiny_encoder()
    packed = embed_images(encoder, images([(16, 16), (8, 24)]))
    assert packed.num_images == 2 and packed.num_packs == 1
    assert packed.lengths(0) == [5, 4]
    assert packed.segment_ids(0).tolist() == [[0] * 5 + [1] * 4]
    assert packed.cu_seqlens(0).tolist() == [0, 5, 9]
    assert packed.attention_mask(0).shape == (1, 1, 9, 9)
    assert [s.grid for s in packed.segments] == [(2, 2), (1, 3)]

    two = embed_images(encoder, images([(16, 16), (8, 24), (8, 8)]), max_tokens_per_pack=6)
    assert [s.pack for s in two.segments] == [0, 1, 1] and two.lengths(1) == [4, 2]
    tokens, mask = two.batched()
    assert tokens.shape == (2, 6, 32) and mask.shape == (2, 1, 6, 6)
    assert torch.equal(tokens[0, 5:], torch.zeros(1, 32))  # pack 0 is padded by one token
    assert mask[0, 0, 5].tolist() == [False] * 5 + [True]  # the padding only sees itself
    assert torch.equal(mask[1, 0], block_diagonal_mask([4, 2])[0, 0])


# ------------------------------------------------------------------- sizing
def test_navit_keeps_native_size_when_it_fits_and_shrinks_otherwise():
    assert navit_size(224, 160, 16, 256) == (224, 160)
    assert navit_size(230, 170, 16, 256) == (224, 160)  # rounded down to the stride
    h, w = navit_size(1024, 512, 16, 256)
    assert (h // 16) * (w // 16) <= 256 and h % 16 == 0 and w % 16 == 0
    assert abs(h / w - 2.0) < 0.15
    assert navit_size(16, 4000, 16, 8) == (16, 128)  # very thin: one patch row, budget kept


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 3000), st.integers(1, 3000), st.sampled_from([4, 14, 16]), st.integers(1, 1024),
    st.sampled_from(["navit", "naflex"]),
)
def test_sizes_fit_the_budget_and_the_stride(height, width, patch, budget, policy):
    if policy == "navit" and min(height, width) < patch:
        with pytest.raises(ValueError, match="shorter than one patch"):
            target_size(height, width, patch, budget, policy)
        return
    h, w = target_size(height, width, patch, budget, policy)
    assert h % patch == 0 and w % patch == 0 and h >= patch and w >= patch
    assert (h // patch) * (w // patch) <= budget
    if policy == "navit":
        assert h <= height and w <= width


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 2000), st.integers(1, 2000), st.sampled_from([4, 14, 16]), st.integers(1, 1024))
def test_naflex_size_is_transformers_rule(height, width, patch, budget):
    from transformers.models.siglip2.image_processing_siglip2 import get_image_size_for_max_num_patches

    assert naflex_size(height, width, patch, budget) == get_image_size_for_max_num_patches(height, width, patch, budget)


def test_resize_to_budget_gives_the_target_sizes():
    imgs = [torch.rand(3, 100, 37), torch.rand(3, 32, 32)]
    out = resize_to_budget(imgs, 8, 16, policy="navit")
    assert [tuple(o.shape[-2:]) for o in out] == [navit_size(100, 37, 8, 16), (32, 32)]
    assert out[1] is imgs[1]
    out = resize_to_budget(imgs, 8, 16, policy="naflex")
    assert [tuple(o.shape[-2:]) for o in out] == [naflex_size(100, 37, 8, 16), naflex_size(32, 32, 8, 16)]


# ------------------------------------------------------------------- errors
def test_errors_name_the_problem():
    encoder = tiny_encoder()
    with pytest.raises(ValueError, match="empty"):
        encode_packed(encoder, [])
    with pytest.raises(ValueError, match="image 1: .*smaller than one patch"):
        encode_packed(encoder, [torch.randn(3, 16, 16), torch.randn(3, 4, 16)])
    with pytest.raises(ValueError, match="image 0: .*not a multiple of the patch size"):
        encode_packed(encoder, [torch.randn(3, 20, 16)])
    with pytest.raises(ValueError, match="image 1 needs 17 tokens, more than max_tokens_per_pack=10"):
        encode_packed(encoder, [torch.randn(3, 16, 16), torch.randn(3, 32, 32)], max_tokens_per_pack=10)
    with pytest.raises(ValueError, match="max_tokens_per_pack must be a positive int"):
        encode_packed(encoder, [torch.randn(3, 16, 16)], max_tokens_per_pack=0)
    with pytest.raises(TypeError, match="list of \\(C, H, W\\) tensors"):
        encode_packed(encoder, torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="image 0 must be a \\(C, H, W\\) tensor"):
        encode_packed(encoder, [torch.randn(1, 3, 16, 16)])
    with pytest.raises(ValueError, match="image 0: .*channels"):
        encode_packed(encoder, [torch.randn(1, 16, 16)])
    with pytest.raises(ValueError, match="out of range"):
        encode_packed(encoder, [torch.randn(3, 16, 16)], layers=(5,))
    with pytest.raises(ValueError, match="policy='square' is not supported"):
        target_size(10, 10, 4, 4, policy="square")
    with pytest.raises(ValueError, match="max_tokens must be a positive int"):
        navit_size(10, 10, 4, 0)


# ------------------------------------------------------------------- benchmark smoke
@pytest.mark.slow
def test_benchmark_tiny_run_writes_results(tmp_path):
    import importlib.util
    import json
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "packing_throughput.py"
    spec = importlib.util.spec_from_file_location("packing_throughput", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    threads = torch.get_num_threads()
    try:
        spec.loader.exec_module(module)
        assert module.main(["--tiny", "--results-dir", str(tmp_path)]) == 0
    finally:
        sys.modules.pop(spec.name, None)
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / "packing_throughput_cpu_tiny.json").read_text())
    rows = {r["name"]: r for r in report["results"]}
    assert set(rows) == {"packed", "padded"} and report["parity_pooled_max_abs"] <= 1e-4
    assert rows["packed"]["processed_tokens"] < rows["padded"]["processed_tokens"]
    assert all(r["real_tokens_per_s"] > 0 and r["peak_memory_mb"] >= 0 for r in rows.values())
    assert "| packed |" in (tmp_path / "packing_throughput_cpu_tiny.md").read_text()


def test_segment_mask_attention_equals_the_dense_block_mask():
    """The per-segment attention path computes what the dense block-diagonal mask computes."""
    from vlm_encoder.layers import Attention, SegmentMask

    attn = Attention(32, 4).eval()
    segments = SegmentMask(((5, 7, 4), (9, 7)))
    x = torch.randn(2, 16, 32)
    dense = segments.dense()
    assert torch.equal(dense[0, 0], block_diagonal_mask([5, 7, 4])[0, 0])
    with torch.no_grad():
        by_segment, _ = attn(x, attn_mask=segments)
        by_mask, _ = attn(x, attn_mask=dense)
        with_weights, weights = attn(x, attn_mask=segments, return_weights=True)
    torch.testing.assert_close(by_segment, by_mask, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(with_weights, by_mask, atol=1e-6, rtol=1e-6)
    assert weights[0, :, 0, 5:].abs().max() == 0  # no attention across segments
    with pytest.raises(ValueError, match="do not tile"):
        attn(x, attn_mask=SegmentMask(((5, 7), (9, 7))))


@torch.no_grad()
def test_packed_attention_is_one_call_per_layer(monkeypatch):
    """`encode_packed` runs one attention kernel call per block over every image of every pack
    (a block-diagonal mask), not a loop over segments; the result still equals each image alone."""
    import torch.nn.functional as F

    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(q, *args, **kwargs):
        calls.append(tuple(q.shape))
        return sdpa(q, *args, **kwargs)

    encoder = tiny_encoder(num_register_tokens=1)
    imgs = images()
    lengths = [2 + (h // 8) * (w // 8) for h, w in SIZES]
    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    one_pack = encode_packed(encoder, imgs, layers="all")
    assert calls == [(1, 2, sum(lengths), 16)] * encoder.num_blocks  # one call per layer, all 5 images
    calls.clear()
    several = encode_packed(encoder, imgs, layers="all", max_tokens_per_pack=max(lengths))
    assert len(calls) == encoder.num_blocks and calls[0][0] > 1  # still one call per layer over all packs
    monkeypatch.undo()
    assert_same_as_alone(encoder, imgs, one_pack, "all", False)
    assert_same_as_alone(encoder, imgs, several, "all", False)
