"""Parity of the 2D-RoPE towers with their references on tiny random models (float32, 1e-5).

  * HF DINOv3 ViT (`DINOv3ViTModel`, saved with `save_pretrained`, read by `load_encoder(dir)`):
    every layer's patch, CLS and register tokens against `hidden_states[i + 1]`, the pooled
    output against `pooler_output`;
  * timm `eva.py` (DINOv3, EVA02 / EVA02-CLIP, Perception Encoder core / lang / spatial), saved
    to `.safetensors` and read by `load_timm_eva(name, checkpoint=...)` (and one through the
    `timm:NAME` spec): every layer against `forward_intermediates`, the pooled output against
    `forward_head(pre_logits=True)`;

each at the native size and at another resolution (the rotary tables recomputed for the new
grid; timm with `dynamic_img_size=True`, resampling its absolute table where it has one). Then
packing equals per-image encoding, and `extract` / `viz pca` run on a saved tower.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
from timm.models import register_model  # noqa: E402

from vlm_encoder import WeightsError, load_encoder  # noqa: E402
from vlm_encoder.cli import main  # noqa: E402
from vlm_encoder.converters.timm_eva import config_from_timm_eva, load_timm_eva  # noqa: E402
from vlm_encoder.converters.timm_vit import UnsupportedTimmModel  # noqa: E402
from vlm_encoder.packing import encode_packed  # noqa: E402
from parity_helpers import close, perturb  # noqa: E402

SIZES = [(32, 32), (48, 24)]  # native 4 x 4 grid, then 6 x 3




# ------------------------------------------------------------------------ HF DINOv3
HF_CASES = {
    "mlp": dict(num_register_tokens=0, use_gated_mlp=False, hidden_act="gelu"),
    "swiglu_registers": dict(num_register_tokens=2, use_gated_mlp=True, hidden_act="silu", key_bias=True),
}


def _hf_dinov3(case: str, directory) -> torch.nn.Module:
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)
    config = DINOv3ViTConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8, layerscale_value=0.5, **HF_CASES[case],
    )
    model = perturb(DINOv3ViTModel(config))
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module", params=sorted(HF_CASES))
def hf_loaded(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp("dinov3") / request.param
    model = _hf_dinov3(request.param, directory)
    return request.param, model, load_encoder(str(directory)), directory


@pytest.mark.parametrize("size", SIZES)
def test_hf_dinov3_every_layer(hf_loaded, size):
    case, model, encoder, _ = hf_loaded
    c = encoder.config
    assert (c.rope, c.pos_embed, c.rope_theta, c.rope_layout) == ("dinov3", "none", 100.0, "half")
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref = model(x, output_hidden_states=True)
        out = encoder(x, layers="all")
    n_reg = c.num_register_tokens
    assert out.grid_size == (size[0] // 8, size[1] // 8)
    for i in range(c.depth):
        hidden = ref.hidden_states[i + 1]  # HF: [embeddings, block 0, block 1, ...]
        close(f"hf_dinov3/{case}", out.patches(i), hidden[:, 1 + n_reg :], f"patches of layer {i}")
        close(f"hf_dinov3/{case}", out.cls(i), hidden[:, 0], f"CLS of layer {i}")
        if n_reg:
            close(f"hf_dinov3/{case}", out.register_tokens[i], hidden[:, 1 : 1 + n_reg], f"registers of layer {i}")
    close(f"hf_dinov3/{case}", out.pooled, ref.pooler_output, "pooled")


def test_rope_is_what_makes_parity(hf_loaded):
    """A control: the same weights with another RoPE base no longer match (the test sees RoPE)."""
    _, model, encoder, _ = hf_loaded
    from vlm_encoder import VisionEncoder

    other = VisionEncoder(encoder.config.replace(rope_theta=1000.0))
    other.load_state_dict(encoder.state_dict())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x, output_hidden_states=True).hidden_states[1]
        assert (other.eval()(x, layers=(0,)).patches(0) - ref[:, 1 + encoder.config.num_register_tokens :]).abs().max() > 1e-3


def test_hf_dinov3_strict_keys(hf_loaded):
    from vlm_encoder.converters import hf_dinov3

    _, model, _, _ = hf_loaded
    state = dict(model.state_dict())
    with pytest.raises(WeightsError, match="does not know.*layer.0.attention.extra"):
        hf_dinov3.convert_state_dict({**state, "model.layer.0.attention.extra.weight": torch.zeros(1)})
    del state["model.layer.1.norm1.weight"], state["model.layer.1.norm1.bias"]
    with pytest.raises(WeightsError, match="layer.1.norm1"):
        hf_dinov3.convert_state_dict(state)


# ------------------------------------------------------------------------ timm eva.py
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)
TIMM_CASES = {
    "dinov3": ("vit_small_patch16_dinov3", dict(global_pool="token")),
    "dinov3_qkvb": ("vit_small_patch16_dinov3_qkvb", {}),
    "dinov3_plus_swiglu": ("vit_small_plus_patch16_dinov3", {}),
    "eva02_mim": ("eva02_tiny_patch14_224", dict(ref_feat_shape=(4, 4))),
    "eva02_clip": ("eva02_base_patch16_clip_224", dict(ref_feat_shape=(4, 4))),
    "pe_core": ("vit_pe_core_tiny_patch16_384", dict(ref_feat_shape=(4, 4), attn_pool_num_heads=4)),
    "pe_lang": ("vit_pe_lang_large_patch14_448", dict(ref_feat_shape=(4, 4))),
    "pe_spatial": ("vit_pe_spatial_large_patch14_448", dict(ref_feat_shape=(4, 4))),
}


def _timm_reference(case: str, tmp_path, **extra) -> tuple[torch.nn.Module, str, dict]:
    name, kwargs = TIMM_CASES[case]
    kwargs = dict(TINY, **kwargs, **extra)
    model = perturb(timm.create_model(name, pretrained=False, **kwargs))
    path = tmp_path / f"{case}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, str(path), kwargs


def _check_timm(case: str, ref: torch.nn.Module, encoder, size: tuple[int, int]) -> None:
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        final, layers = ref.forward_intermediates(x, indices=None, return_prefix_tokens=True, output_fmt="NLC")
        out = encoder(x, layers="all")
        has_cls = ref.cls_token is not None
        for i, item in enumerate(layers):
            patches, prefix = item if isinstance(item, tuple) else (item, None)
            close(f"timm/{case}", out.patches(i), patches, f"patches of layer {i}")
            if has_cls:
                close(f"timm/{case}", out.cls(i), prefix[:, 0], f"CLS of layer {i}")
            if encoder.config.num_register_tokens:
                close(f"timm/{case}", out.register_tokens[i], prefix[:, int(has_cls) :], f"registers of layer {i}")
        close(f"timm/{case}", out.pooled, ref.forward_head(final, pre_logits=True), "pooled")


@pytest.mark.parametrize("case", sorted(TIMM_CASES))
def test_timm_eva_every_layer_native_and_other_resolution(case, tmp_path):
    ref, path, kwargs = _timm_reference(case, tmp_path, dynamic_img_size=True)
    encoder = load_timm_eva(TIMM_CASES[case][0], checkpoint=path, **kwargs)
    assert encoder.config.rope in ("eva", "dinov3")
    for size in SIZES:
        _check_timm(case, ref, encoder, size)


def test_timm_eva_configs_read_each_variant(tmp_path):
    def config(case):
        name, kwargs = TIMM_CASES[case]
        return config_from_timm_eva(timm.create_model(name, pretrained=False, **dict(TINY, **kwargs)))

    clip = config("eva02_clip")
    assert (clip.rope, clip.rope_layout, clip.rope_ref_grid, clip.attn_norm, clip.mlp_norm, clip.mlp_type) == (
        "eva", "interleaved", (4, 4), True, True, "swiglu")
    pe = config("pe_core")
    assert (pe.rope_xy, pe.rope_grid_offset, pe.norm_pre, pe.patch_bias, pe.pool, pe.map_num_heads) == (
        True, 1.0, True, False, "map", 4)
    dino = config("dinov3")
    assert (dino.rope, dino.pos_embed, dino.num_register_tokens, dino.qkv_bias) == ("dinov3", "none", 4, False)


@register_model
def vlm_test_tiny_dinov3(pretrained: bool = False, **kwargs) -> torch.nn.Module:
    """A tiny DINOv3 entry point, registered as one of timm's `eva.py` models (see below)."""
    from timm.models.eva import vit_small_patch16_dinov3

    return vit_small_patch16_dinov3(pretrained=False, **dict(TINY, **TIMM_CASES["dinov3"][1], **kwargs))


