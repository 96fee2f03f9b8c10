"""`pixel_shuffle`'s `order='offset_major'` against transformers' own InternVL and Idefics3
pixel shuffles (bitwise), and their connector weights loaded into our projector (same output)."""

import pytest
import torch
from transformers import Idefics3Config, InternVLConfig
from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector
from transformers.models.internvl.modeling_internvl import InternVLModel, InternVLMultiModalProjector

from projectors import build_projector, load_idefics3_connector, load_internvl_projector
from vlm_encoder.projectors.pixel_shuffle import space_to_depth
from vlm_encoder.weights import WeightsError

D = 8


def internvl_shuffle(tokens, grid, s):
    """transformers' InternVL path: row-major tokens as (B, h, w, C), shuffle, flatten."""
    B, _, C = tokens.shape
    out = InternVLModel.pixel_shuffle(None, tokens.reshape(B, grid[0], grid[1], C), scale_factor=1 / s)
    return out.reshape(B, -1, out.shape[-1])


@pytest.mark.parametrize("s", [2, 4])  # InternVL's downsample_ratio 0.5, 0.25
@pytest.mark.parametrize("grid", [(8, 8), (8, 16)])
def test_offset_major_is_internvl_order(grid, s):
    tokens = torch.randn(2, grid[0] * grid[1], D)
    assert torch.equal(space_to_depth(tokens, grid, s, "offset_major"), internvl_shuffle(tokens, grid, s))


@pytest.mark.parametrize("s", [2, 3])
def test_offset_major_is_idefics3_order(s):
    tokens = torch.randn(2, 36, D)  # Idefics3 takes square grids only
    reference = Idefics3Connector.pixel_shuffle(None, tokens, scale_factor=s)
    assert torch.equal(space_to_depth(tokens, (6, 6), s, "offset_major"), reference)


def test_channel_major_is_pixel_unshuffle_and_differs_from_the_references():
    tokens = torch.randn(1, 16, D)
    ours = space_to_depth(tokens, (4, 4), 2, "channel_major")
    unshuffled = torch.nn.functional.pixel_unshuffle(tokens.transpose(1, 2).reshape(1, D, 4, 4), 2)
    assert torch.equal(ours, unshuffled.flatten(2).transpose(1, 2))
    assert not torch.equal(ours, internvl_shuffle(tokens, (4, 4), 2))
    # The same patches, each token's channels permuted.
    assert torch.equal(ours.sort(-1).values, internvl_shuffle(tokens, (4, 4), 2).sort(-1).values)


def test_order_is_a_typed_option():
    with pytest.raises(ValueError, match="order"):
        build_projector("pixel_shuffle", D, 16, order="internvl_v1")
    proj = build_projector("pixel_shuffle", D, 16, order="offset_major", num_linear=1)
    assert proj.config.options.order == "offset_major" and len(proj.body.mlp) == 1


def test_internvl_projector_weights_give_internvl_output(tmp_path):
    config = InternVLConfig(
        vision_config={"hidden_size": D, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16},
        text_config={"model_type": "qwen2", "hidden_size": 24, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "intermediate_size": 32, "vocab_size": 64},
        downsample_ratio=0.5,
    )
    torch.manual_seed(0)
    reference = InternVLMultiModalProjector(config).eval()
    for p in reference.parameters():  # LayerNorm starts at ones / zeros: perturb it so it is tested
        torch.nn.init.normal_(p, std=0.5)
    ours = load_internvl_projector(reference.state_dict(), scale_factor=2)
    tokens = torch.randn(2, 16, D)
    with torch.no_grad():
        expected = reference(internvl_shuffle(tokens, (4, 4), 2))
        torch.testing.assert_close(ours(tokens, grid_size=(4, 4)), expected, rtol=1e-6, atol=1e-6)
        ours.save_pretrained(tmp_path / "p")
        again = type(ours).from_pretrained(tmp_path / "p")
        assert torch.equal(again(tokens, grid_size=(4, 4)), ours(tokens, grid_size=(4, 4)))


def test_idefics3_connector_weights_give_idefics3_output():
    config = Idefics3Config(
        vision_config={"hidden_size": D, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16},
        text_config={"model_type": "llama", "hidden_size": 24, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "intermediate_size": 32, "vocab_size": 64},
        scale_factor=2,
    )
    torch.manual_seed(0)
    reference = Idefics3Connector(config).eval()
    ours = load_idefics3_connector(reference.state_dict(), scale_factor=2)
    tokens = torch.randn(2, 36, D)
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens, grid_size=(6, 6)), reference(tokens), rtol=1e-6, atol=1e-6)


def test_connector_loaders_are_strict():
    with pytest.raises(WeightsError, match="missing"):
        load_internvl_projector({"linear_1.weight": torch.zeros(4, 4 * D)})
    with pytest.raises(WeightsError, match="multiple of"):
        load_idefics3_connector({"modality_projection.proj.weight": torch.zeros(4, 6)}, scale_factor=2)
