"""The encoder's feature API, options and semantics on tiny configs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from vlm_encoder import PRESETS, EncoderOutput, VisionConfig, VisionEncoder, batch_invariance, create_encoder, preset_config
from vlm_encoder.layers import resample_patch_projection

TINY = dict(image_size=32, patch_size=8, width=32, depth=3, num_heads=4)

# Every option of the architecture, one tiny config each.
VARIANTS = {
    "plain": {},
    "clip": dict(norm_pre=True, patch_bias=False, act="quick_gelu", norm_eps=1e-5, embed_dim=16),
    "siglip": dict(class_token=False, pool="map", act="gelu_tanh"),
    "dinov2_reg": dict(layer_scale_init=1e-5, num_register_tokens=4),
    "gap": dict(pool="gap", final_norm=False, pooled_norm=True),
    "no_cls_none": dict(class_token=False, pool="none"),
    "sincos": dict(pos_embed="sincos"),
    "no_pos": dict(pos_embed="none", qkv_bias=False),
    "swiglu": dict(mlp_type="swiglu", mlp_dim=40),
    "vit_pooler": dict(embed_dim=32, proj_bias=True, proj_act="tanh"),
    "hybrid": dict(stem_layers=(1, 1), stem_width=32, patch_size=1),
}


def tiny(**overrides) -> VisionEncoder:
    return VisionEncoder(VisionConfig(**{**TINY, **overrides})).eval()


def pixels(b: int = 2, h: int = 32, w: int = 32) -> torch.Tensor:
    return torch.randn(b, 3, h, w)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_shapes_every_variant(name):
    enc = tiny(**VARIANTS[name])
    c = enc.config
    out = enc(pixels(2), layers=(0, -1))
    assert isinstance(out, EncoderOutput)
    assert out.layers == (0, c.depth - 1)
    h, w = out.grid_size
    assert (h, w) == c.grid_size
    for tokens in out.patch_tokens:
        assert tokens.shape == (2, h * w, c.width)
    if c.class_token:
        assert [t.shape for t in out.cls_tokens] == [(2, c.width)] * 2
    else:
        assert out.cls_tokens is None
        with pytest.raises(ValueError, match="no CLS token"):
            out.cls(-1)
    if c.num_register_tokens:
        assert out.register_tokens[0].shape == (2, c.num_register_tokens, c.width)
    else:
        assert out.register_tokens is None
    if c.pool == "none":
        assert out.pooled is None
    else:
        assert out.pooled.shape == (2, c.width)
        embeds = enc.image_embeds(pixels(2))
        assert embeds.shape == (2, c.embed_dim or c.width)
    assert out.patch_grid(-1).shape == (2, c.width, h, w)
    assert out.tokens(0).shape == (2, c.num_prefix_tokens + h * w, c.width)


def test_tokens_are_the_block_outputs_in_order():
    """Layer i is block i's output; the split into CLS / registers / patches is exact."""
    enc = tiny(num_register_tokens=2)
    x = pixels(1)
    tokens, _ = enc.embed(x)
    expected = []
    for block in enc.blocks:
        tokens, _ = block(tokens)
        expected.append(tokens)
    out = enc(x, layers=(2, 0, 1))
    assert out.layers == (2, 0, 1)
    for layer in (0, 1, 2):
        torch.testing.assert_close(out.tokens(layer), expected[layer], rtol=0, atol=0)
        torch.testing.assert_close(out.cls(layer), expected[layer][:, 0], rtol=0, atol=0)
        torch.testing.assert_close(out.register_tokens[out.layers.index(layer)], expected[layer][:, 1:3], rtol=0, atol=0)
        torch.testing.assert_close(out.patches(layer), expected[layer][:, 3:], rtol=0, atol=0)
    # Pooled = final LN then CLS.
    full = enc(x, layers=(-1,))
    torch.testing.assert_close(full.pooled, enc.norm(expected[-1])[:, 0], rtol=0, atol=0)


def test_negative_indices_match_hf_hidden_states_convention():
    enc = tiny(depth=4)
    out = enc(pixels(1), layers=(-2, -1))
    assert out.layers == (2, 3)
    torch.testing.assert_close(out.patches(-2), out.patches(2), rtol=0, atol=0)


def test_patch_order_is_row_major():
    """Patch k of the output comes from pixel block (k // w, k % w)."""
    enc = tiny(pos_embed="none", depth=1)
    x = torch.zeros(1, 3, 32, 48)
    x[..., 8:16, 16:24] = 5.0  # row 1, column 2 of a 4 x 6 grid
    tokens, grid = enc.patch_embed(x)
    assert grid == (4, 6)
    baseline = enc.patch_embed.proj.bias
    changed = (tokens[0] - baseline).abs().sum(-1) > 1e-6
    assert changed.nonzero().flatten().tolist() == [1 * 6 + 2]


