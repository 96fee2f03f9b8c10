"""Molmo2's vision tower (`Molmo2VisionModel`: a Linear patch embedding over `(p_h, p_w, C)`
patches, a learned table, LayerNorm pre-norm blocks, no CLS, no final norm) loads through
`load_encoder` (`converters.hf_molmo2`) from a whole `molmo2` checkpoint (the released names
transformers writes back on save): every layer equals the reference's <= 1e-5 (tiny random
models saved with `save_pretrained`, every weight jittered), at a square and a non-square
`image_size`; `load_vision_side` gives `get_image_features` for one crop per image."""

from __future__ import annotations

import pytest
import torch

from parity_helpers import close, perturb
from test_molmo2_connector import ADAPTER, D_LLM, PATCH, SIDE, TEXT, VISION, _index
from vlm_encoder import load_encoder, load_vision_side
from vlm_encoder.converters import hf_molmo2
from vlm_encoder.weights import WeightsError

transformers = pytest.importorskip("transformers")
from transformers import Molmo2Config  # noqa: E402
from transformers.models.molmo2.image_processing_molmo2 import batch_pixels_to_patches  # noqa: E402
from transformers.models.molmo2.modeling_molmo2 import Molmo2ForConditionalGeneration  # noqa: E402

TOKENS = dict(image_start_token_id=60, low_res_image_start_token_id=61, image_end_token_id=62, image_patch_id=63,
              frame_start_token_id=64, frame_end_token_id=65)


def _whole(directory, size):
    torch.manual_seed(0)
    config = Molmo2Config(vision_config=dict(VISION, image_size=list(size)), adapter_config=ADAPTER, text_config=TEXT,
                          **TOKENS)
    reference = perturb(Molmo2ForConditionalGeneration(config))
    reference.save_pretrained(directory)
    return reference, directory


@pytest.fixture(scope="module")
def square(tmp_path_factory):
    return _whole(tmp_path_factory.mktemp("molmo2"), (SIDE * PATCH, SIDE * PATCH))


@pytest.fixture(scope="module")
def non_square(tmp_path_factory):
    return _whole(tmp_path_factory.mktemp("molmo2_ns"), (SIDE * PATCH, 4 * PATCH))


def _patches(images: torch.Tensor) -> torch.Tensor:
    """`(B, C, H, W)` -> the reference's input `(B, N, p*p*C)`, as its processor patchifies."""
    return batch_pixels_to_patches(images.permute(0, 2, 3, 1), PATCH)


@pytest.mark.parametrize("case", ["square", "non_square"])
def test_tower_per_layer(case, request):
    reference, directory = request.getfixturevalue(case)
    encoder = load_encoder(directory)
    assert encoder.source_info["family"] == "molmo2" and not encoder.config.class_token
    images = torch.randn(2, 3, *encoder.config.image_size)
    with torch.no_grad():
        hidden = reference.model.vision_tower(_patches(images), output_hidden_states=True).hidden_states
        out = encoder(images, layers="all", norm=False)
    assert len(hidden) == encoder.num_blocks + 1 == VISION["num_hidden_layers"] + 1
    for i in range(encoder.num_blocks):
        close(f"molmo2 {tuple(images.shape[2:])}", out.patches(i), hidden[i + 1], f"layer {i}")


def test_vision_side_gives_get_image_features_for_one_crop(square):
    reference, directory = square
    side = load_vision_side(directory)
    assert side.connector.config.kind == "molmo_pool" and side.layers == tuple(ADAPTER["vision_feature_layer"])
    assert not side.norm
    images = torch.randn(2, 3, SIDE * PATCH, SIDE * PATCH)
    pooled = SIDE // 2
    with torch.no_grad():
        expected = torch.stack([  # one image (one crop) at a time, as the connector test
            reference.model.get_image_features(crop[None], _index(SIDE, SIDE), torch.tensor([[0, 0, pooled, pooled]]))
            .pooler_output[0] for crop in _patches(images)
        ])
        ours = side.image_tokens(images)
    assert ours.shape == expected.shape == (2, side.num_image_tokens((SIDE, SIDE)), D_LLM)
    close("vision side molmo2", ours, expected, "image tokens")


def test_keys_are_mapped_strictly(square):
    reference, _ = square
    config = hf_molmo2.config_from_hf(reference.config.to_dict())
    memory = {f"model.vision_tower.{k}": v for k, v in reference.model.vision_tower.state_dict().items()}
    ours = hf_molmo2.convert_state_dict(memory, config)  # transformers' in-memory names
    assert ours["patch_embed.proj.weight"].shape == (32, 3, PATCH, PATCH)
    with pytest.raises(WeightsError, match="does not know: extra"):
        hf_molmo2.convert_state_dict({**memory, "model.vision_tower.extra": torch.zeros(1)}, config)
    with pytest.raises(WeightsError, match="found \\['model.vision_backbone.image_vit.', 'model.vision_tower.'\\]"):
        hf_molmo2.convert_state_dict({**memory, "model.vision_backbone.image_vit.x": torch.zeros(1)}, config)
    gqa = reference.config.to_dict()
    gqa["vision_config"]["num_key_value_heads"] = 1
    with pytest.raises(ValueError, match="grouped-query attention"):
        hf_molmo2.config_from_hf(gqa)


def test_released_geometry():
    """Molmo2VisionConfig's defaults are the released tower's: 378 px at patch 14, 27 x 27 table rows."""
    c = hf_molmo2.config_from_hf({"model_type": "molmo2"})
    assert (c.image_size, c.grid_size, c.width, c.head_dim, c.act) == ((378, 378), (27, 27), 1152, 72, "gelu_tanh")


@pytest.mark.parametrize("name", ["allenai/Molmo2-8B", "allenai/Molmo2-4B"])
@pytest.mark.parametrize("load", [load_encoder, load_vision_side])
def test_hub_ids_fail_offline_in_one_line(name, load, empty_cache):
    with pytest.raises(FileNotFoundError) as err:
        load(name)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{name}: config.json not in the Hugging Face cache"), message
