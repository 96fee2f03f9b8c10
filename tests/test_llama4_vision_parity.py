"""Llama 4's vision tower (`Llama4VisionModel`: Unfold patch embedding, CLS appended last, learned
table, `layernorm_pre` / `layernorm_post`, Pixtral-style 2D RoPE) loads through `load_encoder`
(`converters.hf_llama4`) from a whole `llama4` checkpoint and from the tower saved alone: every
layer equals the reference's <= 1e-5 (tiny random models saved with `save_pretrained`, every
weight jittered); `load_vision_side` gives `multi_modal_projector(get_image_features(...))`.

The reference builds its rotary and position tables for `image_size` only (square): it takes no
other size, so there is no non-square reference to compare with."""

from __future__ import annotations

import pytest
import torch

from parity_helpers import close, perturb
from test_llama4_perception_lm_connectors import D_LLM, L4_VISION, _llama4_reference
from test_llama4_perception_lm_connectors import llama4 as llama4_whole  # noqa: F401 - fixture
from vlm_encoder import load_encoder, load_vision_side
from vlm_encoder.converters import hf_llama4
from vlm_encoder.weights import WeightsError

transformers = pytest.importorskip("transformers")
from transformers import Llama4VisionConfig, Llama4VisionModel  # noqa: E402

SIZE, PATCH = L4_VISION["image_size"], L4_VISION["patch_size"]


def _check_layers(case: str, tower, encoder, images: torch.Tensor) -> None:
    """Every layer (the reference's CLS is last, ours first) and the final-normed patches the
    connector reads (the input of `vision_adapter`)."""
    seen: list[torch.Tensor] = []
    hook = tower.vision_adapter.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    try:
        with torch.no_grad():
            hidden = tower(images, output_hidden_states=True).hidden_states
            out = encoder(images, layers="all", norm=False)
            final = encoder(images, norm=True)
    finally:
        hook.remove()
    assert len(hidden) == encoder.num_blocks + 1 == L4_VISION["num_hidden_layers"] + 1
    for i in range(encoder.num_blocks):
        close(case, out.patches(i), hidden[i + 1][:, :-1], f"patches of layer {i}")
        close(case, out.cls(i), hidden[i + 1][:, -1], f"CLS of layer {i}")
    close(case, final.patches(-1), seen[0], "layernorm_post patches (the connector's input)")


def test_whole_checkpoint_tower_per_layer(llama4_whole):  # noqa: F811
    reference, directory = llama4_whole
    encoder = load_encoder(directory)
    c = encoder.config
    assert (c.rope, c.rope_layout, c.rope_grid_offset, c.rope_xy) == ("eva", "interleaved", 1.0, True)
    assert c.class_token and c.norm_pre and c.final_norm and not c.patch_bias
    assert encoder.source_info["family"] == "llama4"
    _check_layers("llama4 24x24", reference.vision_model, encoder, torch.randn(2, 3, SIZE, SIZE))


def test_tower_saved_alone(tmp_path):
    torch.manual_seed(0)
    vision = dict(L4_VISION, image_size=32, num_attention_heads=2, rope_parameters={"rope_theta": 100.0})
    tower = perturb(Llama4VisionModel(Llama4VisionConfig(**{k: v for k, v in vision.items() if k != "rope_theta"})))
    tower.save_pretrained(tmp_path)
    encoder = load_encoder(tmp_path)
    assert encoder.config.rope_theta == 100.0 and encoder.config.num_heads == 2
    _check_layers("llama4 alone 32x32 (head dim 16)", tower, encoder, torch.randn(2, 3, 32, 32))


def test_vision_side_gives_the_image_tokens_the_llm_receives(llama4_whole):  # noqa: F811
    reference, directory = llama4_whole
    side = load_vision_side(directory)
    assert side.connector.config.kind == "pixel_shuffle" and side.norm and side.feature_select == "patch"
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        _, expected = _llama4_reference(reference, images)  # multi_modal_projector(get_image_features(...))
        ours = side.image_tokens(images)
    grid = (SIZE // PATCH, SIZE // PATCH)
    assert ours.shape == expected.shape == (2, side.num_image_tokens(grid), D_LLM)
    close("vision side llama4", ours, expected, "image tokens")


def test_processor_is_one_tile(llama4_whole):  # noqa: F811
    processor = load_encoder(llama4_whole[1]).image_processor
    assert processor.config.size == (SIZE, SIZE) and processor.config.interpolation == "bilinear"


def test_keys_are_mapped_strictly(llama4_whole):  # noqa: F811
    reference, _ = llama4_whole
    config = hf_llama4.config_from_hf(reference.config.to_dict())
    tower = {f"vision_model.{k}": v for k, v in reference.vision_model.state_dict().items()}
    ours = hf_llama4.convert_state_dict(tower, config)
    assert ours["patch_embed.proj.weight"].shape == (32, 3, PATCH, PATCH) and ours["cls_token"].shape == (1, 1, 32)
    with pytest.raises(WeightsError, match="does not know: extra"):
        hf_llama4.convert_state_dict({**tower, "vision_model.extra": torch.zeros(1)}, config)
    del tower["vision_model.layernorm_pre.weight"], tower["vision_model.layernorm_pre.bias"]
    with pytest.raises(WeightsError, match="missing the keys .*layernorm_pre"):
        hf_llama4.convert_state_dict(tower, config)
    bad = reference.config.to_dict()
    bad["vision_config"]["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
    with pytest.raises(ValueError, match="rope_type='linear' is not supported"):
        hf_llama4.config_from_hf(bad)


def test_released_geometry():
    """Llama 4 Scout / Maverick's vision config: head width 88 (22 frequencies per axis)."""
    vision = dict(hidden_size=1408, intermediate_size=5632, num_hidden_layers=34, num_attention_heads=16,
                  image_size=336, patch_size=14, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})
    c = hf_llama4.config_from_hf({"model_type": "llama4", "vision_config": vision})
    assert (c.grid_size, c.head_dim, c.depth, c.rope_theta) == ((24, 24), 88, 34, 10000.0)


@pytest.mark.parametrize("name", ["meta-llama/Llama-4-Scout-17B-16E-Instruct", "meta-llama/Llama-4-Maverick-17B-128E"])
@pytest.mark.parametrize("load", [load_encoder, load_vision_side])
def test_hub_ids_fail_offline_in_one_line(name, load, empty_cache):
    with pytest.raises(FileNotFoundError) as err:
        load(name)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{name}: config.json not in the Hugging Face cache"), message
