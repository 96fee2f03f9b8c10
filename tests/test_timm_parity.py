"""Parity of `load_timm` with timm's own VisionTransformer on tiny random models.

Each reference is built by `timm.create_model(..., pretrained=False)` with tiny overrides,
its weights perturbed (so LayerScale, norms and biases are not at their init values), saved
to a `.safetensors` file and loaded back through `load_timm(name, checkpoint=path)`.
Every layer's patch, CLS and register tokens, the pooled output and the head output must
match timm's within 1e-5 (float32).
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from safetensors.torch import save_file

timm = pytest.importorskip("timm")
from timm.layers import StdConv2dSame  # noqa: E402
from timm.models import register_model  # noqa: E402
from timm.models.resnetv2 import ResNetV2  # noqa: E402
from timm.models.vision_transformer_hybrid import _create_vision_transformer_hybrid  # noqa: E402

from vlm_encoder import WeightsError  # noqa: E402
from vlm_encoder.converters.timm_vit import (  # noqa: E402
    UnsupportedTimmModel,
    config_from_timm,
    convert_state_dict,
    load_timm,
)

ATOL = 1e-5
TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)


@register_model
def vlm_test_tiny_r_s8_hybrid(pretrained: bool = False, **kwargs) -> torch.nn.Module:
    """A tiny `vit_base_r50_s16_224`: ResNetV2 stages (1, 1) of width 32 (stride 8), ViT on top."""
    backbone = ResNetV2(
        layers=(1, 1),
        channels=(128, 256),
        stem_chs=32,
        num_classes=0,
        global_pool="",
        preact=False,
        stem_type="same",
        conv_layer=partial(StdConv2dSame, eps=1e-8),
    )
    return _create_vision_transformer_hybrid("vit_base_r50_s16_224", backbone=backbone, pretrained=False, **kwargs)


HYBRID = dict(img_size=32, embed_dim=64, depth=2, num_heads=4)

CASES = {
    "clip_quickgelu": ("vit_base_patch16_clip_quickgelu_224", TINY),
    "clip_gap_fc_norm": ("vit_medium_patch16_gap_256", TINY),
    "dinov2": ("vit_small_patch14_dinov2", TINY),
    "reg4_dinov2": ("vit_small_patch14_reg4_dinov2", TINY),
    "giant_dinov2_swiglu": ("vit_giant_patch14_dinov2", dict(TINY, mlp_ratio=4.0)),
    "siglip_map": ("vit_base_patch16_siglip_224", dict(TINY, act_layer="gelu_tanh")),
    "augreg": ("vit_base_patch16_224.augreg_in21k", TINY),
    "registers_with_pos": ("vit_base_patch16_224", dict(TINY, reg_tokens=2)),
    "hybrid_r50": ("vlm_test_tiny_r_s8_hybrid", HYBRID),
}


def _reference(name: str, kwargs: dict) -> torch.nn.Module:
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def _save(model: torch.nn.Module, path) -> str:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def _check_parity(ref: torch.nn.Module, encoder, size: int) -> None:
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        final, layers = ref.forward_intermediates(
            x, indices=None, return_prefix_tokens=True, norm=False, output_fmt="NLC"
        )
        out = encoder(x, layers="all", norm=False)
        assert len(layers) == encoder.num_blocks
        has_cls = ref.cls_token is not None
        for i, item in enumerate(layers):
            patches, prefix = item if isinstance(item, tuple) else (item, None)
            torch.testing.assert_close(out.patches(i), patches, atol=ATOL, rtol=0, msg=f"patches of layer {i}")
            if has_cls:
                torch.testing.assert_close(out.cls(i), prefix[:, 0], atol=ATOL, rtol=0, msg=f"CLS of layer {i}")
            if ref.num_reg_tokens:
                registers = out.register_tokens[i]
                torch.testing.assert_close(registers, prefix[:, int(has_cls) :], atol=ATOL, rtol=0)
        pooled = ref.forward_head(final, pre_logits=True)
        if encoder.config.pool == "none":
            assert out.pooled is None
        else:
            torch.testing.assert_close(out.pooled, pooled, atol=ATOL, rtol=0, msg="pooled")
            torch.testing.assert_close(encoder.image_embeds(x), ref(x), atol=ATOL, rtol=0, msg="head output")


@pytest.mark.parametrize("case", sorted(CASES))
def test_timm_parity(case, tmp_path):
    name, kwargs = CASES[case]
    ref = _reference(name, kwargs)
    encoder = load_timm(name, checkpoint=_save(ref, tmp_path / "model.safetensors"), **kwargs)
    _check_parity(ref, encoder, 32)


@pytest.mark.parametrize("case", ["reg4_dinov2", "registers_with_pos"])
@pytest.mark.parametrize("size", [24, 48])
def test_timm_parity_other_resolution(case, size, tmp_path):
    """timm resamples its position table with `dynamic_img_size=True` (bicubic, antialiased)."""
    name, kwargs = CASES[case]
    kwargs = dict(kwargs, dynamic_img_size=True)
    ref = _reference(name, kwargs)
    encoder = load_timm(name, checkpoint=_save(ref, tmp_path / "model.safetensors"), **kwargs)
    _check_parity(ref, encoder, size)


def test_config_reads_the_architecture():
    ref = _reference(*CASES["reg4_dinov2"])
    config = config_from_timm(ref)
    assert (config.width, config.depth, config.num_heads, config.patch_size) == (64, 2, 4, 8)
    assert config.num_register_tokens == 4 and config.layer_scale_init is not None
    assert config.act == "gelu" and config.pool == "cls"
    siglip = config_from_timm(_reference(*CASES["siglip_map"]))
    assert siglip.act == "gelu_tanh" and siglip.pool == "map" and not siglip.class_token
    clip = config_from_timm(_reference(*CASES["clip_quickgelu"]))
    assert clip.act == "quick_gelu" and clip.norm_pre and not clip.patch_bias and clip.norm_eps == 1e-5
    hybrid = config_from_timm(_reference(*CASES["hybrid_r50"]))
    assert hybrid.stem_layers == (1, 1) and hybrid.stem_width == 32 and hybrid.patch_size == 1


@pytest.mark.parametrize(
    "kwargs, what",
    [
        (dict(qk_norm=True), "qk_norm"),
        (dict(global_pool="max"), "global_pool"),
        (dict(proj_bias=False), "proj_bias"),
        (dict(class_token=True, global_pool="map"), "MAP pooling that skips"),
    ],
)
def test_refuses_what_it_cannot_express(kwargs, what):
    model = timm.create_model("vit_base_patch16_224", pretrained=False, **dict(TINY, **kwargs))
    with pytest.raises(UnsupportedTimmModel, match=what):
        config_from_timm(model)


def test_refuses_other_model_classes():
    model = timm.create_model("vit_base_patch16_rope_reg1_gap_256", pretrained=False, **dict(TINY, depth=1))
    with pytest.raises(UnsupportedTimmModel, match="model class"):
        config_from_timm(model)


def test_unknown_and_bad_keys_are_errors(tmp_path):
    ref = _reference(*CASES["dinov2"])
    config = config_from_timm(ref)
    state = dict(ref.state_dict())
    state["mask_token_extra"] = torch.zeros(1)
    with pytest.raises(WeightsError, match="mask_token_extra"):
        convert_state_dict(state, config)
    state = dict(ref.state_dict())
    state["pos_embed"] = state["pos_embed"][:, :5]
    with pytest.raises(WeightsError, match="pos_embed has 5 rows"):
        convert_state_dict(state, config)
    # A checkpoint of another size fails the strict load, naming the tensor.
    small = _reference("vit_small_patch14_dinov2", dict(TINY, depth=1))
    with pytest.raises(WeightsError, match="missing keys: blocks.1"):
        load_timm("vit_small_patch14_dinov2", checkpoint=_save(small, tmp_path / "small.safetensors"), **TINY)


def test_offline_without_cache_says_how_to_pass_a_file(tmp_path):
    with pytest.raises(RuntimeError, match=r"not in the local cache.*checkpoint="):
        load_timm("vit_small_patch14_dinov2.lvd142m", cache_dir=str(tmp_path), **TINY)


def test_image_processor_follows_the_model(tmp_path):
    pytest.importorskip("vlm_encoder.processing")
    name, kwargs = CASES["reg4_dinov2"]
    ref = _reference(name, kwargs)
    encoder = load_timm(name, checkpoint=_save(ref, tmp_path / "model.safetensors"), **kwargs)
    processor = encoder.image_processor
    assert processor is not None
    assert processor.config.crop_size == (32, 32)  # the img_size override, not the pretrained 518
    assert processor.config.mean == pytest.approx((0.485, 0.456, 0.406))  # DINOv2: ImageNet statistics
