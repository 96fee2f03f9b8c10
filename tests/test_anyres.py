"""Any-resolution tiling: selection, tiling, unpad, token assembly and counts, checked against
transformers' LLaVA-NeXT / LLaVA-OneVision / GotOcr2 (InternVL) reference functions."""

import itertools
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers.image_processing_utils import get_patch_output_size
from transformers.image_processing_utils import select_best_resolution as hf_select
from transformers.image_utils import ChannelDimension
from transformers.models.got_ocr2.image_processing_got_ocr2 import GotOcr2ImageProcessor, get_optimal_tiled_canvas
from transformers.models.llava_next import modeling_llava_next as hf_next
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

from projectors import build_projector
from vlm_encoder import VisionConfig, VisionEncoder
from vlm_encoder.anyres import (
    AnyresConfig,
    InternVLAnyres,
    LlavaNextAnyres,
    anyres_grid_shape,
    assemble_tokens,
    encode_anyres,
    fit_size,
    grid_pinpoints,
    internvl_grid,
    num_image_tokens,
    num_tiles,
    select_best_resolution,
    stack_tiles,
    tile_image,
    tile_image_internvl,
    unpad_bounds,
)
from vlm_encoder.anyres.assemble import pool_tiles
from vlm_encoder.processing import ImageProcessor, ProcessorConfig
from vlm_encoder.vlm import VisionLanguageModel, expand_image_tokens

LLAVA_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
PINPOINT_SETS = [LLAVA_PINPOINTS, grid_pinpoints(384, 6), [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]]
SIZES = sorted({(h, w) for h in (1, 7, 20, 33, 100, 336, 500, 600, 1000, 4000) for w in (1, 9, 31, 64, 337, 600, 1000, 2000)})


# ------------------------------------------------------------------ selection
@pytest.mark.parametrize("pinpoints", PINPOINT_SETS)
def test_select_best_resolution_matches_transformers(pinpoints):
    rng = np.random.default_rng(0)
    sizes = SIZES + [tuple(int(v) for v in rng.integers(1, 3000, 2)) for _ in range(300)]
    for size in sizes:
        assert select_best_resolution(size, pinpoints) == tuple(hf_select(size, pinpoints)), size
        tile = pinpoints[0][0] if pinpoints is not LLAVA_PINPOINTS else 336
        assert anyres_grid_shape(size, pinpoints, tile) == hf_next.get_anyres_image_grid_shape(list(size), pinpoints, tile)
        config = LlavaNextAnyres(tile_size=tile, pinpoints=pinpoints)
        assert num_tiles(size, config) == hf_next.image_size_to_num_patches(list(size), pinpoints, tile)


def test_fit_size_matches_transformers():
    for size, target in itertools.product(SIZES[::3], [(336, 672), (672, 672), (1008, 336), (64, 32)]):
        image = np.zeros((3, *size))
        assert fit_size(size, target) == get_patch_output_size(image, target, ChannelDimension.FIRST)


def test_grid_pinpoints():
    assert grid_pinpoints(384, 2) == [(384, 384), (384, 768), (768, 384), (768, 768)]
    assert grid_pinpoints(10, 1, 3, min_tiles=2) == [(10, 20), (10, 30)]


def test_internvl_grid_matches_transformers():
    rng = np.random.default_rng(1)
    sizes = SIZES + [tuple(int(v) for v in rng.integers(1, 3000, 2)) for _ in range(200)]
    for (min_tiles, max_tiles), size in itertools.product([(1, 12), (1, 6), (2, 9), (1, 1)], sizes):
        cols, rows = get_optimal_tiled_canvas(size, (448, 448), min_tiles, max_tiles)
        assert internvl_grid(size, 448, min_tiles, max_tiles) == (rows, cols), (size, min_tiles, max_tiles)


