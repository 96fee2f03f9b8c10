"""Projector zoo: shapes and token counts of every kind, gradients, fusion of layers and
encoders, save/load, LLaVA projector weights, and the errors for invalid options."""

import json

import pytest
import torch
from torch import nn

from projectors import (
    CAbstractorOptions,
    PixelShuffleOptions,
    PoolOptions,
    Projector,
    ProjectorConfig,
    ResamplerOptions,
    build_projector,
    list_projectors,
    load_llava_mm_projector,
    projector_table,
    resample_tokens,
)
from vlm_encoder import VisionConfig, VisionEncoder
from vlm_encoder.weights import WeightsError

D_IN, D_OUT, GRID = 32, 48, (4, 4)
N = GRID[0] * GRID[1]

# kind, options, in_dim, expected output tokens for a 4x4 grid (N = 16)
CASES = [
    ("linear", {}, D_IN, 16),
    ("mlp2x_gelu", {}, D_IN, 16),
    ("mlp3x_gelu", {"hidden_dim": 24}, D_IN, 16),
    ("identity", {}, D_OUT, 16),
    ("pixel_shuffle", {"scale_factor": 2}, D_IN, 4),
    ("pixel_shuffle", {"scale_factor": 4, "norm": False}, D_IN, 1),
    ("pool", {"target_grid": 2}, D_IN, 4),
    ("pool", {"target_grid": (3, 1)}, D_IN, 3),
    ("resampler", {"num_queries": 5, "num_heads": 4, "depth": 2}, D_IN, 5),
    ("c_abstractor", {"target_grid": 2, "depth": 1, "hidden_dim": 16}, D_IN, 4),
    ("deepseek_aligner", {"scale_factor": 3}, D_IN, 4),  # 4x4 zero-padded to 6x6
]
IDS = [f"{k}-{i}" for i, (k, *_) in enumerate(CASES)]


def tiny_encoder(width=32, image=32, patch=8, depth=3):
    return VisionEncoder(VisionConfig(image_size=image, patch_size=patch, width=width, depth=depth, num_heads=4)).eval()


@pytest.mark.parametrize("kind,options,in_dim,tokens", CASES, ids=IDS)
def test_shapes_and_token_counts(kind, options, in_dim, tokens):
    proj = build_projector(kind, in_dim, D_OUT, **options)
    x = torch.randn(2, N, in_dim)
    out = proj(x, grid_size=GRID)
    assert out.shape == (2, tokens, D_OUT)
    assert proj.num_output_tokens(GRID) == tokens
    # Without a grid a square one is assumed for a square N.
    torch.testing.assert_close(proj(x), out)


@pytest.mark.parametrize("kind,options,in_dim,tokens", CASES, ids=IDS)
def test_gradients_reach_every_parameter_and_the_input(kind, options, in_dim, tokens):
    proj = build_projector(kind, in_dim, D_OUT, **options)
    x = torch.randn(2, N, in_dim, requires_grad=True)
    proj(x, grid_size=GRID).pow(2).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, param in proj.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind,options,in_dim,tokens", CASES, ids=IDS)
def test_save_load_round_trip(tmp_path, kind, options, in_dim, tokens):
    proj = build_projector(kind, in_dim, D_OUT, **options).eval()
    proj.save_pretrained(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "config.json").read_text())["kind"] == kind
    loaded = Projector.from_pretrained(tmp_path / "p")
    assert loaded.config == proj.config
    x = torch.randn(1, N, in_dim)
    torch.testing.assert_close(loaded(x, GRID), proj(x, GRID), rtol=0, atol=0)


def test_save_load_keeps_tuple_fields(tmp_path):
    proj = build_projector("pool", (D_IN, 16), D_OUT, target_grid=(2, 3), fusion_grid=(4, 6))
    loaded = Projector.from_pretrained(proj.save_pretrained(tmp_path / "p"))
    assert loaded.config.in_dim == (D_IN, 16) and loaded.config.options.target_grid == (2, 3)
    assert loaded.config.fusion_grid == (4, 6)


