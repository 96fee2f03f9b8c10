"""Qwen's image processor (`Qwen2VLImageProcessor`, used by Qwen2.5-VL, Qwen3-VL and Qwen3.5) as
`ProcessorConfig(resize_mode='smart_resize')`: pixels equal transformers' (its `pixel_values`
patches put back into `(C, H, W)`) and the grid equals its `image_grid_thw`, for images that hit
neither clamp, the `min_pixels` clamp (tiny) and the `max_pixels` clamp (large, elongated); a
saved Qwen2.5-VL checkpoint with a `preprocessor_config.json` gets it, and `load_vision_side`'s
`image_tokens` on PIL images of different sizes (one call per image) equal the reference's
`get_image_features` on its processor's own output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from parity_helpers import close
from vlm_encoder.packing import smart_resize_size
from vlm_encoder.processing import ImageProcessor, ProcessorConfig

transformers = pytest.importorskip("transformers")
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: E402
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor, smart_resize  # noqa: E402

# (H, W): no clamp, under min_pixels (tiny), over max_pixels (large; elongated both ways).
SIZES = [(40, 24), (5, 3), (9, 31), (300, 180), (20, 700), (1200, 90)]
# A tiny Qwen2.5-VL-style config (patch 4, merge 2: factor 8) and Qwen3-VL's own `size` form.
TINY = {"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 16 * 16, "max_pixels": 96 * 96,
        "patch_size": 4, "merge_size": 2, "temporal_patch_size": 2}
QWEN3 = {"image_processor_type": "Qwen2VLImageProcessorFast", "size": {"shortest_edge": 32 * 32, "longest_edge": 128 * 128},
         "patch_size": 16, "merge_size": 2, "temporal_patch_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}


def _image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def unpatchify(pixel_values: torch.Tensor, grid_thw, patch: int, merge: int, temporal: int) -> torch.Tensor:
    """One image's rows of `pixel_values` `(h*w, C*T*p*p)` (merge-unit order) -> `(C, H, W)` (frame 0)."""
    _, h, w = (int(v) for v in grid_thw)
    x = pixel_values.reshape(h // merge, w // merge, merge, merge, 3, temporal, patch, patch)[:, :, :, :, :, 0]
    x = x.permute(4, 0, 2, 5, 1, 3, 6)  # (C, h/m, m, p, w/m, m, p)
    return x.reshape(3, h * patch, w * patch)


def _hf_kwargs(data: dict) -> dict:
    return {k: v for k, v in data.items() if k != "image_processor_type"}


@pytest.mark.parametrize("data,reference", [(TINY, Qwen2VLImageProcessor), (QWEN3, Qwen2VLImageProcessor),
                                            ({**TINY, "image_processor_type": "Qwen2VLImageProcessorPil"},
                                             Qwen2VLImageProcessorPil)])
def test_pixels_and_grid_equal_transformers(data, reference):
    ours = ImageProcessor.from_hf_config(data)
    hf = reference(**_hf_kwargs(data))
    cfg = ours.config
    assert cfg.resize_mode == "smart_resize" and cfg.factor == data["patch_size"] * data["merge_size"]
    assert (cfg.min_pixels, cfg.max_pixels) == (hf.size["shortest_edge"], hf.size["longest_edge"])
    patch, merge = data["patch_size"], data["merge_size"]
    clamps = set()
    for i, (height, width) in enumerate(SIZES):
        image = _image(height, width, seed=i)
        out = hf(image, return_tensors="pt")
        expected = unpatchify(out["pixel_values"], out["image_grid_thw"][0], patch, merge, 2)
        pixels = ours(image)[0]
        assert pixels.shape == expected.shape, (height, width, pixels.shape, expected.shape)
        assert (pixels.shape[1] // patch, pixels.shape[2] // patch) == tuple(out["image_grid_thw"][0, 1:].tolist())
        assert (pixels - expected).abs().max().item() <= 1e-5, (height, width)
        area = pixels.shape[1] * pixels.shape[2]
        clamps.add("min" if round(height / cfg.factor) * round(width / cfg.factor) * cfg.factor**2 < cfg.min_pixels
                   else "max" if area < round(height / cfg.factor) * round(width / cfg.factor) * cfg.factor**2 else "none")
    assert clamps == {"min", "max", "none"}, clamps  # every branch of smart_resize was exercised


def test_size_rule_is_transformers_smart_resize():
    for factor, lo, hi in ((28, 56 * 56, 28 * 28 * 1280), (32, 65536, 16777216), (8, 256, 9216)):
        for height in (1, 3, 13, 28, 29, 100, 517, 4000):
            for width in (1, 7, 28, 255, 1000, 5000):
                if max(height, width) / min(height, width) > 200:
                    with pytest.raises(ValueError, match="aspect ratio"):
                        smart_resize_size(height, width, factor, lo, hi)
                    continue
                assert smart_resize_size(height, width, factor, lo, hi) == smart_resize(height, width, factor, lo, hi)


def test_config_is_validated():
    with pytest.raises(ValueError, match="needs min_pixels"):
        ProcessorConfig(resize_mode="smart_resize", min_pixels=4)
    with pytest.raises(ValueError, match="apply to resize_mode='smart_resize' only"):
        ProcessorConfig(resize_mode="exact", factor=28)
    with pytest.raises(ValueError, match="larger than max_pixels"):
        ProcessorConfig(resize_mode="smart_resize", min_pixels=100, max_pixels=10, factor=2)
    with pytest.raises(ValueError, match="min_pixels"):
        ProcessorConfig(resize_mode="smart_resize", min_pixels=0, max_pixels=10, factor=2)
    with pytest.raises(ValueError, match="takes no crop_size"):
        ProcessorConfig(resize_mode="smart_resize", min_pixels=1, max_pixels=10, factor=2, crop_size=4)
    with pytest.raises(ValueError, match="shortest_edge"):
        ImageProcessor.from_hf_config({"image_processor_type": "Qwen2VLImageProcessor", "size": {"height": 4, "width": 4}})
    processor = ImageProcessor.from_hf_config(TINY)
    assert ImageProcessor.from_dict(processor.to_dict()) == processor  # round trip
    with pytest.raises(ValueError, match="different sizes"):
        processor([_image(40, 24), _image(24, 40)])


def test_a_qwen2_5_vl_checkpoint_gets_its_processor_and_image_tokens_match(tmp_path):
    """Whole checkpoint + `preprocessor_config.json` -> `load_vision_side`: PIL images of
    different sizes, one `image_tokens` call each, vs `get_image_features` on the reference
    processor's own `pixel_values` / `image_grid_thw`."""
    from test_qwen_vl_parity import MERGE, PATCH, TEMPORAL, _save_whole_model
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vlm_encoder import load_encoder, load_vision_side

    _save_whole_model(tmp_path)
    hf_processor = Qwen2VLImageProcessor(min_pixels=16 * 16, max_pixels=48 * 48, patch_size=PATCH, merge_size=MERGE,
                                         temporal_patch_size=TEMPORAL)
    hf_processor.save_pretrained(tmp_path)
    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert load_encoder(tmp_path).image_processor == ImageProcessor.from_hf_config(_hf_kwargs(TINY) | {
        "image_processor_type": "Qwen2VLImageProcessor", "max_pixels": 48 * 48})
    side = load_vision_side(tmp_path)
    assert side.processor.config.resize_mode == "smart_resize"
    for i, (height, width) in enumerate([(50, 30), (7, 40), (200, 90)]):  # non-square; min and max clamps
        image = _image(height, width, seed=i)
        inputs = hf_processor(image, return_tensors="pt")
        with torch.no_grad():
            expected = reference.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
            ours = side.image_tokens(image)  # (1, T, D)
        grid = tuple(inputs["image_grid_thw"][0, 1:].tolist())
        assert ours.shape[1] == side.num_image_tokens(grid), (ours.shape, grid)
        close(f"qwen2_5_vl smart_resize {height}x{width}", ours[0], torch.cat(list(expected)), "image tokens")


def test_extract_native_on_a_qwen2_5_vl_uses_smart_resize(tmp_path):
    """`extract --resolution native`: each image at its `smart_resize` size (the grid of
    transformers' `image_grid_thw`), patches equal to the encoder on the processor's output;
    `--max-patches` replaces `max_pixels`."""
    from test_qwen_vl_parity import MERGE, PATCH, TEMPORAL, _save_whole_model

    from vlm_encoder import load_encoder
    from vlm_encoder.cli import main
    from vlm_encoder.extract import FeatureStore

    model = tmp_path / "qwen"
    _save_whole_model(model)
    kwargs = dict(min_pixels=16 * 16, max_pixels=48 * 48, patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL)
    Qwen2VLImageProcessor(**kwargs).save_pretrained(model)
    folder = tmp_path / "images"
    folder.mkdir()
    sizes = [(50, 30), (7, 40), (200, 90)]
    for i, (height, width) in enumerate(sizes):
        _image(height, width, seed=i).save(folder / f"img_{i}.png")
    for max_patches, max_pixels in ((None, 48 * 48), (64, 64 * PATCH**2)):
        out = tmp_path / f"store_{max_patches}"
        extra = [] if max_patches is None else ["--max-patches", str(max_patches)]
        assert main(["extract", "--model", str(model), "--dataset", str(folder), "--out", str(out), "--layers", "-1",
                     "--select", "patch", "--resolution", "native", "--no-progress", "--num-workers", "0", *extra]) == 0
        store = FeatureStore(out)
        assert store.resolution["sizing"] == "smart_resize"
        encoder = load_encoder(model)
        hf = Qwen2VLImageProcessor(**{**kwargs, "max_pixels": max_pixels})
        for row, (height, width) in enumerate(sizes):
            got = store.get(row)
            image = Image.open(folder / f"img_{row}.png")
            assert got["grid"].tolist() == hf(image, return_tensors="pt")["image_grid_thw"][0, 1:].tolist()
            processor = ImageProcessor(encoder.image_processor.config.replace(max_pixels=max_pixels))
            with torch.no_grad():
                ref = encoder(processor(image), layers=(-1,)).patches(-1)[0]
            torch.testing.assert_close(got[f"layer{encoder.config.depth - 1}.patch"], ref, rtol=0, atol=1e-6)


def test_a_qwen3_vl_tower_reads_the_hub_size_form(tmp_path):
    """A `qwen3_vl_vision` directory with Qwen3-VL's own `preprocessor_config.json` form
    (`Qwen2VLImageProcessorFast`, `size: {shortest_edge, longest_edge}`, mean = std = 0.5) gets
    that processor; the tower on its pixels equals the reference on transformers' `pixel_values`."""
    import json

    from test_qwen3_vl_parity import MERGE, PATCH, TEMPORAL, _reference, _run_reference

    from vlm_encoder import load_encoder

    reference = _reference()
    reference.save_pretrained(tmp_path)
    data = {**QWEN3, "patch_size": PATCH, "merge_size": MERGE, "temporal_patch_size": TEMPORAL,
            "size": {"shortest_edge": 16 * 16, "longest_edge": 40 * 40}, "processor_class": "Qwen3VLProcessor"}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(data))
    encoder = load_encoder(tmp_path)
    cfg = encoder.image_processor.config
    assert (cfg.resize_mode, cfg.min_pixels, cfg.max_pixels, cfg.factor, cfg.mean) == (
        "smart_resize", 256, 1600, PATCH * MERGE, (0.5, 0.5, 0.5))
    hf = Qwen2VLImageProcessor(**_hf_kwargs(data))
    for i, (height, width) in enumerate([(30, 50), (90, 20)]):  # non-square; the second over max_pixels
        image = _image(height, width, seed=i)
        out = hf(image, return_tensors="pt")
        hf_pixels = unpatchify(out["pixel_values"], out["image_grid_thw"][0], PATCH, MERGE, TEMPORAL)[None]
        with torch.no_grad():
            hidden, _, _ = _run_reference(reference, hf_pixels)
            ours = encoder(encoder.image_processor(image), layers=(-1,)).patches(-1)
        close(f"qwen3_vl smart_resize {height}x{width}", ours, hidden[:, -1], "last layer")
