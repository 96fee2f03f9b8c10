"""SigLIP2 NaFlex: a tiny random transformers `Siglip2VisionModel` loads through
`load_encoder`, and our packed, unpadded encoding of the processor's images of mixed sizes
matches transformers' padded batch on every layer and the pooled output. From raw images, the
tower's own processor (`encoder.image_processor`, NaFlex) gives `Siglip2ImageProcessor`'s
pixels, through the Python API, `extract --resolution native` and viz's native path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vlm_encoder import load_encoder
from vlm_encoder.converters import hf_siglip2
from vlm_encoder.converters.hf_siglip2 import linear_patch_to_conv, naflex_patches_to_images
from vlm_encoder.packing import encode_packed, naflex_size, native_sizing
from vlm_encoder.weights import WeightsError

transformers = pytest.importorskip("transformers")

TOL = 1e-5
PATCH = 4
MAX_PATCHES = 24
# Raw image sizes: wide, square at the table's own grid (4x4 patches), tall, tiny, odd.
RAW_SIZES = [(13, 29), (40, 40), (7, 50), (32, 16), (16, 16), (3, 5)]


def vision_config(**overrides):
    kwargs = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=PATCH, num_patches=16
    )
    kwargs.update(overrides)
    return transformers.Siglip2VisionConfig(**kwargs)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    return transformers.Siglip2VisionModel(vision_config()).eval()


@pytest.fixture(scope="module")
def saved(hf_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("siglip2")
    hf_model.save_pretrained(directory)
    transformers.Siglip2ImageProcessor(patch_size=PATCH, max_num_patches=MAX_PATCHES).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    raw = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in RAW_SIZES]
    processor = transformers.Siglip2ImageProcessor(patch_size=PATCH, max_num_patches=MAX_PATCHES)
    return raw, processor(images=raw, return_tensors="pt", input_data_format="channels_last")


def test_processor_sizes_are_our_naflex_sizes(batch):
    raw, inputs = batch
    grids = inputs["spatial_shapes"].tolist()
    assert len({tuple(g) for g in grids}) > 2  # really mixed sizes
    for image, (h, w) in zip(raw, grids):
        assert naflex_size(image.shape[0], image.shape[1], PATCH, MAX_PATCHES) == (h * PATCH, w * PATCH)


def test_load_encoder_config_and_info(saved):
    encoder = load_encoder(saved)
    c = encoder.config
    assert (c.image_size, c.patch_size, c.class_token, c.pool) == ((16, 16), PATCH, False, "map")
    assert (c.pos_resample_mode, c.pos_resample_antialias) == ("bilinear", True)
    assert encoder.source_info["family"] == "siglip2"
    assert encoder.source_info["max_num_patches"] == MAX_PATCHES
    # The recorded processor is Siglip2ImageProcessor's: NaFlex sizing, bilinear, mean/std 0.5.
    p = encoder.get_image_processor().config
    assert (p.resize_mode, p.patch_size, p.max_patches) == ("naflex", PATCH, MAX_PATCHES)
    assert (p.interpolation, p.backend, p.mean, p.std) == ("bilinear", "torchvision", (0.5,) * 3, (0.5,) * 3)
    assert p.rescale_factor == pytest.approx(1 / 255)


@torch.no_grad()
def test_packed_matches_transformers_padded_batch(hf_model, saved, batch):
    _, inputs = batch
    reference = hf_model(**inputs, output_hidden_states=True)
    encoder = load_encoder(saved)
    images = naflex_patches_to_images(inputs["pixel_values"], inputs["spatial_shapes"], PATCH)
    outputs = encode_packed(encoder, images, layers="all")
    normed = encode_packed(encoder, images, layers=(-1,), norm=True, max_tokens_per_pack=MAX_PATCHES)
    for i, (ours, ours_normed) in enumerate(zip(outputs, normed)):
        h, w = inputs["spatial_shapes"][i].tolist()
        n = h * w
        assert ours.grid_size == (h, w)
        for layer in range(encoder.num_blocks):
            assert (reference.hidden_states[layer + 1][i, :n] - ours.patches(layer)[0]).abs().max() <= TOL
        assert (reference.last_hidden_state[i, :n] - ours_normed.patches(-1)[0]).abs().max() <= TOL
        assert (reference.pooler_output[i] - ours.pooled[0]).abs().max() <= TOL


@torch.no_grad()
def test_bicubic_resampling_would_not_match(hf_model, saved, batch):
    """Control: the bilinear option matters (the test above can fail)."""
    _, inputs = batch
    reference = hf_model(**inputs)
    encoder = load_encoder(saved)
    encoder.config = encoder.config.replace(pos_resample_mode="bicubic")
    encoder._pos_cache.clear()
    images = naflex_patches_to_images(inputs["pixel_values"], inputs["spatial_shapes"], PATCH)
    pooled = torch.cat([o.pooled for o in encode_packed(encoder, images)])
    assert (reference.pooler_output - pooled).abs().max() > 1e-3


@torch.no_grad()
def test_full_siglip2_model_loads_its_vision_tower(hf_model, tmp_path):
    config = transformers.Siglip2Config(
        vision_config=vision_config(vision_use_head=False).to_dict(),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    )
    torch.manual_seed(1)
    model = transformers.Siglip2Model(config).eval()
    model.save_pretrained(tmp_path)
    encoder = load_encoder(tmp_path)
    assert encoder.config.pool == "none" and encoder.source_info["family"] == "siglip2"
    image = torch.randn(3, 12, 20)
    patches = image.reshape(3, 3, PATCH, 5, PATCH).permute(1, 3, 2, 4, 0).reshape(1, 15, -1)  # HF's flattening
    reference = model.vision_model(
        pixel_values=patches, pixel_attention_mask=torch.ones(1, 15, dtype=torch.long), spatial_shapes=torch.tensor([[3, 5]])
    )
    ours = encode_packed(encoder, [image], norm=True)[0]
    assert (reference.last_hidden_state[0] - ours.patches(-1)[0]).abs().max() <= TOL


def test_patch_weight_flattening_matches_the_processor():
    D, C, p = 5, 3, 4
    weight = torch.randn(D, p * p * C)
    patch = torch.randn(C, p, p)
    flat = patch.permute(1, 2, 0).reshape(-1)  # the processor's (i, j, c) order
    conv = linear_patch_to_conv(weight, C)
    assert torch.allclose(weight @ flat, (conv * patch).sum(dim=(1, 2, 3)), atol=1e-5)


def test_converter_is_strict(hf_model):
    state = dict(hf_model.state_dict())
    with pytest.raises(WeightsError, match="Linear \\(D, p\\*p\\*C\\)"):
        hf_siglip2.convert_state_dict({**state, "embeddings.patch_embedding.weight": torch.zeros(32, 3, 4, 4)})
    with pytest.raises(WeightsError, match="HF SigLIP2.*does not know"):
        hf_siglip2.convert_state_dict({**state, "encoder.extra.weight": torch.zeros(1)})
    with pytest.raises(WeightsError, match="missing"):
        hf_siglip2.convert_state_dict({k: v for k, v in state.items() if not k.startswith("post_layernorm")})
    with pytest.raises(ValueError, match="not a square number"):
        hf_siglip2.config_from_hf(json.loads(vision_config(num_patches=24).to_json_string()))
    with pytest.raises(ValueError, match="model_type 'siglip2'"):
        hf_siglip2.config_from_hf({"model_type": "siglip"})


# ---------------------------------------------------------------------------- from raw images
# PIL images of several aspect ratios: wide, tall, square, large (shrunk to the budget), tiny.
PIL_SIZES = [(30, 90), (90, 30), (40, 40), (120, 200), (6, 9), (57, 23)]


@pytest.fixture(scope="module")
def raw_pil_images():
    rng = np.random.default_rng(1)
    from PIL import Image

    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in PIL_SIZES]


@pytest.fixture(scope="module")
def hf_raw(hf_model, raw_pil_images):
    """transformers' pipeline: `Siglip2ImageProcessor` then `Siglip2VisionModel` (padded batch)."""
    processor = transformers.Siglip2ImageProcessor(patch_size=PATCH, max_num_patches=MAX_PATCHES)
    inputs = processor(images=raw_pil_images, return_tensors="pt")
    with torch.no_grad():
        reference = hf_model(**inputs)
    return inputs, reference


