"""PerceptionLM's tower (timm's Perception Encoder inside transformers' `TimmWrapperModel`) loads
from a whole `perception_lm` checkpoint through `load_encoder` (`converters.hf_perception_lm`:
the whole checkpoint's names mapped strictly to timm's, then `timm_eva`): every layer equals the
reference tower's <= 1e-5 on tiny random whole models saved with `save_pretrained` (every weight
jittered), at a square and a non-square size; `load_vision_side` gives `get_image_features`."""

from __future__ import annotations

import pytest
import torch

from parity_helpers import close, perturb
from vlm_encoder import load_encoder, load_vision_side
from vlm_encoder.converters import hf_perception_lm
from vlm_encoder.weights import WeightsError

transformers = pytest.importorskip("transformers")
from transformers import PerceptionLMConfig, PerceptionLMForConditionalGeneration  # noqa: E402

D_LLM = 24
TEXT = dict(hidden_size=D_LLM, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            vocab_size=64, model_type="llama")
ARGS = {"embed_dim": 32, "patch_size": 4, "depth": 2, "num_heads": 2, "global_pool": "", "init_values": 0.1}


def _whole(directory, img_size, ratio: int, **model_args):
    """A tiny PerceptionLM saved to `directory` (PE core: CLS, learned positions, 2D RoPE, LayerScale)."""
    torch.manual_seed(0)
    grid = (img_size[0] // 4, img_size[1] // 4)
    vision = {"architecture": "vit_pe_core_large_patch14_336", "num_classes": 0,
              "model_args": dict(ARGS, img_size=img_size, ref_feat_shape=grid, **model_args)}
    config = PerceptionLMConfig(vision_config=vision, text_config=TEXT, projector_pooling_ratio=ratio,
                                image_token_id=60, video_token_id=61)
    reference = perturb(PerceptionLMForConditionalGeneration(config))
    reference.save_pretrained(directory)
    return reference, directory


@pytest.fixture(scope="module")
def square(tmp_path_factory):
    return _whole(tmp_path_factory.mktemp("plm"), (32, 32), 2, use_post_transformer_norm=False)


@pytest.fixture(scope="module")
def non_square(tmp_path_factory):
    """32 x 24 px (8 x 6 patches), with a final norm; pooling ratio 1 (the reference pools square grids only)."""
    return _whole(tmp_path_factory.mktemp("plm_ns"), (32, 24), 1, use_post_transformer_norm=True)


def _check_layers(case: str, reference, encoder, images: torch.Tensor) -> None:
    timm_model = reference.model.vision_tower.timm_model
    with torch.no_grad():
        _, layers = timm_model.forward_intermediates(images, indices=None, return_prefix_tokens=True, norm=False,
                                                     output_fmt="NLC")
        last = reference.model.vision_tower(images).last_hidden_state  # forward_features: the final norm
        out = encoder(images, layers="all", norm=False)
        final = encoder(images, norm=True)
    assert len(layers) == encoder.num_blocks == 2
    for i, (patches, prefix) in enumerate(layers):
        close(case, out.patches(i), patches, f"patches of layer {i}")
        close(case, out.cls(i), prefix[:, 0], f"CLS of layer {i}")
    close(case, torch.cat([final.cls(-1)[:, None], final.patches(-1)], 1), last, "last_hidden_state")


def test_tower_per_layer_at_its_size(square):
    reference, directory = square
    encoder = load_encoder(directory)
    assert encoder.config.rope == "eva" and encoder.config.class_token and not encoder.config.final_norm
    assert encoder.source_info["family"] == "perception_lm"
    _check_layers("perception_lm 32x32", reference, encoder, torch.randn(2, 3, 32, 32))


def test_tower_per_layer_non_square(non_square):
    reference, directory = non_square
    encoder = load_encoder(directory)
    assert encoder.config.image_size == (32, 24) and encoder.config.final_norm
    _check_layers("perception_lm 32x24", reference, encoder, torch.randn(2, 3, 32, 24))


@pytest.mark.parametrize("case", ["square", "non_square"])
def test_vision_side_gives_get_image_features(case, request):
    reference, directory = request.getfixturevalue(case)
    side = load_vision_side(directory)
    assert side.connector.config.kind == "mlp_pool" and side.norm and side.feature_select == "patch"
    size = (32, 32) if case == "square" else (32, 24)
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = reference.model.get_image_features(pixel_values=images[:, None]).pooler_output  # (B, T, D_llm)
        ours = side.image_tokens(images)
    grid = (size[0] // 4, size[1] // 4)
    assert ours.shape == expected.shape and ours.shape[1] == side.num_image_tokens(grid)
    close(f"vision side perception_lm {case}", ours, expected, "image tokens")


def test_processor_is_the_thumbnail_step(square):
    processor = load_encoder(square[1]).image_processor
    assert processor.config.size == (32, 32) and processor.config.interpolation == "bicubic"
    assert tuple(processor.config.mean) == (0.5,) * 3


def test_keys_are_mapped_strictly(square):
    reference, _ = square
    config = hf_perception_lm.config_from_hf(reference.config.to_dict())
    tower = reference.model.vision_tower.state_dict()  # what load_encoder passes: the tower prefix stripped
    assert set(hf_perception_lm.convert_state_dict(tower, config)) >= {"cls_token", "blocks.1.ls2.gamma"}
    with pytest.raises(WeightsError, match=r"tower keys outside 'timm_model.': \['x'\]"):
        hf_perception_lm.convert_state_dict({**tower, "x": torch.zeros(1)}, config)
    with pytest.raises(WeightsError, match="extra"):
        hf_perception_lm.convert_state_dict({**tower, "timm_model.extra": torch.zeros(1)}, config)
    with pytest.raises(ValueError, match="vision_use_cls_token=False with a tower with a class token"):
        hf_perception_lm.config_from_hf(dict(reference.config.to_dict(), vision_use_cls_token=False))


@pytest.mark.parametrize(("arch", "width", "depth", "cls"), [
    ("vit_pe_core_large_patch14_336", 1024, 23, True),  # Perception-LM-1B / 3B
    ("vit_pe_core_gigantic_patch14_448", 1536, 47, False),  # Perception-LM-8B
])
def test_released_geometry_reads_on_meta(arch, width, depth, cls):
    """The released configs' towers (transformers' conversion script's `model_args`) are read from
    timm instances on the `meta` device: no memory, under a second."""
    args = {"embed_dim": width, "depth": depth, "img_size": [448, 448], "global_pool": "",
            "use_post_transformer_norm": False, "init_values": 0.1, "ref_feat_shape": [32, 32]}
    config = {"model_type": "perception_lm", "vision_use_cls_token": cls,
              "vision_config": {"model_type": "timm_wrapper", "architecture": arch, "model_args": args}}
    c = hf_perception_lm.config_from_hf(config)
    assert (c.image_size, c.patch_size, c.width, c.depth, c.class_token) == ((448, 448), 14, width, depth, cls)
    assert c.rope == "eva" and c.rope_ref_grid == (32, 32) and c.pool == "none"


@pytest.mark.parametrize("name", [f"facebook/Perception-LM-{size}" for size in ("1B", "3B", "8B")])
@pytest.mark.parametrize("load", [load_encoder, load_vision_side])
def test_hub_ids_fail_offline_in_one_line(name, load, empty_cache):
    with pytest.raises(FileNotFoundError) as err:
        load(name)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{name}: config.json not in the Hugging Face cache"), message
