"""DeepStack in `VisionLanguageModel`: a tiny random Qwen3-VL saved by transformers (every weight
jittered) and loaded with `from_qwen3_vl` gives the reference's logits and greedy generation
(left-padded batch, a non-square image), as do Qwen3.5 (no DeepStack) and Qwen3-VL-MoE; DeepStack on a LLaVA-style Llama adds each tapped layer's
tokens after decoder layer 0, 1, ... exactly at the image positions, with any projector kind;
save / load round trip; the stage-1 example trains with DeepStack and its loss falls."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest
import torch

from parity_helpers import close, perturb
from vlm_encoder import VisionConfig, VisionEncoder, VisionLanguageModel

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3VLConfig, Qwen3VLForConditionalGeneration  # noqa: E402
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor  # noqa: E402

from projectors import build_projector  # noqa: E402

PATCH, MERGE, TEMPORAL = 4, 2, 2
IMAGE, VISION_START, VISION_END = 60, 61, 62
VISION = dict(
    depth=3, hidden_size=32, intermediate_size=48, num_heads=2, in_channels=3, patch_size=PATCH,
    spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, out_hidden_size=32,
    num_position_embeddings=36, deepstack_visual_indexes=[0, 1],
)
TEXT = dict(
    hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
    intermediate_size=64, vocab_size=64, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
)
SIZE = (32, 48)  # a non-square image: an 8 x 12 patch grid, 4 x 6 = 24 merged image tokens


@pytest.fixture(scope="module")
def qwen3_vl(tmp_path_factory):
    """The reference `Qwen3VLForConditionalGeneration` (every weight jittered) and its saved directory."""
    torch.manual_seed(0)
    config = Qwen3VLConfig(vision_config=VISION, text_config=TEXT, image_token_id=IMAGE, video_token_id=63,
                           vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    reference = perturb(Qwen3VLForConditionalGeneration(config), seed=1)
    directory = tmp_path_factory.mktemp("qwen3_vl")
    reference.save_pretrained(directory)
    return reference, directory


def _prompts(n_image_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two left-padded prompts holding one image each: ids and attention mask `(2, L)`."""
    image = [VISION_START] + [IMAGE] * n_image_tokens + [VISION_END]
    rows = [[5, 9, *image, 17, 3], [7, *image, 11, 23, 4, 30, 2]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _reference_inputs(images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """What the reference takes: flattened patches in merge-unit order, `image_grid_thw`, token types."""
    B, _, H, W = images.shape
    flat, _, _ = Qwen2VLImageProcessor().patchify(images, PATCH, MERGE, TEMPORAL)  # (B, h*w, C*T*p*p)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=flat.reshape(-1, flat.shape[-1]),
                image_grid_thw=torch.tensor([[1, H // PATCH, W // PATCH]] * B), mm_token_type_ids=(ids == IMAGE).int())


def test_qwen3_vl_logits_and_greedy_generation_match_transformers(qwen3_vl):
    reference, directory = qwen3_vl
    vlm = VisionLanguageModel.from_qwen3_vl(directory)
    assert vlm.deepstack_layers == (0, 1) and vlm.positions == "mrope" and len(vlm.deepstack_projectors) == 2
    assert vlm.projector.config.kind == "qwen_merger" and vlm.deepstack_projectors[0].config.options.norm_after_merge
    torch.manual_seed(1)
    images = torch.randn(2, 3, *SIZE)
    n_tokens = vlm.num_image_tokens(SIZE)
    assert n_tokens == (SIZE[0] // (PATCH * MERGE)) * (SIZE[1] // (PATCH * MERGE))
    ids, mask = _prompts(n_tokens)
    inputs = _reference_inputs(images, ids, mask)
    with torch.no_grad():
        expected = reference(**inputs).logits
        got = vlm(ids, images, attention_mask=mask).logits
    valid = mask.bool()
    close("qwen3_vl deepstack logits", got[valid], expected[valid], "logits at the real tokens", atol=1e-4)
    # Without DeepStack the logits differ: the features are used, not just carried.
    with torch.no_grad():
        plain = VisionLanguageModel(vlm.encoder, vlm.projector, vlm.language_model, IMAGE, (-1,), positions="mrope")
        assert (plain(ids, images, attention_mask=mask).logits[valid] - expected[valid]).abs().max() > 1e-3
    new_ref = reference.generate(**inputs, max_new_tokens=6, do_sample=False)[:, ids.shape[1]:]
    new = vlm.generate(ids, images, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(new, new_ref), (new, new_ref)
    # Beam search repeats each sample's rows: the DeepStack features follow them.
    beams = dict(max_new_tokens=4, do_sample=False, num_beams=2, num_return_sequences=2)
    new_ref = reference.generate(**inputs, **beams)[:, ids.shape[1]:]
    assert torch.equal(vlm.generate(ids, images, attention_mask=mask, **beams), new_ref)


def test_qwen3_vl_image_tokens_and_deepstack_features_match(qwen3_vl):
    reference, directory = qwen3_vl
    vlm = VisionLanguageModel.from_qwen3_vl(directory)
    images = torch.randn(2, 3, *SIZE)
    inputs = _reference_inputs(images, *_prompts(vlm.num_image_tokens(SIZE)))
    with torch.no_grad():
        out = reference.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        features, deep = vlm.image_and_deepstack_features(images)
    close("qwen3_vl merger", features.flatten(0, 1), torch.cat(out.pooler_output), "image tokens")
    for j, (ours, ref) in enumerate(zip(deep, out.deepstack_features)):
        close("qwen3_vl deepstack mergers", ours.flatten(0, 1), torch.cat(ref), f"deepstack feature {j}")


QWEN3_5_TEXT = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16, intermediate_size=64,
    vocab_size=64, layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2, linear_num_value_heads=2,
    linear_key_head_dim=8, linear_value_head_dim=8,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "partial_rotary_factor": 0.5},
)
MOE_TEXT = {**TEXT, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "decoder_sparse_step": 1}


@pytest.mark.parametrize("family", [pytest.param("qwen3_5", marks=pytest.mark.slow), "qwen3_vl_moe"])  # qwen3_5 ~7 s
def test_qwen3_5_and_moe_checkpoints_match_transformers(family, tmp_path):
    """The same loader on Qwen3.5 (its tower without DeepStack mergers, a hybrid linear-attention
    LM) and on Qwen3-VL's MoE model (with DeepStack): logits and greedy generation."""
    torch.manual_seed(0)
    ids_config = dict(image_token_id=IMAGE, video_token_id=63, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    if family == "qwen3_5":
        vision = {k: v for k, v in VISION.items() if k != "deepstack_visual_indexes"}
        model = transformers.Qwen3_5ForConditionalGeneration(transformers.Qwen3_5Config(vision_config=vision, text_config=QWEN3_5_TEXT, **ids_config))
    else:
        config = transformers.Qwen3VLMoeConfig(vision_config=VISION, text_config=MOE_TEXT, **ids_config)
        model = transformers.Qwen3VLMoeForConditionalGeneration(config)
    reference = perturb(model, seed=1)
    reference.save_pretrained(tmp_path)
    vlm = VisionLanguageModel.from_qwen3_vl(tmp_path)
    assert vlm.deepstack_layers == (() if family == "qwen3_5" else (0, 1))
    images = torch.randn(2, 3, *SIZE)
    ids, mask = _prompts(vlm.num_image_tokens(SIZE))
    inputs = _reference_inputs(images, ids, mask)
    with torch.no_grad():
        expected, got = reference(**inputs).logits, vlm(ids, images, attention_mask=mask).logits
    valid = mask.bool()
    close(f"{family} logits", got[valid], expected[valid], "logits at the real tokens", atol=1e-4)
    new_ref = reference.generate(**inputs, max_new_tokens=4, do_sample=False)[:, ids.shape[1]:]
    assert torch.equal(vlm.generate(ids, images, attention_mask=mask, max_new_tokens=4, do_sample=False), new_ref)


def test_qwen3_vl_save_and_load_round_trip(qwen3_vl, tmp_path):
    """`save_pretrained` / `from_pretrained` keep the DeepStack projectors, the M-RoPE positions and
    the LM (transformers' Qwen3-VL model without its tower): the same logits, bitwise."""
    vlm = VisionLanguageModel.from_qwen3_vl(qwen3_vl[1])
    images = torch.randn(1, 3, *SIZE)
    ids, mask = _prompts(vlm.num_image_tokens(SIZE))
    vlm.save_pretrained(tmp_path / "vlm")
    again = VisionLanguageModel.from_pretrained(tmp_path / "vlm")
    assert again.positions == "mrope" and again.deepstack_layers == (0, 1) and again.language_model.model.visual is None
    with torch.no_grad():
        assert torch.equal(again(ids[:1], images, attention_mask=mask[:1]).logits, vlm(ids[:1], images, attention_mask=mask[:1]).logits)


# ------------------------------------------------------------------ LLaVA-style
D_LLM, WIDTH = 32, 32


def _llama(layers: int = 3) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=D_LLM, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=None, eos_token_id=None, pad_token_id=0)  # no EOS: greedy decoding runs its length
    return perturb(LlamaForCausalLM(config))


def _llava_style(kinds=("pool", "pixel_shuffle")) -> VisionLanguageModel:
    """A ViT, a `pixel_shuffle` projector (4 tokens per 16 px image) and a Llama, with DeepStack
    taps on blocks 0 and 1 through projectors of the `kinds` given (each 4 tokens per image)."""
    torch.manual_seed(0)
    encoder = VisionEncoder(VisionConfig(image_size=16, patch_size=4, width=WIDTH, depth=3, num_heads=2)).eval()
    main = build_projector("pixel_shuffle", WIDTH, D_LLM, scale_factor=2)
    options = {"pixel_shuffle": {"scale_factor": 2}, "pool": {"target_grid": 2}}
    deep = [build_projector(kind, WIDTH, D_LLM, **options.get(kind, {})) for kind in kinds]
    return VisionLanguageModel(encoder, main, _llama(), IMAGE, (-1,), deepstack_layers=(0, 1), deepstack_projectors=deep)


def test_llava_style_deepstack_adds_each_layer_at_the_image_positions():
    """The hooks add tapped layer j's tokens after decoder layer j, at the image positions only:
    the same as running the decoder layers by hand."""
    vlm = _llava_style().eval()
    images = torch.randn(2, 3, 16, 16)
    ids = torch.tensor([[1, 2, *[IMAGE] * 4, 3], [4, *[IMAGE] * 4, 5, 6]])
    with torch.no_grad():
        got = vlm(ids, images).logits
        features, deep = vlm.image_and_deepstack_features(images)
        inputs = vlm.prepare_inputs(ids, images)
        mask = inputs["visual_pos_masks"]
        assert torch.equal(mask, ids == IMAGE) and [d.shape for d in inputs["deepstack_visual_embeds"]] == [(8, D_LLM)] * 2
        lm = vlm.language_model
        hidden = inputs["inputs_embeds"]
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        rope = lm.model.rotary_emb(hidden, positions)
        causal = torch.full((ids.shape[1],) * 2, float("-inf")).triu(1)[None, None]
        for j, layer in enumerate(lm.model.layers):  # the decoder by hand, DeepStack after layers 0 and 1
            hidden = layer(hidden, attention_mask=causal, position_ids=positions, position_embeddings=rope)
            if j < 2:
                hidden = hidden.clone()
                hidden[mask] += deep[j].flatten(0, 1)
        expected = lm.lm_head(lm.model.norm(hidden))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        plain = VisionLanguageModel(vlm.encoder, vlm.projector, lm, IMAGE, (-1,))(ids, images).logits
        assert (plain - expected).abs().max() > 1e-2  # the taps change the logits
    # The hooks are gone after the call: the LM alone is the plain LM again.
    assert not any(layer._forward_hooks for layer in vlm.language_model.model.layers)


def test_llava_style_deepstack_generation_and_round_trip(tmp_path):
    vlm = _llava_style().eval()
    images = torch.randn(1, 3, 16, 16)
    ids = torch.tensor([[1, *[IMAGE] * 4, 3]])
    with torch.no_grad():
        logits = vlm(ids, images).logits
        new = vlm.generate(ids, images, max_new_tokens=4, do_sample=False)
    # Greedy decoding re-run by hand from the full forward pass gives the same tokens.
    seq = ids
    for _ in range(4):
        with torch.no_grad():
            step = vlm(seq, images).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, step], 1)
    assert torch.equal(new, seq[:, ids.shape[1]:])
    vlm.save_pretrained(tmp_path / "vlm")
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "vlm")
    assert loaded.deepstack_layers == (0, 1) and [p.config.kind for p in loaded.deepstack_projectors] == ["pool", "pixel_shuffle"]
    with torch.no_grad():
        assert torch.equal(loaded(ids, images).logits, logits)


def test_deepstack_trains_with_the_projector_and_refuses_what_does_not_fit():
    vlm = _llava_style()
    trainable = {n.split(".")[0] for n, p in vlm.named_parameters() if p.requires_grad}
    assert trainable == {"projector", "deepstack_projectors"}
    encoder, main, lm = vlm.encoder, vlm.projector, vlm.language_model
    with pytest.raises(ValueError, match="one projector per tapped layer"):
        VisionLanguageModel(encoder, main, lm, IMAGE, deepstack_layers=(0, 1), deepstack_projectors=[vlm.deepstack_projectors[0]])
    with pytest.raises(ValueError, match="decoder layers"):
        VisionLanguageModel(encoder, main, _llama(layers=1), IMAGE, deepstack_layers=(0, 1),
                            deepstack_projectors=list(vlm.deepstack_projectors))
    wide = build_projector("mlp2x_gelu", WIDTH, D_LLM)  # 16 tokens per image, the main projector 4
    odd = VisionLanguageModel(encoder, main, lm, IMAGE, deepstack_layers=(0,), deepstack_projectors=[wide])
    with pytest.raises(ValueError, match="as many tokens per image"):
        odd.image_and_deepstack_features(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="get_rope_index"):
        VisionLanguageModel(encoder, main, lm, IMAGE, positions="mrope")


def test_deepstack_gradients_under_gradient_checkpointing_of_the_lm():
    """With the LM training under (non-reentrant) gradient checkpointing, the recomputed layers
    give the DeepStack projectors and the LM the gradients of a plain backward pass."""
    vlm = _llava_style()
    vlm.set_trainable(language_model=True)
    ids = torch.tensor([[1, 2, *[IMAGE] * 4, 3], [4, *[IMAGE] * 4, 5, 6]])
    images = torch.randn(2, 3, 16, 16)
    grads = []
    for checkpointing in (True, False):
        lm = vlm.language_model
        if checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_disable()
        vlm.zero_grad()
        vlm.train()(ids, images, labels=ids.clone()).loss.backward()
        grads.append([p.grad.clone() for p in vlm.parameters() if p.requires_grad])
    assert len(grads[0]) == len(grads[1]) and all(torch.allclose(a, b, atol=1e-6, rtol=0) for a, b in zip(*grads))


# ------------------------------------------------------------ stage-1 example
def _stage1_module():
    path = Path(__file__).resolve().parents[1] / "examples" / "llava_stage1.py"
    spec = importlib.util.spec_from_file_location("llava_stage1_deepstack", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_stage1_example_with_deepstack_loss_falls_on_a_batch():
    """Fast check: the example's models with DeepStack taps; a few projector steps on one batch lower its loss."""
    stage1 = _stage1_module()
    cfg = stage1.Stage1Config(lm_width=32, encoder_width=32, batch_size=8, deepstack_layers=(0, 1))
    torch.manual_seed(0)
    tokenizer = stage1.build_tokenizer()
    encoder, lm = stage1.build_models(cfg, tokenizer)
    vlm = stage1.build_vlm(cfg, encoder, build_projector("mlp2x_gelu", encoder.width, cfg.lm_width), lm, tokenizer)
    assert len(vlm.deepstack_projectors) == 2
    rng = random.Random(0)
    batch = stage1.sample_batch(8, rng)
    prefix = [vlm.image_token_id] * vlm.num_image_tokens()
    optimizer = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(6):
        loss = stage1.caption_loss(vlm, tokenizer, batch, prefix)
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in vlm.deepstack_projectors.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.slow
def test_stage1_example_with_deepstack_trains(tmp_path):
    """The example's whole run (LM pretraining, stage 1) with DeepStack taps: the held-out caption loss falls."""
    stage1 = _stage1_module()
    cfg = stage1.Stage1Config(lm_steps=40, projector_steps=30, batch_size=8, lm_width=32, encoder_width=32,
                              deepstack_layers=(0, 1))
    result = stage1.run(cfg, tmp_path)
    assert result["loss_after"] < result["loss_before"] - 0.2, result
