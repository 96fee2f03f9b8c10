"""`load_vision_side`: one call loads a whole VLM checkpoint's tower and connector, and
`image_tokens` gives the image tokens the reference's whole model feeds its language model
(its `get_image_features`), <= 1e-5 in float32, for every family whose tower and connector load:
LLaVA, LLaVA-OneVision (anyres), Qwen2.5-VL, Qwen3-VL, Kimi K2.5, DeepSeek-V4 (timm reference),
Gemma 3 and Gemma 4. The tiny saved models are the family parity tests' own builders."""

from __future__ import annotations

import pytest
import torch

from parity_helpers import close, perturb
from test_deepseek_v4_parity import saved as deepseek_saved  # noqa: F401 - fixtures
from test_gemma_parity import _patches as gemma4_patches
from test_gemma_parity import gemma3_whole, gemma4_whole  # noqa: F401 - fixtures
from test_kimi_k25_parity import _patches as kimi_patches
from test_kimi_k25_parity import whole as kimi_whole  # noqa: F401 - fixtures
from vlm_encoder import load_vision_side
from vlm_encoder.vision_side import VisionSide

transformers = pytest.importorskip("transformers")
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor  # noqa: E402

D = 24  # the tiny language models' width


def _qwen_inputs(images: torch.Tensor, patch: int, merge: int, temporal: int):
    B, _, H, W = images.shape
    flat, _, _ = Qwen2VLImageProcessor().patchify(images, patch, merge, temporal)  # merge-unit order
    return flat.reshape(B * (H // patch) * (W // patch), -1), torch.tensor([[1, H // patch, W // patch]] * B)


def _check(case: str, side: VisionSide, ours: torch.Tensor, expected, grid) -> None:
    expected = torch.stack(list(expected)) if not isinstance(expected, torch.Tensor) else expected
    assert ours.shape == expected.shape and ours.shape[1] == side.num_image_tokens(grid), (ours.shape, expected.shape)
    close(f"vision side {case}", ours, expected, "image tokens")


def test_llava(tmp_path):
    from test_hf_parity import _llava_model

    torch.manual_seed(0)
    reference = perturb(_llava_model())
    reference.save_pretrained(tmp_path)
    side = load_vision_side(tmp_path)
    config = reference.config
    assert side.family == "llava" and side.feature_select == "patch" and side.norm is False
    pixels = torch.randn(2, 3, *(config.vision_config.image_size,) * 2)
    with torch.no_grad():
        expected = reference.model.get_image_features(pixels).pooler_output
        ours = side.image_tokens(pixels)
    _check("llava", side, ours, expected, (pixels.shape[2] // config.vision_config.patch_size,) * 2)


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_llava_anyres(family, tmp_path):
    """Every tile through the tower and connector, then unpadding, the budget and the newlines."""
    import test_llava_next_parity as next_
    import test_llava_onevision_parity as onevision

    module = next_ if family == "llava_next" else onevision
    reference = (next_.save_tiny_llava_next if family == "llava_next" else onevision.save_tiny_onevision)(tmp_path)
    side = load_vision_side(tmp_path)
    assert side.family == family and side.anyres is not None and side.image_newline is not None
    processed = module.hf_processor()(module.images(), return_tensors="pt")
    with torch.no_grad():
        expected = reference.model.get_image_features(processed["pixel_values"], processed["image_sizes"]).pooler_output
        ours = side.anyres_image_tokens(processed["pixel_values"], processed["image_sizes"])
    assert len(ours) == len(expected) == len(module.SIZES)
    for i, (a, b) in enumerate(zip(ours, expected)):
        assert a.shape == b.shape
        close(f"vision side {family}", a, b, f"image {i}")


def test_qwen2_5_vl(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from test_qwen_vl_parity import MERGE, PATCH, TEMPORAL, _save_whole_model

    _save_whole_model(tmp_path)
    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path).eval()
    side = load_vision_side(tmp_path)
    assert side.connector.config.kind == "qwen_merger" and side.layers == (-1,) and not side.norm
    images = torch.randn(2, 3, 40, 24)
    with torch.no_grad():
        expected = reference.model.get_image_features(*_qwen_inputs(images, PATCH, MERGE, TEMPORAL)).pooler_output
        ours = side.image_tokens(images)
    _check("qwen2_5_vl", side, ours, expected, (10, 6))


def test_qwen3_vl(tmp_path):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from test_qwen3_vl_parity import MERGE, PATCH, TEMPORAL, _reference

    tower = _reference()
    text = dict(hidden_size=D, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=12,
                intermediate_size=48, vocab_size=64,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 2]})
    config = Qwen3VLConfig(vision_config=tower.config.to_dict(), text_config=text)
    reference = Qwen3VLForConditionalGeneration(config).eval()
    reference.model.visual.load_state_dict(tower.state_dict())
    reference.save_pretrained(tmp_path)
    side = load_vision_side(tmp_path)
    assert side.deepstack_layers == tuple(tower.config.deepstack_visual_indexes) == (0, 1)
    images = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        out = reference.model.get_image_features(*_qwen_inputs(images, PATCH, MERGE, TEMPORAL))
        ours = side.image_tokens(images)
        tokens, deep = side.deepstack_tokens(images)
    _check("qwen3_vl", side, ours, out.pooler_output, (8, 12))
    assert torch.equal(tokens, ours) and len(deep) == len(out.deepstack_features) == 2
    for j, (a, b) in enumerate(zip(deep, out.deepstack_features)):
        _check(f"qwen3_vl deepstack {j}", side, a, b, (8, 12))


@pytest.mark.parametrize("form", ["saved", "released"])
def test_kimi_k25(kimi_whole, form):  # noqa: F811
    reference, directory = kimi_whole
    side = load_vision_side(directory / form)
    assert side.norm and side.family == "kimi_k25"
    images = torch.randn(2, 3, 32, 16)
    with torch.no_grad():
        expected = reference.model.get_image_features(*kimi_patches(images)).pooler_output
        ours = side.image_tokens(images)
    _check(f"kimi_k25 {form}", side, ours, expected, (8, 4))


def test_deepseek_v4_reads_the_final_normed_last_layer(deepseek_saved):  # noqa: F811
    reference, directory = deepseek_saved
    side = load_vision_side(directory)
    assert side.norm and side.layers == (-1,) and side.connector.config.kind == "deepseek_aligner"
    images = torch.randn(2, 3, 20, 28)
    with torch.no_grad():
        expected = reference(images)  # timm's DeepseekVitEncoder: final norm, then its aligner
        ours = side.image_tokens(images)
    _check("deepseek_v4", side, ours, expected, (5, 7))


def test_gemma3(gemma3_whole):  # noqa: F811
    reference, directory = gemma3_whole
    side = load_vision_side(directory)
    assert side.norm and side.connector.config.kind == "gemma_pool"
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference.get_image_features(pixels).pooler_output
        ours = side.image_tokens(pixels)
    _check("gemma3", side, ours, expected, (8, 8))


def test_gemma4(gemma4_whole):  # noqa: F811
    reference, directory = gemma4_whole
    side = load_vision_side(directory)
    images = torch.rand(2, 3, 24, 48)
    with torch.no_grad():
        expected = reference.get_image_features(*gemma4_patches(images)).pooler_output
        ours = side.image_tokens((images - 0.5) / 0.5)
    _check("gemma4", side, ours, expected, (6, 12))


def test_other_model_types_are_refused_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "clip"}')
    with pytest.raises(ValueError, match="model_type='clip' has no vision-side loader; supported: llava, "):
        load_vision_side(tmp_path)
    with pytest.raises(ValueError, match="reads a whole VLM checkpoint .* not a timm spec"):
        load_vision_side("timm:vit_small_patch16_224")


def test_info_names_the_vision_side(gemma3_whole, capsys):  # noqa: F811
    from vlm_encoder.cli import main

    assert main(["info", str(gemma3_whole[1])]) == 0
    assert "vision side:   vlm_encoder.load_vision_side(source)" in capsys.readouterr().out


@pytest.mark.parametrize("load", ["vision_side", "llama4", "perception_lm", "molmo2"])
def test_real_hub_ids_fail_offline_in_one_line(load, empty_cache):
    from vlm_encoder.converters import hf_connectors

    name, loader = {
        "vision_side": ("Qwen/Qwen2.5-VL-7B-Instruct", load_vision_side),
        "llama4": ("meta-llama/Llama-4-Scout-17B-16E-Instruct", hf_connectors.load_llama4_connector),
        "perception_lm": ("facebook/Perception-LM-1B", hf_connectors.load_perception_lm_connector),
        "molmo2": ("allenai/Molmo2-8B", hf_connectors.load_molmo2_connector),
    }[load]
    with pytest.raises(FileNotFoundError) as err:
        loader(name)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{name}: config.json not in the Hugging Face cache"), message