# Registered as timm registers its own eva.py entry points, so that the `timm:NAME` spec routes it.
vlm_test_tiny_dinov3.__module__ = "timm.models.eva"
timm.models._registry._model_to_module["vlm_test_tiny_dinov3"] = "eva"
timm.models._registry._module_to_models["eva"].add("vlm_test_tiny_dinov3")


def test_timm_spec_routes_eva_models(tmp_path):
    ref, path, _ = _timm_reference("dinov3", tmp_path)
    encoder = load_encoder("timm:vlm_test_tiny_dinov3", checkpoint=path)
    assert encoder.config.rope == "dinov3" and encoder.source_info["family"] == "timm"
    _check_timm("dinov3", ref, encoder, (32, 32))


def test_timm_eva_refuses_what_it_cannot_express():
    post_norm = timm.create_model("eva02_enormous_patch14_clip_224", pretrained=False, **TINY)
    with pytest.raises(UnsupportedTimmModel, match="EvaBlockPostNorm"):
        config_from_timm_eva(post_norm)
    mixed = timm.create_model("vit_base_patch16_rope_mixed_224", pretrained=False, **TINY)
    with pytest.raises(UnsupportedTimmModel, match="mixed"):
        config_from_timm_eva(mixed)


def test_timm_eva_unknown_keys_are_errors(tmp_path):
    from safetensors.torch import load_file

    _, path, kwargs = _timm_reference("eva02_clip", tmp_path)
    state = load_file(path)
    save_file({**state, "blocks.0.attn.extra": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsError, match="blocks.0.attn.extra"):
        load_timm_eva(TIMM_CASES["eva02_clip"][0], checkpoint=str(tmp_path / "bad.safetensors"), **kwargs)


# ------------------------------------------------------------------------ packing and the CLI
@pytest.mark.parametrize("case", ["dinov3_plus_swiglu", "eva02_clip", "pe_core"])
def test_packed_rope_tower_equals_per_image(case, tmp_path):
    _, path, kwargs = _timm_reference(case, tmp_path)
    encoder = load_timm_eva(TIMM_CASES[case][0], checkpoint=path, **kwargs)
    images = [torch.randn(3, 32, 32), torch.randn(3, 16, 40), torch.randn(3, 48, 24)]
    with torch.no_grad():
        packed = encode_packed(encoder, images, layers="all", max_tokens_per_pack=40)
        for image, got in zip(images, packed):
            alone = encoder(image[None], layers="all")
            for i in range(encoder.num_blocks):
                torch.testing.assert_close(got.patches(i), alone.patches(i), atol=1e-6, rtol=0)
            torch.testing.assert_close(got.pooled, alone.pooled, atol=1e-6, rtol=0)


@pytest.mark.slow  # ~13 s on 2 shared cores: extract and viz each start a full command
def test_extract_and_viz_on_a_saved_dinov3(tmp_path):
    from PIL import Image

    from vlm_encoder.extract import FeatureStore

    directory = tmp_path / "dinov3"
    _hf_dinov3("swiglu_registers", directory)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (40 + 8 * i, 32), (40 * i, 90, 200)).save(images / f"img_{i}.png")
    out = tmp_path / "store"
    assert main(["extract", "--model", str(directory), "--dataset", str(images), "--out", str(out), "--layers", "0", "-1",
                 "--select", "cls,registers,patch", "--no-progress", "--num-workers", "0"]) == 0
    store = FeatureStore(out)
    assert len(store) == 3 and store[-1, "patch"].shape[-1] == 32
    png = tmp_path / "pca.png"
    assert main(["viz", "pca", "--image", str(images / "img_0.png"), "--model", str(directory), "--out", str(png),
                 "--panel-size", "40"]) == 0
    assert png.stat().st_size > 0

