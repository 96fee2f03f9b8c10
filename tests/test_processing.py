"""ImageProcessor: parity with HF / open_clip / timm eval transforms, the input rules, load_image."""

from __future__ import annotations

import importlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_encoder import VisionConfig
from vlm_encoder.processing import ImageLoadError, ImageProcessor, ProcessorConfig, load_image

TOL = 1e-6


def _photos() -> list[Image.Image]:
    from skimage import data

    astronaut, coffee, chelsea = (Image.fromarray(f()) for f in (data.astronaut, data.coffee, data.chelsea))
    return [
        astronaut,
        coffee,
        chelsea,
        astronaut.resize((301, 97)),  # wide, odd
        coffee.resize((45, 333)),  # tall, narrow
        chelsea.crop((3, 5, 230, 231)),  # odd margins for the crop offset
        chelsea.resize((21, 17)),  # smaller than most crops: padding
    ]


PHOTOS = _photos()


def _max_diff(ours: ImageProcessor, reference, images=PHOTOS) -> float:
    worst = 0.0
    for image in images:
        expected = reference(image)
        got = ours(image)
        assert got.shape == (1, *expected.shape), (got.shape, expected.shape)
        assert got.dtype == torch.float32
        worst = max(worst, (got[0] - expected).abs().max().item())
    return worst


# ---- parity: HF ------------------------------------------------------------------------------

DINOV2 = {
    "image_processor_type": "BitImageProcessor",
    "do_resize": True,
    "size": {"shortest_edge": 256},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 0.00392156862745098,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "do_convert_rgb": True,
}
SIGLIP = {
    "image_processor_type": "SiglipImageProcessor",
    "size": {"height": 64, "width": 48},
    "resample": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "SiglipProcessor",
}
SMALL_CLIP = {
    "image_processor_type": "CLIPImageProcessor",
    "size": {"shortest_edge": 37},
    "crop_size": {"height": 41, "width": 28},  # taller than the resize: pads
}


def _hf_class(name: str, pil: bool):
    import transformers

    if pil:
        module = {"CLIP": "clip", "Siglip": "siglip", "ViT": "vit", "Bit": "bit"}[name.replace("ImageProcessor", "")]
        pil_module = importlib.import_module(f"transformers.models.{module}.image_processing_pil_{module}")
        return getattr(pil_module, name + "Pil")
    return getattr(transformers, name)


@pytest.mark.parametrize("pil", [False, True], ids=["torchvision", "pil"])
@pytest.mark.parametrize(
    "config",
    [
        {"image_processor_type": "CLIPImageProcessor"},
        {"image_processor_type": "SiglipImageProcessor"},
        {"image_processor_type": "ViTImageProcessor"},
        {"image_processor_type": "BitImageProcessor"},
        DINOV2,
        SIGLIP,
        SMALL_CLIP,
        {"image_processor_type": "ViTImageProcessor", "do_normalize": False, "resample": 0, "size": 30},
    ],
    ids=["clip", "siglip", "vit", "bit", "dinov2", "siglip-dict", "clip-small-pad", "vit-nearest-no-norm"],
)
def test_matches_hf_image_processor(config, pil):
    cls = _hf_class(config["image_processor_type"], pil)
    reference = cls(**{k: v for k, v in config.items() if k not in ("image_processor_type", "processor_class")})
    ours = ImageProcessor.from_hf_config(config, backend="pil" if pil else None)
    assert ours.config.backend == ("pil" if pil else "torchvision")
    diff = _max_diff(ours, lambda im: reference(im, return_tensors="pt")["pixel_values"][0])
    assert diff <= TOL


