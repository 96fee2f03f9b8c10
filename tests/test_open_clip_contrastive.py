"""Whole open_clip CLIP models as a `ContrastiveModel`: the text tower (causal attention through
the kernel's `is_causal`, pooling at the end token), the image tower and the logit scale must
reproduce open_clip's own `encode_text`, `encode_image` and logits on tiny random models; text
towers of other forms are refused by name; a converted model trains through `init_model`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

open_clip = pytest.importorskip("open_clip")

from vlm_encoder import WeightsError  # noqa: E402
from vlm_encoder.contrastive import ContrastiveModel  # noqa: E402
from vlm_encoder.converters.open_clip_clip import (  # noqa: E402
    convert_text_state_dict,
    load_open_clip_contrastive,
    text_config_from_open_clip,
)
from vlm_encoder.converters.open_clip_vit import UnsupportedOpenClipModel  # noqa: E402
from vlm_encoder.text import ClipTokenizer  # noqa: E402

ATOL = 1e-5
TEXT = dict(context_length=16, vocab_size=49408, width=32, heads=4, layers=2)
VIT = dict(image_size=32, layers=2, width=64, head_width=16, patch_size=8)
ARCHS = {
    "vlmtest-CLIP": dict(embed_dim=24, vision_cfg=VIT, text_cfg=TEXT),
    "vlmtest-CLIP-quickgelu": dict(embed_dim=24, quick_gelu=True, vision_cfg=VIT, text_cfg=dict(TEXT, mlp_ratio=2.0)),
    "vlmtest-CLIP-siglip-text": dict(
        embed_dim=24, custom_text=True, vision_cfg=VIT,
        text_cfg=dict(TEXT, no_causal_mask=True, pool_type="last", proj_bias=True),
    ),
}
CAPTIONS = ["a photo of a cat", "two dogs", "", "a very long caption " * 6, "a red circle above a blue square"]


@pytest.fixture(scope="module", autouse=True)
def registered(tmp_path_factory):
    folder = tmp_path_factory.mktemp("open_clip_configs")
    for name, cfg in ARCHS.items():
        (folder / f"{name}.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(folder / f"{name}.json")


def perturbed_checkpoint(arch: str, folder) -> tuple[torch.nn.Module, str]:
    """open_clip's model with every tensor moved off its init (norms and biases included),
    saved as a full-model safetensors file."""
    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name == "logit_scale":
                param.fill_(3.3)
            else:
                param.add_(torch.randn_like(param) * 0.05)
    path = folder / f"{arch}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, str(path)


@pytest.mark.parametrize("arch", ["vlmtest-CLIP", "vlmtest-CLIP-quickgelu"])
def test_matches_open_clip_text_image_and_logits(arch, tmp_path):
    reference, path = perturbed_checkpoint(arch, tmp_path)
    ours = load_open_clip_contrastive(arch, checkpoint=path)
    assert isinstance(ours, ContrastiveModel) and not ours.training
    tokens = ClipTokenizer(TEXT["context_length"])(CAPTIONS)
    torch.testing.assert_close(tokens.input_ids, open_clip.tokenize(CAPTIONS, context_length=TEXT["context_length"]))
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want_text = reference.encode_text(tokens.input_ids)
        got_text = ours.encode_text(tokens.input_ids, tokens.attention_mask, normalize=False)
        want_image = reference.encode_image(pixels)
        got_image = ours.encode_image(pixels, normalize=False)
        want_logits, _ = reference.get_logits(pixels, tokens.input_ids)
        scale = ours.current_logit_scale()
        got_logits = scale * ours.encode_image(pixels) @ ours.encode_text(tokens.input_ids, tokens.attention_mask).T
    torch.testing.assert_close(got_text, want_text, atol=ATOL, rtol=0)
    torch.testing.assert_close(got_image, want_image, atol=ATOL, rtol=0)
    torch.testing.assert_close(scale, reference.logit_scale.exp(), atol=ATOL, rtol=0)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=0)


def test_padding_and_batch_do_not_change_a_caption(tmp_path):
    _, path = perturbed_checkpoint("vlmtest-CLIP", tmp_path)
    ours = load_open_clip_contrastive("vlmtest-CLIP", checkpoint=path)
    tokens = ClipTokenizer(TEXT["context_length"])(CAPTIONS)
    with torch.no_grad():
        batched = ours.encode_text(tokens.input_ids, tokens.attention_mask)
        alone = ours.encode_text(tokens.input_ids[:1], tokens.attention_mask[:1])
        short = ours.encode_text(tokens.input_ids[:1, :8], tokens.attention_mask[:1, :8])  # cut in the padding
    torch.testing.assert_close(alone[0], batched[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(short[0], batched[0], atol=1e-6, rtol=0)


def test_other_text_towers_are_refused_by_name(tmp_path):
    with pytest.raises(UnsupportedOpenClipModel, match=r"no_causal_mask=True.*pool_type='last'.*proj_bias=True"):
        load_open_clip_contrastive("vlmtest-CLIP-siglip-text", checkpoint=str(tmp_path / "never-read.safetensors"))
    with pytest.raises(UnsupportedOpenClipModel, match="Hugging Face model"):
        text_config_from_open_clip({"custom_text": True, "text_cfg": {"hf_model_name": "roberta-base"}})
    with pytest.raises(UnsupportedOpenClipModel, match=r"vocab_size=1000 \(supported: 49408\)"):
        text_config_from_open_clip({"text_cfg": dict(TEXT, vocab_size=1000)})


def test_unknown_text_keys_are_listed(tmp_path):
    reference, _ = perturbed_checkpoint("vlmtest-CLIP", tmp_path)
    state = dict(reference.state_dict())
    state["text_adapter.weight"] = torch.zeros(2)
    with pytest.raises(WeightsError, match="text_adapter.weight"):
        convert_text_state_dict(state)
    without_text = {k: v for k, v in state.items() if k.startswith("visual.")}
    with pytest.raises(WeightsError, match="no text tower"):
        convert_text_state_dict(without_text)


def test_converted_model_trains_and_saves(tmp_path):
    from vlm_encoder.train import TrainConfig, Trainer

    _, path = perturbed_checkpoint("vlmtest-CLIP", tmp_path)
    config = TrainConfig(
        data="builtin:shapes", data_options={"num_train": 12, "num_test": 6, "canvas": 32},
        init_model=f"open_clip:vlmtest-CLIP:{path}", output_dir=str(tmp_path / "run"),
        batch_size=6, max_steps=2, warmup_steps=1, eval_split="test", eval_batch_size=6, progress=False,
    )
    trainer = Trainer(config)
    assert trainer.parts.processor == trainer.model.vision.image_processor  # open_clip's preprocessing, not a default
    result = trainer.fit()
    assert result.step == 2 and not result.skipped_steps
    exported = ContrastiveModel.from_pretrained(tmp_path / "run" / "export" / "model")
    assert exported.vision.image_processor == trainer.parts.processor  # saved with the model


def test_info_of_an_unsupported_text_tower_describes_the_image_tower(tmp_path, capsys):
    """`info` (need="any") on an open_clip model whose text tower we cannot express loads its
    image tower and says why the text tower is missing; `eval` (need="contrastive") refuses."""
    from vlm_encoder.cli import main
    from vlm_encoder.specs.models import load_model

    _, path = perturbed_checkpoint("vlmtest-CLIP-siglip-text", tmp_path)
    spec = f"open_clip:vlmtest-CLIP-siglip-text:{path}"
    loaded = load_model(spec)
    assert loaded.kind == "encoder" and "not loaded" in loaded.info["text_tower"]
    assert loaded.vision.config.width == VIT["width"]
    with pytest.raises(UnsupportedOpenClipModel, match="text tower options not supported"):
        load_model(spec, need="contrastive")
    assert main(["info", spec, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "encoder"
