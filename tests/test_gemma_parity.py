"""Gemma 4 vision tower and the Gemma 3 / Gemma 4 connector (`gemma_pool`) vs their references, on
tiny random models saved to disk with every weight jittered:

  * the tower, every layer, against transformers' `Gemma4VisionModel` (a saved tower directory,
    and the tower of a saved whole `gemma4` model) and timm's `Gemma4VitEncoder` /
    `Gemma4VitClassifier` (a saved weight file), at the tables' native size and non-square sizes;
  * the image tokens each reference feeds its LLM (`get_image_features(...).pooler_output`) from a
    whole saved `gemma4` and `gemma3` directory, through `load_encoder` + `load_gemma_projector`;
  * projector save / load round trips; the real hub ids and timm names offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

from transformers import Gemma4VisionConfig  # noqa: E402
from transformers.models.gemma4.image_processing_gemma4 import convert_image_to_patches  # noqa: E402
from transformers.models.gemma4.modeling_gemma4 import Gemma4VisionModel  # noqa: E402

from parity_helpers import close, perturb  # noqa: E402
from vlm_encoder import VisionConfig, VisionEncoder, WeightsError, load_encoder  # noqa: E402
from vlm_encoder.cli import main  # noqa: E402
from vlm_encoder.converters import hf_gemma4  # noqa: E402
from vlm_encoder.converters.hf_gemma4 import load_gemma_projector  # noqa: E402
from vlm_encoder.projectors import Projector, build_projector  # noqa: E402

PATCH, K, TABLE = 4, 3, 16
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
              head_dim=16, patch_size=PATCH, position_embedding_size=TABLE, pooling_kernel_size=K)
TEXT = dict(vocab_size=64, hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=8, global_head_dim=8, vocab_size_per_layer_input=64, hidden_size_per_layer_input=4)
# The native size (the tables' 15 patches a side, whole pooling blocks) and two non-square ones.
SIZES = [(60, 60), (24, 48), (36, 12)]
TIMM_TINY = dict(embed_dim=32, depth=2, num_heads=2, head_dim=16, intermediate_size=48, patch_size=PATCH,
                 position_embedding_size=TABLE, pooling_kernel_size=K)


def _patches(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' processor input for `[0, 1]` images `(B, 3, H, W)`: flattened patches
    `(B, N, p*p*3)` and their `(x, y)` positions `(B, N, 2)` (no padding)."""
    B, _, H, W = images.shape
    flat = torch.stack([convert_image_to_patches(image, PATCH) for image in images])
    ys, xs = torch.meshgrid(torch.arange(H // PATCH), torch.arange(W // PATCH), indexing="ij")
    return flat, torch.stack([xs.flatten(), ys.flatten()], dim=-1).expand(B, -1, -1)


def _layers(model, inputs: tuple, layers) -> list[torch.Tensor]:
    """Every block's output of a reference, caught by hooks."""
    caught: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda m, a, out: caught.append(out[0] if isinstance(out, tuple) else out))
             for layer in layers]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return caught


def _ours(encoder: VisionEncoder, images: torch.Tensor):
    with torch.no_grad():
        return encoder((images - 0.5) / 0.5, layers="all")  # the processor's mean = std = 0.5


def clip_bounds(model: torch.nn.Module, seed: int = 2) -> torch.nn.Module:
    """Finite clamp bounds on every clippable linear (as the E2B / E4B checkpoints), tight enough
    to clip: inputs to +-[1, 2], outputs to +-[0.2, 0.6], each bound its own."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            bound = name.rsplit(".", 1)[-1]
            if bound in hf_gemma4.CLAMP_BUFFERS:
                low, high = (1.0, 2.0) if bound.startswith("input") else (0.2, 0.6)
                value = low + (high - low) * torch.rand((), generator=generator)
                buffer.fill_(-value if bound.endswith("min") else value)
    return model


@pytest.fixture(scope="module")
def hf_tower(tmp_path_factory):
    """A saved `Gemma4VisionModel` with standardize and clipped linears (finite bounds that clip)."""
    torch.manual_seed(0)
    reference = clip_bounds(perturb(Gemma4VisionModel(Gemma4VisionConfig(**VISION, standardize=True, use_clipped_linears=True))))
    directory = tmp_path_factory.mktemp("gemma4_vision")
    reference.save_pretrained(directory)
    return reference, directory


@pytest.fixture(scope="module")
def gemma4_whole(tmp_path_factory):
    """A saved whole `Gemma4ForConditionalGeneration` with a standardizing tower and clipped linears."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    torch.manual_seed(0)
    vision = dict(VISION, standardize=True, use_clipped_linears=True)
    model = clip_bounds(perturb(Gemma4ForConditionalGeneration(Gemma4Config(text_config=TEXT, vision_config=vision, audio_config=None))))
    directory = tmp_path_factory.mktemp("gemma4")
    model.save_pretrained(directory)
    return model, directory


