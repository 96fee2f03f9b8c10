"""VisionLanguageModel: image tokens into tiny random Llama / GPT-2 models, placeholder
handling, freezing, and parity with transformers' LLaVA on a tiny random checkpoint."""

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from projectors import build_projector
from vlm_encoder import VisionConfig, VisionEncoder
from vlm_encoder.vlm import VisionLanguageModel, expand_image_tokens, hf_layer_to_block

VOCAB, D_LLM, IMAGE_ID = 64, 48, 63
M = 16  # 32 px images, 8 px patches


def tiny_llama():
    return LlamaForCausalLM(
        LlamaConfig(vocab_size=VOCAB, hidden_size=D_LLM, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)
    ).eval()


def tiny_gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=D_LLM, n_layer=2, n_head=4, n_positions=256, pad_token_id=0)).eval()


LMS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def tiny_encoder():
    return VisionEncoder(VisionConfig(image_size=32, patch_size=8, width=32, depth=3, num_heads=4))


def make_vlm(lm="llama", kind="mlp2x_gelu", layers=(-2,), feature_select="patch", **options):
    projector = build_projector(kind, (32,) * len(layers), D_LLM, **options)
    return VisionLanguageModel(tiny_encoder(), projector, LMS[lm](), IMAGE_ID, layers, feature_select)


def prompt(n_images=1, before=(1, 5), after=(7, 8, 9), m=M):
    return list(before) + [IMAGE_ID] * (m * n_images) + list(after)


def test_image_features_shapes():
    px = torch.randn(3, 3, 32, 32)
    assert make_vlm().image_features(px).shape == (3, M, D_LLM)
    assert make_vlm(layers=(-1, -3)).image_features(px).shape == (3, M, D_LLM)
    cls_vlm = make_vlm(feature_select="cls_patch")
    assert cls_vlm.num_image_tokens() == M + 1
    assert cls_vlm.image_features(px).shape == (3, M + 1, D_LLM)
    shuffled = make_vlm(kind="pixel_shuffle", scale_factor=2)
    assert shuffled.num_image_tokens() == 4 and shuffled.image_features(px).shape == (3, 4, D_LLM)


def test_expand_image_tokens():
    assert expand_image_tokens([1, 9, 2, 9], image_token_id=9, num_image_tokens=3) == [1, 9, 9, 9, 2, 9, 9, 9]
    vlm = make_vlm()
    assert vlm.expand_image_tokens([1, IMAGE_ID, 2]) == prompt(before=(1,), after=(2,))


def test_prepare_inputs_places_image_tokens_in_order():
    vlm = make_vlm()
    # Sample 0: two images; sample 1: no image (padded, left out of the attention mask).
    row0 = prompt(n_images=2)
    row1 = [3, 4, 5] + [0] * (len(row0) - 3)
    ids = torch.tensor([row0, row1])
    mask = torch.tensor([[1] * len(row0), [1, 1, 1] + [0] * (len(row0) - 3)])
    px = torch.randn(2, 3, 32, 32)
    out = vlm.prepare_inputs(ids, px, attention_mask=mask, labels=ids.clone())
    assert set(out) == {"inputs_embeds", "attention_mask", "labels"}
    features = vlm.image_features(px)
    embeds = out["inputs_embeds"]
    torch.testing.assert_close(embeds[0, 2 : 2 + M], features[0])
    torch.testing.assert_close(embeds[0, 2 + M : 2 + 2 * M], features[1])
    text = vlm.language_model.get_input_embeddings()
    torch.testing.assert_close(embeds[0, :2], text(ids[0, :2]))
    torch.testing.assert_close(embeds[1], text(ids[1]))
    assert (out["labels"][0, 2 : 2 + 2 * M] == -100).all()
    assert out["labels"][0, :2].tolist() == [1, 5] and out["labels"][1].tolist() == row1
    assert out["attention_mask"] is mask


def test_text_only_batch_and_default_mask():
    vlm = make_vlm()
    ids = torch.tensor([[1, 2, 3]])
    out = vlm.prepare_inputs(ids)
    assert out["attention_mask"].tolist() == [[1, 1, 1]] and "labels" not in out
    assert vlm(ids).logits.shape == (1, 3, VOCAB)


