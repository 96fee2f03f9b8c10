"""ContrastiveModel -> open_clip CLIP (config + state dict) -> ContrastiveModel: bitwise
weights, open_clip's embeddings and logits equal ours; what open_clip cannot hold is refused
by name."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from vlm_encoder import ContrastiveModel, VisionConfig, VisionEncoder
from vlm_encoder.export import ExportError
from vlm_encoder.export.open_clip import open_clip_model_config, open_clip_state_dict
from vlm_encoder.text import TextConfig, TextEncoder

open_clip = pytest.importorskip("open_clip")

VISION = dict(image_size=(32, 32), patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64, norm_eps=1e-5,
              patch_bias=False, norm_pre=True, act="quick_gelu")
TEXT = dict(context_length=12, width=32, depth=2, num_heads=2, act="quick_gelu")


def _model(vision=None, text=None, **kwargs) -> ContrastiveModel:
    torch.manual_seed(0)
    model = ContrastiveModel(VisionEncoder(VisionConfig(**{**VISION, **(vision or {})})),
                             TextEncoder(TextConfig(**{**TEXT, **(text or {})})), 16, **kwargs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "logit_scale":
                p.add_(torch.randn_like(p) * 0.1)
        if model.vision.proj is not None:
            model.image_proj.weight.copy_(torch.eye(16))
    return model.eval()


def _register(model, tmp_path, name):
    (tmp_path / f"{name}.json").write_text(json.dumps(open_clip_model_config(model)))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    theirs = open_clip.create_model(name, pretrained=None)
    theirs.load_state_dict(open_clip_state_dict(model), strict=True)
    return theirs.eval()


@pytest.mark.parametrize("tower_projection", [True, False], ids=["tower_proj", "head_proj"])
def test_outputs_equal(tower_projection, tmp_path):
    ours = _model(vision=dict(embed_dim=16) if tower_projection else None)
    theirs = _register(ours, tmp_path, f"vlmenc-export-{int(tower_projection)}")
    torch.manual_seed(1)
    pixels = torch.randn(3, 3, 32, 32)
    ids = torch.randint(1, 1000, (3, 12))
    ids[:, 0] = 49406
    ids[0, 5], ids[1, 11], ids[2, 3] = 49407, 49407, 49407
    ids[0, 6:], ids[2, 4:] = 0, 0
    with torch.no_grad():
        want = ours(pixels, ids)
        image = theirs.encode_image(pixels, normalize=True)
        text = theirs.encode_text(ids, normalize=True)
    torch.testing.assert_close(image, want.image_embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(text, want.text_embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(theirs.logit_scale.exp(), want.logit_scale, rtol=0, atol=1e-5)


def test_round_trip_bitwise(tmp_path):
    ours = _model(vision=dict(embed_dim=16))  # the form from_open_clip gives: tower projection, identity head
    _register(ours, tmp_path, "vlmenc-export-rt")
    save_file(open_clip_state_dict(ours), str(tmp_path / "oc.safetensors"))
    back = ContrastiveModel.from_open_clip("vlmenc-export-rt", str(tmp_path / "oc.safetensors"))
    want = ours.state_dict()
    assert back.state_dict().keys() == want.keys()
    for key, value in back.state_dict().items():
        assert torch.equal(value, want[key]), key


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (dict(objective="siglip"), "objective='siglip'"),
        (dict(text=dict(act="gelu")), "one quick_gelu flag"),
        (dict(vision=dict(class_token=False, pool="map")), "pool_type='map'"),
        (dict(vision=dict(patch_bias=True)), "patch_bias=True"),
    ],
)
def test_refuses_what_does_not_fit(change, named):
    with pytest.raises(ExportError, match=named):
        open_clip_state_dict(_model(**change))
