"""ContrastiveModel: shapes, logit scale / bias, precision, save/load, LiT freezing."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vlm_encoder import VisionConfig, VisionEncoder
from vlm_encoder.contrastive import ClipLoss, ContrastiveConfig, ContrastiveModel, SigLipLoss
from vlm_encoder.text import HFTextConfig, HFTextEncoder, TextConfig, TextEncoder

VISION_VARIANTS = {
    "cls": dict(),
    "map_with_proj": dict(class_token=False, pool="map", act="gelu_tanh", embed_dim=24),
}


def build(objective="clip", vision="cls", **kwargs) -> ContrastiveModel:
    vision_config = VisionConfig(
        **{**dict(image_size=32, patch_size=8, width=32, depth=2, num_heads=4), **VISION_VARIANTS[vision]}
    )
    text_config = TextConfig(context_length=16, width=48, depth=2, num_heads=4)
    return ContrastiveModel(VisionEncoder(vision_config), TextEncoder(text_config), 16, objective=objective, **kwargs)


def batch(model: ContrastiveModel, n: int = 3):
    captions = ["a cat", "two dogs on a mat", "", "a photo"][:n]
    tokens = model.text.tokenizer()(captions)
    return torch.randn(n, 3, 32, 32), tokens.input_ids, tokens.attention_mask


@pytest.mark.parametrize("vision", list(VISION_VARIANTS))
@pytest.mark.parametrize("objective", ["clip", "siglip"])
def test_shapes_norms_and_initial_scale(objective, vision):
    model = build(objective, vision).eval()
    out = model(*batch(model))
    assert out.image_embeds.shape == out.text_embeds.shape == (3, 16)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.text_embeds.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(model.encode_image(batch(model)[0][:1]).norm(), torch.tensor(1.0))
    if objective == "clip":
        assert out.logit_bias is None
        torch.testing.assert_close(out.logit_scale, torch.tensor(1 / 0.07))
    else:
        torch.testing.assert_close(out.logit_scale, torch.tensor(10.0))
        torch.testing.assert_close(out.logit_bias, torch.tensor(-10.0), rtol=0, atol=0)
    assert out.logits_per_image().shape == (3, 3)


def test_logit_scale_is_clamped_at_ln_100_however_far_pushed():
    model = build()
    with torch.no_grad():
        model.logit_scale.fill_(50.0)
    out = model(*batch(model))
    torch.testing.assert_close(out.logit_scale, torch.tensor(100.0))
    ClipLoss()(out.image_embeds, out.text_embeds, out.logit_scale).backward()
    assert model.logit_scale.grad.item() == 0.0  # nothing pushes it further
    with torch.no_grad():
        model.logit_scale.fill_(math.log(20.0))
    assert model(*batch(model)).logit_scale.item() == pytest.approx(20.0)
    with pytest.raises(ValueError, match="max_logit_scale"):
        build(init_logit_scale=5.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("objective", ["clip", "siglip"])
def test_half_precision_logits_are_finite(dtype, objective):
    model = build(objective).to(dtype).eval()
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # pushed past the clamp
        model.image_proj.weight.mul_(1e3)  # large features must not overflow the normalisation
    pixels, ids, mask = batch(model)
    out = model(pixels.to(dtype), ids, mask)
    assert out.image_embeds.dtype == dtype
    logits = out.logits_per_image()
    assert torch.isfinite(logits).all() and logits.abs().max() <= 100.5
    loss = model.build_loss()(out.image_embeds, out.text_embeds, out.logit_scale, out.logit_bias)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("objective", ["clip", "siglip"])
def test_build_loss_and_backward(objective):
    model = build(objective).train()
    loss_fn = model.build_loss(chunk_size=2)
    assert isinstance(loss_fn, SigLipLoss if objective == "siglip" else ClipLoss)
    out = model(*batch(model))
    loss_fn(out.image_embeds, out.text_embeds, out.logit_scale, out.logit_bias).backward()
    assert model.logit_scale.grad is not None and model.text.token_embed.weight.grad is not None
    assert model.vision.patch_embed.proj.weight.grad is not None


@pytest.mark.parametrize("vision", list(VISION_VARIANTS))
@pytest.mark.parametrize("objective", ["clip", "siglip"])
def test_save_and_load_round_trip(tmp_path, objective, vision):
    model = build(objective, vision).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    model.save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["model_type"] == "vlm_encoder.contrastive"
    assert config["vision"]["width"] == 32 and config["text"]["tower"] == "clip" and config["text"]["width"] == 48
    loaded = ContrastiveModel.from_pretrained(tmp_path / "model")
    assert loaded.config == model.config
    inputs = batch(model)
    a, b = model(*inputs), loaded(*inputs)
    for name in ("image_embeds", "text_embeds", "logit_scale"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=0, atol=0)
    assert (a.logit_bias is None) == (b.logit_bias is None)


def test_config_round_trip_and_errors():
    model = build("siglip")
    config = model.config
    assert ContrastiveConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.init_logit_bias == -10.0 and config.init_logit_scale == pytest.approx(math.log(10))
    with pytest.raises(ValueError, match="objective"):
        build("infonce")
    with pytest.raises(ValueError, match="pool"):
        ContrastiveModel(VisionEncoder(VisionConfig(image_size=32, patch_size=8, width=32, depth=1, num_heads=4,
                                                    pool="none")), model.text, 16)
    with pytest.raises(ValueError, match="one caption per image"):
        pixels, ids, _ = batch(model)
        model(pixels, ids[:2])
    with pytest.raises(ValueError, match="tower"):
        ContrastiveConfig.from_dict({**config.to_dict(), "text": {"tower": "gpt", "width": 4}})


@pytest.mark.parametrize("include_projection", [False, True])
def test_lit_freezing_leaves_vision_weights_bitwise_unchanged(include_projection):
    model = build()
    model.freeze_vision(include_projection=include_projection)
    model.train()
    assert not model.vision.training and model.text.training
    vision_before = {k: v.clone() for k, v in model.vision.state_dict().items()}
    proj_before = model.image_proj.weight.detach().clone()
    text_before = model.text.token_embed.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    out = model(*batch(model))
    model.build_loss()(out.image_embeds, out.text_embeds, out.logit_scale, out.logit_bias).backward()
    optimizer.step()
    for name, value in model.vision.state_dict().items():
        assert torch.equal(value, vision_before[name]), f"vision weight {name} changed"
    assert torch.equal(model.image_proj.weight, proj_before) == include_projection
    assert not torch.equal(model.text.token_embed.weight, text_before)
    model.freeze_vision(False)
    assert all(p.requires_grad for p in model.vision.parameters()) and model.vision.training


def test_grad_checkpointing_passes_through():
    model = build().train()
    model.set_grad_checkpointing(True)
    assert model.vision.grad_checkpointing and model.text.grad_checkpointing
    out = model(*batch(model))
    ClipLoss()(out.image_embeds, out.text_embeds, out.logit_scale).backward()
    assert model.vision.blocks[0].attn.qkv.weight.grad is not None


def test_hf_text_tower_round_trip(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizer

    words = ["a", "cat", "dog", "on", "the", "mat"]
    hf_dir = tmp_path / "bert"
    hf_dir.mkdir()
    (hf_dir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizer(str(hf_dir / "vocab.txt")).save_pretrained(str(hf_dir))
    BertModel(BertConfig(vocab_size=11, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=32)).save_pretrained(str(hf_dir))
    vision = VisionEncoder(VisionConfig(image_size=32, patch_size=8, width=32, depth=1, num_heads=4))
    text = HFTextEncoder(HFTextConfig(str(hf_dir), pooling="mean", context_length=8))
    model = ContrastiveModel(vision, text, 16).eval()
    tokens = text.tokenizer()(["a cat on the mat", "a dog"])
    pixels = torch.randn(2, 3, 32, 32)
    model.save_pretrained(tmp_path / "model")
    loaded = ContrastiveModel.from_pretrained(tmp_path / "model")
    torch.testing.assert_close(
        loaded(pixels, tokens.input_ids, tokens.attention_mask).text_embeds,
        model(pixels, tokens.input_ids, tokens.attention_mask).text_embeds,
        rtol=0, atol=0,
    )
