"""DeepSeek-V4 vision tower and its 3x3 aligner vs timm's `deepseek_vit.DeepseekVitEncoder` (the one
reference library that has the tower: transformers 5.24's `deepseek_v4` is the language model
only), on a tiny random encoder with every weight jittered.

  * Through timm (`converters.timm_deepseek`): every layer, the final-normed tokens, and the
    aligner's tokens (what the reference hands its language model) at the encoder's own size and
    at non-square grids that are not multiples of 3 (the aligner zero-pads them); a timm name with
    a checkpoint file; mean pooling, and a classifier without / with its head (refused).
  * Through a whole DeepSeek-V4 checkpoint directory (`converters.hf_deepseek_v4`): the same
    weights written in DeepSeek's release layout (`vision.*`, `aligner.*`, language-model keys at
    the top level, two shards), which timm's own `checkpoint_filter_fn_encoder` reads back to the
    reference's state dict, and a `config.json` saved by transformers' `DeepseekV4Config` with
    the `vision_*` fields: `load_encoder(dir)` per layer, `hf_deepseek_v4.load_aligner(dir)`.
  * The `deepseek_aligner` projector round-trips through `save_pretrained`.
  * The real names: timm's `deepseek_vit_412m_enc.*` route to `timm_deepseek`, the hub ids fail
    offline in one line, a `deepseek_v4` directory goes to its converter and a text-only one
    (DeepSeek-V4-Flash-Base) is refused by name.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from parity_helpers import close, perturb

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
from timm.models.deepseek_vit import DeepseekVitEncoder, checkpoint_filter_fn_encoder  # noqa: E402

from vlm_encoder import load_encoder  # noqa: E402
from vlm_encoder.converters import hf_deepseek_v4, timm_deepseek  # noqa: E402
from vlm_encoder.projectors import Projector, load_deepseek_v4_aligner  # noqa: E402
from vlm_encoder.weights import WeightsError  # noqa: E402

PATCH, WIDTH, DEPTH, HEADS, MLP, D_LLM, RATIO = 4, 32, 3, 2, 48, 40, 3
SIZE = 36  # the encoder's own size: 9 x 9 patches, 3 x 3 aligner tokens
# (H, W): its own size, then non-square grids 5 x 7 and 11 x 6, neither a multiple of 3.
SIZES = [(SIZE, SIZE), (20, 28), (44, 24)]


def _reference() -> DeepseekVitEncoder:
    torch.manual_seed(0)
    model = DeepseekVitEncoder(
        img_size=SIZE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_ratio=MLP / WIDTH,
        out_features=D_LLM, downsample_ratio=RATIO,
    )
    return perturb(model)


def _release_layout(model: DeepseekVitEncoder) -> dict[str, torch.Tensor]:
    """The encoder's weights as a whole DeepSeek-V4 checkpoint keeps them (the inverse of timm's
    `checkpoint_filter_fn_encoder`), with some language-model keys beside them."""
    names = {".attn.qkv.": ".attn.wqkv.", ".attn.proj.": ".attn.wo.", ".mlp.fc1.": ".mlp.w1.", ".mlp.fc2.": ".mlp.w2."}
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("aligner."):
            out[key.replace(".fc1.", ".w1.").replace(".fc2.", ".w2.")] = value.clone()
            continue
        if key == "patch_embed.proj.weight":
            value = value.flatten(1)  # the reference's Linear over flattened (C, p, p) patches
        for ours, theirs in names.items():
            key = key.replace(ours, theirs)
        out[f"vision.{key}"] = value.clone()
    generator = torch.Generator().manual_seed(5)
    for key in ("embed.weight", "norm.weight", "head.weight", "layers.0.attn_norm.weight", "image_newline", "image_start"):
        out[key] = torch.randn(8, D_LLM, generator=generator) if "weight" in key else torch.randn(D_LLM, generator=generator)
    return out


def _vision_fields() -> dict:
    return dict(
        vision_n_layers=DEPTH, vision_dim=WIDTH, vision_n_heads=HEADS, vision_inter_dim=MLP, vision_patch_size=PATCH,
        vision_rope_theta=10000.0, vision_downsample_ratio=RATIO, vision_min_pixels=32 * 32,
    )


def _save_whole_checkpoint(model: DeepseekVitEncoder, directory, vision: bool = True) -> None:
    """A DeepSeek-V4 directory: `config.json` from transformers' `DeepseekV4Config` (tiny LM), two shards."""
    config = transformers.DeepseekV4Config(
        hidden_size=D_LLM, num_hidden_layers=1, num_attention_heads=2, head_dim=16, vocab_size=8,
        **(_vision_fields() if vision else {}),
    )
    config.save_pretrained(directory)
    state = _release_layout(model)
    shards = {"model-00001-of-00002.safetensors": {k: v for k, v in state.items() if k.startswith(("vision.", "aligner."))}}
    shards["model-00002-of-00002.safetensors"] = {k: v for k, v in state.items() if k not in shards["model-00001-of-00002.safetensors"]}
    for name, tensors in shards.items():
        save_file(tensors, str(directory / name))
    weight_map = {key: name for name, tensors in shards.items() for key in tensors}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The jittered reference and a whole DeepSeek-V4 checkpoint directory of its weights."""
    reference = _reference()
    directory = tmp_path_factory.mktemp("deepseek_v4")
    _save_whole_checkpoint(reference, directory)
    return reference, directory


def _run_reference(reference: DeepseekVitEncoder, images: torch.Tensor):
    """Every block's tokens `(B, h*w, D)`, the final-normed tokens and the aligner's tokens."""
    final, layers = reference.forward_intermediates(images, output_fmt="NLC")
    return layers, final.flatten(1, 2), reference(images)


def test_config_maps_the_tower():
    config = timm_deepseek.config_from_timm_deepseek(_reference())
    assert (config.norm_type, config.mlp_type, config.rope, config.rope_layout, config.pos_embed) == (
        "rmsnorm", "swiglu", "eva", "half", "none")
    assert config.final_norm and not config.class_token and config.mlp_dim == MLP and config.grid_size == (9, 9)
    whole = hf_deepseek_v4.config_from_hf({"model_type": "deepseek_v4", **_vision_fields()})
    assert whole.replace(image_size=SIZE) == config  # 32^2 min pixels -> 32 px, 8 patches at patch 4
    assert whole.image_size == (32, 32)


def test_release_layout_is_what_timm_reads(saved):
    """Our writer of DeepSeek's layout and timm's reader of it agree: the format is the reference's."""
    reference, _ = saved
    read = checkpoint_filter_fn_encoder(_release_layout(reference), reference)
    expected = reference.state_dict()
    assert set(read) == set(expected)
    assert all(torch.equal(read[k], expected[k]) for k in expected)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("route", ["timm", "whole checkpoint"])