def test_config_validation():
    with pytest.raises(ValueError, match=r"LlavaNextAnyres needs the fields \['pinpoints'\]"):
        AnyresConfig.from_dict({"tile_size": 336})
    with pytest.raises(ValueError, match="not multiples of the tile size 336"):
        LlavaNextAnyres(tile_size=336, pinpoints=((336, 700),))
    with pytest.raises(ValueError, match=r"unknown InternVLAnyres fields \['pinpoints'\]"):
        AnyresConfig.from_dict({"tile_size": 448, "policy": "internvl", "pinpoints": [[448, 448]]})
    with pytest.raises(ValueError, match="tile_pool must be one of 1, 2"):
        LlavaNextAnyres(tile_size=336, pinpoints=((336, 336),), tile_pool=3)
    with pytest.raises(ValueError, match="policy must be one of 'llava_next', 'internvl', got 'tiles'"):
        AnyresConfig.from_dict({"tile_size": 336, "policy": "tiles"})
    with pytest.raises(ValueError, match="exceeds"):
        InternVLAnyres(tile_size=448, min_tiles=4, max_tiles=2)
    with pytest.raises(ValueError, match="use_thumbnail must be true or false"):
        InternVLAnyres(tile_size=448, use_thumbnail=1)
    with pytest.raises(TypeError, match="build LlavaNextAnyres"):
        AnyresConfig(tile_size=336, policy="llava_next")
    assert LlavaNextAnyres(tile_size=336, pinpoints=[[336, 672]]).pinpoints == ((336, 672),)


def test_config_round_trips_per_policy_and_reads_the_flat_layout():
    """`to_dict` writes the policy and its own fields; `AnyresConfig.from_dict` builds that
    policy's class. A config saved before the split (both policies' fields, flat) still loads."""
    next_ = LlavaNextAnyres(tile_size=32, pinpoints=((32, 64),), budget_tiles=4, multi_image="base")
    internvl = InternVLAnyres(tile_size=32, max_tiles=6, tile_pool=2)
    for config in (next_, internvl):
        assert AnyresConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert set(internvl.to_dict()) == {"policy", "tile_size", "tile_pool", "min_tiles", "max_tiles", "use_thumbnail"}
    flat = {"tile_size": 32, "policy": "llava_next", "pinpoints": [[32, 64]], "newline": True, "unpad": True,
            "tile_pool": 1, "budget_tiles": 4, "min_tiles": 1, "max_tiles": 12, "use_thumbnail": True,
            "multi_image": "base"}
    assert AnyresConfig.from_dict(flat) == next_
    flat_internvl = {**flat, "policy": "internvl", "pinpoints": None, "budget_tiles": None, "multi_image": "tiles",
                     "max_tiles": 6, "tile_pool": 2}
    assert AnyresConfig.from_dict(flat_internvl) == internvl


# ------------------------------------------------------------------ assembly
@pytest.mark.parametrize("size", [(8, 8), (12, 4), (5, 40), (40, 5), (9, 10), (17, 3)])
def test_unpad_bounds_match_transformers(size):
    rng = np.random.default_rng(2)
    for _ in range(100):
        image_size = tuple(int(v) for v in rng.integers(1, 2000, 2))
        x = torch.arange(size[0] * size[1]).view(1, *size)
        top, bottom, left, right = unpad_bounds(size, image_size)
        assert torch.equal(hf_next.unpad_image(x, list(image_size)), x[:, top:bottom, left:right])


def _hf_self(pinpoints, tile, patch):
    vision = SimpleNamespace(image_size=tile, patch_size=patch)
    return SimpleNamespace(config=SimpleNamespace(vision_config=vision, image_grid_pinpoints=pinpoints))


@pytest.mark.parametrize("budget", [None, 2, 4])
def test_assemble_matches_transformers_pack_image_features(budget):
    tile, patch, dim = 32, 8, 6
    side = tile // patch
    pinpoints = grid_pinpoints(tile, 3)  # up to 9 tiles, so the budget bites
    config = LlavaNextAnyres(tile_size=tile, pinpoints=pinpoints, budget_tiles=budget)
    rng = np.random.default_rng(3)
    sizes = [(50, 90), (120, 40), (64, 64), (30, 200), (97, 31), (20, 26), (300, 290), (1000, 100)]
    sizes += [tuple(int(v) for v in rng.integers(10, 400, 2)) for _ in range(10)]
    features = [torch.randn(num_tiles(s, config), side * side, dim) for s in sizes]
    newline = torch.randn(dim)
    fake = _hf_self([list(p) for p in pinpoints], tile, patch)
    if budget is None:
        expected, _ = hf_next.LlavaNextModel.pack_image_features(fake, features, torch.tensor(sizes), "default", newline)
    else:
        expected, _ = LlavaOnevisionModel.pack_image_features(fake, features, torch.tensor(sizes), newline, f"anyres_max_{budget}")
    for f, e, size in zip(features, expected, sizes):
        got = assemble_tokens(f, size, config, side, newline)
        assert got.shape[0] == num_image_tokens(size, config, side)
        torch.testing.assert_close(got, e, rtol=0, atol=1e-6)


