"""LLaVA-NeXT any resolution: a tiny random transformers `LlavaNextForConditionalGeneration`
loaded with `VisionLanguageModel.from_llava_next` gives the same tiles, packed image features
and logits as transformers for images of several sizes and aspect ratios, batched together."""

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
)

from vlm_encoder.anyres import num_tiles, stack_tiles, tile_image
from vlm_encoder.processing import ImageProcessor, ProcessorConfig
from llava_helpers import left_padded, random_images

from vlm_encoder.vlm import VisionLanguageModel

TILE = 32
PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
IMAGE_ID = 99
# (height, width): landscape, portrait, square, very wide, tall with an odd margin, tiny.
SIZES = [(50, 90), (120, 40), (64, 64), (30, 200), (97, 31), (20, 26)]


def save_tiny_llava_next(directory, feature_layer=-2):
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=TILE, patch_size=8, projection_dim=16)
    text = LlamaConfig(vocab_size=100, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID,
                             vision_feature_layer=feature_layer, image_grid_pinpoints=PINPOINTS)
    torch.manual_seed(1)
    model = LlavaNextForConditionalGeneration(config).eval()
    with torch.no_grad():  # non-trivial norms and biases so a wrong mapping shows
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "class_embedding" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(directory)
    return model


def hf_processor():
    return LlavaNextImageProcessor(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                   image_grid_pinpoints=PINPOINTS)


def our_processor():
    return ImageProcessor(ProcessorConfig(resize_mode="shortest_edge", size=TILE, crop_size=TILE,
                                          interpolation="bicubic", backend="torchvision"))


def images(sizes=SIZES):
    return random_images(sizes)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llava_next")
    ref = save_tiny_llava_next(directory)
    return ref, VisionLanguageModel.from_llava_next(directory)


def test_tiles_match_llava_next_image_processor():
    batch = images()
    ref = hf_processor()(batch, return_tensors="pt")
    assert ref["image_sizes"].tolist() == [list(s) for s in SIZES]
    for image, expected, size in zip(batch, ref["pixel_values"], SIZES):
        tiles = tile_image(image, PINPOINTS, our_processor())
        assert tiles.image_size == size
        n = tiles.num_tiles
        assert n == num_tiles(size, _config())
        torch.testing.assert_close(tiles.pixel_values, expected[:n], rtol=0, atol=1e-6)
        assert not expected[n:].any()  # transformers pads the batch with zero tiles


def _config():
    from vlm_encoder.anyres import LlavaNextAnyres

    return LlavaNextAnyres(tile_size=TILE, pinpoints=PINPOINTS)


def prompt_ids(vlm, sizes):
    rows = [vlm.expand_image_tokens([1, 5, IMAGE_ID, 7], image_size=[size]) for size in sizes]
    ids, mask = left_padded(rows)
    return ids, mask


def test_from_llava_next_config(checkpoint):
    ref, vlm = checkpoint
    assert vlm.anyres.pinpoints == tuple(map(tuple, PINPOINTS)) and vlm.anyres.tile_size == TILE
    assert vlm.tile_side == 4
    torch.testing.assert_close(vlm.image_newline, ref.model.image_newline, rtol=0, atol=0)


def test_image_features_match_transformers(checkpoint):
    ref, vlm = checkpoint
    processed = hf_processor()(images(), return_tensors="pt")
    with torch.no_grad():
        expected = ref.model.get_image_features(processed["pixel_values"], processed["image_sizes"]).pooler_output
        got = vlm.anyres_image_features(processed["pixel_values"], processed["image_sizes"])
        ours = vlm.anyres_image_features(*stack_tiles([tile_image(im, PINPOINTS, our_processor()) for im in images()]))
    assert len(got) == len(expected) == len(SIZES)
    for g, o, e, size in zip(got, ours, expected, SIZES):
        assert g.shape == e.shape and g.shape[0] == vlm.num_image_tokens(size)
        torch.testing.assert_close(g, e, rtol=0, atol=1e-4)
        torch.testing.assert_close(o, e, rtol=0, atol=1e-4)


def test_logits_match_transformers_batched(checkpoint):
    ref, vlm = checkpoint
    sizes = SIZES[:3]
    batch = images(sizes)
    ids, mask = prompt_ids(vlm, sizes)
    processed = hf_processor()(batch, return_tensors="pt")
    pixel_values, image_sizes = stack_tiles([tile_image(im, PINPOINTS, our_processor()) for im in batch])
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, pixel_values=processed["pixel_values"],
                       image_sizes=processed["image_sizes"]).logits
        got = vlm(ids, pixel_values, attention_mask=mask, image_sizes=image_sizes).logits
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=0, atol=1e-4)
    new = vlm.generate(ids, pixel_values, attention_mask=mask, image_sizes=image_sizes, max_new_tokens=3, do_sample=False)
    ref_new = ref.generate(input_ids=ids, attention_mask=mask, pixel_values=processed["pixel_values"],
                           image_sizes=processed["image_sizes"], max_new_tokens=3, do_sample=False)
    assert new.tolist() == ref_new[:, ids.shape[1]:].tolist()


def test_placeholder_count_errors(checkpoint):
    _, vlm = checkpoint
    batch = images(SIZES[:2])
    pixel_values, image_sizes = stack_tiles([tile_image(im, PINPOINTS, our_processor()) for im in batch])
    ids, _ = prompt_ids(vlm, SIZES[:2])
    with pytest.raises(ValueError, match="needs image_sizes"):
        vlm.prepare_inputs(ids, pixel_values)
    short = ids.clone()
    short[0, (short[0] == IMAGE_ID).nonzero()[0]] = 3  # one placeholder too few
    with pytest.raises(ValueError, match="do not match"):
        vlm.prepare_inputs(short, pixel_values, image_sizes=image_sizes)
    # Both images' placeholders in one row, none in the other: the split is checked.
    n0, n1 = (vlm.num_image_tokens(s) for s in SIZES[:2])
    if n0 != n1:
        row0 = [1] + [IMAGE_ID] * (n0 + n1 - 1)
        row1 = [2] * (len(row0) - 1) + [IMAGE_ID]
        with pytest.raises(ValueError, match="inside an image"):
            vlm.prepare_inputs(torch.tensor([row0, row1]), pixel_values, image_sizes=image_sizes)
    with pytest.raises(ValueError, match="need"):
        vlm.prepare_inputs(ids, pixel_values[:-1], image_sizes=image_sizes)


def test_full_strategy_with_cls_tower_is_rejected(tmp_path):
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=TILE, patch_size=8)
    text = LlamaConfig(vocab_size=100, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID,
                             vision_feature_select_strategy="full", image_grid_pinpoints=PINPOINTS)
    LlavaNextForConditionalGeneration(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'full' keeps the CLS token"):
        VisionLanguageModel.from_llava_next(tmp_path)