def test_every_layer_matches_the_reference(saved, route, size):
    reference, directory = saved
    if route == "timm":
        encoder = timm_deepseek.encoder_from_timm_deepseek(reference)
    else:
        encoder = load_encoder(directory)
        assert encoder.source_info["family"] == "deepseek_v4"
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        layers, final, _ = _run_reference(reference, images)
        out = encoder(images, layers="all")
        normed = encoder(images, norm=True).patches(-1)
    assert out.grid_size == (size[0] // PATCH, size[1] // PATCH) and out.cls_tokens is None
    for i in range(DEPTH):
        close(f"deepseek_v4 {route} {size}", out.patches(i), layers[i], f"block {i}")
    close(f"deepseek_v4 {route} {size}", normed, final, "final norm")


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("route", ["timm", "whole checkpoint"])
def test_aligner_gives_the_tokens_the_language_model_receives(saved, route, size):
    reference, directory = saved
    if route == "timm":
        encoder, aligner = timm_deepseek.encoder_from_timm_deepseek(reference), timm_deepseek.aligner_from_timm_deepseek(reference)
    else:
        encoder, aligner = load_encoder(directory), hf_deepseek_v4.load_aligner(directory)
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        _, _, tokens = _run_reference(reference, images)
        out = encoder(images, norm=True)
        ours = aligner(out.patches(-1), out.grid_size)
    h, w = out.grid_size
    assert ours.shape == tokens.shape == (2, -(-h // RATIO) * -(-w // RATIO), D_LLM)
    assert aligner.num_output_tokens(out.grid_size) == ours.shape[1]
    close(f"deepseek_v4 aligner {route} {size}", ours, tokens, "aligner tokens")


def test_timm_name_with_a_checkpoint_file(saved, tmp_path):
    """`load_timm_deepseek(NAME, checkpoint=FILE)`: the architecture from timm's registry (tiny
    kwargs), the weights from a file in timm's layout, timm's preprocessing (mean / std 0.5)."""
    reference, _ = saved
    save_file(reference.state_dict(), str(tmp_path / "model.safetensors"))
    encoder = timm_deepseek.load_timm_deepseek(
        "deepseek_vit_412m_enc", str(tmp_path / "model.safetensors"), img_size=SIZE, patch_size=PATCH,
        embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_ratio=MLP / WIDTH, out_features=D_LLM,
    )
    assert encoder.image_processor.config.mean == (0.5, 0.5, 0.5) and encoder.image_processor.config.size == (SIZE, SIZE)
    images = torch.randn(1, 3, 20, 28)
    with torch.no_grad():
        _, final, _ = _run_reference(reference, images)
        close("deepseek_v4 timm checkpoint file", encoder(images, norm=True).patches(-1), final, "final norm")


def test_timm_mean_pooling_and_classifier_heads():
    """`global_pool='avg'` is our `gap` after the final norm; a classifier converts without its
    head only, and is refused by name with one."""
    from timm.models.deepseek_vit import DeepseekVitClassifier

    shape = dict(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=1, mlp_ratio=1.5)
    pooled = perturb(DeepseekVitEncoder(global_pool="avg", **shape))
    images = torch.randn(2, 3, 16, 12)
    with torch.no_grad():
        close("deepseek_v4 timm avg pool", timm_deepseek.encoder_from_timm_deepseek(pooled)(images).pooled, pooled(images), "pooled")
    bare = perturb(DeepseekVitClassifier(num_classes=0, global_pool="", final_norm=False, **shape))
    with torch.no_grad():
        close("deepseek_v4 timm classifier trunk", timm_deepseek.encoder_from_timm_deepseek(bare)(images, norm=True).patches(-1),
              bare.forward_features(images).flatten(1, 2), "final norm")
    with pytest.raises(timm_deepseek.UnsupportedTimmModel, match="classifier's pooling"):
        timm_deepseek.config_from_timm_deepseek(DeepseekVitClassifier(num_classes=5, **shape))


def test_aligner_round_trips_through_save_pretrained(saved, tmp_path):
    aligner = hf_deepseek_v4.load_aligner(saved[1])
    aligner.save_pretrained(tmp_path)
    again = Projector.from_pretrained(tmp_path)
    assert again.config == aligner.config and again.config.kind == "deepseek_aligner"
    tokens = torch.randn(1, 5 * 7, WIDTH)
    with torch.no_grad():
        assert torch.equal(again(tokens, (5, 7)), aligner(tokens, (5, 7)))


def test_converters_are_strict(saved):
    reference, _ = saved
    state = _release_layout(reference)
    del state["vision.blocks.1.mlp.w1.weight"]
    with pytest.raises(WeightsError, match=r"blocks\.1\.mlp\.w1\.weight"):
        hf_deepseek_v4.convert_state_dict(state)
    state = _release_layout(reference)
    state["vision.blocks.0.attn.q_norm.weight"] = torch.ones(16)
    with pytest.raises(WeightsError, match="q_norm"):
        hf_deepseek_v4.convert_state_dict(state)
    aligner = {k: v for k, v in _release_layout(reference).items() if k.startswith("aligner.")}
    with pytest.raises(WeightsError, match="not a multiple"):
        load_deepseek_v4_aligner(aligner, scale_factor=5)
    with pytest.raises(timm_deepseek.UnsupportedTimmModel, match="aligner"):
        timm_deepseek.aligner_from_timm_deepseek(DeepseekVitEncoder(img_size=16, patch_size=4, embed_dim=16, depth=1,
                                                                    num_heads=1, global_pool=""))


def test_a_text_only_deepseek_v4_is_refused_by_name(tmp_path):
    _save_whole_checkpoint(_reference(), tmp_path, vision=False)
    with pytest.raises(ValueError, match="states no vision tower.*vision_n_layers"):
        load_encoder(tmp_path)


# ------------------------------------------------------------------------ real names, offline
TIMM_NAMES = ["deepseek_vit_412m_enc.deepseek_v4_1_flash", "deepseek_vit_412m_enc.deepseek_v4_flash_vision_exp"]
# transformers names DeepSeek-V4-Flash-Base (text only); timm's sources are the two vision checkpoints.
HUB_IDS = ["deepseek-ai/DeepSeek-V4.1-Flash", "deepseek-ai/DeepSeek-V4-Flash-Vision-Exp", "deepseek-ai/DeepSeek-V4-Flash-Base"]


def test_timm_names_route_to_the_deepseek_converter():
    from vlm_encoder.converters.timm_eva import is_eva

    for name in [*TIMM_NAMES, "deepseek_vit_412m", "deepseek_vit_412m_align.deepseek_v4_1_flash"]:
        assert timm_deepseek.is_deepseek(name) and not is_eva(name)
    assert not timm_deepseek.is_deepseek("vit_base_patch16_224")


@pytest.mark.slow  # timm builds the random 412M-parameter model before it looks for the weights
@pytest.mark.parametrize("name", TIMM_NAMES)
def test_real_timm_names_fail_offline_in_one_line(name, empty_cache, capsys):
    line = _one_line_not_cached(f"timm:{name}", capsys)
    assert f"timm pretrained weights for {name!r}" in line and "checkpoint" in line


@pytest.mark.parametrize("name", HUB_IDS)
def test_real_hub_ids_fail_offline_in_one_line(name, empty_cache, capsys):
    line = _one_line_not_cached(name, capsys)
    assert line.startswith(f"vlm-encoder info: error: {name}: config.json not in the Hugging Face cache")


def test_a_deepseek_v4_directory_goes_to_its_converter(saved):
    """Offline the hub ids' `config.json` is not there: a tiny directory of the same model_type stands in."""
    assert json.loads((saved[1] / "config.json").read_text())["model_type"] == "deepseek_v4"
    assert load_encoder(saved[1]).source_info["family"] == "deepseek_v4"


from test_tower_families import _one_line_not_cached  # noqa: E402