def test_tile_pool_matches_onevision_apply_pooling():
    fake = _hf_self([], 40, 8)  # 5x5 grid: odd, so ceil(5 / 2) = 3
    x = torch.randn(3, 25, 7)
    torch.testing.assert_close(pool_tiles(x, 5, 2), LlavaOnevisionModel.apply_pooling(fake, x), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "options",
    [{}, {"newline": False}, {"unpad": False}, {"tile_pool": 2}, {"budget_tiles": 1}, {"tile_pool": 2, "budget_tiles": 2}],
)
def test_token_count_equals_assembled_length(options):
    config = LlavaNextAnyres(tile_size=32, pinpoints=grid_pinpoints(32, 3), **options)
    internvl = InternVLAnyres(tile_size=32, max_tiles=6, tile_pool=options.get("tile_pool", 1))
    rng = np.random.default_rng(4)
    for size in [tuple(int(v) for v in rng.integers(1, 500, 2)) for _ in range(40)]:
        for c in (config, internvl):
            features = torch.randn(num_tiles(size, c), 16, 5)
            tokens = assemble_tokens(features, size, c, 4, torch.zeros(5))
            assert tokens.shape == (num_image_tokens(size, c, 4), 5)


def test_unpad_keeps_the_image_aspect_ratio():
    for size in [(600, 1000), (4000, 600), (336, 336), (1000, 1000), (200, 3000)]:
        rows, cols = anyres_grid_shape(size, LLAVA_PINPOINTS, 336)
        full = (rows * 24, cols * 24)
        top, bottom, left, right = unpad_bounds(full, size)
        h, w = bottom - top, right - left
        assert h <= full[0] and w <= full[1] and (h == full[0] or w == full[1])
        # The cut side is within one cell of the image's aspect ratio (odd margins keep a cell).
        if h == full[0]:
            assert abs(w - size[1] * h / size[0]) <= 1, (size, h, w)
        else:
            assert abs(h - size[0] * w / size[1]) <= 1, (size, h, w)


def test_documented_token_counts():
    """The numbers in docs/resolution.md (CLIP-L/14-336, LLaVA-1.6 pinpoints)."""
    config = LlavaNextAnyres(tile_size=336, pinpoints=LLAVA_PINPOINTS)
    # 1000x600 photo: 672x672, 2x2 tiles, the 48x48 map unpadded to 28x48: 576 + 28 * 49.
    expected = {(600, 1000): (5, 2, 2, 1948), (4000, 600): (4, 3, 1, 1368), (336, 336): (3, 1, 2, 1176),
                (768, 1024): (5, 2, 2, 2340), (200, 3000): (4, 1, 3, 868), (3508, 2480): (5, 2, 2, 2256)}
    for size, (tiles, rows, cols, tokens) in expected.items():
        assert (num_tiles(size, config), *anyres_grid_shape(size, LLAVA_PINPOINTS, 336)) == (tiles, rows, cols)
        assert num_image_tokens(size, config, 24) == tokens, size
    assert num_image_tokens((600, 1000), config.replace(tile_pool=2), 24) == 144 + 14 * 25


# -------------------------------------------------------------------- tiling
def _processor(tile, backend="torchvision"):
    return ImageProcessor(ProcessorConfig(resize_mode="exact", size=tile, backend=backend))


def test_tile_image_layout():
    image = np.zeros((30, 100, 3), np.uint8)
    image[:, :50] = 255  # left half white
    pinpoints = [[32, 64], [64, 32], [32, 96], [96, 32]]
    tiles = tile_image(image, pinpoints, _processor(32))
    assert tiles.grid == (1, 3) and tiles.resolution == (32, 96) and tiles.pixel_values.shape == (4, 3, 32, 32)
    black = _processor(32)(np.zeros((1, 1, 3), np.uint8))[0, :, 0, 0]
    # 30x100 fits 32x96 as 29x96 (ceil(30 * 0.96) = 29): 3 padding rows, 1 above and 2 below.
    column = tiles.pixel_values[1, :, :, 0]  # (3, 32) the first column of the first tile
    for row in (0, 30, 31):
        torch.testing.assert_close(column[:, row], black)
    for row in (1, 29):
        assert not torch.allclose(column[:, row], black)
    assert tiles.pixel_values[1].mean() > tiles.pixel_values[3].mean()  # white left, black right


def test_tile_image_internvl_matches_got_ocr2():
    rng = np.random.default_rng(5)
    ref = GotOcr2ImageProcessor(size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1, max_patches=6)
    for size in [(50, 90), (120, 40), (32, 32), (30, 200), (20, 26)]:
        image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        expected = ref(image, return_tensors="pt")["pixel_values"]
        tiles = tile_image_internvl(image, _processor(32), max_tiles=6)
        assert tiles.num_tiles == num_tiles(size, InternVLAnyres(tile_size=32, max_tiles=6))
        torch.testing.assert_close(tiles.pixel_values, expected, rtol=0, atol=1e-6)