# What `save_pretrained` wrote before the kinds' options were split out: every kind's fields
# flat at the top level, with their defaults where the kind does not read them.
FLAT_DEFAULTS = {"hidden_dim": None, "scale_factor": 2, "norm": True, "target_grid": None, "num_queries": 64,
                 "num_heads": 8, "depth": 2, "pos_embed_grid": None}


@pytest.mark.parametrize("kind,options,in_dim,tokens", CASES, ids=IDS)
def test_configs_saved_in_the_flat_layout_still_load(tmp_path, kind, options, in_dim, tokens):
    proj = build_projector(kind, in_dim, D_OUT, **options).eval()
    proj.save_pretrained(tmp_path / "p")
    saved = json.loads((tmp_path / "p" / "config.json").read_text())
    assert saved["options"] == proj.config.options.to_dict()
    flat = {**{k: v for k, v in saved.items() if k != "options"}, **FLAT_DEFAULTS, **saved["options"]}
    (tmp_path / "p" / "config.json").write_text(json.dumps(flat))
    loaded = Projector.from_pretrained(tmp_path / "p")
    assert loaded.config == proj.config
    x = torch.randn(1, N, in_dim)
    torch.testing.assert_close(loaded(x, GRID), proj(x, GRID), rtol=0, atol=0)


def test_a_flat_config_json_from_before_the_split():
    old = {"model_type": "vlm_encoder.projector", "kind": "pool", "in_dim": [32, 16], "out_dim": 48,
           "fusion": "concat", "fusion_grid": None, "hidden_dim": 24, "bias": True, "scale_factor": 2, "norm": True,
           "target_grid": [2, 3], "num_queries": 64, "num_heads": 8, "depth": 2}
    config = ProjectorConfig.from_dict(old)
    assert config == ProjectorConfig("pool", (32, 16), 48, options=PoolOptions(target_grid=(2, 3), hidden_dim=24))


def test_each_kind_has_its_own_options():
    """One options dataclass per kind: `depth` is cross-attention layers for the resampler
    and RegNet blocks per stage for the C-Abstractor, never both in one config."""
    resampler = build_projector("resampler", D_IN, D_OUT, depth=3).config
    assert resampler.options == ResamplerOptions(depth=3) and resampler.options.num_queries == 64
    c_abs = build_projector("c_abstractor", D_IN, D_OUT, target_grid=2, depth=1).config
    assert c_abs.options == CAbstractorOptions(target_grid=(2, 2), depth=1)
    assert build_projector("linear", D_IN, D_OUT).config.options.to_dict() == {}
    config = ProjectorConfig("pixel_shuffle", [D_IN], D_OUT, fusion_grid=4, options={"scale_factor": 4})
    assert config.in_dim == (D_IN,) and config.fusion_grid == (4, 4)
    assert config.options == PixelShuffleOptions(scale_factor=4)
    assert ProjectorConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="takes PoolOptions"):
        ProjectorConfig("pool", D_IN, D_OUT, options=ResamplerOptions())
    with pytest.raises(ValueError, match="PixelShuffleOptions.norm must be true or false"):
        PixelShuffleOptions(norm="yes")
    with pytest.raises(ValueError, match="ResamplerOptions.depth must be an int"):
        ResamplerOptions(depth=2.0)


def test_mlp2x_gelu_is_llavas_layout():
    proj = build_projector("mlp2x_gelu", D_IN, D_OUT)
    seq = proj.body.mlp
    assert [type(m) for m in seq] == [nn.Linear, nn.GELU, nn.Linear]
    assert seq[0].in_features == D_IN and seq[0].out_features == D_OUT and seq[2].out_features == D_OUT
    x = torch.randn(2, 5, D_IN)
    torch.testing.assert_close(proj(x), seq[2](torch.nn.functional.gelu(seq[0](x))))


