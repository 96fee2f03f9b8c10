"""Every tower family of issue 13 through the front door, from a tiny random reference saved to
disk: the `extract` and `viz pca` commands and a `VisionLanguageModel` around the loaded tower;
anyres tiling on a RoPE tower; and the real checkpoints' names offline.

The per-layer parity of each family lives in its own file (`test_remainder_policy`,
`test_siglip2_parity`, `test_rope_parity`, `test_aimv2_internvit_parity`, `test_qwen_vl_parity`);
this file reuses their tiny builders, so a family is built here exactly as it is checked there.

  * `extract --layers -2 -1` stores one row per image, each layer's patches at the tower's grid
    and width, equal to the loaded encoder on its own processor's pixels; `viz pca` writes a PNG;
    a `VisionLanguageModel` (`mlp2x_gelu` projector, tiny GPT-2 or Llama) runs a forward with
    one image, its image features the projector of the tower's layer -2.
  * `encode_anyres` on HF DINOv3 (2D RoPE, registers) equals encoding every tile alone, at the
    native tile size and at another one (the rotary tables are the tile's, not the image's).
  * The real checkpoints' hub ids and `timm:` names fail offline with an empty cache in one
    line that says they are not in the cache; `timm:` names go to the converter timm's registry
    names, hub ids to the family their `config.json`'s `model_type` names.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")

# Tiny builders of the per-family parity files (tests/ is on sys.path under pytest).
from test_aimv2_internvit_parity import _aimv2, _internvit, _tiny_internvl  # noqa: E402
from test_qwen_vl_parity import _save_whole_model  # noqa: E402
from test_remainder_policy import HF_TOWERS, OPEN_CLIP_ARCHS, TIMM_TINY  # noqa: E402
from test_rope_parity import TIMM_CASES, TINY, _hf_dinov3  # noqa: E402
from parity_helpers import perturb  # noqa: E402
from test_siglip2_parity import MAX_PATCHES, PATCH, vision_config  # noqa: E402
from test_vlm import D_LLM, IMAGE_ID, VOCAB  # noqa: E402

from vlm_encoder import load_encoder  # noqa: E402
from vlm_encoder.anyres import InternVLAnyres, LlavaNextAnyres, encode_anyres  # noqa: E402
from vlm_encoder.cli import main  # noqa: E402
from vlm_encoder.extract import FeatureStore  # noqa: E402
from vlm_encoder.projectors import build_projector  # noqa: E402
from vlm_encoder.vlm import VisionLanguageModel  # noqa: E402

WIDTH = 32  # every tiny tower below
POSITIONS = 2048  # so400m's 27 x 27 = 729 and the tiny Qwen tower's 32 x 32 image tokens fit


def _llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=D_LLM, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=POSITIONS)
    return transformers.LlamaForCausalLM(config).eval()


def _gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=D_LLM, n_layer=2, n_head=4, n_positions=POSITIONS)
    return transformers.GPT2LMHeadModel(config).eval()


# ------------------------------------------------------------------------ timm entry points
def _register_eva(case: str) -> str:
    """A tiny `eva.py` model of `test_rope_parity.TIMM_CASES[case]` under its own timm name, filed
    in timm's registry as an `eva` model (as timm files its own), so `timm:NAME` routes it."""
    import timm.models.eva

    name = f"vlm_test_tiny_{case}"
    if timm.is_model(name):
        return name
    arch, kwargs = TIMM_CASES[case]

    def entry(pretrained: bool = False, **extra) -> torch.nn.Module:
        return getattr(timm.models.eva, arch)(pretrained=False, **dict(TINY, **kwargs, **extra))

    entry.__name__ = entry.__qualname__ = name
    timm.models.register_model(entry)
    timm.models._registry._model_to_module[name] = "eva"
    timm.models._registry._module_to_models["eva"].add(name)
    return name


def _save(model: torch.nn.Module, path) -> str:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def _timm_eva(case: str):
    def build(directory) -> tuple[str, str]:
        name = _register_eva(case)
        torch.manual_seed(0)
        return f"timm:{name}", _save(perturb(timm.create_model(name)), directory / "model.safetensors")

    return build


