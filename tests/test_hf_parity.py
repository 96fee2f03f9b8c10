"""Parity with Hugging Face transformers: every layer's tokens, the pooled output and the
image embedding of tiny random models of each family, loaded through `load_encoder`.

Each reference is built from a tiny config, its weights perturbed (so LayerNorm scales,
biases and LayerScale are not at their trivial init and a swapped mapping shows), written
with `save_pretrained` and loaded back by our loader. Our layer `i` is HF's
`hidden_states[i + 1]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import transformers as tf

from vlm_encoder import load_encoder
from parity_helpers import perturb  # noqa: E402

TOL = 1e-5
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99)
DINO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8, layerscale_value=0.5)


@dataclass
class Reference:
    """What the HF model computes for some pixels."""

    hidden_states: tuple[torch.Tensor, ...]  # embeddings, then one per block (B, T, D)
    last_hidden_state: torch.Tensor | None  # HF's, normed for SigLIP / ViT / DINOv2
    pooled: torch.Tensor | None  # our `pooled` equivalent
    embeds: torch.Tensor | None  # our `image_embeds` equivalent


def _clip_model() -> tf.PreTrainedModel:
    config = tf.CLIPConfig(vision_config=dict(VISION, hidden_act="quick_gelu"), text_config=TEXT, projection_dim=16)
    return tf.CLIPModel(config)


def _run_clip(model, px, interpolate):
    out = model.vision_model(px, output_hidden_states=True, interpolate_pos_encoding=interpolate)
    embeds = model.get_image_features(px, interpolate_pos_encoding=interpolate).pooler_output
    return Reference(out.hidden_states, None, out.pooler_output, embeds)


def _run_clip_vision(model, px, interpolate):
    out = model(px, output_hidden_states=True, interpolate_pos_encoding=interpolate)
    return Reference(out.hidden_states, None, out.pooler_output, out.pooler_output)


def _run_clip_vision_proj(model, px, interpolate):
    out = model(px, output_hidden_states=True, interpolate_pos_encoding=interpolate)
    pooled = model.vision_model(px, interpolate_pos_encoding=interpolate).pooler_output
    return Reference(out.hidden_states, None, pooled, out.image_embeds)


def _run_siglip(model, px, interpolate):
    out = model.vision_model(px, output_hidden_states=True, interpolate_pos_encoding=interpolate)
    embeds = model.get_image_features(px, interpolate_pos_encoding=interpolate).pooler_output
    return Reference(out.hidden_states, out.last_hidden_state, out.pooler_output, embeds)


def _run_siglip_vision(model, px, interpolate):
    out = model(px, output_hidden_states=True, interpolate_pos_encoding=interpolate)
    return Reference(out.hidden_states, out.last_hidden_state, out.pooler_output, out.pooler_output)


def _run_vit(model, px, interpolate):
    out = model(px, output_hidden_states=True, interpolate_pos_encoding=interpolate)
    cls = out.last_hidden_state[:, 0]
    embeds = out.pooler_output if out.pooler_output is not None else cls
    return Reference(out.hidden_states, out.last_hidden_state, cls, embeds)


def _run_dinov2(model, px, interpolate):
    out = model(px, output_hidden_states=True)  # DINOv2 always interpolates
    return Reference(out.hidden_states, out.last_hidden_state, out.pooler_output, out.pooler_output)


def _run_llava(model, px, interpolate):
    out = model.model.vision_tower(px, output_hidden_states=True, interpolate_pos_encoding=interpolate)
    return Reference(out.hidden_states, None, out.pooler_output, out.pooler_output)


def _llava_model() -> tf.PreTrainedModel:
    config = tf.LlavaConfig(
        vision_config=dict(VISION, model_type="clip_vision_model", hidden_act="quick_gelu"),
        text_config=dict(model_type="llama", num_key_value_heads=4, **TEXT),
    )
    return tf.LlavaForConditionalGeneration(config)


# name -> (build the HF model, run it)
CASES: dict[str, tuple[Callable[[], tf.PreTrainedModel], Callable]] = {
    "clip": (_clip_model, _run_clip),
    "clip_vision": (lambda: tf.CLIPVisionModel(tf.CLIPVisionConfig(**VISION, hidden_act="quick_gelu")), _run_clip_vision),
    "clip_vision_proj": (
        lambda: tf.CLIPVisionModelWithProjection(tf.CLIPVisionConfig(**VISION, hidden_act="gelu", projection_dim=24)),
        _run_clip_vision_proj,
    ),
    "siglip": (lambda: tf.SiglipModel(tf.SiglipConfig(vision_config=VISION, text_config=TEXT)), _run_siglip),
    "siglip_vision": (lambda: tf.SiglipVisionModel(tf.SiglipVisionConfig(**VISION)), _run_siglip_vision),
    "vit_pooler": (lambda: tf.ViTModel(tf.ViTConfig(**VISION, pooler_output_size=24)), _run_vit),
    "vit_no_pooler": (lambda: tf.ViTModel(tf.ViTConfig(**VISION, qkv_bias=False), add_pooling_layer=False), _run_vit),
    "dinov2": (lambda: tf.Dinov2Model(tf.Dinov2Config(**DINO)), _run_dinov2),
    "dinov2_swiglu": (lambda: tf.Dinov2Model(tf.Dinov2Config(**DINO, use_swiglu_ffn=True)), _run_dinov2),
    "dinov2_registers": (
        lambda: tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(**DINO, num_register_tokens=3)),
        _run_dinov2,
    ),
    "llava_clip": (_llava_model, _run_llava),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def loaded(request, tmp_path_factory):
    """(case name, HF model, runner, our encoder loaded from its save_pretrained dir)."""
    build, run = CASES[request.param]
    torch.manual_seed(0)
    model = perturb(build())
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    return request.param, model, run, load_encoder(directory)


def _close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs HF {tuple(ref.shape)}"
    diff = (ours - ref).abs().max().item()
    assert diff <= TOL, f"{what}: max abs diff {diff:.3g} > {TOL}"


# (H, W): the native size, and a larger non-square one through interpolate_pos_encoding.
@pytest.mark.parametrize("size", [(32, 32), (48, 64)], ids=["native", "interpolated"])
def test_every_layer_pooled_and_embeds_match_hf(loaded, size):
    name, model, run, encoder = loaded
    torch.manual_seed(0)
    px = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref = run(model, px, size != (32, 32))
        out = encoder(px, layers="all")
        normed = encoder(px, layers=(-1,), norm=True)
        embeds = encoder.image_embeds(px)
    assert len(ref.hidden_states) == encoder.num_blocks + 1
    grid = (size[0] // 8, size[1] // 8)
    assert out.grid_size == grid
    prefix = encoder.num_prefix_tokens
    for i in range(encoder.num_blocks):
        hf = ref.hidden_states[i + 1]  # (B, T, D)
        _close(out.patches(i), hf[:, prefix:], f"{name} layer {i} patches")
        _close(out.tokens(i), hf, f"{name} layer {i} all tokens")
        if encoder.cls_token is not None:
            _close(out.cls(i), hf[:, 0], f"{name} layer {i} CLS")
    if ref.last_hidden_state is not None:
        _close(normed.tokens(-1), ref.last_hidden_state, f"{name} final-normed tokens")
    _close(out.pooled, ref.pooled, f"{name} pooled")
    _close(embeds, ref.embeds, f"{name} image embeds")


def test_configs_match_hf_families(loaded):
    name, model, _, encoder = loaded
    c = encoder.config
    assert c.depth == 2 and c.width == 32 and c.num_heads == 4 and c.patch_size == 8
    # HF interpolates without antialiasing except in Dinov2WithRegistersModel.
    assert c.pos_resample_antialias == (name == "dinov2_registers")
    expected = {
        "clip": dict(act="quick_gelu", norm_pre=True, patch_bias=False, embed_dim=16, pool="cls"),
        "clip_vision": dict(act="quick_gelu", norm_pre=True, embed_dim=None),
        "clip_vision_proj": dict(act="gelu", embed_dim=24, proj_bias=False),
        "siglip": dict(act="gelu_tanh", class_token=False, pool="map", embed_dim=None),
        "siglip_vision": dict(act="gelu_tanh", class_token=False, pool="map"),
        "vit_pooler": dict(act="gelu", embed_dim=24, proj_bias=True, proj_act="tanh", norm_eps=1e-12),
        "vit_no_pooler": dict(embed_dim=None, qkv_bias=False),
        "dinov2": dict(layer_scale_init=0.5, mlp_type="mlp", mlp_dim=128, num_register_tokens=0),
        "dinov2_swiglu": dict(mlp_type="swiglu", mlp_dim=88),  # (int(128 * 2 / 3) + 7) // 8 * 8
        "dinov2_registers": dict(num_register_tokens=3),
        "llava_clip": dict(act="quick_gelu", norm_pre=True, embed_dim=None),
    }[name]
    for field, value in expected.items():
        assert getattr(c, field) == value, f"{name}: {field}={getattr(c, field)!r}, expected {value!r}"
    assert encoder.source_info["model_type"] == model.config.model_type