def test_pixel_shuffle_merges_neighbouring_patches():
    proj = build_projector("pixel_shuffle", 1, 4, scale_factor=2, norm=False)
    # Identity MLP so the merged tokens are visible: token (0, 0) holds patches 0, 1, 4, 5.
    for lin in (proj.body.mlp[0], proj.body.mlp[2]):
        nn.init.eye_(lin.weight)
        nn.init.zeros_(lin.bias)
    x = torch.arange(16.0).reshape(1, 16, 1)
    merged = torch.nn.functional.pixel_unshuffle(x.reshape(1, 1, 4, 4), 2).flatten(2).transpose(1, 2)
    assert merged[0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]
    out = proj(x, grid_size=(4, 4))
    expected = torch.nn.functional.gelu(merged)  # Linear(eye), GELU, Linear(eye)
    torch.testing.assert_close(out, expected)


def test_projector_table_lists_every_kind():
    kinds = {row["kind"] for row in projector_table()}
    assert kinds == set(list_projectors())
    assert {"linear", "mlp{N}x_gelu", "identity", "pixel_shuffle", "pool", "resampler", "c_abstractor"} <= kinds


# ------------------------------------------------------------------ fusion
def test_multilayer_concat_follows_llava_vision_feature_layer():
    enc = tiny_encoder(depth=4)
    px = torch.randn(2, 3, 32, 32)
    layers = (-2, -4, -1)
    out = enc(px, layers=layers)
    proj = build_projector("mlp2x_gelu", (32, 32, 32), D_OUT)
    expected = proj.body.mlp(torch.cat([out.patches(l) for l in layers], dim=-1))
    torch.testing.assert_close(proj(out), expected)
    torch.testing.assert_close(proj([out.patches(l) for l in layers]), expected)


def test_multilayer_weighted_sum_starts_at_the_mean_and_learns():
    enc = tiny_encoder(depth=4)
    out = enc(torch.randn(2, 3, 32, 32), layers=(-2, -3))
    proj = build_projector("linear", (32, 32), D_OUT, fusion="weighted_sum")
    mean = (out.patches(-2) + out.patches(-3)) / 2
    torch.testing.assert_close(proj(out), proj.body.mlp(mean))
    proj(out).sum().backward()
    assert proj.fusion.layer_weights.grad is not None and proj.fusion.layer_weights.grad.abs().sum() > 0


def test_two_encoders_on_different_grids():
    clip_like = tiny_encoder(width=32, image=48, patch=8)  # 6x6 grid
    dino_like = tiny_encoder(width=24, image=32, patch=8)  # 4x4 grid
    a = clip_like(torch.randn(2, 3, 48, 48), layers=(-2,))
    b = dino_like(torch.randn(2, 3, 32, 32), layers=(-1,))
    proj = build_projector("mlp2x_gelu", (32, 24), D_OUT)
    out = proj([a, b])  # the DINO grid is upsampled to the first stream's 6x6 grid
    assert out.shape == (2, 36, D_OUT) and proj.num_output_tokens((6, 6)) == 36
    expected = proj.body.mlp(torch.cat([a.patches(-2), resample_tokens(b.patches(-1), (4, 4), (6, 6))], dim=-1))
    torch.testing.assert_close(out, expected)
    # A common grid of our choosing, then token reduction.
    shuffle = build_projector("pixel_shuffle", (32, 24), D_OUT, fusion_grid=4, scale_factor=2)
    assert shuffle([a, b]).shape == (2, 4, D_OUT)
    assert shuffle.num_output_tokens((6, 6)) == 4
    # Plain tensors need their grids to be resampled.
    out_t = proj([a.patches(-2), b.patches(-1)], grid_size=[(6, 6), (4, 4)])
    torch.testing.assert_close(out_t, out)


def test_resample_tokens():
    x = torch.randn(2, 16, 8)
    assert resample_tokens(x, (4, 4), (4, 4)) is x
    const = torch.full((1, 36, 3), 2.5)
    torch.testing.assert_close(resample_tokens(const, (6, 6), (4, 4)), torch.full((1, 16, 3), 2.5))
    torch.testing.assert_close(resample_tokens(const, (6, 6), (8, 10)), torch.full((1, 80, 3), 2.5))