def _check_against_hf(inputs, reference, pixels, outputs):
    """Our per-image pixels `(3, H_i, W_i)` and outputs against transformers' batch."""
    expected = naflex_patches_to_images(inputs["pixel_values"], inputs["spatial_shapes"], PATCH)
    for i, (want, got, out) in enumerate(zip(expected, pixels, outputs)):
        h, w = inputs["spatial_shapes"][i].tolist()
        assert got.shape == want.shape and out.grid_size == (h, w)
        assert (got - want).abs().max() <= 1e-6, f"pixels of image {i}"
        assert (reference.pooler_output[i] - out.pooled[0]).abs().max() <= 1e-4, f"pooled of image {i}"
        assert (reference.last_hidden_state[i, : h * w] - out.patches(-1)[0]).abs().max() <= 1e-4


@torch.no_grad()
def test_raw_images_through_the_towers_processor_match_transformers(saved, raw_pil_images, hf_raw):
    inputs, reference = hf_raw
    assert len({tuple(g) for g in inputs["spatial_shapes"].tolist()}) >= 4  # really several sizes
    encoder = load_encoder(saved)
    pixels = [encoder.image_processor(image)[0] for image in raw_pil_images]  # each at its own NaFlex size
    _check_against_hf(inputs, reference, pixels, encode_packed(encoder, pixels, norm=True))
    with pytest.raises(ValueError, match="NaFlex processor sizes each image to its own grid"):
        encoder.image_processor(raw_pil_images)  # a list of different sizes cannot be one batch


