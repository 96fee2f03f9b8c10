"""LLaVA-OneVision: a tiny random transformers `LlavaOnevisionForConditionalGeneration` (SigLIP
tower, `vision_feature_select_strategy='full'`, `anyres_max_N` budget) loaded with
`VisionLanguageModel.from_llava_onevision` gives transformers' packed image features and logits,
for images small enough to keep every token and large enough to be downscaled to the budget."""

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    SiglipVisionConfig,
)

from llava_helpers import left_padded, random_images

from vlm_encoder.vlm import VisionLanguageModel

TILE = 32
PINPOINTS = [[TILE * r, TILE * c] for r in range(1, 4) for c in range(1, 4)]  # up to 3x3 tiles
IMAGE_ID = 99
BUDGET = 2  # anyres_max_2: a map of more than ~2 tiles' worth of tokens is downscaled
# (height, width): wide, large square, tall, odd (all downscaled), and a small one (kept).
SIZES = [(40, 80), (96, 96), (120, 45), (77, 61), (20, 26)]


def save_tiny_onevision(directory, aspect=f"anyres_max_{BUDGET}"):
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                image_size=TILE, patch_size=8)
    text = LlamaConfig(vocab_size=100, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID,
                                  image_grid_pinpoints=PINPOINTS, vision_aspect_ratio=aspect)
    torch.manual_seed(2)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    with torch.no_grad():  # non-trivial norms and biases so a wrong mapping shows
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(directory)
    return model


def hf_processor():
    return LlavaOnevisionImageProcessor(size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS)


def images(sizes=SIZES):
    return random_images(sizes)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llava_onevision")
    ref = save_tiny_onevision(directory)
    return ref, VisionLanguageModel.from_llava_onevision(directory)


def test_config_and_budget(checkpoint):
    ref, vlm = checkpoint
    assert vlm.anyres.budget_tiles == BUDGET and vlm.feature_select == "patch" and vlm.feature_layers == (2,)
    torch.testing.assert_close(vlm.image_newline, ref.model.image_newline, rtol=0, atol=0)
    full = vlm.anyres.replace(budget_tiles=None)
    from vlm_encoder.anyres import num_image_tokens

    # A large image is downscaled to the budget (fewer tokens than without it); a small one is not.
    assert vlm.num_image_tokens((96, 96)) == 46 < num_image_tokens((96, 96), full, vlm.tile_side) == 172
    assert vlm.num_image_tokens((20, 26)) == num_image_tokens((20, 26), full, vlm.tile_side) == 36


def test_image_features_match_transformers(checkpoint):
    ref, vlm = checkpoint
    processed = hf_processor()(images(), return_tensors="pt")
    with torch.no_grad():
        expected = ref.model.get_image_features(processed["pixel_values"], processed["image_sizes"]).pooler_output
        got = vlm.anyres_image_features(processed["pixel_values"], processed["image_sizes"])
    assert len(got) == len(expected) == len(SIZES)
    for g, e, size in zip(got, expected, SIZES):
        assert g.shape == e.shape and g.shape[0] == vlm.num_image_tokens(size)
        torch.testing.assert_close(g, e, rtol=0, atol=1e-4)


def test_logits_match_transformers_one_image_per_sample(checkpoint):
    ref, vlm = checkpoint
    sizes = [SIZES[1], SIZES[4]]  # one downscaled, one kept
    rows = [vlm.expand_image_tokens([1, 5, IMAGE_ID, 7], image_size=[size]) for size in sizes]
    ids, mask = left_padded(rows)
    processed = hf_processor()(images(sizes), return_tensors="pt")
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, pixel_values=processed["pixel_values"],
                       image_sizes=processed["image_sizes"]).logits
        got = vlm(ids, processed["pixel_values"], attention_mask=mask, image_sizes=processed["image_sizes"]).logits
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=0, atol=1e-4)


def test_unknown_aspect_policy_is_refused(tmp_path):
    save_tiny_onevision(tmp_path, aspect="pad")
    with pytest.raises(ValueError, match="vision_aspect_ratio='pad'; only 'anyres_max_N'"):
        VisionLanguageModel.from_llava_onevision(tmp_path)


