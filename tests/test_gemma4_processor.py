"""Gemma 4's image processor (`Gemma4ImageProcessor`) as `ProcessorConfig(resize_mode='gemma4')`:
the size rule equals transformers' `get_aspect_ratio_preserving_size` on a grid of sizes (its
errors included); our pixels equal transformers' (its `pixel_values` patches put back into
`(C, H, W)`) for PIL images of several aspect ratios, enlarged, shrunk and thin enough to take the
one-block fallback; a saved whole `gemma4` with a `preprocessor_config.json` gets it (the model's
own `2 (x - 0.5)` folded into mean / std), and `load_vision_side`'s `image_tokens` on a PIL image
equals the reference's `get_image_features` on its processor's own output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from parity_helpers import close, perturb
from vlm_encoder.packing import gemma4_size
from vlm_encoder.processing import ImageProcessor, ProcessorConfig

transformers = pytest.importorskip("transformers")
from transformers.models.gemma4.image_processing_gemma4 import (  # noqa: E402
    Gemma4ImageProcessor,
    get_aspect_ratio_preserving_size,
)
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil  # noqa: E402

# (H, W): enlarged (small), square, shrunk (large), thin, and thinner both ways: the short side
# rounds to zero blocks, so it becomes one block and the long side is capped (48 x 3360).
SIZES = [(40, 24), (100, 100), (700, 1000), (20, 900), (10, 2000), (1500, 12)]
GEMMA4 = {"image_processor_type": "Gemma4ImageProcessor", "patch_size": 16, "max_soft_tokens": 70,
          "pooling_kernel_size": 3}


def _image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def unpatchify(pixel_values: torch.Tensor, positions: torch.Tensor, patch: int) -> torch.Tensor:
    """One image's `pixel_values` `(max_patches, p*p*C)` (row-major, `(py, px, c)`, padded with
    positions -1) -> `(C, H, W)`."""
    valid = (positions != -1).all(-1)
    w, h = (int(v) + 1 for v in positions[valid].max(0).values)
    x = pixel_values[valid].reshape(h, w, patch, patch, 3).permute(4, 0, 2, 1, 3)  # (C, h, p, w, p)
    return x.reshape(3, h * patch, w * patch)


def _hf_kwargs(data: dict) -> dict:
    return {k: v for k, v in data.items() if k != "image_processor_type"}


def test_size_rule_is_transformers():
    for patch, budget, kernel in ((16, 280 * 9, 3), (16, 70 * 9, 3), (4, 70 * 9, 3), (14, 256 * 4, 2), (8, 50, 1)):
        for height in (1, 3, 13, 48, 100, 517, 4000):
            for width in (1, 7, 48, 255, 1000, 5000):
                try:
                    expected = get_aspect_ratio_preserving_size(height, width, patch, budget, kernel)
                except ValueError:
                    with pytest.raises(ValueError, match="Gemma 4's resize"):
                        gemma4_size(height, width, patch, budget, kernel)
                    continue
                got = gemma4_size(height, width, patch, budget, kernel)
                assert got == expected, (patch, budget, kernel, height, width)


@pytest.mark.parametrize("reference", [Gemma4ImageProcessor, Gemma4ImageProcessorPil])
def test_pixels_equal_transformers(reference):
    name = reference.__name__
    ours = ImageProcessor.from_hf_config({**GEMMA4, "image_processor_type": name})
    hf = reference(**_hf_kwargs(GEMMA4))
    cfg = ours.config
    assert (cfg.resize_mode, cfg.patch_size, cfg.max_patches, cfg.pooling_kernel_size) == ("gemma4", 16, 630, 3)
    assert cfg.mean is None and cfg.backend == ("pil" if name.endswith("Pil") else "torchvision")
    shapes = set()
    for i, (height, width) in enumerate(SIZES):
        image = _image(height, width, seed=i)
        out = hf(image, return_tensors="pt")
        expected = unpatchify(out["pixel_values"][0], out["image_position_ids"][0], 16)
        pixels = ours(image)[0]
        shapes.add(tuple(pixels.shape[1:]))
        assert pixels.shape == expected.shape, (height, width, pixels.shape, expected.shape)
        assert pixels.shape[1] * pixels.shape[2] // (16 * 3) ** 2 == out["num_soft_tokens_per_image"][0]
        assert (pixels - expected).abs().max().item() <= 1e-5, (name, height, width)
    assert {(48, 3360), (3360, 48)} <= shapes, shapes  # the one-block fallback, both ways, at the cap


def test_config_is_validated():
    with pytest.raises(ValueError, match="needs pooling_kernel_size"):
        ProcessorConfig(resize_mode="gemma4", patch_size=16, max_patches=630)
    with pytest.raises(ValueError, match="needs patch_size and max_patches"):
        ProcessorConfig(resize_mode="gemma4", pooling_kernel_size=3)
    with pytest.raises(ValueError, match="applies to resize_mode='gemma4' only"):
        ProcessorConfig(resize_mode="naflex", patch_size=16, max_patches=256, pooling_kernel_size=3)
    with pytest.raises(ValueError, match="pooling_kernel_size"):
        ProcessorConfig(resize_mode="gemma4", patch_size=16, max_patches=630, pooling_kernel_size=0)
    with pytest.raises(ValueError, match="one pooled token"):
        ProcessorConfig(resize_mode="gemma4", patch_size=16, max_patches=4, pooling_kernel_size=3)
    with pytest.raises(ValueError, match="takes no crop_size"):
        ProcessorConfig(resize_mode="gemma4", patch_size=16, max_patches=630, pooling_kernel_size=3, crop_size=48)
    with pytest.raises(ValueError, match="max_soft_tokens=100"):
        ImageProcessor.from_hf_config({**GEMMA4, "max_soft_tokens": 100})
    with pytest.raises(ValueError, match="Gemma4ImageProcessor"):
        ImageProcessor.from_hf_config({"image_processor_type": "CLIPImageProcessor", "pooling_kernel_size": 3})
    processor = ImageProcessor.from_hf_config(GEMMA4)
    assert ImageProcessor.from_dict(processor.to_dict()) == processor  # round trip
    assert processor.at_size((48, 96)).config.resize_mode == "exact"
    with pytest.raises(ValueError, match="different sizes"):
        processor([_image(40, 24), _image(24, 40)])


def test_a_gemma4_checkpoint_gets_its_processor_and_image_tokens_match(tmp_path):
    """Whole checkpoint + `preprocessor_config.json` -> `load_vision_side`: non-square PIL images
    (enlarged; shrunk), one `image_tokens` call each, vs `get_image_features` on the reference
    processor's own `pixel_values` / `image_position_ids` (padded to its budget)."""
    from test_gemma_parity import PATCH, TEXT, VISION, K, clip_bounds
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    from vlm_encoder import load_encoder, load_vision_side

    torch.manual_seed(0)
    vision = dict(VISION, standardize=True, use_clipped_linears=True, position_embedding_size=64)  # grids up to 64
    reference = clip_bounds(perturb(Gemma4ForConditionalGeneration(Gemma4Config(text_config=TEXT, vision_config=vision,
                                                                                audio_config=None)))).eval()
    reference.save_pretrained(tmp_path)
    hf_processor = Gemma4ImageProcessor(patch_size=PATCH, max_soft_tokens=70, pooling_kernel_size=K)
    hf_processor.save_pretrained(tmp_path)
    cfg = load_encoder(tmp_path).image_processor.config
    assert (cfg.resize_mode, cfg.patch_size, cfg.max_patches, cfg.pooling_kernel_size) == ("gemma4", PATCH, 630, K)
    assert (cfg.mean, cfg.std) == ((0.5,) * 3, (0.5,) * 3)  # the model's 2 (x - 0.5)
    side = load_vision_side(tmp_path)
    assert side.processor.config == cfg
    for i, (height, width) in enumerate([(30, 50), (200, 90)]):
        image = _image(height, width, seed=i)
        inputs = hf_processor(image, return_tensors="pt")
        with torch.no_grad():
            features = reference.get_image_features(inputs["pixel_values"], inputs["image_position_ids"])
            expected = features.pooler_output[0]
            ours = side.image_tokens(image)  # (1, T, D)
        assert ours.shape[1] == inputs["num_soft_tokens_per_image"][0]
        close(f"gemma4 processor {height}x{width}", ours[0], expected, "image tokens")


def test_a_gemma4_tower_refuses_a_processor_of_another_patch(tmp_path):
    from test_gemma_parity import PATCH, VISION
    from transformers import Gemma4VisionConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4VisionModel

    from vlm_encoder import load_encoder

    Gemma4VisionModel(Gemma4VisionConfig(**VISION)).save_pretrained(tmp_path)
    assert load_encoder(tmp_path).image_processor.config.resize_mode == "exact"  # no processor file: native size
    Gemma4ImageProcessor(patch_size=PATCH * 2, max_soft_tokens=70).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not the tower's patch_size"):
        load_encoder(tmp_path)
