"""Qwen2.5-VL vision tower vs transformers' `Qwen2_5_VisionTransformerPretrainedModel` on a tiny
random config: every layer (the reference's window-ordered tokens put back in row-major order)
at two native resolutions, windowed and full-attention blocks, the `qwen_merger` projector vs
the reference's merged output, and loading a saved whole `qwen2_5_vl` directory."""

from __future__ import annotations

import pytest
import torch

from vlm_encoder import VisionEncoder
from vlm_encoder.converters import hf_qwen2_5_vl
from vlm_encoder.layers import WindowMask

transformers = pytest.importorskip("transformers")
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig  # noqa: E402
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel  # noqa: E402
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor  # noqa: E402

PATCH, MERGE, TEMPORAL = 4, 2, 2
# window_size 16 px = 2 merge units = 4 patches per window side: a window holds 4 merge units.
TINY = dict(
    depth=3, hidden_size=32, intermediate_size=48, num_heads=2, in_channels=3, patch_size=PATCH,
    spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, window_size=16, out_hidden_size=24,
    fullatt_block_indexes=[1],
)
SIZES = [(32, 48), (40, 24)]  # grids 8x12 (windows tile it) and 10x6 (cut windows at the edge)


def _reference(**overrides) -> Qwen2_5_VisionTransformerPretrainedModel:
    torch.manual_seed(0)
    model = Qwen2_5_VisionTransformerPretrainedModel(Qwen2_5_VLVisionConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():  # the RMSNorm weights start at 1: make them count
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def _ours(reference) -> VisionEncoder:
    encoder = VisionEncoder(hf_qwen2_5_vl.config_from_hf(reference.config))
    encoder.load_state_dict(hf_qwen2_5_vl.convert_state_dict(reference.state_dict()))
    return encoder.eval()


def _run_reference(reference, images: torch.Tensor):
    """The reference on images `(B, C, H, W)`: its hidden states and merged output, both with the
    tokens in row-major order, `(B, L+1, h*w, D)` and `(B, h*w/4, out)`."""
    B, _, H, W = images.shape
    h, w = H // PATCH, W // PATCH
    flat, _, _ = Qwen2VLImageProcessor().patchify(images, PATCH, MERGE, TEMPORAL)  # (B, h*w, C*T*p*p) merge-unit order
    grid_thw = torch.tensor([[1, h, w]] * B)
    out = reference(flat.reshape(B * h * w, -1), grid_thw, output_hidden_states=True)
    # Position p of the reference's sequence is sub-token p % 4 of merge unit window_index[p // 4].
    from transformers.vision_utils import get_vision_window_index

    window_index, _ = get_vision_window_index(grid_thw[:1], MERGE, reference.config.window_size, PATCH)
    unit = window_index.repeat_interleave(MERGE * MERGE)  # (h*w,)
    sub = torch.arange(h * w) % (MERGE * MERGE)
    row = unit // (w // MERGE) * MERGE + sub // MERGE
    col = unit % (w // MERGE) * MERGE + sub % MERGE
    to_row_major = torch.argsort(row * w + col)
    hidden = torch.stack([s.reshape(B, h * w, -1)[:, to_row_major] for s in out.hidden_states], dim=1)
    return hidden, out.pooler_output.reshape(B, h * w // MERGE**2, -1)


@pytest.mark.parametrize("size", SIZES)
def test_every_layer_matches_the_reference(size):
    reference = _reference()
    encoder = _ours(reference)
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        hidden, _ = _run_reference(reference, images)
        out = encoder(images, layers="all")
        weighed = encoder(images, layers="all", output_attentions=True)  # the dense-mask path
    assert out.grid_size == (size[0] // PATCH, size[1] // PATCH)
    assert out.cls_tokens is None and out.register_tokens is None
    for i in range(TINY["depth"]):
        assert (out.patches(i) - hidden[:, i + 1]).abs().max().item() <= 1e-5, f"block {i}"
        assert (weighed.patches(i) - hidden[:, i + 1]).abs().max().item() <= 1e-5, f"block {i} (weights)"
    assert weighed.attentions[0][0, 0, 0, 4] == 0 and weighed.attentions[1][0, 0, 0, 4] > 0  # windowed, full


def test_window_mask_groups_the_reference_windows():
    """Our windows of the row-major grid are the reference's (`cu_window_seqlens`) as sets."""
    from transformers.vision_utils import get_vision_window_index

    mask = WindowMask.grid((10, 6), 4)
    _, cu = get_vision_window_index(torch.tensor([[1, 10, 6]]), MERGE, TINY["window_size"], PATCH)
    assert mask.lengths == tuple(cu.diff().tolist()) == (16, 8, 16, 8, 8, 4)
    dense = mask.dense()[0, 0]
    assert dense[0, 3 * 6 + 3] and not dense[0, 4]  # (0,0) and (3,3) share a window, (0,4) does not


def test_full_attention_only_config_and_early_stop():
    reference = _reference(fullatt_block_indexes=[0, 1, 2])
    encoder = _ours(reference)
    assert encoder.block_masks((8, 12), "cpu") == [None, None, None]
    images = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        hidden, _ = _run_reference(reference, images)
        out = encoder(images, layers=(0,))
    assert (out.patches(0) - hidden[:, 1]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("size", SIZES[:1])
def test_merger_projector_matches_the_reference_output(size):
    from vlm_encoder.projectors import load_qwen2_5_vl_merger

    reference = _reference()
    encoder = _ours(reference)
    merger_keys = {k[len("merger.") :]: v for k, v in reference.state_dict().items() if k.startswith("merger.")}
    projector = load_qwen2_5_vl_merger(merger_keys, scale_factor=MERGE)
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        _, merged = _run_reference(reference, images)
        ours = projector(encoder(images, layers=(-1,)))
    assert ours.shape == merged.shape == (2, size[0] * size[1] // (PATCH * MERGE) ** 2, TINY["out_hidden_size"])
    assert (ours - merged).abs().max().item() <= 1e-5


def test_converter_is_strict():
    from vlm_encoder.weights import WeightsError

    state = _reference().state_dict()
    del state["blocks.1.mlp.up_proj.bias"]
    with pytest.raises(WeightsError, match="up_proj.bias"):
        hf_qwen2_5_vl.convert_state_dict(state)
    state = _reference().state_dict()
    state["blocks.0.attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError, match="attn.extra"):
        hf_qwen2_5_vl.convert_state_dict(state)


def _save_whole_model(directory) -> Qwen2_5_VisionTransformerPretrainedModel:
    """A tiny whole `Qwen2_5_VLForConditionalGeneration` saved with `save_pretrained`; its tower."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    reference = _reference()
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=64, vocab_size=64)
    config = Qwen2_5_VLConfig(vision_config=reference.config.to_dict(), text_config=text)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.model.visual.load_state_dict(reference.state_dict())
    model.save_pretrained(directory)
    return reference


def test_a_saved_whole_qwen2_5_vl_directory_gives_its_vision_tower(tmp_path):
    from vlm_encoder import load_encoder

    reference = _save_whole_model(tmp_path / "qwen")
    encoder = load_encoder(tmp_path / "qwen")
    assert encoder.source_info["family"] == "qwen2_5_vl"
    assert encoder.config.attn_window == 4 and encoder.config.full_attention_blocks == (1,)
    images = torch.randn(1, 3, 40, 24)
    with torch.no_grad():
        hidden, _ = _run_reference(reference, images)
        out = encoder(images, layers=(-1,))
    assert (out.patches(-1) - hidden[:, -1]).abs().max().item() <= 1e-5


def test_extract_on_a_saved_qwen2_5_vl(tmp_path):
    from PIL import Image

    from vlm_encoder.cli import main
    from vlm_encoder.extract import FeatureStore

    _save_whole_model(tmp_path / "qwen")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (40 + 8 * i, 32), (40 * i, 90, 200)).save(images / f"img_{i}.png")
    out = tmp_path / "store"
    assert main(["extract", "--model", str(tmp_path / "qwen"), "--dataset", str(images), "--out", str(out),
                 "--layers", "0", "-1", "--select", "patch", "--no-progress", "--num-workers", "0"]) == 0
    store = FeatureStore(out)
    assert len(store) == 2 and store[-1, "patch"].shape[-1] == 32
