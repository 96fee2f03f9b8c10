"""The HF converters' key tables are applied strictly: on a tiny random checkpoint of every
family, an unknown key, a missing key, a gap in the block numbering or two keys feeding one
of ours is a `WeightsError` naming the key; nothing is guessed or patched.

A dropped key is named as in the checkpoint by the walker, or, for a renamed module that is
still there without one of its tensors, as the key it feeds by the strict load."""

from __future__ import annotations

import re

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from vlm_encoder import VisionEncoder
from vlm_encoder.converters import hf_clip, hf_dinov2, hf_siglip, hf_siglip2, hf_vit
from vlm_encoder.weights import WeightsError, load_state_dict_strict

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
VISION = dict(TINY, intermediate_size=64, image_size=16, patch_size=8)
TEXT = dict(TINY, intermediate_size=64, num_hidden_layers=1, vocab_size=99)
DINO = dict(TINY, image_size=16, patch_size=8)
SIGLIP2 = dict(TINY, intermediate_size=64, patch_size=4, num_patches=16)

# name -> (converter, HF model, `config_from_hf` options, the block prefix)
CASES = {
    "clip": (
        hf_clip,
        lambda: tf.CLIPModel(tf.CLIPConfig(vision_config=VISION, text_config=TEXT)),
        {},
        "encoder.layers.",
    ),
    "siglip": (hf_siglip, lambda: tf.SiglipVisionModel(tf.SiglipVisionConfig(**VISION)), {}, "encoder.layers."),
    "siglip2": (
        hf_siglip2,
        lambda: tf.Siglip2VisionModel(tf.Siglip2VisionConfig(**SIGLIP2)),
        {},
        "encoder.layers.",
    ),
    "vit": (hf_vit, lambda: tf.ViTModel(tf.ViTConfig(**VISION)), {"pooler": True}, "encoder.layer."),
    "vit_no_qkv_bias": (
        hf_vit,
        lambda: tf.ViTModel(tf.ViTConfig(**VISION, qkv_bias=False), add_pooling_layer=False),
        {},
        "encoder.layer.",
    ),
    "dinov2_swiglu": (
        hf_dinov2,
        lambda: tf.Dinov2Model(tf.Dinov2Config(**DINO, use_swiglu_ffn=True)),
        {},
        "encoder.layer.",
    ),
    "dinov2_registers": (
        hf_dinov2,
        lambda: tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(**DINO, num_register_tokens=2)),
        {},
        "encoder.layer.",
    ),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """(converter, the checkpoint as saved, a `VisionEncoder` of its config, the block prefix)."""
    module, build, options, blocks = CASES[request.param]
    model = build()
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)  # the names on disk (transformers 5 renames some in memory)
    encoder = VisionEncoder(module.config_from_hf(model.config.to_dict(), **options))
    return module, load_file(str(directory / "model.safetensors")), encoder, blocks


def load(module, state, encoder):
    load_state_dict_strict(encoder, module.convert_state_dict(state))


def test_the_tiny_checkpoint_loads(case):
    module, state, encoder, _ = case
    load(module, state, encoder)


@pytest.mark.parametrize("extra", ["surprise", "{b}0.extra.weight", "{b}1.mlp.fc3.bias", "embeddings.more"])
def test_an_unknown_key_is_named(case, extra):
    module, state, encoder, blocks = case
    key = extra.format(b=blocks)
    with pytest.raises(WeightsError, match=f"does not know: .*{re.escape(key)}"):
        load(module, {**state, key: torch.zeros(1)}, encoder)


def test_every_missing_key_is_named(case):
    module, state, encoder, _ = case
    full = module.convert_state_dict(state)
    unnamed = []
    for key in sorted(state):
        if key.startswith(module.IGNORED_PREFIXES) or key.endswith(("position_ids", "mask_token")):
            continue  # what the family ignores on purpose
        try:
            converted = module.convert_state_dict({k: v for k, v in state.items() if k != key})
        except WeightsError as err:  # the walker: named as in the checkpoint (tower prefix removed)
            text, names = str(err), [key.removeprefix("vision_model.")]
        else:  # a renamed module without one of its tensors: the strict load names what it feeds
            with pytest.raises(WeightsError) as err:
                load_state_dict_strict(encoder, converted)
            text, names = str(err.value), sorted(set(full) - set(converted))
        if not names or not all(name in text for name in names):
            unnamed.append((key, text))
    assert not unnamed, unnamed


def test_blocks_must_be_numbered_from_zero(case):
    module, state, encoder, blocks = case
    moved = {k.replace(f"{blocks}1.", f"{blocks}5.", 1): v for k, v in state.items()}
    with pytest.raises(WeightsError, match=r"not numbered 0\.\.n-1: \[0, 5\]"):
        load(module, moved, encoder)


def test_two_keys_for_one_of_ours_is_an_error(tmp_path):
    """DINOv2's plain and SwiGLU MLP names both feed `mlp.fc1`: a checkpoint with both is refused."""
    tf.Dinov2Model(tf.Dinov2Config(**DINO, use_swiglu_ffn=True)).save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["encoder.layer.0.mlp.fc1.weight"] = state["encoder.layer.0.mlp.weights_in.weight"]
    with pytest.raises(WeightsError, match="maps two keys to 'blocks.0.mlp.fc1.weight'"):
        hf_dinov2.convert_state_dict(state)