# ---------------------------------------------------------- LLaVA weights
def _llava_sequential(in_dim, out_dim, depth, bias=True):
    layers = [nn.Linear(in_dim, out_dim, bias=bias)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim, bias=bias)]
    return nn.Sequential(*layers)


@pytest.mark.parametrize("kind,depth", [("mlp2x_gelu", 2), ("mlp3x_gelu", 3)])
def test_llava_mm_projector_weights_load(tmp_path, kind, depth):
    ref = _llava_sequential(D_IN, D_OUT, depth)
    state = {f"model.mm_projector.{k}": v for k, v in ref.state_dict().items()}
    state["model.embed_tokens.weight"] = torch.zeros(3, 3)  # other keys of the file are ignored
    torch.save(state, tmp_path / "mm_projector.bin")
    proj = load_llava_mm_projector(tmp_path / "mm_projector.bin", kind=kind)
    assert proj.config.kind == kind and proj.config.in_dim == D_IN and proj.config.out_dim == D_OUT
    x = torch.randn(2, 5, D_IN)
    torch.testing.assert_close(proj(x), ref(x))


def test_llava1_linear_projector_loads():
    ref = nn.Linear(D_IN, D_OUT)
    proj = load_llava_mm_projector({f"mm_projector.{k}": v for k, v in ref.state_dict().items()}, kind="linear")
    x = torch.randn(1, 3, D_IN)
    torch.testing.assert_close(proj(x), ref(x))


def test_llava_mm_projector_wrong_layout_raises():
    ref = _llava_sequential(D_IN, D_OUT, 2)
    state = {f"model.mm_projector.{k}": v for k, v in ref.state_dict().items()}
    with pytest.raises(WeightsError, match="mlp3x_gelu"):
        load_llava_mm_projector(state, kind="mlp3x_gelu")
    with pytest.raises(WeightsError, match="no mm_projector"):
        load_llava_mm_projector({"model.embed_tokens.weight": torch.zeros(2, 2)})


# ----------------------------------------------------------------- errors
def test_pixel_shuffle_grid_not_divisible():
    proj = build_projector("pixel_shuffle", D_IN, D_OUT, scale_factor=4)
    with pytest.raises(ValueError, match="divisible by 4.*6x6"):
        proj(torch.randn(1, 36, D_IN), grid_size=(6, 6))


@pytest.mark.parametrize(
    "kind,in_dim,out_dim,options,message",
    [
        ("linear", (32, 48), D_OUT, {"fusion": "weighted_sum"}, "same width"),
        ("identity", 32, 48, {}, "identity"),
        ("nope", 32, 48, {}, "unknown projector kind"),
        ("mlp2x_gelu", 32, 48, {"num_queries": 4}, "do not apply to kind 'mlp2x_gelu'"),
        ("mlp2x_gelu", 32, 48, {"colour": 4}, r"\['colour'\] do not apply"),
        ("pool", 32, 48, {}, "PoolOptions needs .*target_grid"),
        ("resampler", 32, 48, {"num_heads": 5}, "divisible by num_heads"),
        ("mlp0x_gelu", 32, 48, {}, "at least one Linear"),
        ("linear", 0, 48, {}, "in_dim"),
        ("linear", 32, 48, {"fusion": "max"}, "fusion"),
        ("pool", 32, 48, {"target_grid": (2, 0)}, "target_grid"),
    ],
)
def test_invalid_options_raise(kind, in_dim, out_dim, options, message):
    with pytest.raises(ValueError, match=message):
        build_projector(kind, in_dim, out_dim, **options)


def test_mismatched_inputs_raise():
    proj = build_projector("mlp2x_gelu", (32, 32), D_OUT)
    with pytest.raises(ValueError, match="width 24"):
        proj([torch.randn(1, 16, 32), torch.randn(1, 16, 24)])
    with pytest.raises(ValueError, match="fuses 2 input stream"):
        proj(torch.randn(1, 16, 32))
    with pytest.raises(ValueError, match="different token counts"):
        proj([torch.randn(1, 16, 32), torch.randn(1, 9, 32)])
    with pytest.raises(ValueError, match="no square grid"):
        build_projector("pool", 32, D_OUT, target_grid=2)(torch.randn(1, 17, 32))
    with pytest.raises(ValueError, match="larger than the input grid"):
        build_projector("pool", 32, D_OUT, target_grid=5)(torch.randn(1, 16, 32))


