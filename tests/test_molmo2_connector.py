"""Molmo2's adapter (`molmo_pool`) vs transformers' `Molmo2Model.get_image_features` on a tiny
random whole model saved with `save_pretrained` (every weight jittered): the image tokens the
reference feeds its language model, for the processor's multi-crop pooling sets and for one crop
(the sets built from the grid); the pooling sets equal `arange_for_pooling`'s; save / load round
trip; strict keys.

The connector is fed the reference tower's own hidden states at `vision_feature_layer` (our
converted tower and `load_vision_side`: tests/test_molmo2_vision_parity.py)."""

from __future__ import annotations

import pytest
import torch

from parity_helpers import close, perturb
from vlm_encoder.converters.hf_connectors import load_molmo2_connector
from vlm_encoder.projectors import Projector, load_molmo2_adapter
from vlm_encoder.projectors.molmo_pool import pooling_index
from vlm_encoder.weights import WeightsError

transformers = pytest.importorskip("transformers")
from transformers import Molmo2Config  # noqa: E402
from transformers.models.molmo2.image_processing_molmo2 import arange_for_pooling  # noqa: E402
from transformers.models.molmo2.modeling_molmo2 import Molmo2ForConditionalGeneration  # noqa: E402

D_LLM, PATCH, SIDE, LAYERS = 24, 4, 6, [2, 0]  # later layer first, as Molmo2's default [24, 18]
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
              head_dim=16, image_size=[SIDE * PATCH, SIDE * PATCH], patch_size=PATCH)
ADAPTER = dict(vision_feature_layer=LAYERS, hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
               intermediate_size=40, text_hidden_size=D_LLM)
TEXT = dict(hidden_size=D_LLM, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            head_dim=12, vocab_size=64, additional_vocab_size=8)


@pytest.fixture(scope="module")
def molmo2(tmp_path_factory):
    directory = tmp_path_factory.mktemp("molmo2")
    torch.manual_seed(0)
    config = Molmo2Config(vision_config=VISION, adapter_config=ADAPTER, text_config=TEXT, image_start_token_id=60,
                          low_res_image_start_token_id=61, image_end_token_id=62, image_patch_id=63,
                          frame_start_token_id=64, frame_end_token_id=65)
    reference = perturb(Molmo2ForConditionalGeneration(config))
    reference.save_pretrained(directory)
    return reference, directory


def _hidden(reference, pixels: torch.Tensor) -> list[torch.Tensor]:
    """The tower's hidden states at `vision_feature_layer`, in its order: the connector's streams."""
    states = reference.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    return [states[layer + 1 if layer >= 0 else layer] for layer in LAYERS]


def _index(h: int, w: int, pool: int = 2) -> torch.Tensor:
    return arange_for_pooling(torch.arange(h * w).reshape(h, w), pool, pool)[0]


@pytest.mark.parametrize(("grid", "pool"), [((6, 6), 2), ((7, 5), 2), ((5, 6), 4), ((3, 8), 3)])
def test_pooling_sets_are_the_processors(grid, pool):
    assert torch.equal(pooling_index(grid, (pool, pool)), _index(*grid, pool))


def test_multi_crop_tokens_match_get_image_features(molmo2):
    """Two crops as the processor lays them out: the low-res image's 6 x 6 grid, then a crop
    whose valid patches are a 5 x 6 region (indices offset by one crop), 3 + 3 x 3 tokens."""
    reference, directory = molmo2
    connector = load_molmo2_connector(directory)
    pixels = torch.randn(2, SIDE * SIDE, PATCH * PATCH * 3)
    low = _index(SIDE, SIDE)
    crop = _index(5, 6) + SIDE * SIDE
    crop[_index(5, 6) < 0] = -1
    index = torch.cat([low, crop])  # (9 + 9, 4)
    grids = torch.tensor([[3, 3, 3, 3]])
    with torch.no_grad():
        (expected,) = reference.model.get_image_features(pixels, index, grids).pooler_output  # (18, D_llm)
        features = torch.cat(_hidden(reference, pixels), dim=-1)  # fusion='concat' in the config's order
        ours = connector.body.pool_indexed(features, index)
    assert ours.shape == expected.shape == (18, D_LLM)
    close("molmo2 connector multi-crop", ours, expected, "image tokens")


@pytest.mark.parametrize("pool", [2, 4])
def test_one_crop_tokens_from_the_grid(molmo2, pool):
    reference, directory = molmo2
    prefix = "model.multi_modal_projector."
    state = {k[len(prefix):]: v for k, v in reference.state_dict().items() if k.startswith(prefix)}
    connector = load_molmo2_adapter(state, num_layers=2, num_heads=2, pool_size=pool)
    pixels = torch.randn(2, SIDE * SIDE, PATCH * PATCH * 3)
    with torch.no_grad():
        side = -(-SIDE // pool)  # pooled grid
        grids = torch.tensor([[0, 0, side, side]])
        expected = torch.stack([  # one image (one crop) at a time
            reference.model.get_image_features(crop[None], _index(SIDE, SIDE, pool), grids).pooler_output[0]
            for crop in pixels
        ])
        ours = connector(_hidden(reference, pixels), grid_size=(SIDE, SIDE))  # (B, T, D_llm)
    assert ours.shape == expected.shape == (2, side**2, D_LLM) and connector.num_output_tokens((SIDE, SIDE)) == side**2
    close(f"molmo2 connector one crop pool {pool}", ours, expected, "image tokens")


def test_round_trip_and_strict_keys(molmo2, tmp_path):
    _, directory = molmo2
    connector = load_molmo2_connector(directory)
    c = connector.config
    assert c.kind == "molmo_pool" and c.in_dim == (32, 32) and c.options.num_kv_heads == 1 and not c.bias
    connector.save_pretrained(tmp_path / "p")
    again = Projector.from_pretrained(tmp_path / "p")
    x = [torch.randn(1, 35, 32), torch.randn(1, 35, 32)]
    with torch.no_grad():
        assert torch.equal(again(x, grid_size=(7, 5)), connector(x, grid_size=(7, 5)))
    module = lambda key: "image_pooling_2d." if key[5] in "qkvo" else "image_projector."  # noqa: E731 - body.q_proj...
    state = {k.replace("body.", module(k), 1): v for k, v in connector.state_dict().items()}
    assert load_molmo2_adapter(state, num_layers=2, num_heads=2).config == c
    with pytest.raises(WeightsError, match="unexpected \\['extra'\\]"):
        load_molmo2_adapter({**state, "extra": torch.zeros(1)}, num_layers=2, num_heads=2)
    with pytest.raises(WeightsError, match="does not fit"):
        load_molmo2_adapter(state, num_layers=3, num_heads=2)
    with pytest.raises(ValueError, match="not a Molmo2"):
        load_molmo2_connector(tmp_path / "p")