def test_tiles_match_llava_onevision_image_processor():
    from vlm_encoder.anyres import tile_image
    from vlm_encoder.processing import ImageProcessor, ProcessorConfig

    hf = hf_processor()
    ours = ImageProcessor(ProcessorConfig(resize_mode="exact", size=TILE, interpolation="bicubic", backend="torchvision",
                                          mean=tuple(hf.image_mean), std=tuple(hf.image_std)))
    batch = images()
    expected = hf(batch, return_tensors="pt")
    assert expected["image_sizes"].tolist() == [list(s) for s in SIZES]
    for image, want in zip(batch, expected["pixel_values"]):
        tiles = tile_image(image, PINPOINTS, ours)
        torch.testing.assert_close(tiles.pixel_values, want[: tiles.num_tiles], rtol=0, atol=1e-6)
        assert not want[tiles.num_tiles :].any()  # transformers pads the batch with zero tiles


def test_load_encoder_reads_the_onevision_tower(checkpoint, tmp_path):
    """`load_encoder` on a LLaVA-OneVision directory gives its SigLIP tower, equal to the one
    `from_llava_onevision` builds (and so to transformers')."""
    from vlm_encoder import load_encoder

    ref, vlm = checkpoint
    ref.save_pretrained(tmp_path)
    encoder = load_encoder(tmp_path)
    assert encoder.source_info["family"] == "llava_onevision" and encoder.source_info["vision_family"] == "siglip"
    pixels = torch.randn(2, 3, TILE, TILE)
    with torch.no_grad():
        want = ref.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1]
        got = encoder(pixels, layers=(-1,)).patch_tokens[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_multi_image_samples_match_transformers(checkpoint):
    """transformers' multi-image path: a sample holding several images gets each as its base
    tile only plus one newline (`batch_num_images`), a sample with one image is tiled."""
    ref, vlm = checkpoint
    assert vlm.anyres.multi_image == "base"
    sizes = [SIZES[0], SIZES[1], SIZES[3]]  # sample 0: two images; sample 1: one image
    batch = images(sizes)
    processed = hf_processor()([batch[:2], batch[2:]], return_tensors="pt")
    assert processed["batch_num_images"].tolist() == [2, 1]
    rows = [vlm.expand_image_tokens([1, IMAGE_ID, 5, IMAGE_ID, 7], image_size=sizes[:2]),
            vlm.expand_image_tokens([1, 5, IMAGE_ID, 7], image_size=[sizes[2]])]
    side = vlm.tile_side
    assert rows[0].count(IMAGE_ID) == 2 * (side * side + 1)  # base tiles + one newline each
    assert rows[1].count(IMAGE_ID) == vlm.num_image_tokens(sizes[2])
    ids, mask = left_padded(rows)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, pixel_values=processed["pixel_values"],
                       image_sizes=processed["image_sizes"], batch_num_images=processed["batch_num_images"]).logits
        got = vlm(ids, processed["pixel_values"], attention_mask=mask, image_sizes=processed["image_sizes"],
                  batch_num_images=processed["batch_num_images"]).logits
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="do not hold 3 images"):  # the multi-image sample without batch_num_images
        vlm(ids, processed["pixel_values"], attention_mask=mask, image_sizes=processed["image_sizes"])


def test_base_only_tiles_match_the_multi_image_processor():
    from vlm_encoder.anyres import tile_image
    from vlm_encoder.processing import ImageProcessor, ProcessorConfig

    hf = hf_processor()
    ours = ImageProcessor(ProcessorConfig(resize_mode="exact", size=TILE, interpolation="bicubic", backend="torchvision",
                                          mean=tuple(hf.image_mean), std=tuple(hf.image_std)))
    batch = images([SIZES[0], SIZES[2], (30, 30)])  # wide, tall, square
    expected = hf([batch], return_tensors="pt")  # one sample of three images: base tiles only
    assert expected["batch_num_images"].tolist() == [3]
    for image, want in zip(batch, expected["pixel_values"]):
        tiles = tile_image(image, PINPOINTS, ours, base_only=True)
        assert tiles.num_tiles == 1
        torch.testing.assert_close(tiles.pixel_values[0], want[0], rtol=0, atol=1e-6)