@torch.no_grad()
def test_extract_and_viz_native_use_the_naflex_processor(saved, raw_pil_images, hf_raw, tmp_path):
    from vlm_encoder import FeatureStore
    from vlm_encoder.extract import ExtractConfig, run_extraction
    from vlm_encoder.viz import prepare_native_images

    inputs, reference = hf_raw
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(raw_pil_images):
        image.save(folder / f"img_{i}.png")
    config = ExtractConfig(model=str(saved), dataset=str(folder), out=tmp_path / "out", layers=(-1,),
                           select=("patch", "pooled"), norm=True, resolution="native", num_workers=0, progress=False)
    assert run_extraction(config).complete
    store = FeatureStore(config.out)
    assert store.resolution == {"mode": "native", "max_patches": MAX_PATCHES, "sizing": "naflex"}
    for row in range(len(PIL_SIZES)):
        got = store.get(row)
        h, w = inputs["spatial_shapes"][row].tolist()
        assert got["grid"].tolist() == [h, w]
        assert (reference.pooler_output[row] - got["pooled"]).abs().max() <= 1e-4
        assert (reference.last_hidden_state[row, : h * w] - got["layer1.patch"]).abs().max() <= 1e-4
    # viz's native path: the same sizing policy and budget, the same pixels.
    encoder = load_encoder(saved)
    policy, budget = native_sizing(encoder)
    assert (policy, budget) == ("naflex", MAX_PATCHES)
    pixels, _, _ = prepare_native_images(raw_pil_images, encoder, budget, policy)
    _check_against_hf(inputs, reference, pixels, encode_packed(encoder, pixels, norm=True))


def test_naflex_processor_is_saved_and_defaulted(saved, tmp_path):
    encoder = load_encoder(saved)
    encoder.save_pretrained(tmp_path / "ours")
    assert load_encoder(tmp_path / "ours").get_image_processor() == encoder.get_image_processor()
    # Without a preprocessor_config.json: transformers' defaults (256 patches) at the tower's patch size.
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((saved / name).read_bytes())
    default = load_encoder(bare).get_image_processor().config
    assert (default.resize_mode, default.patch_size, default.max_patches) == ("naflex", PATCH, 256)