def test_tile_size_must_be_known():
    processor = ImageProcessor(ProcessorConfig(resize_mode="shortest_edge", size=32))
    with pytest.raises(ValueError, match="pass tile_size"):
        tile_image(np.zeros((10, 10, 3), np.uint8), [[32, 32]], processor)


# ------------------------------------------------------------------- encoding
def tiny_encoder():
    return VisionEncoder(VisionConfig(image_size=32, patch_size=8, width=32, depth=2, num_heads=4)).eval()


def test_encode_anyres_reassembles_tile_features():
    encoder = tiny_encoder()
    image = np.random.default_rng(6).integers(0, 256, (50, 90, 3), dtype=np.uint8)
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    out = encode_anyres(encoder, image, pinpoints, layer=-1)
    tiles = out.tiles
    assert tiles.grid == (2, 2) and out.layer == 1
    with torch.no_grad():
        per_tile = encoder(tiles.pixel_values, layers=(-1,)).patches(-1)  # (5, 16, 32)
    torch.testing.assert_close(out.global_tokens, per_tile[0])
    # Unpad of a 50x90 image on an 8x8 map keeps rows 2..5; tile (0, 1)'s last row is map row 3.
    assert out.feature_map.shape == (32, 4, 8)
    torch.testing.assert_close(out.feature_map[:, 1, 4:], per_tile[2].view(4, 4, 32)[3].T)
    assert out.tokens.shape == (16 + 32, 32)
    torch.testing.assert_close(out.tokens[16:], out.feature_map.flatten(1).T)

    internvl = encode_anyres(encoder, image, InternVLAnyres(tile_size=32, max_tiles=4))
    assert internvl.tiles.grid == (1, 2) and internvl.feature_map.shape == (32, 4, 8)
    assert internvl.tokens.shape == (3 * 16, 32) and internvl.global_tokens.shape == (16, 32)


# ------------------------------------------------------------------------ VLM
def test_vlm_anyres_with_grid_projector_and_internvl():
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)).eval()
    processor = _processor(32)
    images = [np.full((50, 90, 3), 120, np.uint8), np.full((120, 40, 3), 30, np.uint8)]
    for anyres in (LlavaNextAnyres(tile_size=32, pinpoints=((32, 64), (64, 32), (64, 64))),
                   InternVLAnyres(tile_size=32, max_tiles=4)):
        projector = build_projector("pixel_shuffle", 32, 48, scale_factor=2)  # 4x4 tile grid -> 2x2 tokens
        vlm = VisionLanguageModel(tiny_encoder(), projector, lm, 63, anyres=anyres)
        assert vlm.tile_side == 2 and (vlm.image_newline is not None) == (anyres.policy == "llava_next")
        tiles = [tile_image(im, anyres.pinpoints, processor) if anyres.policy == "llava_next" else
                 tile_image_internvl(im, processor, max_tiles=4) for im in images]
        pixel_values, image_sizes = stack_tiles(tiles)
        ids = vlm.expand_image_tokens([1, 63, 2, 63, 3], image_size=[(50, 90), (120, 40)])
        counts = [vlm.num_image_tokens(s) for s in [(50, 90), (120, 40)]]
        assert len(ids) == 3 + sum(counts)
        out = vlm(torch.tensor([ids]), pixel_values, image_sizes=image_sizes, labels=torch.tensor([ids]))
        assert torch.isfinite(out.loss)
        out.loss.backward()
        if vlm.image_newline is not None:
            assert vlm.image_newline.grad is not None and vlm.image_newline.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="square grid"):
        VisionLanguageModel(tiny_encoder(), build_projector("resampler", 32, 48, num_queries=3), lm, 63, anyres=anyres)
    with pytest.raises(ValueError, match="feature_select='patch'"):
        VisionLanguageModel(tiny_encoder(), build_projector("linear", 32, 48), lm, 63, feature_select="cls_patch",
                            anyres=anyres)


def test_expand_image_tokens_per_image_counts():
    assert expand_image_tokens([1, 9, 2, 9], 9, [2, 3]) == [1, 9, 9, 2, 9, 9, 9]
    with pytest.raises(ValueError, match="2 token counts given for 1"):
        expand_image_tokens([1, 9], 9, [2, 3])
