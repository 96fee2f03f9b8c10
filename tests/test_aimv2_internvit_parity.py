"""Parity of the AIMv2 and InternViT towers with transformers on tiny random models (float32, 1e-5).

Each reference is saved with `save_pretrained` and read back by `load_encoder(dir)`; every
layer's tokens are checked against `hidden_states[i + 1]` (HF: `[embeddings, block 0, ...]`),
the pooled output against AIMv2's `pooler_output` (its attention-pooling head) or InternViT's
documented pooling (mean of the patch tokens, or the final-normed CLS token), at the native
size and, where the reference allows another, at 48 x 24 (AIMv2's learned table is fixed-size
in HF, so that case is native only). Then the strict key tables, the `aimv2` and `internvl`
wrappers, and `extract` on a saved tower.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vlm_encoder import WeightsError, load_encoder  # noqa: E402
from vlm_encoder.cli import main  # noqa: E402
from parity_helpers import close, perturb  # noqa: E402

NATIVE, OTHER = (32, 32), (48, 24)  # a 4 x 4 grid of 8-pixel patches, then 6 x 3
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)




# ------------------------------------------------------------------------ AIMv2
AIMV2_CASES = {
    "learned_head": dict(is_native=False, use_head=True),
    "native_sincos_head": dict(is_native=True, use_head=True),
    "native_no_head_biases": dict(is_native=True, use_head=False, qkv_bias=True, mlp_bias=True),
}


def _aimv2(case: str, directory) -> torch.nn.Module:
    from transformers import Aimv2VisionConfig, Aimv2VisionModel

    torch.manual_seed(0)
    model = perturb(Aimv2VisionModel(Aimv2VisionConfig(**TINY, **AIMV2_CASES[case])))
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module", params=sorted(AIMV2_CASES))
def aimv2_loaded(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp("aimv2") / request.param
    model = _aimv2(request.param, directory)
    return request.param, model, load_encoder(str(directory)), directory


@pytest.mark.parametrize("size", [NATIVE, OTHER])
def test_aimv2_every_layer(aimv2_loaded, size):
    case, model, encoder, _ = aimv2_loaded
    c = encoder.config
    assert (c.norm_type, c.patch_norm, c.class_token, c.mlp_type) == ("rmsnorm", True, False, "swiglu")
    if size != NATIVE and c.pos_embed == "learned":
        pytest.skip("HF AIMv2 never resamples its learned table: native size only")
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref = model(x, output_hidden_states=True)
        out = encoder(x, layers="all")
        normed = encoder(x, layers=(-1,), norm=True)
    assert out.grid_size == (size[0] // 8, size[1] // 8) and out.cls_tokens is None
    for i in range(c.depth):
        close(f"aimv2/{case}", out.patches(i), ref.hidden_states[i + 1], f"tokens of layer {i}")
    close(f"aimv2/{case}", normed.patches(-1), ref.last_hidden_state, "final RMSNorm")
    if model.config.use_head:
        close(f"aimv2/{case}", out.pooled, ref.pooler_output, "attention-pooling head")
    else:
        assert out.pooled is None


def test_aimv2_patch_norm_is_seen(aimv2_loaded):
    """A control: without the RMSNorm after the patch convolution, layer 0 no longer matches."""
    from vlm_encoder import VisionEncoder

    _, model, encoder, _ = aimv2_loaded
    other = VisionEncoder(encoder.config.replace(patch_norm=False))
    other.load_state_dict({k: v for k, v in encoder.state_dict().items() if not k.startswith("patch_norm.")})
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert (other.eval()(x, layers=(0,)).patches(0) - model(x, output_hidden_states=True).hidden_states[1]).abs().max() > 1e-3


def test_aimv2_strict_keys(aimv2_loaded):
    from vlm_encoder.converters import hf_aimv2

    _, model, _, _ = aimv2_loaded
    state = dict(model.state_dict())
    with pytest.raises(WeightsError, match="does not know.*layers.0.attention.extra"):
        hf_aimv2.convert_state_dict({**state, "encoder.layers.0.attention.extra.weight": torch.zeros(1)})
    del state["encoder.layers.1.rms_norm2.weight"]
    with pytest.raises(WeightsError, match="layers.1.rms_norm2"):
        hf_aimv2.convert_state_dict(state)


def test_aimv2_clip_style_model_gives_its_image_tower(tmp_path):
    """A whole `Aimv2Model` directory: the vision tower, its head and `visual_projection`
    (`image_embeds` = `get_image_features`); the text tower is ignored."""
    from transformers import Aimv2Config, Aimv2Model

    torch.manual_seed(0)
    config = Aimv2Config(
        vision_config=dict(TINY, is_native=True),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99),
        projection_dim=16,
    )
    model = perturb(Aimv2Model(config))
    model.save_pretrained(tmp_path)
    encoder = load_encoder(str(tmp_path))
    assert encoder.config.embed_dim == 16 and encoder.source_info["family"] == "aimv2"
    x = torch.randn(2, 3, *OTHER)
    with torch.no_grad():
        ref = model.vision_model(x, output_hidden_states=True)
        embeds = model.get_image_features(pixel_values=x)
        embeds = getattr(embeds, "pooler_output", embeds)
        out = encoder(x, layers="all")
        close("aimv2/model", out.patches(1), ref.hidden_states[2], "last layer")
        close("aimv2/model", encoder.image_embeds(x), embeds, "image_embeds")


# ------------------------------------------------------------------------ InternViT
INTERNVIT_CASES = {
    "layernorm_mean": dict(),  # InternViT-300M: LayerNorm, no qk-norm, mean pooling
    "rmsnorm_qknorm": dict(norm_type="rms_norm", use_qk_norm=True),  # InternViT-6B
    "cls_bias": dict(use_mean_pooling=False, attention_bias=True, hidden_act="gelu_pytorch_tanh"),
}


def _internvit(case: str, directory) -> torch.nn.Module:
    from transformers import InternVLVisionConfig, InternVLVisionModel

    torch.manual_seed(0)
    model = perturb(InternVLVisionModel(InternVLVisionConfig(**TINY, layer_scale_init_value=0.5, **INTERNVIT_CASES[case])))
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module", params=sorted(INTERNVIT_CASES))
def internvit_loaded(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp("internvit") / request.param
    model = _internvit(request.param, directory)
    return request.param, model, load_encoder(str(directory)), directory


@pytest.mark.parametrize("size", [NATIVE, OTHER])
def test_internvit_every_layer(internvit_loaded, size):
    case, model, encoder, _ = internvit_loaded
    c = encoder.config
    hf = model.config
    assert (c.qk_norm, c.norm_type, c.pool) == (
        hf.use_qk_norm, "rmsnorm" if hf.norm_type == "rms_norm" else "layernorm", "gap" if hf.use_mean_pooling else "cls"
    )
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref = model(x, output_hidden_states=True)
        out = encoder(x, layers="all")
    assert out.grid_size == (size[0] // 8, size[1] // 8)
    for i in range(c.depth):
        hidden = ref.hidden_states[i + 1]
        close(f"internvit/{case}", out.patches(i), hidden[:, 1:], f"patches of layer {i}")
        close(f"internvit/{case}", out.cls(i), hidden[:, 0], f"CLS of layer {i}")
    last = ref.last_hidden_state  # after the final LayerNorm, or the last block's tokens (mean pooling)
    pooled = last[:, 1:].mean(dim=1) if hf.use_mean_pooling else last[:, 0]
    close(f"internvit/{case}", out.pooled, pooled, "pooled")


def test_internvit_qk_norm_is_seen():
    """A control: qk-norm over each head instead of the whole width no longer matches."""
    from vlm_encoder import VisionEncoder
    from vlm_encoder.converters import hf_internvit

    from transformers import InternVLVisionConfig, InternVLVisionModel

    torch.manual_seed(0)
    model = perturb(InternVLVisionModel(InternVLVisionConfig(**TINY, **INTERNVIT_CASES["rmsnorm_qknorm"])))
    state = hf_internvit.convert_state_dict(model.state_dict())
    config = hf_internvit.config_from_hf(model.config.to_dict())
    other = VisionEncoder(config.replace(qk_norm_scope="head"))
    per_head = {k: (v.reshape(2, 16).mean(0) if k.endswith(("q_norm.weight", "k_norm.weight")) else v) for k, v in state.items()}
    other.load_state_dict(per_head)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x, output_hidden_states=True).hidden_states[1]
        assert (other.eval()(x, layers=(0,)).patches(0) - ref[:, 1:]).abs().max() > 1e-4


def test_internvit_strict_keys(internvit_loaded):
    from vlm_encoder.converters import hf_internvit

    _, model, _, _ = internvit_loaded
    state = dict(model.state_dict())
    with pytest.raises(WeightsError, match="does not know.*layer.0.attention.extra"):
        hf_internvit.convert_state_dict({**state, "encoder.layer.0.attention.extra.weight": torch.zeros(1)})
    del state["encoder.layer.1.lambda_2"]
    with pytest.raises(WeightsError, match="layer.1.lambda_2"):
        hf_internvit.convert_state_dict(state)


def test_internvit_unsupported_variants_are_refused():
    from vlm_encoder.converters import hf_internvit

    with pytest.raises(ValueError, match="use_qk_norm needs norm_type='rms_norm'"):
        hf_internvit.config_from_hf({"model_type": "internvl_vision", **TINY, "use_qk_norm": True})
    with pytest.raises(ValueError, match="use_mean_pooling=False with norm_type='rms_norm'"):
        hf_internvit.config_from_hf({"model_type": "internvl_vision", **TINY, "norm_type": "rms_norm", "use_mean_pooling": False})


def _tiny_internvl(directory) -> torch.nn.Module:
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    torch.manual_seed(0)
    config = InternVLConfig(
        vision_config=dict(TINY, layer_scale_init_value=0.5),
        text_config=dict(
            model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, vocab_size=151700,
        ),
        image_token_id=151667,
    )
    model = perturb(InternVLForConditionalGeneration(config))
    model.save_pretrained(directory)
    return model


def test_internvl_checkpoint_gives_its_tower(tmp_path):
    model = _tiny_internvl(tmp_path)
    encoder = load_encoder(str(tmp_path))
    assert encoder.source_info["family"] == "internvl" and encoder.source_info["vision_family"] == "internvl_vision"
    x = torch.randn(2, 3, *NATIVE)
    with torch.no_grad():
        ref = model.model.vision_tower(x, output_hidden_states=True)
        out = encoder(x, layers="all")
    for i in range(encoder.config.depth):
        close("internvit/internvl", out.patches(i), ref.hidden_states[i + 1][:, 1:], f"patches of layer {i}")


# ------------------------------------------------------------------------ CLI
def test_extract_on_saved_towers(tmp_path):
    from PIL import Image

    from vlm_encoder.extract import FeatureStore

    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (40 + 8 * i, 32), (60 * i, 90, 200)).save(images / f"img_{i}.png")
    for name, make, select in (("aimv2", _aimv2, "patch"), ("internvit", _internvit, "cls,patch")):
        directory = tmp_path / name
        make("native_sincos_head" if name == "aimv2" else "layernorm_mean", directory)
        out = tmp_path / f"store_{name}"
        assert main(["extract", "--model", str(directory), "--dataset", str(images), "--out", str(out), "--layers", "0", "-1",
                     "--select", select, "--no-progress", "--num-workers", "0"]) == 0
        store = FeatureStore(out)
        assert len(store) == 2 and store[-1, "patch"].shape[-1] == 32

