"""Parity of `load_open_clip` with open_clip's own image towers on tiny random models.

Tiny architectures are registered with `open_clip.add_model_config` (a JSON file per model),
built by `open_clip.create_model` without weights, perturbed, saved to `.safetensors` (the
full CLIP state dict, text tower included) and loaded back through
`load_open_clip(arch, checkpoint=path)`. Every layer's CLS and patch tokens, the pooled
output and `encode_image` must match within 1e-5 (float32).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")
from timm.models import register_model  # noqa: E402

from vlm_encoder import WeightsError  # noqa: E402
from vlm_encoder.converters.open_clip_vit import (  # noqa: E402
    UnsupportedOpenClipModel,
    config_from_open_clip,
    convert_state_dict,
    load_open_clip,
)

ATOL = 1e-5


@register_model
def vlm_test_tiny_siglip_trunk(pretrained: bool = False, **kwargs) -> torch.nn.Module:
    """A tiny `vit_base_patch16_siglip_224` (no CLS, MAP head, tanh GELU) for open_clip's timm tower."""
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return timm.create_model(
        "vit_base_patch16_siglip_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=4,
        act_layer="gelu_tanh",
        **kwargs,
    )


TEXT = dict(context_length=8, vocab_size=64, width=32, heads=4, layers=1)
VIT = dict(image_size=32, layers=2, width=64, head_width=16, patch_size=8)
SIGLIP_TEXT = dict(TEXT, no_causal_mask=True, pool_type="last", proj_bias=True)
ARCHS = {
    "vlmtest-ViT": dict(embed_dim=48, vision_cfg=VIT, text_cfg=TEXT),
    "vlmtest-ViT-quickgelu": dict(embed_dim=48, quick_gelu=True, vision_cfg=VIT, text_cfg=TEXT),
    "vlmtest-ViT-ls-avg-lnpost": dict(
        embed_dim=40,
        vision_cfg=dict(VIT, ls_init_value=0.1, pool_type="avg", final_ln_after_pool=True, no_ln_pre=True),
        text_cfg=TEXT,
    ),
    "vlmtest-ViT-tanh-eps": dict(
        embed_dim=48,
        vision_cfg=dict(
            VIT, act_kwargs={"approximate": "tanh"}, norm_kwargs={"eps": 1e-6}, pos_embed_type="sin_cos_2d"
        ),
        text_cfg=TEXT,
    ),
    "vlmtest-SigLIP": dict(
        embed_dim=64,
        custom_text=True,
        vision_cfg=dict(image_size=32, timm_model_name="vlm_test_tiny_siglip_trunk", timm_pool="map", timm_proj="none"),
        text_cfg=SIGLIP_TEXT,
    ),
    "vlmtest-SigLIP-linear": dict(
        embed_dim=48,
        custom_text=True,
        vision_cfg=dict(
            image_size=32,
            timm_model_name="vlm_test_tiny_siglip_trunk",
            timm_pool="map",
            timm_proj="linear",
            timm_proj_bias=True,
        ),
        text_cfg=SIGLIP_TEXT,
    ),
}


@pytest.fixture(scope="module", autouse=True)
def _registered(tmp_path_factory):
    folder = tmp_path_factory.mktemp("open_clip_configs")
    for name, cfg in ARCHS.items():
        path = folder / f"{name}.json"
        path.write_text(json.dumps(cfg))
        open_clip.add_model_config(path)