@pytest.fixture(scope="module")
def gemma3_whole(tmp_path_factory):
    """A saved whole `Gemma3ForConditionalGeneration`: SigLIP 32 px / patch 4 (8 x 8), 4 tokens."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    config = Gemma3Config(
        text_config=dict(vocab_size=300, hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=8),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                           patch_size=4, vision_use_head=False),
        mm_tokens_per_image=4,
    )
    model = perturb(Gemma3ForConditionalGeneration(config))
    directory = tmp_path_factory.mktemp("gemma3")
    model.save_pretrained(directory)
    transformers.Gemma3ImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return model, directory


# ---------------------------------------------------------------------------- the tower
def test_config_maps_the_tower():
    config = hf_gemma4.config_from_hf(Gemma4VisionConfig(**VISION))
    assert (config.pos_embed, config.pos_table_size, config.grid_size) == ("factorized", TABLE, (15, 15))
    assert (config.rope, config.rope_xy, config.rope_layout, config.rope_theta) == ("eva", True, "split", 100.0)
    assert config.qk_norm and config.v_norm and config.sandwich_norm and not config.final_norm
    assert (config.norm_type, config.mlp_type, config.act, config.qkv_bias) == ("rmsnorm", "gated", "gelu_tanh", False)
    assert not config.clipped_linears and hf_gemma4.config_from_hf(Gemma4VisionConfig(**VISION, use_clipped_linears=True)).clipped_linears
    with pytest.raises(ValueError, match="num_key_value_heads=1"):
        hf_gemma4.config_from_hf(Gemma4VisionConfig(**{**VISION, "num_key_value_heads": 1}))
    with pytest.raises(ValueError, match="head_dim=8"):
        hf_gemma4.config_from_hf(Gemma4VisionConfig(**{**VISION, "head_dim": 8}))


def test_new_vision_config_fields_are_checked():
    base = dict(image_size=32, patch_size=4, width=32, depth=1, num_heads=2, class_token=False, pool="none")
    with pytest.raises(ValueError, match="pos_table_size applies to pos_embed='factorized'"):
        VisionConfig(**base, pos_table_size=8)
    with pytest.raises(ValueError, match="smaller than the native grid"):
        VisionConfig(**base, pos_embed="factorized", pos_table_size=4)
    assert VisionConfig(**base, pos_embed="factorized").pos_table_size == 8
    encoder = VisionEncoder(VisionConfig(**base, pos_embed="factorized"))
    with pytest.raises(ValueError, match="larger than the position tables"):
        encoder(torch.randn(1, 3, 36, 32))
    plain = set(VisionEncoder(VisionConfig(**base)).state_dict())
    gemma = set(VisionEncoder(VisionConfig(**base, sandwich_norm=True, v_norm=True, mlp_type="gated")).state_dict())
    assert {k.rsplit(".", 1)[0] for k in gemma - plain} == {"blocks.0.post_attn_norm", "blocks.0.post_mlp_norm"}  # v_norm: none
    clipped = VisionEncoder(VisionConfig(**base, clipped_linears=True, mlp_type="gated")).state_dict()
    assert clipped["blocks.0.attn.qkv.in_min"].shape == (3,) and clipped["blocks.0.mlp.fc1.out_max"].shape == (2,)
    assert clipped["blocks.0.attn.proj.in_max"].isinf().all()  # no clamp until loaded


@pytest.mark.parametrize("size", SIZES)
def test_every_layer_of_the_saved_tower_matches_transformers(hf_tower, size):
    reference, directory = hf_tower
    encoder = load_encoder(directory)
    assert encoder.source_info["family"] == "gemma4_vision"
    assert encoder.image_processor.config.mean == (0.5, 0.5, 0.5)
    images = torch.rand(2, 3, *size)
    expected = _layers(reference, _patches(images), reference.encoder.layers)
    out = _ours(encoder, images)
    assert out.grid_size == (size[0] // PATCH, size[1] // PATCH) and out.cls_tokens is None
    for i, hidden in enumerate(expected):
        close(f"gemma4 hf {size}", out.patches(i), hidden, f"block {i}")


def test_early_stop_matches(hf_tower):
    reference, directory = hf_tower
    images = torch.rand(1, 3, 24, 48)
    expected = _layers(reference, _patches(images), reference.encoder.layers)
    with torch.no_grad():
        out = load_encoder(directory)((images - 0.5) / 0.5, layers=(0,))
    assert out.layers == (0,)
    close("gemma4 hf early stop", out.patches(0), expected[0], "block 0")


def test_the_clamp_bounds_count(hf_tower):
    """The tiny tower's bounds do clip: lifting them changes every layer."""
    _, directory = hf_tower
    encoder = load_encoder(directory)
    images = torch.rand(1, 3, 24, 48)
    clipped = _ours(encoder, images)
    with torch.no_grad():
        for name, buffer in encoder.named_buffers():
            if name.rsplit(".", 1)[-1] in ("in_min", "in_max", "out_min", "out_max"):
                buffer.fill_(float("inf") if name.endswith("max") else -float("inf"))
    free = _ours(encoder, images)
    assert all((clipped.patches(i) - free.patches(i)).abs().max() > 1e-2 for i in range(2))