@pytest.mark.parametrize(
    "layers, message",
    [((3,), r"out of range.*-3\.\.2"), ((-4,), r"out of range"), ((0, -3), "repeat"), ((), "at least one")],
)
def test_bad_layer_requests(layers, message):
    enc = tiny()
    with pytest.raises(ValueError, match=message):
        enc(pixels(1), layers=layers)


def test_bare_int_layers_is_a_type_error():
    with pytest.raises(TypeError, match="sequence of block indices"):
        tiny()(pixels(1), layers=-1)


def test_layers_all():
    enc = tiny()
    assert enc(pixels(1), layers="all").layers == (0, 1, 2)


def test_unrequested_layer_lookup_names_what_is_held():
    out = tiny()(pixels(1), layers=(0,))
    with pytest.raises(ValueError, match=r"holds layers \[0\]"):
        out.patches(1)


def test_early_stop_runs_only_needed_blocks():
    enc = tiny(depth=6)
    calls: list[int] = []
    for i, block in enumerate(enc.blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
    out = enc(pixels(1), layers=(1, 3))
    assert calls == [0, 1, 2, 3]
    assert out.pooled is None
    calls.clear()
    assert enc(pixels(1), layers=(-1,)).pooled is not None
    assert calls == list(range(6))


def test_norm_true_applies_final_layernorm():
    enc = tiny()
    x = pixels(2)
    raw = enc(x, layers=(1,))
    normed = enc(x, layers=(1,), norm=True)
    torch.testing.assert_close(normed.patches(1), enc.norm(raw.tokens(1))[:, 1:])
    torch.testing.assert_close(normed.cls(1), enc.norm(raw.tokens(1))[:, 0])


def test_attention_weights_only_when_asked_and_consistent():
    enc = tiny()
    x = pixels(2)
    plain = enc(x, layers=(0, 2))
    assert plain.attentions is None
    out = enc(x, layers=(0, 2), output_attentions=True)
    T = 1 + 16
    assert [a.shape for a in out.attentions] == [(2, 4, T, T)] * 2
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, 4, T))
    # The explicit-softmax path gives the same tokens as the fused SDPA path.
    for layer in (0, 2):
        torch.testing.assert_close(out.tokens(layer), plain.tokens(layer), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ resolution
def test_resampling_at_native_size_is_identity():
    enc = tiny()
    assert enc.position_embedding(enc.config.grid_size) is enc.pos_embed
    from vlm_encoder.layers import resample_pos_embed

    table = torch.randn(1, 16, 32)
    assert resample_pos_embed(table, (4, 4), (4, 4)) is table


def test_non_square_and_other_sizes_work():
    enc = tiny()
    for h, w in [(32, 48), (64, 16), (24, 40)]:
        out = enc(pixels(1, h, w), layers=(-1,))
        assert out.grid_size == (h // 8, w // 8)
        assert out.patches(-1).shape == (1, (h // 8) * (w // 8), 32)


def test_resampled_table_matches_bicubic_reference_and_follows_the_table():
    enc = tiny()
    with torch.no_grad():
        table = enc.position_embedding((6, 5))
        grid = enc.pos_embed.reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
        ref = F.interpolate(grid, size=(6, 5), mode="bicubic", align_corners=False, antialias=True)
        torch.testing.assert_close(table, ref.permute(0, 2, 3, 1).reshape(1, 30, 32))
        assert torch.equal(enc.position_embedding((6, 5)), table)
        enc.pos_embed.add_(1.0)  # resampled from the current values (never cached: tests/adversarial/test_position_tables.py)
        assert not torch.equal(enc.position_embedding((6, 5)), table)


def test_resampled_table_gets_gradients_when_training():
    enc = tiny().train()
    enc(pixels(1, 48, 40), layers=(-1,)).pooled.square().sum().backward()
    assert enc.pos_embed.grad is not None and enc.pos_embed.grad.abs().sum() > 0


@pytest.mark.parametrize("h, w", [(30, 32), (32, 33)])
def test_side_not_multiple_of_patch_is_a_clear_error(h, w):
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        tiny()(pixels(1, h, w))


def test_bad_pixel_inputs_are_clear_errors():
    enc = tiny()
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        enc(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="channels"):
        enc(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="float"):
        enc(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_set_image_size_resamples_table_permanently():
    enc = tiny()
    x = pixels(1, 48, 64)
    before = enc(x, layers=(-1,))
    enc.set_image_size((48, 64))
    assert enc.config.image_size == (48, 64) and enc.pos_embed.shape == (1, 6 * 8, 32)
    after = enc(x, layers=(-1,))
    torch.testing.assert_close(after.pooled, before.pooled)
    with pytest.raises(ValueError, match="multiple of the patch stride"):
        enc.set_image_size(50)


def test_set_patch_size_flexivit_preserves_patch_projection():
    """PI-resize: <x, w> == <resize(x), w'> when the patch is upsampled."""
    weight = torch.randn(8, 3, 8, 8, dtype=torch.float64)
    new = resample_patch_projection(weight, 12)
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    x_up = F.interpolate(x, size=(12, 12), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(torch.einsum("bchw,dchw->bd", x, weight), torch.einsum("bchw,dchw->bd", x_up, new))

    enc = tiny(image_size=48)
    enc.set_patch_size(12)
    assert enc.config.patch_size == 12 and enc.config.grid_size == (4, 4)
    assert enc.patch_embed.proj.weight.shape == (32, 3, 12, 12)
    assert enc(pixels(1, 48, 48), layers=(-1,)).patches(-1).shape == (1, 16, 32)
    with pytest.raises(ValueError, match="multiple of the patch stride"):
        enc.set_patch_size(10)


# -------------------------------------------------------------------- training
@pytest.mark.parametrize("name", ["plain", "clip", "siglip", "dinov2_reg", "gap", "swiglu", "hybrid"])
def test_gradients_reach_every_parameter(name):
    enc = tiny(**VARIANTS[name]).train()
    enc.image_embeds(pixels(2)).square().sum().backward()
    missing = [n for n, p in enc.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"


def test_gradient_checkpointing_same_gradients():
    x = pixels(2)
    enc = tiny(drop_path_rate=0.0).train()
    enc.image_embeds(x).sum().backward()
    ref = {n: p.grad.clone() for n, p in enc.named_parameters()}
    enc.zero_grad()
    enc.set_grad_checkpointing(True)
    enc.image_embeds(x).sum().backward()
    for n, p in enc.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], msg=n)


def test_drop_path_only_in_training():
    enc = tiny(drop_path_rate=0.5)
    x = pixels(4)
    enc.eval()
    torch.testing.assert_close(enc.pooled_features(x), enc.pooled_features(x), rtol=0, atol=0)
    enc.train()
    torch.manual_seed(1)
    a = enc.pooled_features(x)
    torch.manual_seed(2)
    b = enc.pooled_features(x)
    assert not torch.equal(a, b)


# --------------------------------------------------------------- determinism
@pytest.mark.parametrize("name", ["plain", "siglip", "dinov2_reg"])
def test_image_alone_equals_image_in_batch_of_seven_bitwise(name):
    enc = tiny(**VARIANTS[name])
    batch = pixels(7)
    with torch.inference_mode():
        together = enc(batch, layers=(0, -1))
        for i in range(7):
            alone = enc(batch[i : i + 1], layers=(0, -1))
            for a, b in zip(alone.patch_tokens, together.patch_tokens):
                assert torch.equal(a[0], b[i])
            assert torch.equal(alone.pooled[0], together.pooled[i])


def test_batch_invariance_modes_compute_the_same_features():
    enc = tiny(stem_layers=(1,), stem_width=32, patch_size=1, image_size=32, pool="map", embed_dim=16)
    batch = pixels(3)
    with torch.inference_mode():
        alone = torch.cat([enc.image_embeds(batch[i : i + 1]) for i in range(3)])
        by_mode = {}
        for mode in ("auto", "always", "off"):
            with batch_invariance(mode):
                by_mode[mode] = enc.image_embeds(batch)
    assert torch.equal(by_mode["auto"], alone) and torch.equal(by_mode["always"], alone)
    torch.testing.assert_close(by_mode["off"], alone, atol=1e-5, rtol=1e-5)  # same math, rounding may differ


def test_torch_compile_matches_eager():
    enc = tiny()
    x = pixels(2)
    with torch.no_grad():
        eager = enc(x, layers=(-2, -1))
        compiled = torch.compile(enc)(x, layers=(-2, -1))
    assert compiled.layers == eager.layers
    for a, b in zip(compiled.patch_tokens, eager.patch_tokens):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled.pooled, eager.pooled, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ save/load
@pytest.mark.parametrize("name", ["clip", "siglip", "hybrid", "dinov2_reg"])
def test_save_pretrained_round_trip(tmp_path, name):
    enc = tiny(**VARIANTS[name], image_size=(32, 48))
    enc.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging directory left behind"
    loaded = VisionEncoder.from_pretrained(tmp_path / "model")
    assert loaded.config == enc.config
    x = pixels(2, 32, 48)
    torch.testing.assert_close(loaded(x, layers=(0, -1)).pooled, enc(x, layers=(0, -1)).pooled, rtol=0, atol=0)


def test_image_processor_travels_with_the_saved_model(tmp_path):
    from vlm_encoder import load_encoder
    from vlm_encoder.processing import ImageProcessor, ProcessorConfig

    enc = tiny()
    enc.image_processor = ImageProcessor(ProcessorConfig(resize_mode="shortest_edge", size=40, crop_size=32,
                                                         mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    enc.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "processor_config.json").is_file()
    assert VisionEncoder.from_pretrained(tmp_path / "model").image_processor == enc.image_processor
    assert load_encoder(tmp_path / "model").image_processor == enc.image_processor
    # Saving a model without preprocessing over it removes the file: it was not this model's.
    tiny().save_pretrained(tmp_path / "model")
    assert not (tmp_path / "model" / "processor_config.json").exists()
    reloaded = VisionEncoder.from_pretrained(tmp_path / "model")
    assert reloaded.get_image_processor() is None  # nothing recorded ...
    assert reloaded.image_processor == ImageProcessor.default_for(reloaded.config)  # ... so the default is used


def test_from_pretrained_rejects_wrong_model_type(tmp_path):
    import json

    enc = tiny()
    enc.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "clip"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="load_encoder"):
        VisionEncoder.from_pretrained(tmp_path)


# ------------------------------------------------------------- config, presets
@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(width=30, num_heads=4), "divisible by num_heads"),
        (dict(act="relu"), "act must be one of 'gelu', 'quick_gelu', 'gelu_tanh', got the string 'relu'"),
        (dict(pool="cls", class_token=False), "needs class_token"),
        (dict(image_size=30), "not a multiple of the patch stride 8"),
        (dict(pos_embed="rope"), "pos_embed must be one of 'learned', 'sincos', 'none'"),
        (dict(depth=0), "VisionConfig.depth must be >= 1, got 0"),
        (dict(image_size=(32, 32, 3)), r"image_size must be a list of 2 \(an int, an int\), got \(32, 32, 3\)"),
        (dict(proj_act="tanh"), "set embed_dim"),
    ],
)
def test_config_validation_messages(changes, message):
    with pytest.raises(ValueError, match=message):
        VisionConfig(**{**TINY, **changes})


def test_config_is_frozen_and_json_round_trips():
    import json

    config = VisionConfig(**{**TINY, "stem_layers": (1, 2), "image_size": (32, 64), "patch_size": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.width = 8  # type: ignore[misc]
    assert VisionConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown VisionConfig fields"):
        VisionConfig.from_dict({**config.to_dict(), "hidden_size": 3})


def test_every_preset_is_a_valid_config():
    assert len(PRESETS) > 100
    for name in PRESETS:
        config = preset_config(name)
        assert config.image_size[0] % config.input_stride == 0 or config.patch_remainder == "drop"
    assert preset_config("vit_large_patch14_clip_336").grid_size == (24, 24)
    assert preset_config("vit_base_r50_s16_224").grid_size == (14, 14)
    assert preset_config("vit_so400m_patch14_siglip_384").grid_size == (27, 27)


def test_patch_remainder_drop_floors_like_the_conv():
    enc = tiny(patch_remainder="drop", image_size=36)
    assert enc.config.grid_size == (4, 4)
    x = pixels(1, 36, 39)
    out = enc(x, layers=(-1,))
    assert out.grid_size == (4, 4)
    torch.testing.assert_close(out.pooled, enc(x[..., :32, :32], layers=(-1,)).pooled, rtol=0, atol=0)


def test_create_encoder_overrides_and_unknown_name():
    enc = create_encoder("vit_base_patch16_224", depth=2, width=64, num_heads=4, image_size=64)
    assert enc.num_blocks == 2 and enc.width == 64
    with pytest.raises(ValueError, match="did you mean"):
        create_encoder("vit_base_patch16_225")


def test_hybrid_stem_stride_and_channels():
    enc = tiny(stem_layers=(1, 1, 1), stem_width=32, patch_size=1, image_size=64)
    assert enc.stem.stride == 16 and enc.config.grid_size == (4, 4)
    assert enc.stem(pixels(1, 64, 64)).shape == (1, 4 * 32 * 4, 4, 4)
