"""Adversarial images (issue 8, items 11-15): broken files, every PIL mode, EXIF orientation,
arrays of odd shapes, and sizes from 1x1 to 10000x50.

Broken files are skipped with their reason where a dataset is processed (`vlm-encoder
extract` on a folder: the failures file names each, and written + failed == total) and are a
clear `ImageLoadError` for a single image; PIL's global settings are never changed.
"""

from __future__ import annotations

import io
import json
import struct
import warnings
import zlib
from pathlib import Path

import accelerate  # noqa: F401 - imported first: its import adds warning filters (torch, numpy)
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from vlm_encoder import VisionConfig, VisionEncoder
from vlm_encoder.cli import main as cli_main
from vlm_encoder.extract import FeatureStore
from vlm_encoder.processing import ImageLoadError, ImageProcessor, ProcessorConfig, load_image

# Imports that add warning filters of their own, done before any test snapshots the filters.
torch.testing.assert_close(torch.zeros(1), torch.zeros(1))

RAW = ProcessorConfig(resize_mode="none", mean=None, std=None, rescale_factor=1.0)  # 0-255 values, no resize
TINY = {"image_size": 32, "patch_size": 8, "width": 32, "depth": 2, "num_heads": 2}
TINY_ARGS = ["--override", "depth=2", "--override", "width=32", "--override", "num_heads=2",
             "--override", "image_size=32", "--override", "patch_size=8"]
ORIENTATION = 0x0112


# ------------------------------------------------------------------ helpers
def pil_globals() -> tuple:
    return (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters))


@pytest.fixture(autouse=True)
def pil_globals_unchanged():
    """Every test here leaves PIL's limits and the warning filters as it found them."""
    before = pil_globals()
    yield
    assert pil_globals() == before, "PIL's global settings or the warning filters were changed"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny forwards: spinning threads only slow them on a shared CPU
    yield
    torch.set_num_threads(threads)


def random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A 60-byte 8-bit grey PNG whose header declares `width x height` pixels (data truncated)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def jpeg_with_orientation(array: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return encoded(Image.fromarray(array), "JPEG", quality=95, exif=exif.tobytes())


# What each EXIF orientation asks a viewer to do, by hand on the stored `(H, W, C)` pixels.
HAND_ORIENT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, k=-1),  # 90 degrees clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, k=1),
}


def broken_files(folder: Path) -> dict[str, str]:
    """The four broken files of item 11, written into `folder`: name -> a word its reason must hold."""
    good = encoded(Image.fromarray(random_rgb(40, 48)), "JPEG", quality=90)
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "page.jpg").write_bytes(b"<!DOCTYPE html>\n<html><body>404 Not Found</body></html>\n")
    (folder / "huge.png").write_bytes(png_declaring(20_000, 20_000))
    return {"truncated.jpg": "truncated", "empty.jpg": "empty", "page.jpg": "not an image",
            "huge.png": "decompression bomb"}


def tiny_encoder(**changes) -> VisionEncoder:
    torch.manual_seed(0)
    return VisionEncoder(VisionConfig(**{**TINY, **changes})).eval()