# ------------------------------------------------------------------------ the families
def _hf_siglip_so400m(directory) -> tuple[str, None]:
    torch.manual_seed(0)
    perturb(HF_TOWERS["siglip"]()).save_pretrained(directory)
    return str(directory), None


def _timm_siglip_so400m(directory) -> tuple[str, str]:
    name = "vlm_test_tiny_so400m_trunk"  # registered by test_remainder_policy: 384 px, patch 14, MAP head
    torch.manual_seed(0)
    return f"timm:{name}", _save(perturb(timm.create_model(name)), directory / "model.safetensors")


def _open_clip_so400m(directory) -> tuple[str, str]:
    arch = "vlmtest-ViT-patch14-384"
    (directory / f"{arch}.json").write_text(json.dumps(OPEN_CLIP_ARCHS[arch]))
    open_clip.add_model_config(directory / f"{arch}.json")
    torch.manual_seed(0)
    model = perturb(open_clip.create_model(arch, pretrained=None))
    return f"open_clip:{arch}", _save(model, directory / "open_clip.safetensors")


def _hf_siglip2_naflex(directory) -> tuple[str, None]:
    torch.manual_seed(0)
    transformers.Siglip2VisionModel(vision_config()).save_pretrained(directory)
    transformers.Siglip2ImageProcessor(patch_size=PATCH, max_num_patches=MAX_PATCHES).save_pretrained(directory)
    return str(directory), None


def _hf(build, *args):
    def run(directory) -> tuple[str, None]:
        build(*args, directory)
        return str(directory), None

    return run


FAMILIES = {
    "hf_siglip_so400m": _hf_siglip_so400m,
    "timm_siglip_so400m": _timm_siglip_so400m,
    "open_clip_so400m": _open_clip_so400m,
    "hf_siglip2_naflex": _hf_siglip2_naflex,
    "hf_dinov3": _hf(_hf_dinov3, "swiglu_registers"),
    "timm_dinov3": _timm_eva("dinov3"),
    "timm_eva02": _timm_eva("eva02_mim"),
    "timm_eva02_clip": _timm_eva("eva02_clip"),
    "timm_pe_core": _timm_eva("pe_core"),
    "timm_pe_lang": _timm_eva("pe_lang"),
    "timm_pe_spatial": _timm_eva("pe_spatial"),
    "hf_aimv2": _hf(_aimv2, "native_sincos_head"),
    "hf_internvit": _hf(_internvit, "layernorm_mean"),
    "hf_internvl": lambda directory: (_tiny_internvl(directory), (str(directory), None))[1],
    "hf_qwen2_5_vl": lambda directory: (_save_whole_model(directory), (str(directory), None))[1],
}
NAFLEX = {"hf_siglip2_naflex"}  # extract / viz take --resolution native
# One family per reference library and position scheme stays in `make test`; the others are slow.
FAST = {"hf_siglip_so400m", "hf_siglip2_naflex", "hf_dinov3", "timm_eva02_clip", "hf_internvit"}


def _params(names):
    return [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in sorted(names)]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """`built(family)`: `(spec, checkpoint or None)` of the family's tiny reference on disk (built once)."""
    cache: dict[str, tuple[str, str | None]] = {}

    def get(family: str) -> tuple[str, str | None]:
        if family not in cache:
            cache[family] = FAMILIES[family](tmp_path_factory.mktemp(family))
        return cache[family]

    return get


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(40, 56), (64, 48)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img_{i}.png")
    return folder


def _model_args(spec: str, checkpoint: str | None) -> list[str]:
    return ["--model", spec, *(["--checkpoint", checkpoint] if checkpoint else [])]


