"""Kimi K2.5's image processor (`Kimi_K25ImageProcessor`) as `ProcessorConfig(resize_mode='kimi_k25')`:
the sizes equal transformers' `navit_resize` on a grid of sizes; our pixels equal transformers'
(its `pixel_values` patches put back into `(C, H, W)`, padding included) for PIL images kept at
their native size (padded to whole merge units, or already whole), shrunk by the patch budget
and shrunk by the side limit; a saved whole `kimi_k25` with a `preprocessor_config.json` gets it,
and `load_vision_side`'s `image_tokens` on a PIL image equals the reference's
`get_image_features` on its processor's own output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from parity_helpers import close
from test_kimi_k25_parity import MERGE, PATCH
from test_kimi_k25_parity import whole as kimi_whole  # noqa: F401 - fixture
from vlm_encoder.packing import kimi_k25_size
from vlm_encoder.processing import ImageProcessor, ProcessorConfig

transformers = pytest.importorskip("transformers")
from transformers.models.kimi_k25.image_processing_kimi_k25 import Kimi_K25ImageProcessor, navit_resize  # noqa: E402

# A tiny budget: 256 patches of 14 px, at most 32 patches (448 px) a side.
KIMI = {"image_processor_type": "Kimi_K25ImageProcessor", "patch_size": 14, "merge_size": 2, "max_patches": 256,
        "size": {"max_height": 32, "max_width": 32}}
# (H, W): native + padding, native whole merge units, tiny (one unit), over the budget, over the side limit.
SIZES = [(50, 37), (56, 84), (5, 3), (300, 400), (20, 1000), (900, 60)]


def _image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def unpatchify(pixel_values: torch.Tensor, grid_thw, patch: int) -> torch.Tensor:
    """One image's `pixel_values` `(h*w, C, p, p)` (row-major) -> `(C, H, W)`."""
    _, h, w = (int(v) for v in grid_thw)
    return pixel_values.reshape(h, w, 3, patch, patch).permute(2, 0, 3, 1, 4).reshape(3, h * patch, w * patch)


def _hf_kwargs(data: dict) -> dict:
    return {k: v for k, v in data.items() if k != "image_processor_type"}


def test_size_rule_is_transformers_navit_resize():
    for patch, merge, budget, side in ((14, 2, 16384, 512), (14, 2, 256, 32), (4, 2, 64, 12), (16, 3, 100, 7)):
        for height in (1, 3, 13, 28, 100, 517, 4000):
            for width in (1, 7, 28, 255, 1000, 9000):
                expected = navit_resize(height, width, patch, merge, budget, side)
                assert kimi_k25_size(height, width, patch, patch * merge, budget, side) == expected, (height, width)


def test_pixels_equal_transformers():
    ours = ImageProcessor.from_hf_config(KIMI)
    hf = Kimi_K25ImageProcessor(**_hf_kwargs(KIMI))
    cfg = ours.config
    assert (cfg.resize_mode, cfg.patch_size, cfg.max_patches, cfg.factor, cfg.max_side) == ("kimi_k25", 14, 256, 28, 32)
    kinds = set()
    for i, (height, width) in enumerate(SIZES):
        image = _image(height, width, seed=i)
        out = hf(image, return_tensors="pt")
        expected = unpatchify(out["pixel_values"], out["image_grid_thw"][0], 14)
        pixels = ours(image)[0]
        assert pixels.shape == expected.shape, (height, width, pixels.shape, expected.shape)
        assert (pixels - expected).abs().max().item() <= 1e-5, (height, width)
        (h, w), padded = kimi_k25_size(height, width, 14, 28, 256, 32)
        kinds.add("native" if (h, w) == (height, width) else "shrunk")
        kinds.add("padded" if padded != (h, w) else "whole")
    assert kinds == {"native", "shrunk", "padded", "whole"}, kinds


def test_config_is_validated():
    with pytest.raises(ValueError, match="needs factor"):
        ProcessorConfig(resize_mode="kimi_k25", patch_size=14, max_patches=256, factor=28)
    with pytest.raises(ValueError, match="needs patch_size and max_patches"):
        ProcessorConfig(resize_mode="kimi_k25", factor=28, max_side=32)
    with pytest.raises(ValueError, match="max_side applies to resize_mode='kimi_k25' only"):
        ProcessorConfig(resize_mode="exact", max_side=32)
    with pytest.raises(ValueError, match="takes no crop_size"):
        ProcessorConfig(resize_mode="kimi_k25", patch_size=14, max_patches=256, factor=28, max_side=32, crop_size=28)
    with pytest.raises(ValueError, match="max_height"):
        ImageProcessor.from_hf_config({**KIMI, "size": {"max_height": 32, "max_width": 16}})
    processor = ImageProcessor.from_hf_config(KIMI)
    assert ImageProcessor.from_dict(processor.to_dict()) == processor  # round trip
    assert processor.at_size((28, 56)).config.max_side is None
    with pytest.raises(ValueError, match="different sizes"):
        processor([_image(40, 24), _image(24, 40)])


def test_a_kimi_k25_checkpoint_gets_its_processor_and_image_tokens_match(kimi_whole):  # noqa: F811
    """Whole checkpoint + `preprocessor_config.json` -> `load_vision_side`: non-square PIL images
    (native and padded; shrunk by the budget and padded), one `image_tokens` call each, vs
    `get_image_features` on the reference processor's own `pixel_values` / `image_grid_thw`."""
    from vlm_encoder import load_encoder, load_vision_side

    reference, directory = kimi_whole
    reference.eval()
    hf_processor = Kimi_K25ImageProcessor(patch_size=PATCH, merge_size=MERGE, max_patches=64,
                                          size={"max_height": 12, "max_width": 12})
    hf_processor.save_pretrained(directory / "saved")
    cfg = load_encoder(directory / "saved").image_processor.config
    assert (cfg.resize_mode, cfg.patch_size, cfg.max_patches, cfg.factor, cfg.max_side) == (
        "kimi_k25", PATCH, 64, PATCH * MERGE, 12)
    side = load_vision_side(directory / "saved")
    assert side.processor.config == cfg
    for i, (height, width) in enumerate([(13, 22), (30, 50)]):
        image = _image(height, width, seed=i)
        inputs = hf_processor(image, return_tensors="pt")
        with torch.no_grad():
            features = reference.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
            ours = side.image_tokens(image)  # (1, T, D)
        close(f"kimi_k25 processor {height}x{width}", ours[0], torch.cat(list(features.pooler_output)), "image tokens")