@torch.inference_mode()
def encode(encoder: VisionEncoder, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    out = encoder(pixels, layers=(0, -1))
    result = {"patches0": out.patches(0), "patches1": out.patches(-1), "pooled": out.pooled}
    if out.cls_tokens is not None:
        result["cls"] = out.cls(-1)
    return result


def assert_same_features(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


# ------------------------------------------------- 11. broken files, one at a time
@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("broken")
    return folder, broken_files(folder)


@pytest.mark.parametrize("name", ["truncated.jpg", "empty.jpg", "page.jpg", "huge.png"])
def test_load_image_names_the_file_and_the_reason(broken, name):
    folder, words = broken
    path = folder / name
    with pytest.raises(ImageLoadError) as caught:
        load_image(path)
    assert caught.value.source == str(path)
    assert words[name] in caught.value.reason.lower()
    assert str(path) in str(caught.value)
    with pytest.raises(ImageLoadError, match=words[name]):  # the same from the bytes
        load_image(path.read_bytes())


@pytest.mark.parametrize("max_pixels", [None, 10**6, 10**10])
def test_a_png_declaring_20000x20000_is_refused_before_any_allocation(max_pixels):
    data = png_declaring(20_000, 20_000)
    assert len(data) < 100
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(data, max_pixels=max_pixels)


def test_a_declared_size_between_the_limits_is_refused_by_ours_without_a_warning():
    data = png_declaring(10_000, 10_000)  # over MAX_IMAGE_PIXELS, under PIL's error at twice it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning escaping would fail here
        with pytest.raises(ImageLoadError, match=r"10000x10000 = 100000000 pixels exceeds the limit"):
            load_image(data)


@pytest.mark.parametrize("name", ["truncated.jpg", "empty.jpg", "page.jpg", "huge.png"])
def test_the_processor_raises_the_same_clear_error(broken, name):
    folder, words = broken
    path = folder / name
    processor = ImageProcessor(ProcessorConfig(size=32))
    with pytest.raises(ImageLoadError, match=words[name]):
        processor(path)
    good = Image.fromarray(random_rgb(20, 20))
    with pytest.raises(ImageLoadError, match=f"image 1: {path}") as caught:  # in a list: its index too
        processor([good, str(path), good])
    assert caught.value.source == str(path) and words[name] in caught.value.reason.lower()


def test_a_lazily_opened_truncated_image_is_a_value_error_not_an_oserror(broken):
    folder, _ = broken
    processor = ImageProcessor(ProcessorConfig(size=32))
    # PIL decodes on first use
    with Image.open(folder / "truncated.jpg") as lazy, pytest.raises(ValueError, match="cannot be decoded.*truncated"):
        processor(lazy)
    with Image.open(folder / "truncated.jpg") as lazy, pytest.raises(ValueError, match="image 0: PIL image"):
        processor([lazy, Image.fromarray(random_rgb(8, 8))])


def test_an_extreme_aspect_strip_is_a_clear_error_not_gigabytes():
    """1 x 100000 pixels (300 kB) under shortest_edge 224 would become 224 x 22.4M before the crop."""
    strip = Image.fromarray(random_rgb(1, 100_000))
    clip_like = ImageProcessor(ProcessorConfig(resize_mode="shortest_edge", size=224, crop_size=224))
    with pytest.raises(ValueError, match="aspect ratio is too extreme"):
        clip_like(strip)
    squash = ImageProcessor(ProcessorConfig(resize_mode="exact", size=224))
    assert squash(strip).shape == (1, 3, 224, 224)


# ----------------------------------------------- 11 (+12, 13). a dataset through extract
@pytest.fixture(scope="module")
def extracted(tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """`vlm-encoder extract` over a folder of good, odd-mode, EXIF-rotated and broken files."""
    root = tmp_path_factory.mktemp("extract")
    folder = root / "images"
    folder.mkdir()
    words = broken_files(folder)
    for i in range(5):
        Image.fromarray(random_rgb(24 + 3 * i, 30, seed=i)).save(folder / f"good_{i}.jpg", quality=90)
    Image.fromarray(random_rgb(20, 20, 1)).convert("CMYK").save(folder / "mode_cmyk.jpg", quality=95)
    Image.fromarray(np.arange(0, 65536, 64, dtype=np.uint16).reshape(32, 32)).save(folder / "mode_i16.png")
    Image.fromarray(random_rgb(20, 20, 2)).convert("P").save(folder / "mode_p.png", transparency=0)
    Image.fromarray(random_rgb(20, 20, 3)[:, :, :2], "LA").save(folder / "mode_la.png")
    stored = random_rgb(32, 48, seed=7)
    (folder / "rot_exif6.jpg").write_bytes(jpeg_with_orientation(stored, 6))
    decoded = np.asarray(load_image(folder / "rot_exif6.jpg"))  # (32, 48, 3) as stored
    Image.fromarray(np.ascontiguousarray(HAND_ORIENT[6](decoded))).save(folder / "rot_hand.png")
    out = root / "features"
    before = pil_globals()
    code = cli_main(["extract", "--model", "preset:vit_tiny_patch16_224", *TINY_ARGS, "--dataset", str(folder),
                     "--out", str(out), "--select", "cls,patch,pooled", "--shard-size", "4", "--batch-size", "3",
                     "--num-workers", "0", "--no-progress"])
    assert code == 0
    assert pil_globals() == before
    return folder, out, words


def test_extract_skips_each_broken_file_with_its_reason(extracted):
    folder, out, words = extracted
    store = FeatureStore(out)
    manifest = json.loads((out / "manifest.json").read_text())
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    reasons = {f["name"]: f["reason"] for f in failures}
    assert set(reasons) == set(words)
    for name, word in words.items():
        assert word in reasons[name].lower(), (name, reasons[name])
    total = len(list(folder.iterdir()))
    assert manifest["num_rows"] == total == 15
    assert manifest["rows_written"] == len(store) == total - len(words)
    assert manifest["rows_written"] + manifest["rows_failed"] == manifest["num_rows"]
    assert manifest["complete"]
    assert {f["row"] for f in failures}.isdisjoint(store.row_ids.tolist())


def test_extract_honours_exif_orientation_and_keeps_every_mode(extracted):
    folder, out, _ = extracted
    store = FeatureStore(out)
    names = sorted(p.name for p in folder.iterdir())
    row = {name: names.index(name) for name in names}
    written = set(store.row_ids.tolist())
    for name in ("mode_cmyk.jpg", "mode_i16.png", "mode_p.png", "mode_la.png"):
        assert row[name] in written, name
    rotated, by_hand = store.row_ids.tolist().index(row["rot_exif6.jpg"]), store.row_ids.tolist().index(row["rot_hand.png"])
    for key in ("cls", "patch", "pooled"):
        layer = None if key == "pooled" else -1
        column = store[layer, key]
        assert torch.equal(column[rotated], column[by_hand]), key


# --------------------------------------------------------------- 12. every PIL mode
def test_the_processor_docstring_documents_each_mode():
    doc = ImageProcessor.__doc__
    for mode in ("L", "LA", "P", "RGBA", "CMYK", "I;16", "F", "transparency"):
        assert mode in doc, mode


def raw(image: Image.Image, **changes) -> np.ndarray:
    """The processor's `(H, W, 3)` 0-255 values, before any resize or normalisation."""
    return ImageProcessor(RAW.replace(**changes))(image)[0].permute(1, 2, 0).numpy()


def test_mode_l_is_replicated():
    gray = np.array([[0, 7, 200, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(raw(Image.fromarray(gray, "L")), np.repeat(gray[:, :, None], 3, axis=2))


@pytest.mark.parametrize("background", [(255, 255, 255), (0, 0, 0), (10, 200, 30)])
def test_alpha_modes_are_composited_on_the_background(background):
    alpha = np.array([[0, 255, 128, 1]], dtype=np.uint8)
    colour = np.array([[[200, 10, 90]] * 4], dtype=np.uint8)
    expected = colour * (alpha[..., None] / 255.0) + np.array(background) * (1 - alpha[..., None] / 255.0)
    rgba = Image.fromarray(np.concatenate([colour, alpha[..., None]], axis=2), "RGBA")
    got = raw(rgba, background=background)
    np.testing.assert_allclose(got, expected, atol=1.0)
    np.testing.assert_array_equal(got[0, 0], background)  # fully transparent: the background exactly
    np.testing.assert_array_equal(got[0, 1], colour[0, 1])  # opaque: the colour exactly
    la = Image.fromarray(np.stack([colour[..., 0], alpha], axis=2), "LA")
    expected_la = colour[..., :1] * (alpha[..., None] / 255.0) + np.array(background) * (1 - alpha[..., None] / 255.0)
    np.testing.assert_allclose(raw(la, background=background), expected_la, atol=1.0)


@pytest.mark.parametrize("via_file", [False, True])
def test_mode_p_with_transparency_composites_the_transparent_index(via_file):
    palette = Image.new("P", (3, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    for x in range(3):
        palette.putpixel((x, 0), x)
    palette.info["transparency"] = 1
    image = load_image(encoded(palette, "PNG")) if via_file else palette
    assert image.mode == "P" and image.info.get("transparency") == 1
    np.testing.assert_array_equal(raw(image, background=(7, 8, 9))[0], [[255, 0, 0], [7, 8, 9], [0, 0, 255]])


def test_mode_cmyk_goes_through_pil_convert():
    rng = np.random.default_rng(0)
    cmyk = Image.fromarray(rng.integers(0, 256, (4, 5, 4), dtype=np.uint8), "CMYK")
    np.testing.assert_array_equal(raw(cmyk), np.asarray(cmyk.convert("RGB")))
    from_jpeg = load_image(encoded(cmyk, "JPEG", quality=95))
    assert from_jpeg.mode == "CMYK"
    np.testing.assert_array_equal(raw(from_jpeg), np.asarray(from_jpeg.convert("RGB")))


@pytest.mark.parametrize("via_file", [False, True])
def test_mode_i16_maps_the_full_16_bit_range_without_saturating(via_file):
    values = np.array([[0, 1, 255, 256, 300, 1000, 32768, 65534, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    if via_file:
        image = load_image(encoded(image, "PNG"))
    assert image.mode == "I;16"
    got = raw(image)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got[0, :, 0], values[0] * 255.0 / 65535.0, rtol=1e-6, atol=1e-4)
    assert got.max() == 255.0 and got[0, -2, 0] < 255.0  # only 65535 is white
    assert len(np.unique(got[0, :, 0])) == values.size  # every 16-bit level stays distinct


def test_mode_i16_transparency_key_takes_the_background():
    image = Image.fromarray(np.array([[0, 1000, 65535]], dtype=np.uint16))
    image.info["transparency"] = 1000
    np.testing.assert_allclose(raw(image, background=(10, 20, 30))[0, 1], [10, 20, 30])
    np.testing.assert_allclose(raw(image)[0, 0], [0, 0, 0])


def test_mode_i16_keeps_precision_through_the_resize():
    """A 16-bit ramp resized and normalised equals the same ramp given as floats in [0, 1]."""
    ramp = np.arange(0, 65536, 257, dtype=np.uint16)[:240].reshape(12, 20)
    processor = ImageProcessor(ProcessorConfig(resize_mode="exact", size=8))
    as_float = np.repeat((ramp / 65535.0).astype(np.float32)[:, :, None], 3, axis=2)
    torch.testing.assert_close(processor(Image.fromarray(ramp)), processor(as_float), atol=1e-5, rtol=0)


def test_mode_f_in_unit_range_and_errors_outside():
    values = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)
    np.testing.assert_allclose(raw(Image.fromarray(values, "F"))[0, :, 0], values[0] * 255.0)
    for bad, word in ((np.array([[0.0, 2.0]], dtype=np.float32), "values in"), (np.array([[np.nan, 0.5]], dtype=np.float32), "values in")):
        with pytest.raises(ValueError, match=rf"mode 'F' image has {word}.*\[0, 1\]"):
            raw(Image.fromarray(bad, "F"))


# --------------------------------------------------------------- 13. EXIF orientation
@pytest.mark.parametrize("orientation", list(HAND_ORIENT))
def test_every_exif_orientation_gives_the_hand_oriented_pixels(orientation):
    data = jpeg_with_orientation(random_rgb(16, 24, seed=orientation), orientation)
    image = load_image(data)
    assert image.getexif().get(ORIENTATION) == orientation  # returned as stored
    expected = np.ascontiguousarray(HAND_ORIENT[orientation](np.asarray(image)))
    np.testing.assert_array_equal(raw(image), expected)
    np.testing.assert_array_equal(raw(image, exif_transpose=False), np.asarray(image))


def test_exif_orientation_6_gives_the_encoder_features_of_the_hand_rotated_png(tmp_path):
    stored = random_rgb(32, 48, seed=6)  # stored 32 high, 48 wide; shown 48 high, 32 wide
    jpeg = tmp_path / "photo.jpg"
    jpeg.write_bytes(jpeg_with_orientation(stored, 6))
    decoded = np.asarray(load_image(jpeg))
    png = tmp_path / "by_hand.png"
    Image.fromarray(np.ascontiguousarray(np.rot90(decoded, k=-1))).save(png)  # lossless
    encoder = tiny_encoder(image_size=(48, 32))
    processor = ImageProcessor.default_for(encoder.config)  # squash to (48, 32): no resize here
    from_jpeg, from_png = processor(jpeg), processor(png)
    assert from_jpeg.shape == (1, 3, 48, 32)
    assert torch.equal(from_jpeg, from_png)
    assert_same_features(encode(encoder, from_jpeg), encode(encoder, from_png))
    ignored = ImageProcessor(processor.config.replace(exif_transpose=False))(jpeg)  # the control
    assert not torch.equal(encode(encoder, ignored)["pooled"], encode(encoder, from_png)["pooled"])


# ------------------------------------------------------------ 14. arrays and tensors
CONFIGS_14 = {
    "exact": ProcessorConfig(resize_mode="exact", size=32),
    "shortest_edge_crop": ProcessorConfig(resize_mode="shortest_edge", size=32, crop_size=32),
    "none": RAW,
}


@pytest.mark.parametrize("config", list(CONFIGS_14))
@pytest.mark.parametrize("shape", [(1, 9, 3), (3, 3, 3), (7, 5, 3), (1, 1, 3)])
def test_channels_last_arrays_equal_the_pil_path(config, shape):
    processor = ImageProcessor(CONFIGS_14[config])
    array = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    via_pil = processor(Image.fromarray(array))
    assert torch.equal(processor(array), via_pil)
    assert torch.equal(processor(torch.from_numpy(array).permute(2, 0, 1)), via_pil)  # CHW uint8 tensor
    assert torch.equal(processor(torch.from_numpy(array).permute(2, 0, 1).contiguous()), via_pil)


@pytest.mark.parametrize("config", list(CONFIGS_14))
def test_grayscale_arrays_equal_the_pil_l_path(config):
    processor = ImageProcessor(CONFIGS_14[config])
    gray = np.random.default_rng(2).integers(0, 256, (6, 11), dtype=np.uint8)
    via_pil = processor(Image.fromarray(gray, "L"))
    for image in (gray, gray[:, :, None], torch.from_numpy(gray), torch.from_numpy(gray)[None]):
        assert torch.equal(processor(image), via_pil)


def test_3x3x3_is_channels_last_for_numpy_and_channels_first_for_torch():
    array = np.arange(27, dtype=np.uint8).reshape(3, 3, 3) * 9
    hwc = raw(Image.fromarray(array))
    np.testing.assert_array_equal(ImageProcessor(RAW)(array)[0].permute(1, 2, 0).numpy(), hwc)
    as_chw = ImageProcessor(RAW)(torch.from_numpy(array))[0]  # torch: (C, H, W)
    np.testing.assert_array_equal(as_chw.numpy(), array.astype(np.float32))
    assert not np.array_equal(hwc, array.transpose(1, 2, 0))  # the two readings differ: nothing guessed


@pytest.mark.parametrize("config", list(CONFIGS_14))
def test_float_images_in_unit_range_match_the_uint8_path(config):
    """Floats in [0, 1] are the uint8 values / 255: equal without a resize; with one, the float
    path keeps full precision where PIL's 8-bit path rounds (and clips) after each of its two
    passes, so a smooth image agrees within a grey level."""
    processor = ImageProcessor(CONFIGS_14[config])
    y, x = np.mgrid[0:12, 0:17]
    smooth = 128 + 90 * np.sin(y / 3.0)[:, :, None] * np.cos(x[:, :, None] / 4.0 + np.arange(3))
    for array in (np.random.default_rng(3).integers(0, 256, (12, 17, 3), dtype=np.uint8), smooth.astype(np.uint8)):
        via_pil = processor(Image.fromarray(array))
        as_float = array.astype(np.float32) / 255.0
        from_float = processor(as_float)
        assert torch.equal(processor(torch.from_numpy(as_float).permute(2, 0, 1)), from_float)
        assert torch.equal(processor(as_float.astype(np.float64)), from_float)
        if config == "none":
            torch.testing.assert_close(from_float, via_pil, atol=1e-6, rtol=0)
    grey_level = 1 / 255 / min(processor.config.std or (1 / 255,))  # one 8-bit step, normalised
    atol = 1e-6 if config == "none" else 1.01 * grey_level
    torch.testing.assert_close(from_float, via_pil, atol=atol, rtol=0)
    lowest = (0 - max(processor.config.mean or (0,))) / min(processor.config.std or (1 / 255,))
    assert from_float.min() >= lowest - 1e-5  # the filter's overshoot is clamped as in the 8-bit path


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((3, 16, 16), np.uint8), r"shape \(3, 16, 16\).*channels-last.*never guessed"),
        (np.zeros((16, 16, 4), np.uint8), r"channels-last.*RGBA"),
        (np.zeros((16, 16, 2), np.uint8), r"shape \(16, 16, 2\)"),
        (np.zeros((2, 16, 16, 3), np.uint8), r"shape \(2, 16, 16, 3\)"),
        (np.zeros((0, 16, 3), np.uint8), "no pixels"),
        (np.zeros((16, 16, 3), np.int64), "dtype int64"),
        (np.zeros((16, 16, 3), bool), "dtype bool"),
        (np.full((4, 4, 3), 1.0001, np.float32), r"float images must lie in \[0, 1\]"),
        (np.full((4, 4, 3), -0.1, np.float32), r"float images must lie in \[0, 1\]"),
        (np.full((4, 4, 3), np.nan, np.float32), r"float images must lie in \[0, 1\]"),
        (np.full((4, 4, 3), 255.0, np.float32), r"float images must lie in \[0, 1\]"),
        (torch.zeros(16, 16, 3, dtype=torch.uint8), r"\(16, 16, 3\).*channels-first.*never guessed"),
        (torch.zeros(2, 3, 16, 16), "a batch"),
        (torch.zeros(4, 16, 16), r"shape \(4, 16, 16\)"),
        (torch.zeros(3, 16, 16, dtype=torch.int32), "dtype torch.int32"),
        (torch.full((3, 4, 4), 2.0), r"\[0, 1\]"),
        ([[1, 2], [3, 4]], "unsupported image type list"),
    ],
    ids=lambda v: "x".join(map(str, getattr(v, "shape", ()))) if not isinstance(v, str) else None,
)
def test_other_arrays_are_clear_errors(image, message):
    errors = (ValueError, TypeError)
    with pytest.raises(errors, match=message):
        ImageProcessor(ProcessorConfig(size=32))(image)


# --------------------------------------------------------------- 15. sizes
SIZES = [(1, 1), (13, 13), (225, 223), (10000, 50)]  # (H, W)
PROCESSORS_15 = {
    "exact": ProcessorConfig(resize_mode="exact", size=32),
    "shortest_edge_crop": ProcessorConfig(resize_mode="shortest_edge", size=32, crop_size=32),
    "longest_edge_pad": ProcessorConfig(resize_mode="longest_edge", size=32, crop_size=32),
}


@pytest.fixture(scope="module")
def encoders() -> dict[str, VisionEncoder]:
    return {"cls_registers": tiny_encoder(num_register_tokens=2),
            "no_cls_map": tiny_encoder(class_token=False, pool="map")}


@pytest.mark.parametrize("processor_name", list(PROCESSORS_15))
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_the_processor_gives_the_native_grid_for_every_size(encoders, processor_name, size):
    image = Image.fromarray(random_rgb(*size))
    pixels = ImageProcessor(PROCESSORS_15[processor_name])(image)
    assert pixels.shape == (1, 3, 32, 32) and torch.isfinite(pixels).all()
    for encoder in encoders.values():
        with torch.inference_mode():
            out = encoder(pixels, layers=(-1,), norm=True)
        p = encoder.config.patch_size
        assert out.grid_size == (32 // p, 32 // p)
        assert out.patches(-1).shape == (1, (32 // p) * (32 // p), encoder.width)
        tokens = encoder.num_prefix_tokens + (32 // p) * (32 // p)
        assert out.patches(-1).shape[1] + encoder.num_prefix_tokens == tokens


def test_the_extreme_aspect_at_clip_size_gives_a_valid_tensor():
    """10000x50 under CLIP's shortest_edge 224 + crop: a 44800 x 224 intermediate, then the crop."""
    image = Image.fromarray(random_rgb(10000, 50))
    pixels = ImageProcessor(ProcessorConfig(resize_mode="shortest_edge", size=224, crop_size=224))(image)
    assert pixels.shape == (1, 3, 224, 224) and torch.isfinite(pixels).all()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_the_raw_encoder_refuses_sizes_that_are_not_patch_multiples(encoders, size):
    encoder = encoders["cls_registers"]
    pixels = torch.randn(1, 3, *size)
    message = "smaller than one patch" if min(size) < 8 else "not a multiple of the patch size 8"
    with pytest.raises(ValueError, match=message):
        encoder(pixels)


@pytest.mark.parametrize("size", [(8, 8), (16, 40), (224, 216), (10000, 48)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_the_raw_encoder_takes_any_patch_multiple(encoders, size):
    encoder = encoders["cls_registers"]
    with torch.inference_mode():
        out = encoder(torch.randn(1, 3, *size), layers=(0,))
    grid = (size[0] // 8, size[1] // 8)
    assert out.grid_size == grid
    assert out.patches(0).shape[1] + encoder.num_prefix_tokens == encoder.num_prefix_tokens + grid[0] * grid[1]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_patch_remainder_drop_ignores_the_last_pixels(size):
    """`patch_remainder='drop'`: the grid is `(H // p, W // p)`, the remainder is ignored as the
    convolution does; an image smaller than one patch is still an error."""
    encoder = tiny_encoder(patch_remainder="drop", num_register_tokens=2)
    pixels = torch.randn(1, 3, *size)
    if min(size) < 8:
        with pytest.raises(ValueError, match="smaller than one patch"):
            encoder(pixels)
        return
    with torch.inference_mode():
        out = encoder(pixels, layers=(0,))
        cropped = encoder(pixels[:, :, : size[0] // 8 * 8, : size[1] // 8 * 8], layers=(0,))
    grid = (size[0] // 8, size[1] // 8)
    assert out.grid_size == grid and out.patches(0).shape[1] == grid[0] * grid[1]
    assert torch.equal(out.patches(0), cropped.patches(0))  # the dropped pixels change nothing
