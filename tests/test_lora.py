"""LoRA through `peft`: adapters on the towers (`lora_r`, `lora_targets` in `TrainConfig`), only
they train, checkpoints resume exactly, and the export is a plain `ContrastiveModel` equal to the
adapted one; and on a `VisionLanguageModel`'s language model."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")

from test_train import _train, params, tiny_config, tiny_model  # noqa: E402
from test_vlm import IMAGE_ID, make_vlm, prompt  # noqa: E402
from train_helpers import run_killed_after  # noqa: E402

from vlm_encoder.contrastive import ContrastiveModel  # noqa: E402
from vlm_encoder.lora import apply_lora, apply_lora_to_language_model, lora_target_names, merge_lora  # noqa: E402
from vlm_encoder.train import TrainConfig  # noqa: E402

LORA = dict(lora_r=4, lora_targets=("qkv", "proj"), lr=5e-2)


def _embeddings(model: ContrastiveModel) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    tokens = model.text.tokenizer()(["a red square", "a blue circle", "two dots"])
    with torch.no_grad():
        return (model.encode_image(torch.randn(3, 3, 16, 16)),
                model.encode_text(tokens.input_ids, tokens.attention_mask))


def _nudge_adapters(model: torch.nn.Module) -> None:
    """peft starts lora_B at zero (the adapted model equals the base); move it off zero."""
    torch.manual_seed(2)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)


def test_only_adapters_train_and_merge_equals_adapted():
    model = tiny_model().eval()
    base = _embeddings(model)
    names = apply_lora(model, 4, ("qkv", "proj"))
    assert names == ["vision.blocks.0.attn.qkv", "vision.blocks.0.attn.proj", "text.blocks.0.attn.qkv", "text.blocks.0.attn.proj"]
    assert isinstance(model, ContrastiveModel)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 8 and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    _nudge_adapters(model)
    adapted = _embeddings(model)
    assert not torch.allclose(adapted[0], base[0], atol=1e-3)
    merged = merge_lora(model)
    assert merged.state_dict().keys() == tiny_model().state_dict().keys()  # plain keys: loads as a ContrastiveModel
    for got, want in zip(_embeddings(merged), adapted):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert any("lora_A" in n for n, _ in model.named_parameters())  # the original stays adapted


def test_targets_select_a_tower_and_bad_targets_are_errors():
    model = tiny_model()
    assert lora_target_names(model, (r"vision\..*qkv",)) == ["vision.blocks.0.attn.qkv"]
    with pytest.raises(ValueError, match="match no linear layer"):
        lora_target_names(model, ("q_proj",))
    with pytest.raises(ValueError, match="lora_targets is empty"):
        TrainConfig(lora_r=4, lora_targets=())


def test_lora_training_exports_the_merged_model(tmp_path):
    trainer, _ = _train(tiny_config(tmp_path, max_steps=3, **LORA))
    assert trainer.parts.trainable and all("lora_" in n for n, p in trainer.model.named_parameters() if p.requires_grad)
    exported = ContrastiveModel.from_pretrained(tmp_path / "run" / "export" / "model").eval()
    trainer.model.eval()
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in trainer.model.named_parameters())  # it trained
    for got, want in zip(_embeddings(exported), _embeddings(trainer.model)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.slow  # three short runs
def test_lora_resume_is_exact(tmp_path):
    steps = dict(max_steps=5, checkpoint_every=2, **LORA)
    straight, _ = _train(tiny_config(tmp_path / "a", **steps))
    config = tiny_config(tmp_path / "b", **steps)
    run_killed_after(config, 3)
    resumed, result = _train(config)
    assert result.resumed_from.name == "step_00000002"
    expected, got = params(straight.model), params(resumed.model)
    assert any("lora_A" in k for k in expected)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_lora_on_the_language_model_of_a_vlm():
    vlm = make_vlm().eval()
    adapted = apply_lora_to_language_model(vlm, 4)
    assert adapted and all(n.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) for n in adapted)
    trainable = [n for n, p in vlm.named_parameters() if p.requires_grad and n.startswith("language_model.")]
    assert trainable and all("lora_" in n for n in trainable)
    _nudge_adapters(vlm)
    ids = torch.tensor([prompt()])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        logits = vlm(ids, pixels).logits
        merged = merge_lora(vlm)
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(ids, pixels).logits, logits, atol=1e-5, rtol=0)
    assert IMAGE_ID in ids
