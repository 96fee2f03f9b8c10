"""`load_encoder` dispatch, file formats and errors, and the `vlm-encoder info` command."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

from vlm_encoder import VisionConfig, VisionEncoder, WeightsError, load_encoder
from vlm_encoder.cli import main
from vlm_encoder.converters import hf_clip, hf_siglip
from vlm_encoder.loading import SUPPORTED_MODEL_TYPES

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
TINY = VisionConfig(image_size=32, patch_size=8, width=32, depth=2, num_heads=4, embed_dim=16)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A saved tiny `CLIPVisionModel` with a CLIP preprocessor config."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("clip_vision")
    tf.CLIPVisionModel(tf.CLIPVisionConfig(**VISION)).save_pretrained(directory)
    tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def own_dir(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("own")
    VisionEncoder(TINY).save_pretrained(directory)
    return directory


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ------------------------------------------------------------------ dispatch
def test_save_pretrained_round_trip_through_load_encoder(own_dir):
    original = VisionEncoder.from_pretrained(own_dir)
    loaded = load_encoder(own_dir)
    assert loaded.config == TINY
    _same_weights(loaded, original)
    assert loaded.source_info["family"] == "vlm_encoder"
    assert not loaded.training
    px = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded.image_embeds(px), original.image_embeds(px), rtol=0, atol=0)


def test_checkpoint_overrides_the_directory_weights(own_dir, tmp_path):
    other = VisionEncoder(TINY)
    path = tmp_path / "other.safetensors"
    save_file(other.state_dict(), str(path))
    _same_weights(load_encoder(own_dir, checkpoint=path), other)


def test_dtype_and_device(own_dir):
    encoder = load_encoder(own_dir, dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in encoder.parameters()} == {torch.bfloat16}


def test_hf_directory_gets_image_processor_and_source_info(clip_dir):
    encoder = load_encoder(clip_dir)
    assert encoder.source_info["family"] == "clip"
    assert encoder.source_info["model_type"] == "clip_vision_model"
    assert encoder.source_info["weights"] == ["model.safetensors"]
    assert encoder.config.embed_dim is None  # a CLIPVisionModel has no projection
    from vlm_encoder.processing import ImageProcessor

    assert isinstance(encoder.image_processor, ImageProcessor)
    assert encoder.image_processor.config.crop_size == (32, 32)


@pytest.mark.parametrize("scheme", ["open_clip", "timm", "preset"])
def test_library_sources_need_a_name(scheme):
    # Real dispatch of each scheme to its converter is tested end to end in test_front_door.py.
    with pytest.raises(ValueError, match="give a name"):
        load_encoder(f"{scheme}:")


def test_sharded_safetensors(tmp_path):
    torch.manual_seed(0)
    model = tf.SiglipVisionModel(tf.SiglipVisionConfig(**VISION)).eval()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    encoder = load_encoder(tmp_path)
    assert len(encoder.source_info["weights"]) > 1
    px = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder.image_embeds(px), model(px).pooler_output, rtol=0, atol=1e-5)


def test_pytorch_bin_weights_only(clip_dir, tmp_path):
    for name in ("config.json", "preprocessor_config.json"):
        (tmp_path / name).write_text((clip_dir / name).read_text())
    torch.save(load_file(str(clip_dir / "model.safetensors")), tmp_path / "pytorch_model.bin")
    _same_weights(load_encoder(tmp_path), load_encoder(clip_dir))


def test_legacy_llava_layout_and_auto_map_ignored(tmp_path):
    """Old hub LLaVA files keep the tower under `vision_tower.vision_model.` and the LM under
    `language_model.model.`; both layouts load the same tower, and `auto_map` runs no code."""
    torch.manual_seed(0)
    config = tf.LlavaConfig(
        vision_config=dict(VISION, model_type="clip_vision_model"),
        text_config=dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=99),
    )
    new_dir, old_dir = tmp_path / "new", tmp_path / "old"
    tf.LlavaForConditionalGeneration(config).save_pretrained(new_dir)
    old_dir.mkdir()
    data = json.loads((new_dir / "config.json").read_text())
    data["auto_map"] = {"AutoModel": "evil.Model"}
    (old_dir / "config.json").write_text(json.dumps(data))
    tensors = load_file(str(new_dir / "model.safetensors"))
    legacy = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in tensors.items()}
    save_file(legacy, str(old_dir / "model.safetensors"))
    new, old = load_encoder(new_dir), load_encoder(old_dir)
    _same_weights(new, old)
    assert new.source_info["vision_family"] == "clip"
    assert new.source_info["vision_feature_layer"] == -2

    legacy["surprise.weight"] = torch.zeros(1)
    save_file(legacy, str(old_dir / "model.safetensors"))
    with pytest.raises(WeightsError, match="surprise.weight"):
        load_encoder(old_dir)


# ------------------------------------------------------------------ errors
def test_unknown_model_type_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type='bert' is not supported") as info:
        load_encoder(tmp_path)
    for model_type in SUPPORTED_MODEL_TYPES:
        assert model_type in str(info.value)


def _copy_with_weights(src, dst, tensors):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    save_file(tensors, str(dst / "model.safetensors"))


def test_missing_key_is_named(clip_dir, tmp_path):
    tensors = load_file(str(clip_dir / "model.safetensors"))
    del tensors["encoder.layers.1.self_attn.k_proj.bias"]
    _copy_with_weights(clip_dir, tmp_path / "m", tensors)
    with pytest.raises(WeightsError, match=r"encoder\.layers\.1\.self_attn\.k_proj\.bias"):
        load_encoder(tmp_path / "m")


def test_unexpected_key_is_named(clip_dir, tmp_path):
    tensors = load_file(str(clip_dir / "model.safetensors"))
    tensors["encoder.layers.0.extra.weight"] = torch.zeros(2)
    _copy_with_weights(clip_dir, tmp_path / "u", tensors)
    with pytest.raises(WeightsError, match=r"encoder\.layers\.0\.extra\.weight"):
        load_encoder(tmp_path / "u")


def test_wrong_shape_is_named(clip_dir, tmp_path):
    tensors = load_file(str(clip_dir / "model.safetensors"))
    tensors["post_layernorm.weight"] = torch.ones(31)
    _copy_with_weights(clip_dir, tmp_path / "s", tensors)
    with pytest.raises(WeightsError, match="norm.weight"):
        load_encoder(tmp_path / "s")


def test_family_mismatch_is_an_error_not_a_guess(clip_dir, tmp_path):
    """SigLIP config over CLIP weights: the converter refuses instead of patching."""
    tensors = load_file(str(clip_dir / "model.safetensors"))
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text(json.dumps({"model_type": "siglip_vision_model", **VISION}))
    save_file(tensors, str(tmp_path / "x" / "model.safetensors"))
    with pytest.raises(WeightsError):
        load_encoder(tmp_path / "x")


def test_converters_are_strict_pure_functions(clip_dir):
    tensors = load_file(str(clip_dir / "model.safetensors"))
    full = {f"vision_model.{k}": v for k, v in tensors.items()}
    full.update({"text_model.embeddings.token_embedding.weight": torch.zeros(3, 2), "logit_scale": torch.zeros(())})
    assert hf_clip.convert_state_dict(full).keys() == hf_clip.convert_state_dict(tensors).keys()
    with pytest.raises(WeightsError, match="stray"):
        hf_clip.convert_state_dict({**full, "stray": torch.zeros(1)})
    with pytest.raises(WeightsError):
        hf_siglip.convert_state_dict(tensors)  # CLIP keys are not SigLIP's


def test_bad_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_encoder(tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_encoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", **VISION}))
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_encoder(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match="not valid JSON"):
        load_encoder(tmp_path)


def test_hub_id_offline_and_not_cached_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache") as info:
        load_encoder("nobody-xyz/no-such-model-123")
    assert "local model directory" in str(info.value)


# ------------------------------------------------------------------ info command
def test_info_command_on_hf_and_own_directories(clip_dir, own_dir, capsys):
    assert main(["info", str(clip_dir)]) == 0
    text = capsys.readouterr().out
    for expected in ("family:        clip", "blocks:        2", "width:         32", "grid 4x4 (16 patches)", "parameters:", "preprocessing: resize_mode="):
        assert expected in text, (expected, text)
    assert main(["info", str(own_dir), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["blocks"] == 2 and data["grid"] == [4, 4] and data["embed_dim"] == 16
    assert data["parameters"] == sum(p.numel() for p in VisionEncoder(TINY).parameters())


def test_info_command_reports_errors(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert main(["info", str(tmp_path)]) == 2
    assert "not supported" in capsys.readouterr().err


def test_a_converted_tower_saves_and_loads_back(clip_dir, tmp_path):
    """Weights assigned from a converter's slices (CLIP's position rows) are the module's own
    tensors: safetensors saves them, and the copy loads back equal."""
    encoder = load_encoder(clip_dir)
    for name, tensor in encoder.state_dict().items():
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), name
    encoder.save_pretrained(tmp_path / "copy")
    _same_weights(encoder, load_encoder(tmp_path / "copy"))