@pytest.mark.parametrize("family", _params(FAMILIES))
def test_extract_viz_and_vlm(family, built, images, tmp_path):
    spec, checkpoint = built(family)
    encoder = load_encoder(spec, checkpoint=checkpoint)
    grid = encoder.config.grid_size
    pictures = [Image.open(images / f"img_{i}.png").convert("RGB") for i in range(2)]

    # extract: one row per image, both layers at the tower's grid and width, = the encoder on its
    # own processor's pixels (a NaFlex tower only extracts at each image's own size).
    native = ["--resolution", "native"] if family in NAFLEX else []
    out = tmp_path / "store"
    assert main(["extract", *_model_args(spec, checkpoint), "--dataset", str(images), "--out", str(out), *native,
                 "--layers", "-2", "-1", "--select", "patch", "--no-progress", "--num-workers", "0"]) == 0
    store = FeatureStore(out)
    assert len(store) == 2
    if not native:
        for layer in (-2, -1):
            assert store[layer, "patch"].shape == (2, grid[0] * grid[1], WIDTH), (layer, grid)
    depth = encoder.num_blocks
    for row, picture in enumerate(pictures):
        with torch.no_grad():
            expected = encoder(encoder.image_processor(picture), layers=(-2, -1))
        stored = store.get(row)
        for layer in (-2, -1):
            torch.testing.assert_close(stored[f"layer{depth + layer}.patch"], expected.patches(layer)[0], atol=1e-5, rtol=0)

    # viz pca: a PNG.
    png = tmp_path / "pca.png"
    assert main(["viz", "pca", "--image", str(images / "img_0.png"), *_model_args(spec, checkpoint), "--out", str(png),
                 *native, "--panel-size", "32"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # VisionLanguageModel around the loaded tower: one image, a forward with a loss.
    lm = (_gpt2 if sorted(FAMILIES).index(family) % 2 else _llama)()
    vlm = VisionLanguageModel(encoder, build_projector("mlp2x_gelu", WIDTH, D_LLM), lm, IMAGE_ID, feature_layers=(-2,))
    pixels = encoder.image_processor(pictures[0])  # (1, 3, H, W) at the tower's own size
    h, w = (side // encoder.config.input_stride for side in pixels.shape[-2:])
    ids = torch.tensor([vlm.expand_image_tokens([1, IMAGE_ID, 2, 3], image_size=tuple(pixels.shape[-2:]))])
    assert ids.shape[1] == 3 + h * w
    with torch.no_grad():
        result = vlm(ids, pixels, labels=ids)
        patches = encoder(pixels, layers=(-2,)).patches(-2)
        torch.testing.assert_close(vlm.image_features(pixels), vlm.projector(patches), atol=1e-5, rtol=0)
    assert result.logits.shape == (1, ids.shape[1], VOCAB) and torch.isfinite(result.loss)


# ------------------------------------------------------------------------ anyres on a RoPE tower
@pytest.mark.parametrize("tile", [32, 48])  # the native 4x4 grid, then 6x6: new rotary tables
def test_anyres_on_a_rope_tower_equals_each_tile_alone(tile, built):
    spec, _ = built("hf_dinov3")
    encoder = load_encoder(spec)
    assert encoder.config.rope == "dinov3" and encoder.config.num_register_tokens == 2
    side = tile // 8
    image = np.random.default_rng(1).integers(0, 256, (tile, 2 * tile, 3), dtype=np.uint8)  # fits (tile, 2 tile): no unpad
    llava = encode_anyres(encoder, image, LlavaNextAnyres(tile_size=tile, pinpoints=((tile, 2 * tile), (2 * tile, tile))))
    internvl = encode_anyres(encoder, image, InternVLAnyres(tile_size=tile, max_tiles=4))
    for out in (llava, internvl):
        with torch.no_grad():
            alone = torch.cat([encoder(t[None], layers=(-1,)).patches(-1) for t in out.tiles.pixel_values])  # (T, s*s, D)
        assert out.tiles.grid == (1, 2)
        if out is llava:  # base tile, then the map of tiles 1 and 2 side by side
            assert out.feature_map.shape == (WIDTH, side, 2 * side)
            torch.testing.assert_close(out.global_tokens, alone[0], atol=1e-6, rtol=0)
            grid = alone[1:].view(2, side, side, WIDTH).permute(3, 1, 0, 2).reshape(WIDTH, side, 2 * side)
            torch.testing.assert_close(out.feature_map, grid, atol=1e-6, rtol=0)
        else:  # every tile's tokens in order, the thumbnail last
            torch.testing.assert_close(out.tokens, alone.flatten(0, 1), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------ real names, offline
TIMM_NAMES = {  # timm name -> the converter timm's registry sends it to
    "vit_pe_core_large_patch14_336": "timm_eva",
    "eva02_base_patch14_224.mim_in22k": "timm_eva",
    "vit_base_patch16_dinov3.lvd1689m": "timm_eva",
    "vit_so400m_patch14_siglip_384": "timm_vit",
}
HUB_IDS = {  # hub id -> (its config.json's model_type, the family our loader gives, a tiny builder)
    "google/siglip-so400m-patch14-384": ("siglip", "siglip", None),  # a whole SiglipModel
    "facebook/dinov3-vitb16-pretrain-lvd1689m": ("dinov3_vit", "dinov3_vit", "hf_dinov3"),
    "Qwen/Qwen2.5-VL-7B-Instruct": ("qwen2_5_vl", "qwen2_5_vl", "hf_qwen2_5_vl"),
    "apple/aimv2-large-patch14-224": ("aimv2_vision_model", "aimv2", "hf_aimv2"),
    "OpenGVLab/InternVL3-1B-hf": ("internvl", "internvl", "hf_internvl"),
}


def _one_line_not_cached(name: str, capsys) -> str:
    assert main(["info", name]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and not captured.out, captured.err
    assert lines[0].startswith("vlm-encoder info: error: ") and "not in the" in lines[0] and "cache" in lines[0], lines[0]
    return lines[0]


# timm builds the whole random model before it looks for the weights: so400m and PE-L take
# 6-8 s each on 2 shared cores, the base models ~3 s.
BIG_TIMM = {"vit_so400m_patch14_siglip_384", "vit_pe_core_large_patch14_336"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow if n in BIG_TIMM else ()) for n in sorted(TIMM_NAMES)])
def test_real_timm_names_route_and_fail_offline_in_one_line(name, empty_cache, capsys):
    """`timm:NAME` goes to `converters.timm_eva` exactly when timm's registry says `eva.py` builds
    it (`is_eva`, the routing `specs.models.load_model` uses), else to `converters.timm_vit`."""
    from vlm_encoder.converters.timm_eva import is_eva

    if not timm.is_model(name.split(".")[0]):
        pytest.skip(f"this timm ({timm.__version__}) has no {name}")
    assert ("timm_eva" if is_eva(name) else "timm_vit") == TIMM_NAMES[name]
    line = _one_line_not_cached(f"timm:{name}", capsys)
    assert f"timm pretrained weights for {name!r}" in line and "checkpoint" in line


@pytest.mark.parametrize("name", sorted(HUB_IDS))
def test_real_hub_ids_fail_offline_in_one_line(name, empty_cache, capsys):
    line = _one_line_not_cached(name, capsys)
    assert line.startswith(f"vlm-encoder info: error: {name}: config.json not in the Hugging Face cache")


def _tiny_siglip(directory) -> None:
    """A whole tiny `SiglipModel` (model_type `siglip`, as google/siglip-so400m-patch14-384)."""
    torch.manual_seed(0)
    config = transformers.SiglipConfig(
        vision_config=dict(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=56, patch_size=14),
        text_config=dict(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64),
    )
    transformers.SiglipModel(config).save_pretrained(directory)


@pytest.mark.parametrize("name", sorted(HUB_IDS))
def test_real_hub_ids_model_type_goes_to_its_converter(name, built, tmp_path):
    """A hub id's converter is chosen from its `config.json`, which offline is not there; so a
    tiny saved directory of the same `model_type` as the real checkpoint stands in for it."""
    model_type, family, builder = HUB_IDS[name]
    if builder is None:
        _tiny_siglip(tmp_path)
        directory = tmp_path
    else:
        directory = built(builder)[0]
    assert json.loads((Path(directory) / "config.json").read_text())["model_type"] == model_type
    assert load_encoder(directory).source_info["family"] == family
