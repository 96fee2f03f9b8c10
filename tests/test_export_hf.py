"""Export to transformers: ours -> HF directory -> ours is bitwise, and the HF model's
hidden states / pooled output equal ours. Options a format cannot hold are refused by name."""

from __future__ import annotations

import pytest
import torch

from vlm_encoder import load_encoder
from vlm_encoder.config import VisionConfig
from vlm_encoder.encoder import VisionEncoder
from vlm_encoder.export import ExportError, save_hf_vision_model, to_hf_vision_model

TINY = dict(image_size=(32, 32), patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64, norm_eps=1e-5)
CASES = {
    "clip": dict(family="clip", config=dict(patch_bias=False, norm_pre=True, act="quick_gelu")),
    "clip_projection": dict(family="clip", config=dict(patch_bias=False, norm_pre=True, embed_dim=16)),
    "siglip": dict(family="siglip", config=dict(class_token=False, pool="map", act="gelu_tanh")),
    "siglip_nohead": dict(family="siglip", config=dict(class_token=False, pool="none")),
    "dinov2": dict(family="dinov2", config=dict(layer_scale_init=0.5)),
    "dinov2_registers_swiglu": dict(
        family="dinov2", config=dict(layer_scale_init=0.5, num_register_tokens=2, mlp_type="swiglu", act="gelu")
    ),
}


def _randomised(config: dict) -> VisionEncoder:
    torch.manual_seed(0)
    encoder = VisionEncoder(VisionConfig(**{**TINY, **config}))
    with torch.no_grad():  # LayerNorms and zero-initialised tensors random too, so nothing hides
        for p in encoder.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return encoder.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_and_outputs(case, tmp_path):
    family, config = CASES[case]["family"], CASES[case]["config"]
    ours = _randomised(config)
    save_hf_vision_model(ours, tmp_path / "hf", family)

    back = load_encoder(tmp_path / "hf")  # through the family's converter, as any HF checkpoint
    want = ours.state_dict()
    assert back.state_dict().keys() == want.keys()
    for key, value in back.state_dict().items():
        assert torch.equal(value, want[key]), key

    import transformers

    theirs = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = theirs(pixel_values=pixels, output_hidden_states=True)
        mine = ours(pixels, layers="all")
        for i in range(ours.num_blocks):  # layer i is HF's hidden_states[i + 1]
            torch.testing.assert_close(got.hidden_states[i + 1], mine.tokens(i), rtol=0, atol=1e-5)
        if ours.config.pool != "none":
            torch.testing.assert_close(got.pooler_output, mine.pooled, rtol=0, atol=1e-5)
        if ours.config.embed_dim is not None:
            projected = transformers.CLIPVisionModelWithProjection.from_pretrained(tmp_path / "hf").eval()
            torch.testing.assert_close(
                projected(pixel_values=pixels).image_embeds, ours.image_embeds(pixels), rtol=0, atol=1e-5
            )


@pytest.mark.parametrize(
    ("family", "config", "named"),
    [
        ("clip", dict(class_token=False, pool="gap"), "class_token=False"),
        ("clip", dict(patch_bias=True, norm_pre=True), "patch_bias=True"),
        ("siglip", dict(), "class_token=True"),
        ("dinov2", dict(), "layer_scale_init=None"),
        ("dinov2", dict(layer_scale_init=1.0, image_size=(32, 48)), "image_size=(32, 48)"),
        ("siglip", dict(class_token=False, pool="map", qk_norm=True), "qk_norm=True"),
    ],
)
def test_refuses_what_does_not_fit(family, config, named):
    encoder = VisionEncoder(VisionConfig(**{**TINY, **config}))
    with pytest.raises(ExportError, match=named.replace("(", r"\(").replace(")", r"\)")):
        to_hf_vision_model(encoder, family)
