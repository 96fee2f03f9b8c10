"""Llama 4's and PerceptionLM's connectors vs transformers on tiny random whole models saved with
`save_pretrained` (every weight jittered): the image tokens each reference feeds its language
model, from the connector our loaders read out of the saved directory; save / load round trips;
strict keys.

Llama 4's connector is fed the reference tower's own patch tokens (the input of `vision_adapter`;
our converted tower and `load_vision_side`: tests/test_llama4_vision_parity.py). PerceptionLM's tower is a timm PE `Eva`
(`TimmWrapperModel`): our `VisionEncoder` converted from it (`timm_eva.encoder_from_timm_eva`)
gives the connector its tokens."""

from __future__ import annotations

import pytest
import torch

from parity_helpers import close, perturb
from vlm_encoder.converters.hf_connectors import load_llama4_connector, load_perception_lm_connector
from vlm_encoder.converters.timm_eva import encoder_from_timm_eva
from vlm_encoder.projectors import (
    Projector,
    load_llama4_projector,
    load_perception_lm_projector,
)
from vlm_encoder.weights import WeightsError

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    Llama4Config,
    Llama4ForConditionalGeneration,
    PerceptionLMConfig,
    PerceptionLMForConditionalGeneration,
)

D_LLM = 24
TEXT = dict(hidden_size=D_LLM, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            vocab_size=64)
L4_VISION = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=24,
                 patch_size=4, pixel_shuffle_ratio=0.5, projector_input_dim=40, projector_output_dim=40,
                 vision_output_dim=40, rope_theta=10000)
PLM_VISION = {"architecture": "vit_pe_core_large_patch14_336", "num_classes": 0,
              "model_args": {"embed_dim": 32, "img_size": (32, 32), "patch_size": 4, "depth": 2, "num_heads": 2,
                             "global_pool": "", "use_post_transformer_norm": False, "init_values": 0.1,
                             "ref_feat_shape": (8, 8)}}


@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama4")
    torch.manual_seed(0)
    text = dict(TEXT, intermediate_size_mlp=32, head_dim=12, num_local_experts=2, num_experts_per_tok=1)
    config = Llama4Config(vision_config=L4_VISION, text_config=text, image_token_id=60)
    reference = perturb(Llama4ForConditionalGeneration(config))
    reference.save_pretrained(directory)
    return reference, directory


@pytest.fixture(scope="module")
def perception_lm(tmp_path_factory):
    directory = tmp_path_factory.mktemp("perception_lm")
    torch.manual_seed(0)
    config = PerceptionLMConfig(vision_config=PLM_VISION, text_config=dict(TEXT, model_type="llama"),
                                projector_pooling_ratio=2, image_token_id=60, video_token_id=61)
    reference = perturb(PerceptionLMForConditionalGeneration(config))
    reference.save_pretrained(directory)
    return reference, directory