def _reference(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = open_clip.create_model(arch).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def _save(model: torch.nn.Module, path) -> str:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def _reference_pooled(visual: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The tower's pooled output before the projection, through public APIs."""
    if hasattr(visual, "trunk"):
        return visual.trunk.forward_head(visual.trunk.forward_features(x), pre_logits=True)
    headless = copy.deepcopy(visual)
    headless.prune_intermediate_layers(indices=1, prune_norm=False, prune_head=True)  # keeps every block
    return headless(x)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_open_clip_parity(arch, tmp_path):
    ref = _reference(arch)
    encoder = load_open_clip(arch, checkpoint=_save(ref, tmp_path / "open_clip_model.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        inter = ref.visual.forward_intermediates(x, indices=None, output_fmt="NLC", output_extra_tokens=True)
        out = encoder(x, layers="all", norm=False)
        layers = inter["image_intermediates"]
        assert len(layers) == encoder.num_blocks == 2
        for i, patches in enumerate(layers):
            torch.testing.assert_close(out.patches(i), patches, atol=ATOL, rtol=0, msg=f"patches of layer {i}")
            if encoder.config.class_token:
                cls = inter["image_intermediates_prefix"][i][:, 0]
                torch.testing.assert_close(out.cls(i), cls, atol=ATOL, rtol=0, msg=f"CLS of layer {i}")
        torch.testing.assert_close(out.pooled, _reference_pooled(ref.visual, x), atol=ATOL, rtol=0, msg="pooled")
        torch.testing.assert_close(encoder.image_embeds(x), ref.encode_image(x), atol=ATOL, rtol=0, msg="encode_image")


def test_other_resolution_has_no_reference():
    pytest.skip("open_clip's VisionTransformer has no position resampling at run time: no reference to compare with")


def test_config_reads_the_options():
    config = config_from_open_clip(ARCHS["vlmtest-ViT-quickgelu"])
    assert config.act == "quick_gelu" and config.norm_pre and not config.patch_bias and config.embed_dim == 48
    assert (config.width, config.depth, config.num_heads, config.norm_eps) == (64, 2, 4, 1e-5)
    config = config_from_open_clip(ARCHS["vlmtest-ViT-ls-avg-lnpost"])
    assert config.pool == "gap" and config.pooled_norm and not config.final_norm and not config.norm_pre
    assert config.layer_scale_init == 0.1
    config = config_from_open_clip(ARCHS["vlmtest-ViT-tanh-eps"])
    assert config.act == "gelu_tanh" and config.norm_eps == 1e-6
    config = config_from_open_clip(ARCHS["vlmtest-SigLIP"])
    assert config.pool == "map" and not config.class_token and config.embed_dim is None


@pytest.mark.parametrize(
    "vision, match",
    [
        (dict(VIT, attentional_pool=True), "attentional_pool"),
        (dict(VIT, qk_norm=True), "custom attention"),
        (dict(VIT, pool_type="none"), "pool_type"),
        (dict(VIT, layers=[1, 1, 1, 1]), "ResNet"),
        (dict(VIT, some_new_option=1), "some_new_option"),
        (dict(VIT, act_kwargs={"inplace": True}), "act_kwargs"),
        (dict(image_size=32, timm_model_name="vlm_test_tiny_siglip_trunk", timm_pool="map", timm_proj="mlp"), "mlp"),
    ],
)
def test_refuses_what_it_cannot_express(vision, match):
    with pytest.raises(UnsupportedOpenClipModel, match=match):
        config_from_open_clip(dict(embed_dim=48, vision_cfg=vision, text_cfg=TEXT))


def test_unknown_keys_are_errors_and_text_keys_ignored():
    ref = _reference("vlmtest-ViT")
    config = config_from_open_clip(ARCHS["vlmtest-ViT"])
    state = ref.state_dict()
    converted = convert_state_dict(state, config)
    assert not any(k.startswith(("token_embedding", "transformer", "ln_final", "text")) for k in converted)
    with pytest.raises(WeightsError, match="visual.extra_thing"):
        convert_state_dict(dict(state, **{"visual.extra_thing": torch.zeros(1)}), config)
    with pytest.raises(WeightsError, match="mystery"):
        convert_state_dict(dict(state, mystery=torch.zeros(1)), config)
    with pytest.raises(WeightsError, match="no 'visual"):
        convert_state_dict({"logit_scale": torch.zeros(())}, config)


def test_wrong_architecture_for_the_file_is_an_error(tmp_path):
    ref = _reference("vlmtest-ViT")
    path = _save(ref, tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match="shape mismatches"):
        load_open_clip("vlmtest-ViT-ls-avg-lnpost", checkpoint=path)


def test_unknown_tag_and_offline_download(tmp_path):
    with pytest.raises(ValueError, match="neither a file nor a pretrained tag"):
        load_open_clip("ViT-B-32", checkpoint="no-such-tag")
    with pytest.raises(RuntimeError, match=r"not in the local cache.*checkpoint="):
        load_open_clip("ViT-B-32", checkpoint="laion2b_s34b_b79k", cache_dir=str(tmp_path))


def test_image_processor_is_attached(tmp_path):
    pytest.importorskip("vlm_encoder.processing")
    ref = _reference("vlmtest-ViT")
    encoder = load_open_clip("vlmtest-ViT", checkpoint=_save(ref, tmp_path / "model.safetensors"))
    processor = encoder.image_processor
    assert processor is not None
    assert processor.config.crop_size == (32, 32)
    assert processor.config.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