def test_config_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown ProjectorConfig fields"):
        ProjectorConfig.from_dict({"kind": "linear", "in_dim": 2, "out_dim": 3, "colour": 1})


def test_c_abstractor_is_honeybees_network_from_timm():
    """Honeybee builds its C-Abstractor as `RegStage(depth, in, hidden, stride=1, dilation=1,
    act_layer=SiLU, norm_layer=LayerNorm2d)`, adaptive pooling, the same stage, then
    `Linear, SiLU, Linear`: built that way from timm with our weights, it gives our output."""
    from functools import partial

    from timm.layers import LayerNorm2d
    from timm.models.regnet import RegStage

    projector = build_projector("c_abstractor", D_IN, D_OUT, target_grid=2, depth=3, hidden_dim=24).eval()
    reg_block = partial(RegStage, stride=1, dilation=1, act_layer=nn.SiLU, norm_layer=LayerNorm2d)
    net = nn.Sequential(reg_block(3, D_IN, 24), nn.AdaptiveAvgPool2d((2, 2)), reg_block(3, 24, 24))
    readout = nn.Sequential(nn.Linear(24, D_OUT), nn.SiLU(), nn.Linear(D_OUT, D_OUT))
    body = projector.body
    with torch.no_grad():
        for p in projector.parameters():  # off the init, so every weight matters
            p.add_(torch.randn_like(p) * 0.05)
        net[0].load_state_dict(body.stage1.state_dict())
        net[2].load_state_dict(body.stage2.state_dict())
        readout.load_state_dict(body.readout.state_dict())
        x = torch.randn(2, N, D_IN)
        grid = x.transpose(1, 2).reshape(2, D_IN, *GRID)  # Honeybee: 'b (h w) d -> b d h w'
        expected = readout(net(grid).flatten(2).transpose(1, 2))
        torch.testing.assert_close(projector(x, grid_size=GRID), expected, rtol=0, atol=1e-6)
    assert any(isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1 for m in body.stage1.modules())  # depthwise 3x3
    assert any("se" in name for name, _ in body.stage1.named_modules())  # squeeze-excitation


def test_c_abstractor_position_embedding():
    """`pos_embed_grid` adds Honeybee's learned position embedding to the input tokens (on its
    own grid as is, on another grid resampled bicubic); a kind without it refuses the option."""
    plain = build_projector("c_abstractor", D_IN, D_OUT, target_grid=2, depth=1, hidden_dim=16).eval()
    with_pos = build_projector("c_abstractor", D_IN, D_OUT, target_grid=2, depth=1, hidden_dim=16,
                               pos_embed_grid=GRID).eval()
    assert with_pos.body.pos_embed.shape == (1, N, D_IN)
    state = {k: v for k, v in with_pos.state_dict().items() if k != "body.pos_embed"}
    plain.load_state_dict(state)
    x = torch.randn(2, N, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(with_pos(x, grid_size=GRID), plain(x + with_pos.body.pos_embed, grid_size=GRID))
        y = torch.randn(2, 36, D_IN)  # a 6x6 grid: the 4x4 table resampled
        table = torch.nn.functional.interpolate(with_pos.body.pos_embed.transpose(1, 2).reshape(1, D_IN, *GRID),
                                                size=(6, 6), mode="bicubic", align_corners=False)
        torch.testing.assert_close(with_pos(y, grid_size=(6, 6)),
                                   plain(y + table.flatten(2).transpose(1, 2), grid_size=(6, 6)))
    with pytest.raises(ValueError, match="pos_embed_grid"):
        build_projector("pool", D_IN, D_OUT, target_grid=2, pos_embed_grid=GRID)