def _llama4_reference(reference, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tower's patch tokens (what `vision_adapter` receives) and the image tokens the LLM
    receives: `multi_modal_projector(get_image_features(...).last_hidden_state)`, `(B, T, D_llm)`."""
    seen: list[torch.Tensor] = []
    hook = reference.vision_model.vision_adapter.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    try:
        features = reference.get_image_features(pixel_values=images).last_hidden_state  # (B, T, P)
    finally:
        hook.remove()
    flat = reference.multi_modal_projector(features.view(-1, features.size(-1)))  # what forward scatters
    return seen[0], flat.view(images.shape[0], -1, flat.shape[-1])


def test_llama4_connector_gives_the_image_tokens_the_llm_receives(llama4):
    reference, directory = llama4
    connector = load_llama4_connector(directory)
    assert connector.config.kind == "pixel_shuffle" and connector.config.options.order == "offset_major"
    images = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        patches, expected = _llama4_reference(reference, images)
        side = 24 // 4
        ours = connector(patches, grid_size=(side, side))
    assert ours.shape == expected.shape == (2, (side // 2) ** 2, D_LLM)
    assert connector.num_output_tokens((side, side)) == ours.shape[1]
    close("llama4 connector", ours, expected, "image tokens")


def test_llama4_connector_round_trip_and_strict_keys(llama4, tmp_path):
    _, directory = llama4
    connector = load_llama4_connector(directory)
    connector.save_pretrained(tmp_path / "p")
    again = Projector.from_pretrained(tmp_path / "p")
    x = torch.randn(1, 36, 32)
    with torch.no_grad():
        assert torch.equal(again(x, grid_size=(6, 6)), connector(x, grid_size=(6, 6)))
    state = {"fc1.weight": torch.zeros(40, 128), "fc2.weight": torch.zeros(40, 40),
             "linear_1.weight": torch.zeros(8, 40)}
    with pytest.raises(WeightsError, match="unexpected \\['extra'\\]"):
        load_llama4_projector({**state, "extra": torch.zeros(1)})
    with pytest.raises(WeightsError, match="do not chain"):
        load_llama4_projector({**state, "fc2.weight": torch.zeros(40, 48)})
    with pytest.raises(ValueError, match="not a Llama 4 VLM"):
        load_llama4_connector(tmp_path / "p")


def test_perception_lm_connector_on_our_encoder_gives_get_image_features(perception_lm):
    reference, directory = perception_lm
    encoder = encoder_from_timm_eva(reference.model.vision_tower.timm_model)
    connector = load_perception_lm_connector(directory)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference.model.get_image_features(pixel_values=images[:, None]).pooler_output  # (B, T, D_llm)
        out = encoder(images, norm=True)
        ours = connector(out.patches(-1), out.grid_size)
    assert ours.shape == expected.shape == (2, 4 * 4, D_LLM)
    assert connector.num_output_tokens(out.grid_size) == ours.shape[1]
    close("perception_lm connector", ours, expected, "image tokens")


def test_perception_lm_connector_on_a_non_square_grid(perception_lm):
    """The reference pools square grids only (and its timm tower has a fixed size): on a 10 x 6
    grid its own projector layers and `adaptive_avg_pool2d` to `(h // 2, w // 2)` by hand."""
    reference, directory = perception_lm
    connector = load_perception_lm_connector(directory)
    tokens = torch.randn(2, 60, 32)
    with torch.no_grad():
        projector = reference.model.multi_modal_projector
        mlp = projector.linear_2(projector.gelu(projector.linear_1(tokens)))  # (B, h*w, D)
        grid = mlp.transpose(1, 2).reshape(2, D_LLM, 10, 6)
        expected = torch.nn.functional.adaptive_avg_pool2d(grid, (5, 3)).flatten(2).transpose(1, 2)
        ours = connector(tokens, grid_size=(10, 6))
    close("perception_lm connector 10x6", ours, expected, "image tokens")


def test_perception_lm_connector_round_trip_and_strict_keys(perception_lm, tmp_path):
    _, directory = perception_lm
    connector = load_perception_lm_connector(directory)
    assert connector.config.kind == "mlp_pool" and connector.config.options.pooling_ratio == 2
    connector.save_pretrained(tmp_path / "p")
    again = Projector.from_pretrained(tmp_path / "p")
    x = torch.randn(1, 64, 32)
    with torch.no_grad():
        assert torch.equal(again(x, grid_size=(8, 8)), connector(x, grid_size=(8, 8)))
    with pytest.raises(WeightsError, match="missing \\['linear_2.bias'\\]"):
        load_perception_lm_projector({k: v for k, v in connector.state_dict().items() if False} | {
            "linear_1.weight": torch.zeros(D_LLM, 32), "linear_1.bias": torch.zeros(D_LLM),
            "linear_2.weight": torch.zeros(D_LLM, D_LLM)})
    with pytest.raises(ValueError, match="not a PerceptionLM"):
        load_perception_lm_connector(tmp_path / "p")
    identity = load_perception_lm_projector({k.replace("body.mlp.0", "linear_1").replace("body.mlp.2", "linear_2"): v
                                             for k, v in connector.state_dict().items()}, pooling_ratio=1)
    assert identity.num_output_tokens((8, 8)) == 64
