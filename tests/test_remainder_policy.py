"""The patch-remainder policy at SigLIP so400m's geometry (384 px, patch 14: 384 = 27 * 14 + 6).

Every reference floors the patch grid there (its strided convolution ignores the last 6
pixels; its position table has 27 x 27 rows), so every converter sets
`VisionConfig.patch_remainder='drop'`. Tiny random towers of that geometry (width 32, 2 blocks)
from HF (SigLIP, CLIP, ViT, DINOv2), timm (`vit_so400m_patch14_siglip_384`), open_clip (its own
ViT and a timm SigLIP trunk), `VisionLanguageModel.from_llava` and `from_llava_onevision` match
their references per layer (<= 1e-5) and in logits; anyres tiling at 384 equals
`LlavaOnevisionImageProcessor`'s; `load_encoder(..., patch_remainder=...)` and
`--patch-remainder` override the policy.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")
from timm.models import register_model  # noqa: E402

from llava_helpers import left_padded, random_images  # noqa: E402

from vlm_encoder import load_encoder  # noqa: E402
from vlm_encoder.converters.open_clip_vit import load_open_clip  # noqa: E402
from vlm_encoder.converters.timm_vit import load_timm  # noqa: E402
from vlm_encoder.vlm import VisionLanguageModel  # noqa: E402
from parity_helpers import perturb  # noqa: E402

SIZE, PATCH, GRID = 384, 14, 27  # so400m/14 at 384 px: a 27 x 27 grid, 729 tokens
TOL = 1e-5
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=SIZE, patch_size=PATCH)


def _pixels(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))


def _check_layers(encoder, ref_layers, x: torch.Tensor, prefix: int) -> None:
    """Our block outputs against the reference's `(B, prefix + 729, D)` per layer."""
    with torch.no_grad():
        out = encoder(x, layers="all")
    assert out.grid_size == (GRID, GRID) and out.patches(-1).shape[1] == GRID * GRID
    assert len(ref_layers) == encoder.num_blocks
    for i, ref in enumerate(ref_layers):
        torch.testing.assert_close(out.patches(i), ref[:, prefix:], atol=TOL, rtol=0, msg=f"patches of layer {i}")
        if prefix:
            torch.testing.assert_close(out.cls(i), ref[:, 0], atol=TOL, rtol=0, msg=f"CLS of layer {i}")


# ---------------------------------------------------------------------------- HF towers
HF_TOWERS = {
    "siglip": lambda: transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TINY, intermediate_size=64)),
    "clip": lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY, intermediate_size=64)),
    "vit": lambda: transformers.ViTModel(transformers.ViTConfig(**TINY, intermediate_size=64), add_pooling_layer=False),
    "dinov2": lambda: transformers.Dinov2Model(transformers.Dinov2Config(**TINY, layerscale_value=0.5)),
}


@pytest.fixture(scope="module")
def hf_siglip_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = perturb(HF_TOWERS["siglip"]())
    directory = tmp_path_factory.mktemp("siglip_so400m_geometry")
    model.save_pretrained(directory)
    return model, directory


@pytest.mark.parametrize("family", sorted(HF_TOWERS))
def test_hf_towers_floor_the_grid_like_transformers(family, hf_siglip_dir, tmp_path):
    if family == "siglip":
        ref, directory = hf_siglip_dir
    else:
        torch.manual_seed(0)
        ref, directory = perturb(HF_TOWERS[family]()), tmp_path
        ref.save_pretrained(directory)
    encoder = load_encoder(directory)
    assert encoder.config.patch_remainder == "drop" and encoder.config.grid_size == (GRID, GRID)
    x = _pixels()
    with torch.no_grad():
        reference = ref(pixel_values=x, output_hidden_states=True)
    _check_layers(encoder, reference.hidden_states[1:], x, prefix=int(encoder.config.class_token))
    if family == "siglip":
        with torch.no_grad():
            torch.testing.assert_close(encoder(x).pooled, reference.pooler_output, atol=TOL, rtol=0)