def test_count_mismatch_names_both_counts():
    vlm = make_vlm()
    ids = torch.tensor([prompt(n_images=1)])
    with pytest.raises(ValueError, match=r"hold 16 image token ids.*2 x 16 = 32 features"):
        vlm.prepare_inputs(ids, torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="no pixel_values"):
        vlm.prepare_inputs(ids)
    uneven = torch.tensor([[1] + [IMAGE_ID] * 8 + [2] * 16, [1] + [IMAGE_ID] * 24])  # 8 + 24 = 2 images' worth
    assert int((uneven == IMAGE_ID).sum()) == 32
    with pytest.raises(ValueError, match="not a multiple"):
        vlm.prepare_inputs(uneven, torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("lm", ["llama", "gpt2"])
def test_forward_loss_trains_only_the_projector(lm):
    vlm = make_vlm(lm).train()
    assert not vlm.encoder.training and not vlm.language_model.training and vlm.projector.training
    ids = torch.tensor([prompt(), prompt()])
    out = vlm(ids, torch.randn(2, 3, 32, 32), labels=ids)
    assert out.logits.shape == (2, ids.shape[1], VOCAB) and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vlm.projector.parameters())
    assert all(p.grad is None for p in vlm.encoder.parameters())
    assert all(p.grad is None for p in vlm.language_model.parameters())


def test_set_trainable_switches_each_part():
    vlm = make_vlm()
    vlm.set_trainable(encoder=True, projector=False, language_model=True)
    ids = torch.tensor([prompt()])
    vlm(ids, torch.randn(1, 3, 32, 32), labels=ids).loss.backward()
    assert vlm.encoder.patch_embed.proj.weight.grad is not None
    assert vlm.language_model.get_input_embeddings().weight.grad is not None
    assert all(p.grad is None for p in vlm.projector.parameters())


@pytest.mark.parametrize("lm", ["llama", "gpt2"])
def test_generate(lm):
    vlm = make_vlm(lm)
    ids = torch.tensor([prompt(), prompt()])
    new = vlm.generate(ids, torch.randn(2, 3, 32, 32), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert new.shape == (2, 4)
    # Greedy decoding continues the argmax of forward's last position.
    first = vlm(ids, vlm_px := torch.randn(2, 3, 32, 32)).logits[:, -1].argmax(-1)
    assert vlm.generate(ids, vlm_px, max_new_tokens=1, do_sample=False, pad_token_id=0)[:, 0].tolist() == first.tolist()


def test_constructor_validates():
    enc, lm = tiny_encoder(), tiny_llama()
    with pytest.raises(ValueError, match="does not match the encoder width"):
        VisionLanguageModel(enc, build_projector("linear", 24, D_LLM), lm, IMAGE_ID)
    with pytest.raises(ValueError, match="hidden size"):
        VisionLanguageModel(enc, build_projector("linear", 32, 40), lm, IMAGE_ID)
    with pytest.raises(ValueError, match="gives 1"):
        VisionLanguageModel(enc, build_projector("linear", (32, 32), D_LLM), lm, IMAGE_ID)
    with pytest.raises(ValueError, match="patch grid"):
        VisionLanguageModel(enc, build_projector("pool", 32, D_LLM, target_grid=2), lm, IMAGE_ID, feature_select="cls_patch")
    with pytest.raises(ValueError, match="feature_select"):
        VisionLanguageModel(enc, build_projector("linear", 32, D_LLM), lm, IMAGE_ID, feature_select="cls")


def test_hf_layer_indices():
    assert hf_layer_to_block(-1, 24) == -1 and hf_layer_to_block(-2, 24) == -2
    assert hf_layer_to_block(1, 24) == 0 and hf_layer_to_block(24, 24) == 23
    with pytest.raises(ValueError, match="embedding output"):
        hf_layer_to_block(0, 24)
    with pytest.raises(ValueError, match="embedding output"):
        hf_layer_to_block(-25, 24)


# ----------------------------------------------------------- LLaVA parity
def save_tiny_llava(directory, vision_feature_layer=-2, strategy="default", bias=True):
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=16)
    text = LlamaConfig(vocab_size=100, hidden_size=D_LLM, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=99,
                         vision_feature_layer=vision_feature_layer, vision_feature_select_strategy=strategy,
                         multimodal_projector_bias=bias)
    torch.manual_seed(1)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # non-trivial norms and biases so a wrong mapping shows
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "class_embedding" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(directory)
    return model


@pytest.mark.parametrize(
    "layer,strategy,bias,tokens",
    [(-2, "default", True, 16), ([-1, 1], "full", False, 17), ([-3, -2], "default", True, 16)],
)
def test_from_llava_matches_transformers(tmp_path, layer, strategy, bias, tokens):
    ref = save_tiny_llava(tmp_path, layer, strategy, bias)
    vlm = VisionLanguageModel.from_llava(tmp_path)
    assert vlm.num_image_tokens() == tokens
    ids = torch.tensor([[1, 5] + [99] * tokens + [7, 8, 9], [4] + [99] * tokens + [3, 2, 6, 7]])
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = ref(input_ids=ids, pixel_values=px).logits
        got = vlm(ids, px).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    new = vlm.generate(ids[:1], px[:1], max_new_tokens=3, do_sample=False)
    ref_new = ref.generate(input_ids=ids[:1], pixel_values=px[:1], max_new_tokens=3, do_sample=False)
    assert new.tolist() == ref_new[:, ids.shape[1] :].tolist()


