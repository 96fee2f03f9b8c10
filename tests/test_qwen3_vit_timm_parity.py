"""Qwen3-VL / Qwen3.5 vision tower and its merger vs timm's `qwen3_vit.Qwen3VitEncoder` (a tiny
random `_enc`-style encoder, every weight jittered): every layer at the table's own grid and at
two non-square grids, the merger (`_enc`'s `global_pool='merge'` output), a head-less classifier,
a timm name with a checkpoint file; timm and transformers agree through our one tower (an HF
Qwen3-VL tower read by timm's own filter); the real timm names route here and fail offline in
one line."""

from __future__ import annotations

import pytest
import torch

from parity_helpers import close, perturb
from test_tower_families import _one_line_not_cached

timm = pytest.importorskip("timm")
from timm.models.qwen3_vit import Qwen3VitClassifier, Qwen3VitEncoder, checkpoint_filter_fn_encoder  # noqa: E402

from vlm_encoder.converters import timm_qwen3  # noqa: E402

SHAPE = dict(img_size=24, patch_size=4, embed_dim=32, depth=3, num_heads=2, mlp_ratio=1.5, pos_embed_grid_size=6)
SIZES = [(24, 24), (32, 48), (40, 16)]  # the 6x6 table's own grid, a larger and a smaller non-square one


def _reference(**kwargs) -> Qwen3VitEncoder:
    torch.manual_seed(0)
    return perturb(Qwen3VitEncoder(**{**SHAPE, "out_features": 24, **kwargs}), seed=3)


def _layers(reference: Qwen3VitEncoder, images: torch.Tensor) -> list[torch.Tensor]:
    """Every block's tokens `(B, h*w, D)`, row-major (timm's own order)."""
    return reference.forward_intermediates(images, indices=None, output_fmt="NLC", intermediates_only=True)


def test_config_reads_the_instance():
    config = timm_qwen3.config_from_timm_qwen3(_reference())
    assert config.grid_size == (6, 6) and (config.pos_embed, config.rope, config.rope_layout) == ("learned", "eva", "half")
    assert (config.pos_resample_mode, config.pos_resample_align_corners, config.pos_resample_antialias) == ("bilinear", True, False)
    assert (config.act, config.mlp_dim, config.final_norm, config.norm_eps) == ("gelu_tanh", 48, False, 1e-6)
    with pytest.raises(timm_qwen3.UnsupportedTimmModel, match="global_pool='avg'"):
        timm_qwen3.config_from_timm_qwen3(Qwen3VitEncoder(**SHAPE, global_pool="avg"))


