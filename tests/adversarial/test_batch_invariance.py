"""Property (issue 8, item 17): an image's features do not depend on its batch.

The same 64 images (32 px) encoded one at a time, in batches of 7 and in one batch of 64,
each time in a different shuffled order, give bitwise equal tokens of every layer, CLS,
registers, pooled output and image embedding on the CPU, for a plain CLS encoder, a
SigLIP-like encoder without CLS (MAP pooling), one with registers and a hybrid ResNet stem.

The property tests run with one torch thread (on a CPU shared by many processes, two
spinning threads make these tiny forwards ~40x slower); the batch dependence they guard
against (a convolution or GEMM kernel chosen by batch size) shows at any thread count, and
`test_at_the_default_thread_count` repeats the check with the default threads.

The guarantee costs nothing where the batched kernels keep it (see `vlm_encoder.determinism`);
`test_the_batched_path_is_invariant_for_the_preset_shapes` pins that they do for the shapes
of the presets, so a torch upgrade that breaks it fails here rather than silently slowing
extraction down to one call per image.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlm_encoder import VisionConfig, VisionEncoder, batch_invariance
from vlm_encoder.layers import Block

NUM_IMAGES = 64
TINY = {"image_size": 32, "patch_size": 8, "width": 32, "depth": 2, "num_heads": 2}
CONFIGS = {
    "cls": {"embed_dim": 16, "norm_pre": True, "act": "quick_gelu"},
    "no_cls_map": {"class_token": False, "pool": "map", "act": "gelu_tanh"},
    "registers": {"num_register_tokens": 4, "layer_scale_init": 1e-5},
    "hybrid_stem": {"stem_layers": (1, 1), "stem_width": 32, "patch_size": 1},
}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def encoder_and_images(name: str) -> tuple[VisionEncoder, torch.Tensor]:
    torch.manual_seed(0)
    encoder = VisionEncoder(VisionConfig(**{**TINY, **CONFIGS[name]})).eval()
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(NUM_IMAGES, 3, 32, 32, generator=generator)  # (64, 3, 32, 32)
    return encoder, images


@torch.inference_mode()
def features(encoder: VisionEncoder, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every per-image output of one call, each with the batch first."""
    out = encoder(pixels, layers="all")
    result = {f"patches{i}": out.patches(i) for i in out.layers}
    if out.cls_tokens is not None:
        result.update({f"cls{i}": out.cls(i) for i in out.layers})
    if out.register_tokens is not None:
        result.update({f"registers{i}": t for i, t in zip(out.layers, out.register_tokens)})
    result["pooled"] = out.pooled
    result["embeds"] = encoder.project(out.pooled)
    return result


def one_at_a_time(name: str) -> dict[str, torch.Tensor]:
    encoder, images = encoder_and_images(name)
    singles = [features(encoder, images[i : i + 1]) for i in range(NUM_IMAGES)]
    return {key: torch.cat([s[key] for s in singles]) for key in singles[0]}