def test_load_encoder_patch_remainder_overrides_the_policy(hf_siglip_dir):
    _, directory = hf_siglip_dir
    with pytest.raises(ValueError, match="image height 384 is not a multiple of the patch stride 14"):
        load_encoder(directory, patch_remainder="error")
    assert load_encoder(directory, patch_remainder="drop").config.patch_remainder == "drop"
    with pytest.raises(ValueError, match="patch_remainder='floor' is not one of error, drop"):
        load_encoder(directory, patch_remainder="floor")
    # A preset gets it before its config is checked: 384 px at patch 14 needs it.
    preset = load_encoder("preset:vit_tiny_patch16_224", overrides={"image_size": SIZE, "patch_size": PATCH, "depth": 1},
                          patch_remainder="drop")
    assert preset.config.grid_size == (GRID, GRID)


def test_patch_remainder_command_line_option(hf_siglip_dir, capsys):
    from vlm_encoder.cli import main

    _, directory = hf_siglip_dir
    assert main(["info", str(directory), "--patch-remainder", "drop"]) == 0
    assert "27x27" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["info", str(directory), "--patch-remainder", "floor"])
    assert main(["info", str(directory), "--patch-remainder", "error"]) != 0  # refused in one line
    assert "image height 384 is not a multiple of the patch stride 14" in capsys.readouterr().err


# ---------------------------------------------------------------------------- timm and open_clip
TIMM_TINY = dict(embed_dim=32, depth=2, num_heads=4)


def _save(model: torch.nn.Module, path) -> str:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def test_timm_so400m_geometry(tmp_path):
    name = "vit_so400m_patch14_siglip_384"
    torch.manual_seed(0)
    ref = perturb(timm.create_model(name, pretrained=False, **TIMM_TINY))
    encoder = load_timm(name, checkpoint=_save(ref, tmp_path / "model.safetensors"), **TIMM_TINY)
    assert encoder.config.patch_remainder == "drop"
    x = _pixels()
    with torch.no_grad():
        final, layers = ref.forward_intermediates(x, indices=None, norm=False, output_fmt="NLC")
        pooled = ref.forward_head(final, pre_logits=True)
    _check_layers(encoder, layers, x, prefix=0)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x).pooled, pooled, atol=TOL, rtol=0)


@register_model
def vlm_test_tiny_so400m_trunk(pretrained: bool = False, **kwargs) -> torch.nn.Module:
    """A tiny `vit_so400m_patch14_siglip_384` (384 px, patch 14, MAP head) for open_clip's timm tower."""
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return timm.create_model("vit_so400m_patch14_siglip_384", pretrained=False, **TIMM_TINY, **kwargs)


OPEN_CLIP_TEXT = dict(context_length=8, vocab_size=64, width=32, heads=4, layers=1)
OPEN_CLIP_ARCHS = {
    "vlmtest-SigLIP-so400m-geometry": dict(
        embed_dim=32,
        custom_text=True,
        vision_cfg=dict(image_size=SIZE, timm_model_name="vlm_test_tiny_so400m_trunk", timm_pool="map", timm_proj="none"),
        text_cfg=dict(OPEN_CLIP_TEXT, no_causal_mask=True, pool_type="last", proj_bias=True),
    ),
    "vlmtest-ViT-patch14-384": dict(
        embed_dim=16,
        vision_cfg=dict(image_size=SIZE, layers=2, width=32, head_width=8, patch_size=PATCH),
        text_cfg=OPEN_CLIP_TEXT,
    ),
}


@pytest.fixture(scope="module")
def open_clip_archs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("open_clip_configs")
    for name, cfg in OPEN_CLIP_ARCHS.items():
        path = folder / f"{name}.json"
        path.write_text(json.dumps(cfg))
        open_clip.add_model_config(path)
    return sorted(OPEN_CLIP_ARCHS)


@pytest.mark.parametrize("arch", sorted(OPEN_CLIP_ARCHS))
def test_open_clip_so400m_geometry(arch, open_clip_archs, tmp_path):
    torch.manual_seed(0)
    ref = perturb(open_clip.create_model(arch))
    encoder = load_open_clip(arch, checkpoint=_save(ref, tmp_path / "open_clip_model.safetensors"))
    assert encoder.config.patch_remainder == "drop"
    x = _pixels()
    with torch.no_grad():
        inter = ref.visual.forward_intermediates(x, indices=None, output_fmt="NLC", output_extra_tokens=True)
        out = encoder(x, layers="all")
        for i, patches in enumerate(inter["image_intermediates"]):
            torch.testing.assert_close(out.patches(i), patches, atol=TOL, rtol=0, msg=f"patches of layer {i}")
        assert out.grid_size == (GRID, GRID)
        torch.testing.assert_close(encoder.image_embeds(x), ref.encode_image(x), atol=TOL, rtol=0)


