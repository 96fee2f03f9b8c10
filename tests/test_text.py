"""Text tower: tokenizer edge cases and truncation, TextEncoder pooling and checks, presets,
save/load, and the Hugging Face text-tower option (tiny random BERT, offline)."""

from __future__ import annotations

import pytest
import torch

from vlm_encoder.text import (
    TEXT_PRESETS,
    ClipTokenizer,
    HFTextConfig,
    HFTextEncoder,
    TextConfig,
    TextEncoder,
    text_preset_config,
)

EOT, SOT = ClipTokenizer.eot_token_id, ClipTokenizer.sot_token_id

EDGE_CAPTIONS = {
    "empty": "",
    "very_long": "a photo of a very long caption " * 200,
    "emoji": "🐱🐶🎉 cats and dogs 👩‍👩‍👧",
    "rtl": "صورة قطة على الطاولة שלום עולם",
    "zero_width": "a\u200bcat\u200c\u200don\ufeffa mat\u2060",
    "nul": "a\x00cat\x00\x00",
    "only_whitespace": " \t\n  ",
    "special_strings": "a <end_of_text> cat <start_of_text> on a mat",
}


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    return ClipTokenizer(context_length=16)


@pytest.mark.parametrize("name", list(EDGE_CAPTIONS))
def test_edge_captions_give_fixed_length_ids_with_one_end_token(tokenizer, name):
    batch = tokenizer([EDGE_CAPTIONS[name], "a cat"])
    assert batch.input_ids.shape == batch.attention_mask.shape == (2, 16)
    assert batch.input_ids.dtype == torch.long
    for ids, mask in zip(batch.input_ids, batch.attention_mask):
        assert ids[0] == SOT
        eot = (ids == EOT).nonzero().flatten()
        assert eot.numel() == 1, f"{name}: expected exactly one end token, got {ids.tolist()}"
        position = int(eot)
        assert position >= 1
        assert mask.sum() == position + 1 and mask[: position + 1].all()
        assert (ids[position + 1 :] == 0).all()
        assert (ids[1:position] != SOT).all()
        assert 0 <= int(ids.min()) and int(ids.max()) < ClipTokenizer.vocab_size


def test_long_caption_is_truncated_with_end_token_last(tokenizer):
    ids = tokenizer(EDGE_CAPTIONS["very_long"]).input_ids[0]
    assert ids[-1] == EOT and ids[0] == SOT
    assert tokenizer.decode(ids).startswith("a photo of a very long")


def test_matches_open_clip_tokenize_on_plain_captions():
    import open_clip

    captions = ["a photo of a cat.", "", "Two dogs playing in the SNOW!", "word " * 100, "🐱 emoji"]
    ours = ClipTokenizer(context_length=24)(captions).input_ids
    torch.testing.assert_close(ours, open_clip.tokenize(captions, context_length=24))


def test_tokenizer_rejects_non_strings_and_bad_context(tokenizer):
    with pytest.raises(TypeError, match="str"):
        tokenizer([b"bytes"])
    with pytest.raises(ValueError, match="context_length"):
        ClipTokenizer(context_length=1)


def test_decode_round_trip(tokenizer):
    assert tokenizer.decode(tokenizer("a cat on a mat!").input_ids[0]) == "a cat on a mat !"


# ------------------------------------------------------------------ TextEncoder
def tiny_config(**overrides) -> TextConfig:
    return TextConfig(**{**dict(context_length=16, width=32, depth=2, num_heads=4), **overrides})


def test_presets_and_config_validation():
    assert set(TEXT_PRESETS) == {"tiny", "small", "base"}
    base = text_preset_config("base")
    assert (base.width, base.depth, base.num_heads, base.context_length) == (512, 12, 8, 77)
    assert text_preset_config("tiny", context_length=32).context_length == 32
    with pytest.raises(ValueError, match="unknown text preset"):
        text_preset_config("huge")
    with pytest.raises(ValueError, match="divisible"):
        TextConfig(width=30, num_heads=4)
    with pytest.raises(ValueError, match="TextConfig.context_length must be >= 2, got 1"):
        TextConfig(context_length=1)
    with pytest.raises(ValueError, match="TextConfig.depth must be an int, got 2.0"):
        TextConfig(depth=2.0)
    with pytest.raises(ValueError, match="unknown TextConfig fields"):
        TextConfig.from_dict({"width": 32, "bogus": 1})
    assert TextConfig.from_dict(tiny_config().to_dict()) == tiny_config()