def test_hf_saved_dict_round_trip():
    from transformers import CLIPImageProcessor

    reference = CLIPImageProcessor(size={"shortest_edge": 50}, crop_size={"height": 48, "width": 48})
    ours = ImageProcessor.from_hf_config(reference.to_dict())
    diff = _max_diff(ours, lambda im: reference(im, return_tensors="pt")["pixel_values"][0], PHOTOS[:3])
    assert diff <= TOL
    # The backend is read from the class name.
    assert ImageProcessor.from_hf_config({"image_processor_type": "CLIPImageProcessorPil"}).config.backend == "pil"
    legacy = ImageProcessor.from_hf_config({"feature_extractor_type": "CLIPFeatureExtractor"})
    assert legacy.config.crop_size == (224, 224)


@pytest.mark.parametrize(
    "config, match",
    [
        ({}, "image_processor_type"),
        ({"image_processor_type": "LlavaOnevisionImageProcessor"}, "not supported"),
        ({"image_processor_type": "CLIPImageProcessor", "do_flip": True}, "do_flip"),
        ({"image_processor_type": "CLIPImageProcessor", "size": {"longest_edge": 3}}, "size"),
        ({"image_processor_type": "CLIPImageProcessor", "resample": 9}, "resample"),
        ({"image_processor_type": "CLIPImageProcessor", "do_pad": True}, "do_pad"),
    ],
)
def test_hf_config_errors(config, match):
    with pytest.raises(ValueError, match=match):
        ImageProcessor.from_hf_config(config)


# ---- parity: open_clip and timm ---------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        {},
        {"size": 64, "interpolation": "bilinear"},
        {"size": (64, 48)},
        {"size": (40, 72), "interpolation": "bilinear"},  # open_clip resizes these with bicubic anyway
        {"size": 63, "resize_mode": "longest", "fill_color": 100},
        {"size": (50, 70), "resize_mode": "squash", "interpolation": "bilinear", "mean": 0.5, "std": 0.5},
    ],
)
def test_matches_open_clip_image_transform(cfg):
    from open_clip import image_transform
    from open_clip.transform import PreprocessCfg

    pc = PreprocessCfg(**cfg)
    reference = image_transform(
        pc.size, is_train=False, mean=pc.mean, std=pc.std, resize_mode=pc.resize_mode,
        interpolation=pc.interpolation, fill_color=pc.fill_color,
    )
    assert _max_diff(ImageProcessor.from_open_clip(pc), reference) <= TOL
    assert ImageProcessor.from_open_clip(cfg) == ImageProcessor.from_open_clip(pc)


IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


@pytest.mark.parametrize(
    "data_config",
    [
        dict(input_size=(3, 224, 224), interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.9),
        dict(input_size=(3, 48, 64), interpolation="bilinear", crop_pct=0.875, crop_mode="center", **IMAGENET),
        dict(input_size=(3, 56, 56), interpolation="bicubic", crop_pct=0.95, crop_mode="squash", **IMAGENET),
        dict(input_size=(3, 56, 40), interpolation="bicubic", crop_pct=0.9, crop_mode="border", **IMAGENET),
        dict(input_size=(3, 60, 60), interpolation="nearest", crop_pct=1.0, crop_mode="center", **IMAGENET),
    ],
    ids=["center-224", "center-nonsquare", "squash", "border", "nearest"],
)
def test_matches_timm_create_transform(data_config):
    from timm.data import create_transform

    assert _max_diff(ImageProcessor.from_timm(data_config), create_transform(**data_config)) <= TOL


def test_timm_resolve_data_config():
    import timm
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    data_config = resolve_data_config({}, model=model)
    assert _max_diff(ImageProcessor.from_timm(data_config), create_transform(**data_config), PHOTOS[:2]) <= TOL


# ---- input rules -----------------------------------------------------------------------------

PLAIN = ImageProcessor(ProcessorConfig(resize_mode="none", mean=None, std=None, rescale_factor=1.0))  # 0-255 values


def _plain(image) -> torch.Tensor:
    return PLAIN(image)[0]  # (3, H, W) on the 0-255 scale