def test_from_llava_rejects_embedding_layer(tmp_path):
    save_tiny_llava(tmp_path, vision_feature_layer=0)
    with pytest.raises(ValueError, match="embedding output"):
        VisionLanguageModel.from_llava(tmp_path)


def save_tiny_siglip_llava(directory, strategy):
    from transformers import SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                image_size=32, patch_size=8)
    text = LlamaConfig(vocab_size=100, hidden_size=D_LLM, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=99, vision_feature_layer=-1,
                         vision_feature_select_strategy=strategy)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(directory)
    return model


def test_from_llava_siglip_tower(tmp_path):
    ref = save_tiny_siglip_llava(tmp_path / "full", "full")
    vlm = VisionLanguageModel.from_llava(tmp_path / "full")
    assert vlm.feature_select == "patch" and vlm.num_image_tokens() == 16
    ids = torch.tensor([[1] + [99] * 16 + [5, 6]])
    px = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vlm(ids, px).logits, ref(input_ids=ids, pixel_values=px).logits, rtol=0, atol=1e-4)
    save_tiny_siglip_llava(tmp_path / "default", "default")
    with pytest.raises(ValueError, match="no CLS token"):
        VisionLanguageModel.from_llava(tmp_path / "default")


# ------------------------------------------------------------------ save / load
def test_save_and_load_round_trip_gives_the_same_logits(tmp_path):
    from projectors import Projector

    vlm = make_vlm("llama", kind="mlp2x_gelu", layers=(-2, -1))
    vlm.set_trainable(language_model=True)
    target = tmp_path / "vlm"
    target.mkdir()
    (target / "tokenizer.json").write_text("{}")  # the user's own file stays
    vlm.save_pretrained(target)
    assert {"vlm_config.json", "encoder", "projector", "language_model", "tokenizer.json"} <= {p.name for p in target.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging directory left behind"
    loaded = VisionLanguageModel.from_pretrained(target)
    assert loaded.feature_layers == vlm.feature_layers and loaded.trainable == vlm.trainable
    assert isinstance(loaded.projector, Projector)
    ids, pixels = torch.tensor([prompt(), prompt()]), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, pixels).logits, vlm.eval()(ids, pixels).logits, rtol=0, atol=0)
    # Saved again without the LM over the same directory: the stale LM goes, from_pretrained asks for one.
    vlm.save_pretrained(target, language_model=False)
    assert not (target / "language_model").exists() and (target / "tokenizer.json").exists()
    with pytest.raises(FileNotFoundError, match="saved without its language model"):
        VisionLanguageModel.from_pretrained(target)
    again = VisionLanguageModel.from_pretrained(target, language_model=vlm.language_model)
    with torch.no_grad():
        torch.testing.assert_close(again(ids, pixels).logits, vlm(ids, pixels).logits, rtol=0, atol=0)


def test_anyres_model_round_trip_keeps_the_newline(tmp_path):
    from vlm_encoder.anyres import LlavaNextAnyres

    anyres = LlavaNextAnyres(tile_size=32, pinpoints=((32, 64), (64, 32), (64, 64)))
    projector = build_projector("mlp2x_gelu", 32, D_LLM)
    vlm = VisionLanguageModel(tiny_encoder(), projector, tiny_gpt2(), IMAGE_ID, (-2,), anyres=anyres)
    with torch.no_grad():
        vlm.image_newline.normal_()
    vlm.save_pretrained(tmp_path / "vlm")
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "vlm")
    assert loaded.anyres == anyres
    assert torch.equal(loaded.image_newline, vlm.image_newline)
    (tmp_path / "vlm" / "image_newline.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="image_newline.safetensors is missing"):
        VisionLanguageModel.from_pretrained(tmp_path / "vlm")


def test_from_pretrained_names_what_is_wrong(tmp_path):
    from vlm_encoder import WeightsError

    with pytest.raises(FileNotFoundError, match="no vlm_config.json"):
        VisionLanguageModel.from_pretrained(tmp_path)
    make_vlm().save_pretrained(tmp_path / "vlm")
    config = tmp_path / "vlm" / "vlm_config.json"
    config.write_text(config.read_text().replace("vlm_encoder.vlm", "llava"))
    with pytest.raises(WeightsError, match="model_type='llava'"):
        VisionLanguageModel.from_pretrained(tmp_path / "vlm")
