"""ContrastiveModel -> HF CLIPModel -> ContrastiveModel: bitwise weights, equal embeddings
and logits; what a CLIPModel cannot hold is refused by name."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from vlm_encoder import ContrastiveModel, VisionConfig, VisionEncoder
from vlm_encoder.converters.hf_clip_text import load_contrastive
from vlm_encoder.export import ExportError, save_hf_clip_model, to_hf_clip_model
from vlm_encoder.text import TextConfig, TextEncoder

VISION = dict(image_size=(32, 32), patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64, norm_eps=1e-5,
              patch_bias=False, norm_pre=True)
TEXT = dict(context_length=12, width=32, depth=2, num_heads=2, act="quick_gelu")


def _model(vision=None, **kwargs) -> ContrastiveModel:
    torch.manual_seed(0)
    model = ContrastiveModel(VisionEncoder(VisionConfig(**{**VISION, **(vision or {})})),
                             TextEncoder(TextConfig(**TEXT)), 16, **kwargs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "logit_scale":
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _inputs():
    torch.manual_seed(1)
    ids = torch.randint(1, 1000, (3, 12))
    ids[:, 0] = 49406
    ids[0, 5], ids[1, 11], ids[2, 3] = 49407, 49407, 49407  # the end token, then padding after it
    ids[0, 6:], ids[2, 4:] = 0, 0
    return torch.randn(3, 3, 32, 32), ids


def _compare(ours: ContrastiveModel, theirs: tf.CLIPModel) -> None:
    pixels, ids = _inputs()
    with torch.no_grad():
        got = theirs(input_ids=ids, pixel_values=pixels)
        want = ours(pixels, ids)
    torch.testing.assert_close(got.image_embeds, want.image_embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.text_embeds, want.text_embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.logits_per_image, want.logits_per_image(), rtol=0, atol=1e-4)


def test_round_trip_bitwise_and_outputs(tmp_path):
    ours = _model()
    save_hf_clip_model(ours, tmp_path / "clip")
    _compare(ours, tf.CLIPModel.from_pretrained(tmp_path / "clip").eval())
    back = load_contrastive(tmp_path / "clip")
    want = ours.state_dict()
    assert back.state_dict().keys() == want.keys()
    for key, value in back.state_dict().items():
        assert torch.equal(value, want[key]), key


def test_tower_projection_with_identity_head_exports():
    """An open_clip model loaded here: the tower projects, `image_proj` is the identity."""
    ours = _model(vision=dict(embed_dim=16))
    with torch.no_grad():
        ours.image_proj.weight.copy_(torch.eye(16))
    _compare(ours, to_hf_clip_model(ours))


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (dict(objective="siglip"), "objective='siglip'"),
        (dict(vision=dict(embed_dim=16)), "vision.embed_dim=16"),
        (dict(vision=dict(class_token=False, pool="gap")), "class_token=False"),
    ],
)
def test_refuses_what_does_not_fit(change, named):
    with pytest.raises(ExportError, match=named):
        to_hf_clip_model(_model(**change))