# ---------------------------------------------------------------------------- LLaVA
TEXT = dict(vocab_size=100, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=8192)
IMAGE_ID = 99
PINPOINTS = [[SIZE, SIZE], [SIZE, 2 * SIZE], [2 * SIZE, SIZE]]


def _siglip_vision() -> transformers.SiglipVisionConfig:
    return transformers.SiglipVisionConfig(**TINY, intermediate_size=64)


def _save_llava(model_class, config, directory):
    torch.manual_seed(2)
    model = model_class(config).eval()
    with torch.no_grad():  # non-trivial norms and biases so a wrong mapping shows
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(directory)
    return model


@pytest.mark.slow
def test_from_llava_so400m_geometry_logits(tmp_path):
    config = transformers.LlavaConfig(vision_config=_siglip_vision(), text_config=transformers.LlamaConfig(**TEXT),
                                      image_token_index=IMAGE_ID, vision_feature_layer=-1,
                                      vision_feature_select_strategy="full")
    ref = _save_llava(transformers.LlavaForConditionalGeneration, config, tmp_path)
    vlm = VisionLanguageModel.from_llava(tmp_path)
    assert vlm.encoder.config.patch_remainder == "drop" and vlm.num_image_tokens() == GRID * GRID
    tokens = GRID * GRID
    ids = torch.tensor([[1, 5] + [IMAGE_ID] * tokens + [7, 8, 9], [4] + [IMAGE_ID] * tokens + [3, 2, 6, 7]])
    px = _pixels()
    with torch.no_grad():
        expected = ref(input_ids=ids, pixel_values=px).logits
        got = vlm(ids, px).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_from_llava_onevision_so400m_geometry_logits(tmp_path):
    config = transformers.LlavaOnevisionConfig(
        vision_config=_siglip_vision(), text_config=transformers.LlamaConfig(**TEXT), image_token_index=IMAGE_ID,
        image_grid_pinpoints=PINPOINTS, vision_aspect_ratio="anyres_max_1",
    )
    ref = _save_llava(transformers.LlavaOnevisionForConditionalGeneration, config, tmp_path)
    vlm = VisionLanguageModel.from_llava_onevision(tmp_path)
    assert vlm.encoder.config.patch_remainder == "drop" and vlm.tile_side == GRID
    sizes = [(300, 500), (200, 190)]  # two tiles (downscaled to the budget), one tile
    processor = transformers.LlavaOnevisionImageProcessor(size={"height": SIZE, "width": SIZE},
                                                           image_grid_pinpoints=PINPOINTS)
    processed = processor(random_images(sizes), return_tensors="pt")
    rows = [vlm.expand_image_tokens([1, 5, IMAGE_ID, 7], image_size=[size]) for size in sizes]
    ids, mask = left_padded(rows)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, pixel_values=processed["pixel_values"],
                       image_sizes=processed["image_sizes"]).logits
        got = vlm(ids, processed["pixel_values"], attention_mask=mask, image_sizes=processed["image_sizes"]).logits
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=0, atol=1e-4)


def test_anyres_tiles_at_384_match_llava_onevision_image_processor():
    from vlm_encoder.anyres import tile_image
    from vlm_encoder.processing import ImageProcessor, ProcessorConfig

    hf = transformers.LlavaOnevisionImageProcessor(size={"height": SIZE, "width": SIZE}, image_grid_pinpoints=PINPOINTS)
    ours = ImageProcessor(ProcessorConfig(resize_mode="exact", size=SIZE, interpolation="bicubic", backend="torchvision",
                                          mean=tuple(hf.image_mean), std=tuple(hf.image_std)))
    sizes = [(300, 500), (500, 300), (200, 190)]
    batch = random_images(sizes)
    expected = hf(batch, return_tensors="pt")
    for image, want in zip(batch, expected["pixel_values"]):
        tiles = tile_image(image, PINPOINTS, ours)
        assert tiles.pixel_values.shape[-2:] == (SIZE, SIZE)
        torch.testing.assert_close(tiles.pixel_values, want[: tiles.num_tiles], rtol=0, atol=1e-6)