def in_batches(name: str, order: list[int], batch_size: int) -> dict[str, torch.Tensor]:
    """Features of the images taken in `order`, `batch_size` at a time, put back in image order."""
    encoder, images = encoder_and_images(name)
    parts = []
    for start in range(0, NUM_IMAGES, batch_size):
        chunk = order[start : start + batch_size]
        parts.append(features(encoder, images[chunk]))
    merged = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    inverse = torch.empty(NUM_IMAGES, dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(NUM_IMAGES)
    return {key: value[inverse] for key, value in merged.items()}


@functools.cache
def reference_one_thread(name: str) -> dict[str, torch.Tensor]:
    return one_at_a_time(name)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", list(CONFIGS))
@settings(max_examples=3, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(order=st.permutations(list(range(NUM_IMAGES))), batch_size=st.sampled_from([7, 64]))
def test_features_do_not_depend_on_batch_or_order(name, order, batch_size):
    reference = reference_one_thread(name)
    batched = in_batches(name, list(order), batch_size)
    assert batched.keys() == reference.keys()
    for key in reference:
        assert batched[key].shape == reference[key].shape, key
        differing = (batched[key] != reference[key]).flatten(1).any(dim=1).nonzero().flatten().tolist()
        assert not differing, f"{name}: {key} of images {differing} changed bitwise with batch size {batch_size}"


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_batch_sizes_1_7_64_in_three_shuffled_orders(name):
    """The plain, non-hypothesis form: sizes 1, 7 and 64, each in its own shuffled order."""
    reference = reference_one_thread(name)
    generator = torch.Generator().manual_seed(2)
    for batch_size in (1, 7, 64):
        order = torch.randperm(NUM_IMAGES, generator=generator).tolist()
        batched = in_batches(name, order, batch_size)
        for key in reference:
            assert torch.equal(batched[key], reference[key]), f"{name}: {key} at batch size {batch_size}"


@pytest.mark.parametrize("name", ["no_cls_map"])
def test_at_the_default_thread_count(name):
    if torch.get_num_threads() < 2:
        pytest.skip("torch runs with one thread here")
    reference = one_at_a_time(name)
    order = torch.randperm(NUM_IMAGES, generator=torch.Generator().manual_seed(3)).tolist()
    for batch_size in (7, 64):
        batched = in_batches(name, order, batch_size)
        for key in reference:
            assert torch.equal(batched[key], reference[key]), f"{name}: {key} at batch size {batch_size}"


@pytest.mark.parametrize("name", ["hybrid_stem", "cls"])
def test_without_the_switch_some_kernels_round_by_batch(one_thread, name):
    """Why the switch exists: with `batch_invariance("off")` the small convolutions of the
    hybrid stem and the linears over one pooled row per image round differently in a batch
    (a kernel chosen by batch size); the default falls back per image for those ops only."""
    encoder, images = encoder_and_images(name)
    with batch_invariance("off"):
        batched = features(encoder, images[:7])
    singles = {key: torch.cat([features(encoder, images[i : i + 1])[key] for i in range(7)]) for key in batched}
    if all(torch.equal(batched[key], singles[key]) for key in batched):
        pytest.skip("this CPU's kernels happen to be batch-invariant for these shapes")
    default = features(encoder, images[:7])
    assert all(torch.equal(default[key], singles[key]) for key in batched)


# tokens, heads, causal: ViT-B/16 224, ViT-B/32 224, ViT-L/14 336, ViT-L/14 224, CLIP's text tower
PRESET_SHAPES = [(197, 12, False), (50, 12, False), (577, 16, False), (257, 16, False), (77, 8, True)]
HEAD_DIM = 8  # tiny widths: the token and head counts are what decide the kernels' work split


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("tokens", "heads", "causal"), PRESET_SHAPES, ids=[f"{t}x{h}" for t, h, _ in PRESET_SHAPES])
@torch.inference_mode()
def test_the_batched_path_is_invariant_for_the_preset_shapes(tokens, heads, causal, dtype):
    """One batched call of a transformer block (attention, the token-wise linears, norms)
    gives each image bitwise what it gets alone, at the default thread count: the default
    mode then never needs its per-image fallback for the blocks."""
    torch.manual_seed(0)
    width = heads * HEAD_DIM
    block = Block(width, heads, width).to(dtype).eval()
    x = torch.randn(5, tokens, width).to(dtype)  # (B, T, D)
    with batch_invariance("off"):
        alone = torch.cat([block(x[i : i + 1], causal=causal)[0] for i in range(5)])
        for batch_size in (2, 5):
            together = block(x[:batch_size], causal=causal)[0]
            differing = (together != alone[:batch_size]).flatten(1).any(dim=1).nonzero().flatten().tolist()
            assert not differing, (
                f"{tokens} tokens x {heads} heads, {dtype}, {torch.get_num_threads()} threads: images {differing} "
                f"of a batch of {batch_size} differ from alone; the default mode would fall back per image"
            )


def test_the_check_can_fail():
    """A change of one image changes its features (so the equality above says something)."""
    encoder, images = encoder_and_images("cls")
    changed = images[:7].clone()
    changed[3] += 1e-3
    a, b = features(encoder, images[:7]), features(encoder, changed)
    assert torch.equal(a["pooled"][:3], b["pooled"][:3])
    assert not torch.equal(a["pooled"][3], b["pooled"][3])