def test_text_encoder_shapes_and_eot_pooling():
    encoder = TextEncoder(tiny_config()).eval()
    batch = encoder.tokenizer()(["a cat", "a photo of two dogs", ""])
    out = encoder(batch.input_ids)
    assert out.tokens.shape == (3, 16, 32) and out.pooled.shape == (3, 32)
    eot = (batch.input_ids == EOT).int().argmax(1)
    torch.testing.assert_close(out.pooled, out.tokens[torch.arange(3), eot])


def test_padding_never_reaches_the_pooled_feature():
    encoder = TextEncoder(tiny_config()).eval()
    ids = encoder.tokenizer()(["a cat"]).input_ids
    noisy = ids.clone()
    after = (ids[0] == EOT).nonzero().item() + 1
    noisy[0, after:] = torch.randint(1, 40000, (16 - after,))
    torch.testing.assert_close(encoder(noisy).pooled, encoder(ids).pooled)


def test_batch_invariance():
    encoder = TextEncoder(tiny_config()).eval()
    ids = encoder.tokenizer()(["a cat", "a dog on a mat", "snow"]).input_ids
    together = encoder(ids).pooled
    alone = torch.cat([encoder(ids[i : i + 1]).pooled for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_text_encoder_rejects_ids_longer_than_its_context():
    # Id values are the tokenizer's boundary (in the vocabulary, one end token after position
    # 0: test_edge_captions_give_fixed_length_ids_with_one_end_token and the fuzz tests);
    # the encoder checks only the shape, which costs no device synchronisation.
    encoder = TextEncoder(tiny_config())
    ids = encoder.tokenizer()(["a cat", "a dog"]).input_ids
    with pytest.raises(ValueError, match="context_length"):
        encoder(torch.cat([ids, ids], dim=1))
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        encoder(ids[0])


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    encoder = TextEncoder(tiny_config()).train()
    ids = encoder.tokenizer()(["a cat", "a photo of two dogs"]).input_ids
    encoder(ids).pooled.square().sum().backward()
    plain = [p.grad.clone() for p in encoder.parameters()]
    encoder.zero_grad()
    encoder.set_grad_checkpointing(True)
    encoder(ids).pooled.square().sum().backward()
    for a, p in zip(plain, encoder.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=1e-5, atol=1e-6)


def test_save_and_load_round_trip(tmp_path):
    encoder = TextEncoder(tiny_config()).eval()
    encoder.save_pretrained(tmp_path / "text")
    loaded = TextEncoder.from_pretrained(tmp_path / "text")
    assert loaded.config == encoder.config
    ids = encoder.tokenizer()(["a cat"]).input_ids
    torch.testing.assert_close(loaded(ids).pooled, encoder(ids).pooled, rtol=0, atol=0)


def test_tokenizer_refuses_a_foreign_vocabulary():
    with pytest.raises(ValueError, match="does not match open_clip's BPE"):
        TextEncoder(tiny_config(vocab_size=1000, eot_token_id=999, sot_token_id=998)).tokenizer()


# ------------------------------------------------------------------ Hugging Face text tower
WORDS = ["a", "cat", "dog", "on", "the", "mat", "photo", "of", "two"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizer

    directory = tmp_path_factory.mktemp("tiny_bert")
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(str(directory))
    config = BertConfig(
        vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(config).eval().save_pretrained(str(directory))
    return directory


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_hf_text_tower_pooling(hf_dir, pooling):
    from transformers import AutoModel

    encoder = HFTextEncoder(HFTextConfig(str(hf_dir), pooling=pooling, context_length=12)).eval()
    batch = encoder.tokenizer()(["a cat on the mat", "two dogs"])
    assert batch.input_ids.shape == (2, 12)
    out = encoder(batch.input_ids, batch.attention_mask)
    reference = AutoModel.from_pretrained(str(hf_dir), local_files_only=True).eval()
    hidden = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    if pooling == "cls":
        expected = hidden[:, 0]
    else:
        mask = batch.attention_mask.unsqueeze(-1).float()
        expected = (hidden * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(out.pooled, expected)
    assert encoder.width == 32


def test_hf_tokenizer_truncation_keeps_the_end_token(hf_dir):
    encoder = HFTextEncoder(HFTextConfig(str(hf_dir), context_length=8))
    batch = encoder.tokenizer()(["a cat " * 50])
    assert batch.input_ids.shape == (1, 8)
    assert batch.input_ids[0, -1].item() == 3  # [SEP]
    with pytest.raises(ValueError, match="attention_mask"):
        encoder(batch.input_ids)


def test_hf_config_errors(tmp_path):
    with pytest.raises(ValueError, match="pooling"):
        HFTextConfig(str(tmp_path), pooling="max")
    with pytest.raises(FileNotFoundError, match="config.json"):
        HFTextEncoder(HFTextConfig(str(tmp_path)))