def test_transparency_composited_on_white():
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., 0] = 255  # red ...
    rgba[:, :3, 3] = 0  # ... invisible on the left
    rgba[:, 3:, 3] = 255
    out = _plain(Image.fromarray(rgba, "RGBA"))
    assert torch.equal(out[:, :, :3], torch.full((3, 4, 3), 255.0))
    assert torch.equal(out[:, :, 3:], torch.tensor([255.0, 0, 0]).view(3, 1, 1).expand(3, 4, 3))
    half_alpha = np.dstack([np.zeros((2, 2, 3), np.uint8), np.full((2, 2, 1), 128, np.uint8)])
    half = _plain(Image.fromarray(half_alpha, "RGBA"))
    assert torch.allclose(half, torch.full_like(half, 127.0), atol=1)  # black at half alpha on white

    la = Image.fromarray(np.stack([np.zeros((3, 3), np.uint8), np.zeros((3, 3), np.uint8)], -1), "LA")
    assert torch.equal(_plain(la), torch.full((3, 3, 3), 255.0))

    palette = Image.new("P", (3, 3), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.info["transparency"] = 1
    assert torch.equal(_plain(palette), torch.full((3, 3, 3), 255.0))
    palette.info.pop("transparency")
    assert torch.equal(_plain(palette)[:, 0, 0], torch.tensor([10.0, 20.0, 30.0]))

    black = ImageProcessor(PLAIN.config.replace(background=(0, 0, 0)))
    assert torch.equal(black(Image.fromarray(rgba, "RGBA"))[0][:, :, :3], torch.zeros(3, 4, 3))


def test_gray_and_cmyk():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = _plain(Image.fromarray(gray, "L"))
    assert torch.equal(out, torch.from_numpy(gray).float().expand(3, 3, 4))
    bilevel = torch.from_numpy((gray > 100) * 255.0).float().expand(3, 3, 4)
    assert torch.equal(_plain(Image.fromarray(gray > 100)), bilevel)
    cmyk = Image.new("CMYK", (4, 3), (10, 200, 30, 40))
    assert torch.equal(_plain(cmyk), _plain(cmyk.convert("RGB")))


def test_sixteen_bit_is_scaled_not_saturated():
    values = np.array([[0, 257, 32768, 65535]], np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    expected = torch.tensor([0.0, 1.0, 32768 * 255 / 65535, 255.0]).expand(3, 1, 4)
    assert torch.allclose(_plain(image), expected, atol=1e-4)
    assert torch.allclose(_plain(image.convert("I")), expected, atol=1e-4)
    assert torch.allclose(_plain(values), expected, atol=1e-4)  # numpy uint16
    # 65535 is white after the full pipeline too, with either backend and a real resize.
    for backend in ("pil", "torchvision"):
        processor = ImageProcessor(ProcessorConfig(size=(8, 8), backend=backend))
        white16 = processor(Image.fromarray(np.full((20, 30), 65535, np.uint16)))
        white8 = processor(Image.new("RGB", (30, 20), (255, 255, 255)))
        assert torch.allclose(white16, white8, atol=1e-5)
    with pytest.raises(ValueError, match="mode 'I'"):
        _plain(Image.fromarray(np.array([[70000]], np.int32)))


def test_float_mode_and_arrays():
    values = np.array([[0.0, 0.25, 1.0]], np.float32)
    expected = torch.tensor([0.0, 63.75, 255.0]).expand(3, 1, 3)
    assert torch.allclose(_plain(Image.fromarray(values, "F")), expected)
    assert torch.allclose(_plain(values), expected)
    assert torch.allclose(_plain(torch.from_numpy(values)), expected)
    for bad in (values * 2, values - 0.5, np.full((2, 2), np.nan, np.float32)):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            _plain(bad)
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            _plain(torch.from_numpy(bad))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        _plain(Image.fromarray(values * 3, "F"))


def test_exif_orientation_applied():
    pixels = np.random.default_rng(0).integers(0, 255, (20, 40, 3), dtype=np.uint8)  # H=20, W=40
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", exif=exif)
    loaded = load_image(buffer.getvalue())
    assert loaded.getexif().get(0x0112) == 6
    stored = Image.fromarray(np.asarray(loaded))  # same pixels, no EXIF
    out = _plain(loaded)
    assert out.shape == (3, 40, 20)
    assert torch.equal(out, _plain(stored.transpose(Image.Transpose.ROTATE_270)))
    assert not torch.equal(out, _plain(stored.transpose(Image.Transpose.ROTATE_90)))
    ignore = ImageProcessor(PLAIN.config.replace(exif_transpose=False))
    assert ignore(loaded).shape == (1, 3, 20, 40)


def test_numpy_and_torch_layouts():
    rng = np.random.default_rng(1)
    hwc = rng.integers(0, 255, (5, 7, 3), dtype=np.uint8)
    from_pil = _plain(Image.fromarray(hwc))
    assert torch.equal(_plain(hwc), from_pil)
    assert torch.equal(_plain(torch.from_numpy(hwc).permute(2, 0, 1)), from_pil)
    assert torch.allclose(_plain(torch.from_numpy(hwc).permute(2, 0, 1).float() / 255), from_pil, atol=1e-4)
    assert torch.equal(_plain(hwc[..., :1]), _plain(hwc[..., 0]))
    assert torch.equal(_plain(hwc[..., 0]), _plain(Image.fromarray(hwc[..., 0])))
    cube = rng.integers(0, 255, (3, 3, 3), dtype=np.uint8)  # numpy is HWC: a 3x3 RGB image
    assert torch.equal(_plain(cube), _plain(Image.fromarray(cube)))
    gray = torch.arange(15, dtype=torch.uint8).view(1, 5, 3)  # torch is CHW: a 5x3 gray image
    assert _plain(gray).shape == (3, 5, 3)
    assert torch.equal(_plain(gray), _plain(gray[0]))


@pytest.mark.parametrize(
    "image, match",
    [
        (np.zeros((3, 8, 8), np.uint8), r"\(3, 8, 8\).*channels-last"),
        (np.zeros((8, 8, 4), np.uint8), r"\(8, 8, 4\)"),
        (np.zeros((2, 8, 8, 3), np.uint8), r"\(2, 8, 8, 3\)"),
        (np.zeros((8, 8, 3), np.int64), "dtype int64"),
        (np.zeros((0, 8, 3), np.uint8), "no pixels"),
        (torch.zeros(8, 8, 3, dtype=torch.uint8), r"\(8, 8, 3\).*channels-first"),
        (torch.zeros(5, 4, 3), r"\(5, 4, 3\)"),
        (torch.zeros(2, 3, 8, 8), "batch"),
        (torch.zeros(3, 8, 8, dtype=torch.int64), "dtype torch.int64"),
        (torch.full((3, 8, 8), 1.5), r"\[0, 1\]"),
    ],
)
def test_bad_inputs_raise(image, match):
    with pytest.raises(ValueError, match=match):
        _plain(image)


def test_unsupported_type_raises():
    with pytest.raises(TypeError, match="unsupported image type"):
        PLAIN([1, 2, 3])
    with pytest.raises(ValueError, match="empty"):
        PLAIN([])


def test_list_of_sizes_matches_one_by_one():
    small = {"size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 32}}
    processor = ImageProcessor.from_hf_config(DINOV2 | small)
    batch = processor(PHOTOS)
    assert batch.shape == (len(PHOTOS), 3, 32, 32)
    for i, image in enumerate(PHOTOS):
        assert torch.equal(batch[i : i + 1], processor(image))
    with pytest.raises(ValueError, match="different sizes"):
        PLAIN(PHOTOS[:2])
    with pytest.raises(ValueError, match="image 1"):
        processor([PHOTOS[0], np.zeros((3, 8, 8), np.uint8)])


def test_default_for_encoder():
    encoder_config = VisionConfig(image_size=(32, 48), patch_size=16, width=32, depth=1, num_heads=2)
    processor = ImageProcessor.default_for(encoder_config)
    assert processor(PHOTOS[:2]).shape == (2, 3, 32, 48)
    assert processor.config.resize_mode == "exact"


def test_config_validation():
    with pytest.raises(ValueError, match="resize_mode"):
        ProcessorConfig(resize_mode="cover")
    with pytest.raises(ValueError, match="both"):
        ProcessorConfig(mean=(0.5, 0.5, 0.5), std=None)
    with pytest.raises(ValueError, match="std must be positive"):
        ProcessorConfig(std=(0.5, 0.0, 0.5))
    with pytest.raises(ValueError, match="background"):
        ProcessorConfig(background=(256, 0, 0))
    with pytest.raises(ValueError, match="size"):
        ProcessorConfig(size=(0, 3))
    with pytest.raises(ValueError, match="unknown"):
        ProcessorConfig.from_dict({"sizes": 3})


def test_save_and_from_pretrained_round_trip(tmp_path):
    processor = ImageProcessor.from_timm(
        dict(input_size=(3, 56, 40), interpolation="bicubic", crop_pct=0.9, crop_mode="border", **IMAGENET)
    )
    path = processor.save_pretrained(tmp_path / "proc")
    assert path.name == "processor_config.json"
    assert json.loads(path.read_text())["processor_type"] == "vlm_encoder.ImageProcessor"
    loaded = ImageProcessor.from_pretrained(tmp_path / "proc")
    assert loaded == processor
    assert torch.equal(loaded(PHOTOS[:3]), processor(PHOTOS[:3]))
    assert ImageProcessor.from_dict(processor.to_dict()) == processor
    assert not list((tmp_path / "proc").glob(".*tmp"))
    with pytest.raises(FileNotFoundError, match="processor_config.json"):
        ImageProcessor.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="from_hf_config"):
        ImageProcessor.from_dict({"processor_type": "CLIPImageProcessor"})


# ---- load_image ------------------------------------------------------------------------------


def _encoded(fmt: str = "PNG", size=(32, 24)) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def test_load_image_good_file(tmp_path):
    path = tmp_path / "ok.jpg"
    path.write_bytes(_encoded("JPEG"))
    image = load_image(path)
    path.unlink()  # fully decoded: the file is no longer needed
    assert image.size == (32, 24) and np.asarray(image).shape == (24, 32, 3)
    with pytest.raises(ImageLoadError, match="no such file"):
        PLAIN(str(tmp_path / "missing.png"))


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("empty.png", b"", "empty file"),
        ("page.jpg", b"<!DOCTYPE html><html><body>Not found</body></html>", "text"),
        ("junk.png", b"\x00\x01\x02garbage" * 10, "not an image"),
        ("cut.png", _encoded("PNG")[:200], "truncated|corrupt"),
        ("cut.jpg", _encoded("JPEG", (64, 64))[:300], "truncated|corrupt"),
    ],
)
def test_load_image_errors_name_file_and_reason(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageLoadError, match=reason) as info:
        load_image(path)
    assert name in str(info.value)
    assert isinstance(info.value, ValueError)


def test_load_image_decompression_bomb_without_global_change(monkeypatch):
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageLoadError, match="exceeds the limit of 100 pixels"):
        load_image(_encoded(), max_pixels=100)
    assert Image.MAX_IMAGE_PIXELS == before
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(_encoded())
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # > 2x: PIL raises itself
    with pytest.raises(ImageLoadError, match="decompression"):
        load_image(_encoded())


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about corrupt EXIF in random data
def test_load_image_fuzz_only_image_load_error():
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    headers = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"II*\x00", b"RIFF\x00\x00\x00\x00WEBP"]
    valid = _encoded("PNG", (8, 8))

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(st.sampled_from(headers), st.binary(max_size=300), st.integers(0, len(valid)))
    def check(header, body, cut):
        for data in (header + body, valid[:cut] + body):
            try:
                image = load_image(data)
            except ImageLoadError:
                continue
            assert isinstance(image, Image.Image)

    check()
