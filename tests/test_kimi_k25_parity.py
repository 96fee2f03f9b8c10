"""Kimi K2.5's vision tower (MoonViT) and its connector vs transformers' `kimi_k25` on tiny random
models saved with `save_pretrained` (every weight jittered): every layer at the table's own grid
and at resized non-square grids, from a `Kimi_K25VisionModel` directory (transformers' names,
half-layout rotary channels) and from a whole `Kimi_K25ForConditionalGeneration` directory
(the released names and complex-pair channels, as `moonshotai/Kimi-K2.5`); the `mm_projector` as
a `qwen_merger` whose tokens are what `get_image_features` feeds the language model; a save / load
round trip of that projector; and the real hub ids offline."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from parity_helpers import close, perturb
from vlm_encoder import load_encoder
from vlm_encoder.cli import main
from vlm_encoder.converters import hf_kimi_k25
from vlm_encoder.weights import WeightsError

transformers = pytest.importorskip("transformers")
from transformers import Kimi_K25Config, Kimi_K25VisionConfig  # noqa: E402
from transformers.models.kimi_k25.modeling_kimi_k25 import (  # noqa: E402
    Kimi_K25ForConditionalGeneration,
    Kimi_K25VisionModel,
)

PATCH, MERGE, DEPTH = 4, 2, 3
VISION = dict(patch_size=PATCH, pos_emb_height=6, pos_emb_width=6, pos_emb_time=2, num_attention_heads=2,
              num_hidden_layers=DEPTH, hidden_size=32, intermediate_size=48, merge_kernel_size=[MERGE, MERGE],
              rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})
TEXT = dict(model_type="deepseek_v3", hidden_size=24, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
            intermediate_size=48, moe_intermediate_size=8, n_routed_experts=2, num_experts_per_tok=1, n_shared_experts=1,
            first_k_dense_replace=1, vocab_size=64, q_lora_rank=None, kv_lora_rank=8, qk_nope_head_dim=8,
            qk_rope_head_dim=8, v_head_dim=8)
# The table is 6 x 6 patches (24 px): its own grid, and non-square grids larger and smaller.
SIZES = [(24, 24), (32, 16), (16, 40)]
HUB_IDS = ["moonshotai/Kimi-K2.5", "moonshotai/Kimi-K2.6"]
# What transformers' save writes where the release has another name (its load reads both).
SAVED_AS_RELEASED = {"vision_tower.encoder.patch_embed.": "vision_tower.patch_embed.",
                     "model.mm_projector.pre_norm.": "mm_projector.pre_norm."}


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    """A `Kimi_K25VisionModel` saved alone (transformers' names)."""
    directory = tmp_path_factory.mktemp("kimi_k25_vision")
    torch.manual_seed(0)
    reference = perturb(Kimi_K25VisionModel(Kimi_K25VisionConfig(**VISION)))
    reference.save_pretrained(directory)
    return reference, directory


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """A whole `Kimi_K25ForConditionalGeneration` saved by transformers (the released layout),
    and the same weights renamed exactly as the release names them."""
    directory = tmp_path_factory.mktemp("kimi_k25")
    torch.manual_seed(1)
    config = Kimi_K25Config(vision_config=VISION, text_config=TEXT, projection_hidden_size=32,
                            projection_layer_norm_eps=1e-4, image_token_id=60, video_token_id=61,
                            vision_start_token_id=62, vision_end_token_id=63)
    reference = perturb(Kimi_K25ForConditionalGeneration(config), seed=2)
    reference.save_pretrained(directory / "saved")
    released = directory / "released"
    released.mkdir()
    (released / "config.json").write_text((directory / "saved" / "config.json").read_text())
    state = load_file(str(directory / "saved" / "model.safetensors"))
    renamed = {}
    for key, value in state.items():
        prefix = next((p for p in SAVED_AS_RELEASED if key.startswith(p)), None)
        renamed[SAVED_AS_RELEASED[prefix] + key[len(prefix):] if prefix else key] = value
    save_file(renamed, str(released / "model.safetensors"))
    return reference, directory


def _patches(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The processor's input: each image's patches row-major `(B*h*w, C, p, p)`, and `grid_thw`."""
    B, C, H, W = images.shape
    h, w = H // PATCH, W // PATCH
    flat = images.reshape(B, C, h, PATCH, w, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(B * h * w, C, PATCH, PATCH)
    return flat, torch.tensor([[1, h, w]] * B)


def _run_tower(vision: Kimi_K25VisionModel, images: torch.Tensor):
    """Every block's raw output `(B, L, h*w, D)` (the last one caught by a hook: transformers ties
    `hidden_states[-1]` to the final-normed `last_hidden_state`), and `last_hidden_state`."""
    B, _, H, W = images.shape
    caught = []
    handle = vision.layers[-1].register_forward_hook(lambda module, args, output: caught.append(output))
    try:
        out = vision(*_patches(images), output_hidden_states=True)
    finally:
        handle.remove()
    rows = lambda t: t.reshape(B, (H // PATCH) * (W // PATCH), -1)  # noqa: E731
    blocks = [rows(t) for t in out.hidden_states[1:-1]] + [rows(caught[0])]
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
    return torch.stack(blocks, dim=1), rows(out.last_hidden_state)


def _check_layers(case: str, vision, encoder, size) -> None:
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        blocks, last = _run_tower(vision, images)
        out = encoder(images, layers="all")
        normed = encoder(images, layers=(-1,), norm=True)
    assert out.grid_size == (size[0] // PATCH, size[1] // PATCH)
    assert out.cls_tokens is None and out.register_tokens is None
    for i in range(DEPTH):
        close(case, out.patches(i), blocks[:, i], f"block {i} at {size}")
    close(case, normed.patches(-1), last, f"last_hidden_state at {size}")


def test_config_maps_the_position_schemes(tower):
    config = hf_kimi_k25.config_from_hf(tower[0].config)
    assert config.grid_size == (6, 6) and config.pos_embed == "learned" and not config.class_token
    assert (config.pos_resample_mode, config.pos_resample_antialias, config.pos_resample_align_corners) == ("bicubic", False, False)
    assert (config.rope, config.rope_layout, config.rope_xy) == ("eva", "interleaved", True)
    assert config.final_norm and config.norm_eps == 1e-5 and config.act == "gelu_tanh"
    with pytest.raises(ValueError, match="as a square"):
        hf_kimi_k25.config_from_hf(Kimi_K25VisionConfig(**{**VISION, "pos_emb_width": 5}))


def test_released_config_names_are_read():
    """The release's `vision_config` (MoonViT's names, `model_type` ""), as in moonshotai/Kimi-K2.5."""
    released = {"init_pos_emb_height": 64, "init_pos_emb_time": 4, "init_pos_emb_width": 64, "merge_kernel_size": [2, 2],
                "merge_type": "sd2_tpool", "mm_hidden_size": 1152, "mm_projector_type": "patchmerger", "model_type": "",
                "patch_size": 14, "pos_emb_type": "divided_fixed", "projector_hidden_act": "gelu", "projector_ln_eps": 1e-05,
                "text_hidden_size": 7168, "video_attn_type": "spatial_temporal", "vt_hidden_size": 1152,
                "vt_intermediate_size": 4304, "vt_num_attention_heads": 16, "vt_num_hidden_layers": 27}
    config = hf_kimi_k25.config_from_hf({"model_type": "kimi_k25", "vision_config": released})
    assert (config.width, config.depth, config.num_heads, config.mlp_dim) == (1152, 27, 16, 4304)
    assert config.image_size == (896, 896) and config.patch_size == 14 and config.rope_theta == 10000.0
    with pytest.raises(ValueError, match="merge_type"):
        hf_kimi_k25.config_from_hf({"model_type": "kimi_k25", "vision_config": {**released, "merge_type": "other"}})


@pytest.mark.parametrize("size", SIZES)
def test_every_layer_of_a_saved_vision_model_matches(tower, size):
    reference, directory = tower
    encoder = load_encoder(directory).eval()
    assert encoder.source_info["family"] == "kimi_k25_vision"
    processor = encoder.image_processor.config  # Kimi_K25ImageProcessor's normalisation, the native size
    assert (processor.mean, processor.std, processor.size) == ((0.5,) * 3, (0.5,) * 3, (24, 24))
    _check_layers("kimi_k25 vision", reference, encoder, size)


@pytest.mark.parametrize("form", ["saved", "released"])
@pytest.mark.parametrize("size", SIZES[:2])
def test_every_layer_of_a_whole_checkpoint_matches(whole, form, size):
    reference, directory = whole
    encoder = load_encoder(directory / form).eval()
    assert encoder.source_info["family"] == "kimi_k25"
    _check_layers(f"kimi_k25 whole ({form})", reference.model.vision_tower, encoder, size)


@pytest.mark.parametrize("form", ["saved", "released"])
@pytest.mark.parametrize("size", SIZES)
def test_the_connector_gives_the_image_tokens_of_get_image_features(whole, form, size):
    reference, directory = whole
    encoder = load_encoder(directory / form).eval()
    merger = hf_kimi_k25.load_merger(directory / form)
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        flat, grid_thw = _patches(images)
        expected = reference.model.get_image_features(flat, grid_thw).pooler_output  # one (N_i, D_llm) per image
        out = encoder(images, layers=(-1,), norm=True)
        tokens = merger(out.patches(-1), out.grid_size)  # (B, h*w/4, D_llm)
    assert tokens.shape == (2, size[0] * size[1] // (PATCH * MERGE) ** 2, TEXT["hidden_size"])
    close("kimi_k25 connector", tokens, torch.stack(list(expected)), f"image tokens at {size}")


def test_the_connector_round_trips_through_save_and_load(whole, tmp_path):
    from vlm_encoder.projectors import Projector

    _, directory = whole
    merger = hf_kimi_k25.load_merger(directory / "released")
    assert merger.config.kind == "qwen_merger" and merger.config.options.norm_type == "layernorm"
    assert merger.config.options.norm_eps == 1e-4  # the config's projection_layer_norm_eps
    merger.save_pretrained(tmp_path / "merger")
    back = Projector.from_pretrained(tmp_path / "merger")
    x = torch.randn(2, 24, 32)
    with torch.no_grad():
        assert torch.equal(merger(x, (4, 6)), back(x, (4, 6)))


def test_the_transformers_in_memory_connector_names_load_too(whole):
    from vlm_encoder.projectors import load_kimi_k25_merger

    reference, directory = whole
    state = reference.model.mm_projector.state_dict()  # pre_norm, in_proj, out_proj
    merger = load_kimi_k25_merger(state, norm_eps=1e-4)
    released = hf_kimi_k25.load_merger(directory / "released")
    x = torch.randn(1, 16, 32)
    with torch.no_grad():
        assert torch.equal(merger(x, (4, 4)), released(x, (4, 4)))
    with pytest.raises(WeightsError, match="unexpected"):
        load_kimi_k25_merger({**state, "extra.weight": torch.zeros(1)})


def test_converter_is_strict(whole, tower):
    _, directory = whole
    state = load_file(str(directory / "released" / "model.safetensors"))
    del state["vision_tower.encoder.blocks.1.wqkv.bias"]
    with pytest.raises(WeightsError, match="wqkv"):
        hf_kimi_k25.convert_state_dict(state, num_heads=2)
    state = load_file(str(directory / "released" / "model.safetensors"))
    state["vision_tower.encoder.patch_embed.proj.weight"] = state["vision_tower.patch_embed.proj.weight"]
    with pytest.raises(WeightsError, match="twice"):
        hf_kimi_k25.convert_state_dict(state, num_heads=2)
    state = tower[0].state_dict()
    state["layers.0.attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError, match="attn.extra"):
        hf_kimi_k25.convert_state_dict(state, num_heads=2, layout="transformers")


@pytest.mark.parametrize("name", HUB_IDS)
def test_real_hub_ids_fail_offline_in_one_line(name, empty_cache, capsys):
    assert main(["info", name]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and not captured.out, captured.err
    assert lines[0].startswith(f"vlm-encoder info: error: {name}: config.json not in the Hugging Face cache")
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
        hf_kimi_k25.load_merger(name)


def test_a_hub_id_of_the_cached_checkpoint_goes_to_this_converter(whole, tmp_path, monkeypatch):
    """The hub id's converter is chosen from its cached `config.json` (`model_type` kimi_k25):
    the tiny released directory stands in for moonshotai/Kimi-K2.5 in a hub cache layout."""
    import shutil

    import huggingface_hub.constants

    _, directory = whole
    snapshot = tmp_path / "hub" / "models--moonshotai--Kimi-K2.5" / "snapshots" / ("0" * 40)
    shutil.copytree(directory / "released", snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert json.loads((snapshot / "config.json").read_text())["model_type"] == "kimi_k25"
    assert load_encoder(HUB_IDS[0]).source_info["family"] == "kimi_k25"
    assert hf_kimi_k25.load_merger(HUB_IDS[0]).config.kind == "qwen_merger"