def test_images_of_their_own_sizes_pack(hf_tower):
    """Gemma 4's variable resolution: images at their own grids, packed into one sequence, equal
    each image alone (`encode_packed`; the factorized tables and `split` RoPE rows per image)."""
    from vlm_encoder.packing import encode_packed

    encoder = load_encoder(hf_tower[1])
    images = [torch.rand(3, 24, 48), torch.rand(3, 36, 12), torch.rand(3, 60, 60)]
    with torch.no_grad():
        packed = encode_packed(encoder, [(image - 0.5) / 0.5 for image in images], layers=(0, -1))
        for image, out in zip(images, packed):
            alone = _ours(encoder, image[None])
            assert out.grid_size == alone.grid_size
            for layer in (0, -1):
                torch.testing.assert_close(out.patches(layer), alone.patches(layer), atol=1e-5, rtol=0)


def test_converter_is_strict(hf_tower):
    state = hf_tower[0].state_dict()
    del state["encoder.layers.1.mlp.up_proj.linear.weight"]
    with pytest.raises(WeightsError, match="up_proj"):
        hf_gemma4.convert_state_dict(state)
    state = hf_tower[0].state_dict()
    state["encoder.layers.0.self_attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError, match="self_attn.extra"):
        hf_gemma4.convert_state_dict(state)
    state = hf_tower[0].state_dict()
    del state["encoder.layers.0.self_attn.k_proj.output_max"]
    with pytest.raises(WeightsError, match="missing the keys encoder.layers.0.self_attn.k_proj.output_max"):
        hf_gemma4.convert_state_dict(state)


# ---------------------------------------------------------------------------- timm
def _timm_reference(name: str, tmp_path: Path):
    """A timm model with transformers' init of the position tables (ones: timm's are HF's weights
    renamed), then jittered. With timm's own init (std 0.02) the embeddings are ~10x smaller and the
    unit-scale attention over normed queries and keys amplifies the float32 rounding of the patch
    embedding (a convolution here, a Linear there; 2.4e-7) to 2-4e-5 by block 1."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **TIMM_TINY)
    with torch.no_grad():
        model.get_parameter(f"{'encoder.' if hasattr(model, 'encoder') else ''}patch_embed.position_embedding_table").fill_(1.0)
    clip_bounds(perturb(model))  # the 167m (E2B / E4B) arch has clipped linears
    path = tmp_path / "gemma4_timm.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


@pytest.mark.parametrize("name", ["gemma4_vit_570m_enc", "gemma4_vit_167m"])  # encoder (standardize), classifier (clipped)
def test_every_layer_matches_timm(name, tmp_path):
    reference, path = _timm_reference(name, tmp_path)
    encoder = hf_gemma4.load_timm_gemma4(name, str(path), **TIMM_TINY)
    assert encoder.image_processor.config.mean == (0.5, 0.5, 0.5)
    for size in [(36, 36), (24, 48)]:
        images = torch.rand(2, 3, *size)
        with torch.no_grad():
            expected = reference.forward_intermediates(images, output_fmt="NLC", intermediates_only=True)
        out = _ours(encoder, images)
        for i, hidden in enumerate(expected):
            close(f"gemma4 timm {name} {size}", out.patches(i), hidden, f"block {i}")


def test_timm_names_route_to_the_gemma4_converter():
    for name in ("gemma4_vit_167m_enc.gemma4_e4b_it", "gemma4_vit_570m.gemma4_31b_it"):
        assert hf_gemma4.is_gemma4(name)
    assert not hf_gemma4.is_gemma4("vit_base_patch16_224")


# ---------------------------------------------------------------------------- the connectors
@pytest.mark.parametrize("size", [(36, 36), (24, 48)])
def test_gemma4_image_tokens_match_get_image_features(gemma4_whole, size):
    model, directory = gemma4_whole
    encoder = load_encoder(directory)
    assert encoder.source_info["family"] == "gemma4"
    projector = load_gemma_projector(directory)
    assert projector.config.kind == "gemma_pool" and projector.body.std_bias is not None
    images = torch.rand(2, 3, *size)
    with torch.no_grad():
        expected = model.get_image_features(*_patches(images)).pooler_output  # one (M, D_llm) per image
        tokens = projector(encoder((images - 0.5) / 0.5).patches(-1), (size[0] // PATCH, size[1] // PATCH))
    assert tokens.shape == (2, size[0] * size[1] // (PATCH * K) ** 2, TEXT["hidden_size"])
    for b in range(2):
        close(f"gemma4 connector {size}", tokens[b], expected[b], f"image {b}")


def test_gemma4_padded_batch_of_two_sizes_matches_each_image_alone(gemma4_whole):
    """The reference's variable-resolution batch: images of different grids padded to one patch
    count (positions -1), as its processor hands them; ours encodes each image at its own size."""
    model, directory = gemma4_whole
    encoder, projector = load_encoder(directory), load_gemma_projector(directory)
    images = [torch.rand(1, 3, 24, 48), torch.rand(1, 3, 36, 12)]  # 6x12 and 9x3 patches
    pieces = [_patches(image) for image in images]
    longest = max(flat.shape[1] for flat, _ in pieces)
    flat = torch.cat([torch.nn.functional.pad(f, (0, 0, 0, longest - f.shape[1])) for f, _ in pieces])
    positions = torch.cat([torch.nn.functional.pad(p, (0, 0, 0, longest - p.shape[1]), value=-1) for _, p in pieces])
    with torch.no_grad():
        expected = model.get_image_features(flat, positions).pooler_output
        for b, image in enumerate(images):
            grid = (image.shape[2] // PATCH, image.shape[3] // PATCH)
            tokens = projector(encoder((image - 0.5) / 0.5).patches(-1), grid)
            close("gemma4 connector padded batch", tokens[0], expected[b], f"image {b}")


def test_gemma3_processor_is_its_siglip_processor(gemma3_whole):
    """The saved `Gemma3ImageProcessor` becomes ours: the same pixels (torchvision backend)."""
    import numpy as np
    from PIL import Image

    encoder = load_encoder(gemma3_whole[1])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    expected = transformers.Gemma3ImageProcessor.from_pretrained(gemma3_whole[1])(image, return_tensors="pt").pixel_values
    assert (encoder.image_processor.config.size, encoder.image_processor.config.interpolation) == ((32, 32), "bilinear")
    torch.testing.assert_close(encoder.image_processor([image]), expected, atol=1e-5, rtol=0)


def test_gemma3_siglip_tower_and_image_tokens_match_get_image_features(gemma3_whole):
    model, directory = gemma3_whole
    encoder = load_encoder(directory)
    assert encoder.source_info["family"] == "gemma3" and encoder.source_info["vision_family"] == "siglip"
    projector = load_gemma_projector(directory)
    assert projector.num_output_tokens((8, 8)) == 4
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.get_image_features(pixels)
        out = encoder(pixels, layers="all", norm=True)
        tokens = projector(out.patches(-1), out.grid_size)
    close("gemma3 siglip tower", out.patches(-1), expected.last_hidden_state, "post_layernorm output")
    close("gemma3 connector", tokens, expected.pooler_output, "image tokens")


@pytest.mark.parametrize("which", ["gemma3", "gemma4"])
def test_projector_round_trip(which, gemma3_whole, gemma4_whole, tmp_path):
    directory = (gemma3_whole if which == "gemma3" else gemma4_whole)[1]
    projector = load_gemma_projector(directory)
    projector.save_pretrained(tmp_path / "proj")
    again = Projector.from_pretrained(tmp_path / "proj")
    tokens = torch.randn(2, 144, 32)  # a 12 x 12 grid: whole 3 x 3 and 4 x 4 blocks
    with torch.no_grad():
        torch.testing.assert_close(again(tokens, (12, 12)), projector(tokens, (12, 12)), atol=0, rtol=0)
    assert again.config == projector.config


def test_gemma_pool_needs_whole_blocks_and_a_gemma_checkpoint(hf_tower):
    projector = build_projector("gemma_pool", 8, 4, kernel_size=3)
    with pytest.raises(ValueError, match="divisible by 3"):
        projector(torch.randn(1, 20, 8), (4, 5))
    with pytest.raises(ValueError, match="model_type='gemma4_vision' is not a Gemma VLM"):
        load_gemma_projector(hf_tower[1])


# ---------------------------------------------------------------------------- real names, offline
HUB_IDS = {"google/gemma-3-4b-it": "gemma3", "google/gemma-4-e2b-it": "gemma4", "google/gemma-4-26B-A4B-it": "gemma4"}


def _one_line(spec: str, capsys) -> str:
    assert main(["info", spec]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and not captured.out, captured.err
    assert "not in the" in lines[0] and "cache" in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("name", sorted(HUB_IDS))
def test_real_hub_ids_fail_offline_in_one_line(name, empty_cache, capsys):
    assert _one_line(name, capsys).startswith(f"vlm-encoder info: error: {name}: config.json not in the Hugging Face cache")


@pytest.mark.parametrize("name", sorted(HUB_IDS))
def test_real_hub_ids_model_type_goes_to_its_converter(name, gemma3_whole, gemma4_whole):
    """Offline the real `config.json` is not there: a tiny saved directory of the same `model_type`
    (the real ones: `gemma3`, `gemma4`) stands in for it."""
    directory = (gemma3_whole if HUB_IDS[name] == "gemma3" else gemma4_whole)[1]
    assert json.loads((Path(directory) / "config.json").read_text())["model_type"] == HUB_IDS[name]
    assert load_encoder(directory).source_info["family"] == HUB_IDS[name]


@pytest.mark.slow  # timm builds the whole random model (167M: ~17 s, 570M) before it looks for the weights
@pytest.mark.parametrize("name", ["gemma4_vit_167m_enc.gemma4_e4b_it", "gemma4_vit_570m_enc.gemma4_31b_it"])
def test_real_timm_names_fail_offline_in_one_line(name, empty_cache, capsys):
    line = _one_line(f"timm:{name}", capsys)
    assert f"timm pretrained weights for {name!r}" in line
