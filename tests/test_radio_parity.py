"""RADIO / C-RADIO v3 and v4 vs transformers' `radio` on tiny random models saved with
`save_pretrained` (every weight jittered): every layer's class tokens, registers and patches at
the config's image size and at non-square sizes smaller and larger than the CPE table, the
summary tokens (`summary_idxs`) against `RadioModelOutput.summary`, the packed input
(`encode_packed`) against each image alone and against transformers' own packed forward
(`image_grid_hw`), both key layouts (NVIDIA's release, which transformers' save writes, and
transformers' own), strictness, and the real hub ids offline."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from parity_helpers import close, perturb
from vlm_encoder import load_encoder
from vlm_encoder.cli import main
from vlm_encoder.converters import hf_radio
from vlm_encoder.packing import encode_packed
from vlm_encoder.weights import WeightsError

transformers = pytest.importorskip("transformers")
from transformers import RadioConfig, RadioModel  # noqa: E402

PATCH, DEPTH = 4, 2
# 3 class tokens (2 of them the summary, as C-RADIOv4), 2 registers, a 16 x 16 CPE table (64 px).
BASE = dict(hidden_size=32, num_hidden_layers=DEPTH, num_attention_heads=2, mlp_ratio=2.0, patch_size=PATCH,
            image_size=32, max_img_size=64, num_cls_tokens=3, num_registers=2, summary_idxs=[0, 2])
VARIANTS = {
    "mlp": dict(BASE),  # C-RADIOv3 / v4-H: GELU MLP
    "swiglu": dict(BASE, use_swiglu_ffn=True, qkv_bias=False, layerscale_value=0.5),
}
# The config's size, non-square grids inside the table, and one past it (the table is enlarged).
SIZES = [(32, 32), (24, 40), (44, 20), (72, 36)]
HUB_IDS = ["nvidia/C-RADIOv4-H", "nvidia/C-RADIOv4-SO400M", "nvidia/C-RADIOv3-B", "nvidia/C-RADIOv3-L",
           "nvidia/C-RADIOv3-H", "nvidia/C-RADIOv3-g"]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def radio(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"radio_{request.param}")
    torch.manual_seed(0)
    reference = RadioModel(RadioConfig(**VARIANTS[request.param]))
    perturb(reference)
    with torch.no_grad():  # the conditioner's buffers are not parameters: make them non-trivial too
        reference.input_conditioner.norm_mean.copy_(torch.tensor([0.4, 0.5, 0.45]).view(-1, 1, 1))
        reference.input_conditioner.norm_std.copy_(torch.tensor([0.25, 0.3, 0.2]).view(-1, 1, 1))
    reference.config.norm_mean, reference.config.norm_std = [0.4, 0.5, 0.45], [0.25, 0.3, 0.2]
    reference.save_pretrained(directory)
    return request.param, reference, directory


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor([0.4, 0.5, 0.45]).view(3, 1, 1), torch.tensor([0.25, 0.3, 0.2]).view(3, 1, 1)
    return (pixels.float() - mean) / std  # RadioInputConditioner's arithmetic


def _pixels(size: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(seed))  # [0, 1], as HF takes


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_every_layer_and_summary_match_transformers(radio, size):
    name, reference, directory = radio
    encoder = load_encoder(str(directory))
    c = encoder.config
    assert (c.num_class_tokens, c.num_register_tokens, c.summary_idxs) == (3, 2, (0, 2))
    assert c.image_size == (64, 64) and c.pos_resample_crop and not c.final_norm
    pixels = _pixels(size, seed=sum(size))
    with torch.no_grad():
        ref = reference(pixels, output_hidden_states=True)
        out = encoder(_normalise(pixels), layers="all")  # HF's input conditioner, outside
    hidden = ref.hidden_states[-DEPTH:]  # one per block (after the embeddings, when HF records them)
    case = f"radio {name} {size[0]}x{size[1]}"
    for i in range(DEPTH):
        tokens = hidden[i]  # (B, 3 + 2 + N, D)
        close(case, out.class_tokens[i], tokens[:, :3], f"layer {i} class tokens")
        close(case, out.cls(i), tokens[:, 0], f"layer {i} CLS")
        close(case, out.register_tokens[i], tokens[:, 3:5], f"layer {i} registers")
        close(case, out.patches(i), tokens[:, 5:], f"layer {i} patches")
        close(case, out.tokens(i), tokens, f"layer {i} all tokens")
    close(case, out.summary(-1).flatten(1), ref.summary, "summary")
    close(case, out.patches(-1), ref.features, "features")
    assert out.grid_size == (size[0] // PATCH, size[1] // PATCH) and out.pooled is None


def test_processor_normalises_as_the_input_conditioner(radio):
    _, _, directory = radio
    processor = load_encoder(str(directory)).image_processor
    assert processor.config.size == (32, 32)
    assert processor.config.mean == pytest.approx((0.4, 0.5, 0.45))
    assert processor.config.std == pytest.approx((0.25, 0.3, 0.2))


def test_info_names_the_class_tokens(radio, capsys):
    _, _, directory = radio
    assert main(["info", str(directory)]) == 0
    out = capsys.readouterr().out
    assert "prefix tokens: 3 class tokens (summary [0, 2]) + 2 registers" in out and "family:        radio" in out


def test_packed_equals_each_image_and_transformers_packed(radio):
    """`encode_packed` over images of three sizes: each image's tokens as encoding it alone, and
    as transformers' packed forward (flattened patches + `image_grid_hw`)."""
    name, reference, directory = radio
    encoder = load_encoder(str(directory))
    raw = [_pixels(size, seed=i)[0] for i, size in enumerate([(32, 32), (24, 40), (16, 28)])]
    images = [_normalise(x) for x in raw]
    with torch.no_grad():
        packed = encode_packed(encoder, images, layers="all")
        alone = [encoder(x[None], layers="all") for x in images]
        patches = torch.cat([x.reshape(3, x.shape[1] // PATCH, PATCH, x.shape[2] // PATCH, PATCH)
                             .permute(1, 3, 0, 2, 4).reshape(-1, 3 * PATCH * PATCH) for x in raw])
        grid_hw = torch.tensor([[x.shape[1] // PATCH, x.shape[2] // PATCH] for x in raw])
        ref = reference(patches, image_grid_hw=grid_hw)
    case = f"radio {name} packed"
    for p, a in zip(packed, alone):
        for i in range(DEPTH):
            close(case, p.tokens(i), a.tokens(i), f"layer {i} packed vs alone")
        close(case, p.summary(-1), a.summary(-1), "summary packed vs alone")
    close(case, torch.cat([p.summary(-1).flatten(1) for p in packed]), ref.summary, "summary vs transformers packed")
    close(case, torch.cat([p.patches(-1)[0] for p in packed]), ref.features, "features vs transformers packed")


def test_both_layouts_load_the_same(radio, tmp_path):
    """transformers' save writes NVIDIA's release names (`radio_model.model.*`, fused qkv); a live
    `RadioModel.state_dict()` has transformers' own (`encoder.layer.{i}.attention.q_proj`); the
    release's LayerScale is `ls1.grandma` / `ls2.gamma`. All give the same encoder."""
    name, reference, directory = radio
    saved = load_file(directory / "model.safetensors")
    assert "radio_model.model.blocks.0.attn.qkv.weight" in saved  # the released layout
    nvidia = {k.replace("layer_scale1.lambda1", "ls1.grandma").replace("layer_scale2.lambda1", "ls2.gamma"): v
              for k, v in saved.items()}
    live = {k: v.contiguous() for k, v in reference.state_dict().items()}
    theirs = load_encoder(str(directory)).state_dict()
    for layout, state in (("nvidia", nvidia), ("live", live)):
        (tmp_path / layout).mkdir()
        (tmp_path / layout / "config.json").write_text((directory / "config.json").read_text())
        save_file(state, tmp_path / layout / "model.safetensors")
        ours = load_encoder(str(tmp_path / layout)).state_dict()
        assert sorted(ours) == sorted(theirs)
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), (layout, key)


def test_missing_layer_scale_is_filled_with_layerscale_value(radio):
    name, reference, _ = radio
    state = {k: v for k, v in reference.state_dict().items() if "layer_scale" not in k}
    value = reference.config.layerscale_value
    converted = hf_radio.convert_state_dict(state, num_class_tokens=3, layerscale_value=value)
    assert torch.equal(converted["blocks.1.ls2.gamma"], torch.full((32,), value))


def test_strict(radio):
    _, reference, _ = radio
    state = dict(reference.state_dict())
    state["radio_model.adaptors.clip.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError, match="adaptors"):
        hf_radio.convert_state_dict(state, num_class_tokens=3, layerscale_value=1.0)
    state = {k: v for k, v in reference.state_dict().items() if k != "encoder.layer.1.norm1.weight"}
    converted = hf_radio.convert_state_dict(state, num_class_tokens=3, layerscale_value=1.0)
    assert "blocks.1.norm1.weight" not in converted and "blocks.1.norm1.bias" in converted  # the loader names it
    with pytest.raises(ValueError, match="video_temporal_patch_size"):
        hf_radio.config_from_hf({**reference.config.to_dict(), "video_temporal_patch_size": 2})
    legacy = {"model_type": "radio", "version": "c-radio_v3-b", "args": {"model": "vit_base_patch16_224"},
              "auto_map": {"AutoModel": "hf_model.RADIOModel"}}  # NVIDIA's remote-code config.json
    with pytest.raises(ValueError, match="remote-code RADIO config.*never run"):
        hf_radio.config_from_hf(legacy)


@pytest.mark.parametrize("name", HUB_IDS)
def test_real_hub_ids_fail_offline_in_one_line(name, empty_cache, capsys):
    assert main(["info", name]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and not captured.out, captured.err
    assert lines[0].startswith(f"vlm-encoder info: error: {name}: config.json not in the Hugging Face cache")


def test_a_hub_id_of_the_cached_checkpoint_goes_to_this_converter(radio, tmp_path, monkeypatch):
    """The converter is chosen from the cached `config.json` (`model_type` radio): the tiny
    directory stands in for nvidia/C-RADIOv4-H in a hub cache layout."""
    import shutil

    import huggingface_hub.constants

    _, _, directory = radio
    snapshot = tmp_path / "hub" / "models--nvidia--C-RADIOv4-H" / "snapshots" / ("0" * 40)
    shutil.copytree(directory, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert json.loads((snapshot / "config.json").read_text())["model_type"] == "radio"
    assert load_encoder(HUB_IDS[0]).source_info["family"] == "radio"


# ---------------------------------------------------------------------------------------- timm
timm = pytest.importorskip("timm")
from vlm_encoder.converters import timm_radio  # noqa: E402

TINY_TIMM = dict(embed_dim=32, depth=DEPTH, num_heads=2, mlp_ratio=2.0, patch_size=PATCH, reg_tokens=4, img_size=32)
# v3-B: LayerScale and align_corners=True (its hub code); v4-H: neither. The CPE table is 16 x 16.
TIMM_NAFLEX = {"naflexvit_base_patch16_radio_v3": dict(init_values=0.1), "naflexvit_huge_patch16_radio_v4": {}}
TIMM_NAMES = ["naflexvit_base_patch16_radio_v3.c_radio", "vit_base_patch16_radio_v3.c_radio"]


def _timm_layers(model, images: torch.Tensor) -> list[torch.Tensor]:
    """Every block's tokens `(B, prefix + N, D)` from timm's `forward_intermediates`."""
    out = model.forward_intermediates(images, indices=list(range(DEPTH)), return_prefix_tokens=True,
                                      output_fmt="NLC", intermediates_only=True)
    return [torch.cat([prefix, patches], dim=1) for patches, prefix in out]


@pytest.fixture(scope="module", params=sorted(TIMM_NAFLEX))
def naflex(request):
    torch.manual_seed(0)
    model = timm.create_model(request.param, pretrained=False, pos_embed_grid_size=(16, 16), **TINY_TIMM,
                              **TIMM_NAFLEX[request.param])
    return request.param, perturb(model)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_timm_naflexvit_radio_every_layer(naflex, size):
    name, model = naflex
    encoder = timm_radio.encoder_from_timm_radio(model)
    c = encoder.config
    assert c.pos_resample_crop and c.image_size == (64, 64) and c.pos_resample_mode == "bilinear"
    assert c.pos_resample_align_corners == ("v3" in name) and not c.pos_resample_antialias
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref, out = _timm_layers(model, images), encoder(images, layers="all")
    for i in range(DEPTH):
        close(f"radio timm {name} {size[0]}x{size[1]}", out.tokens(i), ref[i], f"layer {i}")


def test_timm_vit_radio_is_timm_vit(tmp_path):
    """`vit_*_radio_*`: a classic timm ViT (table fixed to `img_size`, resampled as timm's
    `dynamic_img_size`), loaded from a timm checkpoint file."""
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_radio_v3", pretrained=False, dynamic_img_size=True, **TINY_TIMM)
    perturb(model)
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    encoder = timm_radio.load_timm_radio("vit_base_patch16_radio_v3", str(tmp_path / "model.safetensors"),
                                         dynamic_img_size=True, **TINY_TIMM)
    assert encoder.config.num_register_tokens == 4 and not encoder.config.pos_resample_crop
    for size in [(32, 32), (24, 40)]:
        images = torch.randn(2, 3, *size)
        with torch.no_grad():
            ref, out = _timm_layers(model, images), encoder(images, layers="all")
        for i in range(DEPTH):
            close(f"radio timm vit {size[0]}x{size[1]}", out.tokens(i), ref[i], f"layer {i}")


def test_timm_and_transformers_read_the_same_checkpoint_alike(tmp_path):
    """One tiny C-RADIOv4-style checkpoint in NVIDIA's layout: timm's NaFlexVit loads it with its
    own filter, transformers with its own; ours through both routes (naming timm's prefix tokens
    as 3 class tokens, summary (0, 2)) gives the same tokens and summary."""
    torch.manual_seed(0)
    hf = RadioModel(RadioConfig(**dict(BASE, num_registers=2)))
    perturb(hf)
    hf.save_pretrained(tmp_path / "hf")
    released = {k.replace("layer_scale1.lambda1", "ls1.gamma").replace("layer_scale2.lambda1", "ls2.gamma"): v
                for k, v in load_file(tmp_path / "hf" / "model.safetensors").items()}
    model = timm.create_model("naflexvit_huge_patch16_radio_v4", pretrained=False, pos_embed_grid_size=(16, 16),
                              init_values=1.0, **TINY_TIMM)
    from timm.models.naflexvit import checkpoint_filter_fn

    model.load_state_dict(checkpoint_filter_fn(released, model))
    model.eval()
    ours_timm = timm_radio.encoder_from_timm_radio(model, num_class_tokens=3, summary_idxs=(0, 2))
    ours_hf = load_encoder(str(tmp_path / "hf"))
    assert ours_timm.config.num_register_tokens == 2 and ours_timm.config.summary_idxs == (0, 2)
    mean, std = torch.tensor(hf.config.norm_mean).view(3, 1, 1), torch.tensor(hf.config.norm_std).view(3, 1, 1)
    for size in [(32, 32), (24, 40)]:
        pixels = _pixels(size, seed=3)
        with torch.no_grad():
            ref, timm_ref = hf(pixels), _timm_layers(model, (pixels - mean) / std)
            a, b = ours_timm((pixels - mean) / std, layers="all"), ours_hf((pixels - mean) / std, layers="all")
        case = f"radio timm vs transformers {size[0]}x{size[1]}"
        close(case, a.summary(-1).flatten(1), ref.summary, "summary via timm")
        close(case, a.tokens(-1), b.tokens(-1), "timm route vs HF route")
        close(case, a.tokens(-1), timm_ref[-1], "timm route vs timm")


def test_timm_names_route_to_the_radio_converter():
    for name in [*TIMM_NAMES, "naflexvit_so400m_patch16_radio_v4", "vit_giant_patch16_radio_v3"]:
        assert timm_radio.is_radio(name) and timm.is_model(name.split(".")[0])
    assert not timm_radio.is_radio("vit_base_patch16_224") and not timm_radio.is_radio("naflexvit_base_patch16_gap")


def test_timm_class_token_naming_is_checked(naflex):
    _, model = naflex
    with pytest.raises(ValueError, match="summary_idxs needs num_class_tokens"):
        timm_radio.encoder_from_timm_radio(model, summary_idxs=(0,))
    with pytest.raises(ValueError, match="num_class_tokens=6 must be in 1..5"):
        timm_radio.encoder_from_timm_radio(model, num_class_tokens=6)


@pytest.mark.parametrize("name", TIMM_NAMES)  # timm builds the random ViT-B first: ~2 s each
def test_real_timm_names_fail_offline_in_one_line(name, empty_cache, capsys):
    assert main(["info", f"timm:{name}"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and not captured.out, captured.err
    assert f"timm pretrained weights for {name!r}" in lines[0] and "checkpoint" in lines[0]


def test_extract_stores_the_summary(radio, tmp_path):
    """`extract --select summary`: each image's summary tokens `(S, D)` per layer, as the encoder
    gives them; an encoder without `summary_idxs` refuses the kind in one line."""
    from PIL import Image

    from vlm_encoder import FeatureStore
    from vlm_encoder.extract import ExtractConfig, run_extraction

    _, _, directory = radio
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray((torch.rand(20, 28, 3) * 255).byte().numpy()).save(images / f"{i}.png")
    config = ExtractConfig(model=str(directory), dataset=str(images), out=tmp_path / "out", layers=(0, -1),
                           select=("summary", "patch"), shard_size=2, batch_size=2, num_workers=0, progress=False)
    run_extraction(config)
    store = FeatureStore(tmp_path / "out")
    encoder = load_encoder(str(directory))
    row = store.get(1)
    pixels = encoder.image_processor(Image.open(images / "1.png"))  # (1, C, H, W)
    with torch.no_grad():
        out = encoder(pixels, layers=(0, -1))
    assert row["layer1.summary"].shape == (2, 32)
    close("radio extract", row["layer0.summary"], out.summary(0)[0], "stored summary, layer 0")
    close("radio extract", row["layer1.summary"], out.summary(-1)[0], "stored summary, last layer")
    assert main(["extract", "--model", "preset:vit_tiny_patch16_224", "--dataset", str(images), "--out",
                 str(tmp_path / "none"), "--select", "summary", "--no-progress"]) == 2