@pytest.mark.parametrize("size", SIZES)
def test_every_layer_and_the_merger_match_timm(size):
    reference = _reference()
    encoder = timm_qwen3.encoder_from_timm_qwen3(reference)
    merger = timm_qwen3.merger_from_timm_qwen3(reference)
    assert merger.config.kind == "qwen_merger" and merger.config.out_dim == 24
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = _layers(reference, images)
        out = encoder(images, layers="all")
        merged = merger(out.patches(-1), out.grid_size)
        merged_ref = reference(images)
    assert out.grid_size == (size[0] // 4, size[1] // 4) and out.cls_tokens is None
    for i, ref in enumerate(expected):
        close(f"qwen3_vit timm {size}", out.patches(i), ref, f"block {i}")
    close("qwen3_vit timm merger", merged, merged_ref, "merged tokens")


def test_early_stop_and_merger_round_trip(tmp_path):
    from vlm_encoder.projectors import Projector

    reference = _reference()
    encoder = timm_qwen3.encoder_from_timm_qwen3(reference)
    merger = timm_qwen3.merger_from_timm_qwen3(reference)
    images = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        out = encoder(images, layers=(1,))
        assert out.layers == (1,)
        close("qwen3_vit timm early stop", out.patches(1), _layers(reference, images)[1], "block 1")
        merger.save_pretrained(tmp_path / "merger")
        again = Projector.from_pretrained(tmp_path / "merger")
        patches = encoder(images, layers=(-1,)).patches(-1)
        assert torch.equal(again(patches, (8, 12)), merger(patches, (8, 12)))


def test_headless_classifier_and_refusals():
    torch.manual_seed(0)
    bare = perturb(Qwen3VitClassifier(**SHAPE, num_classes=0, global_pool="", final_norm=False))
    images = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        out = timm_qwen3.encoder_from_timm_qwen3(bare)(images, layers=(-1,))
        close("qwen3_vit timm classifier trunk", out.patches(-1), _layers(bare.encoder, images)[-1], "last block")
    with pytest.raises(timm_qwen3.UnsupportedTimmModel, match="classifier's pooling"):
        timm_qwen3.config_from_timm_qwen3(Qwen3VitClassifier(**SHAPE, num_classes=5))
    with pytest.raises(timm_qwen3.UnsupportedTimmModel, match="has none"):
        timm_qwen3.merger_from_timm_qwen3(Qwen3VitEncoder(**SHAPE, global_pool=""))
    with pytest.raises(timm_qwen3.UnsupportedTimmModel, match="out_features=0"):
        timm_qwen3.merger_from_timm_qwen3(Qwen3VitEncoder(**SHAPE, out_features=0))


def test_timm_name_with_a_checkpoint_file(tmp_path):
    """`load_timm_qwen3(NAME, checkpoint=FILE)`: the architecture from timm's registry (tiny
    kwargs), the weights from a file in timm's layout, timm's preprocessing (mean / std 0.5)."""
    from safetensors.torch import save_file

    reference = _reference()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(tmp_path / "w.safetensors"))
    kwargs = {k: v for k, v in SHAPE.items() if k != "img_size"}
    encoder = timm_qwen3.load_timm_qwen3("qwen3_vit_88m_enc", str(tmp_path / "w.safetensors"), img_size=24, out_features=24, **kwargs)
    assert tuple(encoder.image_processor.config.mean) == (0.5, 0.5, 0.5)
    images = torch.randn(1, 3, 40, 16)
    with torch.no_grad():
        close("qwen3_vit timm checkpoint file", encoder(images, layers=(-1,)).patches(-1), _layers(reference, images)[-1], "last block")


def test_timm_and_transformers_agree_through_one_tower():
    """An HF `Qwen3VLVisionModel`'s weights, read by timm's own `checkpoint_filter_fn_encoder`
    into a timm encoder, and by `hf_qwen3_vl` into ours: the two references' towers are ours."""
    from transformers import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    from vlm_encoder.converters import hf_qwen3_vl
    from vlm_encoder.encoder import VisionEncoder

    torch.manual_seed(0)
    hf = perturb(Qwen3VLVisionModel(Qwen3VLVisionConfig(
        depth=3, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=4, spatial_merge_size=2,
        temporal_patch_size=2, out_hidden_size=24, num_position_embeddings=36, deepstack_visual_indexes=[0])))
    state = {f"model.visual.{k}": v for k, v in hf.state_dict().items()}
    reference = Qwen3VitEncoder(**SHAPE, out_features=24)
    reference.load_state_dict(checkpoint_filter_fn_encoder(state, reference))
    ours = VisionEncoder(hf_qwen3_vl.config_from_hf(hf.config))
    ours.load_state_dict(hf_qwen3_vl.convert_state_dict(state))
    images = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        out = ours.eval()(images, layers="all")
        for i, ref in enumerate(_layers(reference.eval(), images)):
            close("qwen3_vit timm vs hf weights", out.patches(i), ref, f"block {i}")


# ------------------------------------------------------------------------ real names, offline
TIMM_NAMES = ["qwen3_vit_88m_enc.qwen3_5_0_8b", "qwen3_vit_306m_enc.qwen3_vl_4b", "qwen3_vit_416m_enc.qwen3_5_27b"]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow if "88m" not in n else ()) for n in TIMM_NAMES])
def test_real_timm_names_route_and_fail_offline_in_one_line(name, empty_cache, capsys):
    """`timm:NAME` goes to `converters.timm_qwen3` exactly when timm's registry says `qwen3_vit.py`
    builds it; offline with an empty cache it fails in one line (timm builds the random model
    first: the 306m / 416m towers take several seconds, so they are slow tests)."""
    assert timm_qwen3.is_qwen3_vit(name) and not timm_qwen3.is_qwen3_vit("vit_base_patch16_224")
    line = _one_line_not_cached(f"timm:{name}", capsys)
    assert f"timm pretrained weights for {name!r}" in line and "checkpoint" in line
