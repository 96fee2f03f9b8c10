"""Qwen3-VL vision tower vs transformers' `Qwen3VLVisionModel` on a tiny random config saved with
`save_pretrained` (every weight jittered) and read back by `load_encoder`: every layer (the
reference's merge-unit-ordered tokens put back in row-major order) at the table's own grid and at
two resized non-square grids, the `qwen_merger` projectors vs the reference's merged output and
its DeepStack features, and a whole saved `qwen3_vl` directory. Qwen3.5's tower (the same tower
without DeepStack mergers, `Qwen3_5VisionModel`) likewise, alone and in a whole `qwen3_5` directory."""

from __future__ import annotations

import pytest
import torch

from parity_helpers import close, perturb
from test_tower_families import _one_line_not_cached
from vlm_encoder import load_encoder
from vlm_encoder.converters import hf_qwen3_vl

transformers = pytest.importorskip("transformers")
from transformers import Qwen3VLVisionConfig  # noqa: E402
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel  # noqa: E402
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor  # noqa: E402

PATCH, MERGE, TEMPORAL = 4, 2, 2
TINY = dict(
    depth=3, hidden_size=32, intermediate_size=48, num_heads=2, in_channels=3, patch_size=PATCH,
    spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, out_hidden_size=24,
    num_position_embeddings=36, deepstack_visual_indexes=[0, 1],
)
# The table is 6 x 6 patches (24 px): its own grid, a larger non-square one and a smaller one.
SIZES = [(24, 24), (32, 48), (40, 16)]


def _reference() -> Qwen3VLVisionModel:
    torch.manual_seed(0)
    model = Qwen3VLVisionModel(Qwen3VLVisionConfig(**TINY)).eval()
    with torch.no_grad():  # norms start at 1 / 0 and biases at 0: make every weight count
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The reference tower saved with `save_pretrained`, and that directory."""
    directory = tmp_path_factory.mktemp("qwen3_vl_vision")
    reference = _reference()
    reference.save_pretrained(directory)
    return reference, directory


def _run_reference(reference, images: torch.Tensor):
    """The reference on images `(B, C, H, W)`: its hidden states `(B, L+1, h*w, D)` row-major,
    its merged output `(B, h*w/4, out)` and DeepStack features (each `(B, h*w/4, out)`)."""
    B, _, H, W = images.shape
    h, w = H // PATCH, W // PATCH
    flat, _, _ = Qwen2VLImageProcessor().patchify(images, PATCH, MERGE, TEMPORAL)  # (B, h*w, C*T*p*p) merge-unit order
    out = reference(flat.reshape(B * h * w, -1), torch.tensor([[1, h, w]] * B), output_hidden_states=True)
    p = torch.arange(h * w)  # position p: sub-token p % 4 of merge unit p // 4 (row-major units)
    unit, sub = p // MERGE**2, p % MERGE**2
    row = unit // (w // MERGE) * MERGE + sub // MERGE
    col = unit % (w // MERGE) * MERGE + sub % MERGE
    to_row_major = torch.argsort(row * w + col)
    hidden = torch.stack([s.reshape(B, h * w, -1)[:, to_row_major] for s in out.hidden_states], dim=1)
    merged = lambda t: t.reshape(B, h * w // MERGE**2, -1)  # noqa: E731
    return hidden, merged(out.pooler_output), [merged(t) for t in getattr(out, "deepstack_features", None) or []]


def test_config_maps_the_position_schemes():
    config = hf_qwen3_vl.config_from_hf(Qwen3VLVisionConfig(**TINY))
    assert config.grid_size == (6, 6) and config.pos_embed == "learned" and config.rope == "eva"
    assert (config.pos_resample_mode, config.pos_resample_align_corners, config.pos_resample_antialias) == ("bilinear", True, False)
    assert config.norm_type == "layernorm" and not config.final_norm and config.act == "gelu_tanh"
    with pytest.raises(ValueError, match="not a square number"):
        hf_qwen3_vl.config_from_hf(Qwen3VLVisionConfig(**{**TINY, "num_position_embeddings": 30}))


@pytest.mark.parametrize("size", SIZES)
def test_every_layer_of_the_saved_tower_matches_the_reference(saved, size):
    reference, directory = saved
    encoder = load_encoder(directory).eval()
    assert encoder.source_info["family"] == "qwen3_vl_vision"
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        hidden, _, _ = _run_reference(reference, images)
        out = encoder(images, layers="all")
    assert out.grid_size == (size[0] // PATCH, size[1] // PATCH)
    assert out.cls_tokens is None and out.register_tokens is None
    assert hidden.shape[1] == TINY["depth"] + 1
    for i in range(TINY["depth"]):
        assert (out.patches(i) - hidden[:, i + 1]).abs().max().item() <= 1e-5, f"block {i}"


def test_early_stop_matches(saved):
    reference, directory = saved
    encoder = load_encoder(directory).eval()
    images = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        hidden, _, _ = _run_reference(reference, images)
        out = encoder(images, layers=(0,))
    assert len(out.layers) == 1 and (out.patches(0) - hidden[:, 1]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("size", SIZES[1:])
def test_mergers_match_the_merged_output_and_deepstack_features(saved, size):
    from vlm_encoder.projectors import load_qwen3_vl_merger

    reference, directory = saved
    encoder = load_encoder(directory).eval()
    state = reference.state_dict()
    part = lambda prefix: {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}  # noqa: E731
    merger = load_qwen3_vl_merger(part("merger."), scale_factor=MERGE)
    deepstack = [
        load_qwen3_vl_merger(part(f"deepstack_merger_list.{k}."), scale_factor=MERGE, norm_after_merge=True)
        for k in range(len(TINY["deepstack_visual_indexes"]))
    ]
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        _, merged, features = _run_reference(reference, images)
        out = encoder(images, layers=(*TINY["deepstack_visual_indexes"], -1))
        ours = merger(out.patches(-1), out.grid_size)
        ours_deep = [proj(out.patches(i), out.grid_size) for proj, i in zip(deepstack, TINY["deepstack_visual_indexes"])]
    assert ours.shape == merged.shape == (2, size[0] * size[1] // (PATCH * MERGE) ** 2, TINY["out_hidden_size"])
    assert (ours - merged).abs().max().item() <= 1e-5
    for k, (a, b) in enumerate(zip(ours_deep, features)):
        assert (a - b).abs().max().item() <= 1e-5, f"deepstack merger {k}"


def test_merger_loader_checks_where_the_norm_is(saved):
    from vlm_encoder.projectors import load_qwen3_vl_merger
    from vlm_encoder.weights import WeightsError

    state = {k[len("merger.") :]: v for k, v in saved[0].state_dict().items() if k.startswith("merger.")}
    with pytest.raises(WeightsError, match="norm_after_merge=True"):
        load_qwen3_vl_merger(state, scale_factor=MERGE, norm_after_merge=True)


def test_converter_is_strict(saved):
    from vlm_encoder.weights import WeightsError

    state = saved[0].state_dict()
    del state["blocks.1.mlp.linear_fc1.weight"], state["blocks.1.mlp.linear_fc1.bias"]
    with pytest.raises(WeightsError, match="linear_fc1"):
        hf_qwen3_vl.convert_state_dict(state)
    state = saved[0].state_dict()
    state["blocks.0.attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError, match="attn.extra"):
        hf_qwen3_vl.convert_state_dict(state)


def test_a_saved_whole_qwen3_vl_directory_gives_its_vision_tower(saved, tmp_path):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    reference, _ = saved
    text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                intermediate_size=64, vocab_size=64, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]})
    model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(vision_config=reference.config.to_dict(), text_config=text))
    model.model.visual.load_state_dict(reference.state_dict())
    model.save_pretrained(tmp_path / "qwen3")
    encoder = load_encoder(tmp_path / "qwen3").eval()
    assert encoder.source_info["family"] == "qwen3_vl"
    images = torch.randn(1, 3, 40, 16)
    with torch.no_grad():
        hidden, _, _ = _run_reference(reference, images)
        out = encoder(images, layers=(-1,))
    assert (out.patches(-1) - hidden[:, -1]).abs().max().item() <= 1e-5


# ---------------------------------------------------------------- Qwen3.5
QWEN3_5 = {k: v for k, v in TINY.items() if k != "deepstack_visual_indexes"}


@pytest.fixture(scope="module")
def saved_qwen3_5(tmp_path_factory):
    """Qwen3.5's reference tower (every weight jittered) saved with `save_pretrained`."""
    from transformers import Qwen3_5VisionConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5VisionModel

    torch.manual_seed(0)
    reference = perturb(Qwen3_5VisionModel(Qwen3_5VisionConfig(**QWEN3_5)), seed=2)
    directory = tmp_path_factory.mktemp("qwen3_5_vision")
    reference.save_pretrained(directory)
    return reference, directory


@pytest.mark.parametrize("size", SIZES[:2])
def test_qwen3_5_tower_every_layer_and_merger_match_the_reference(saved_qwen3_5, size):
    from vlm_encoder.projectors import load_qwen3_vl_merger

    reference, directory = saved_qwen3_5
    encoder = load_encoder(directory).eval()
    assert encoder.source_info["family"] == "qwen3_5_vision" and encoder.config.grid_size == (6, 6)
    merger = load_qwen3_vl_merger(
        {k[len("merger."):]: v for k, v in reference.state_dict().items() if k.startswith("merger.")}, scale_factor=MERGE
    )
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        hidden, merged, deep = _run_reference(reference, images)
        out = encoder(images, layers="all")
        ours = merger(out.patches(-1), out.grid_size)
    assert not deep
    for i in range(TINY["depth"]):
        close(f"qwen3_5 vision {size}", out.patches(i), hidden[:, i + 1], f"block {i}")
    close("qwen3_5 merger", ours, merged, "merged tokens")


def test_a_saved_whole_qwen3_5_directory_gives_its_vision_tower(saved_qwen3_5, tmp_path):
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    reference, _ = saved_qwen3_5
    text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                intermediate_size=64, vocab_size=64, layer_types=["linear_attention", "full_attention"],
                linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8)
    model = Qwen3_5ForConditionalGeneration(Qwen3_5Config(vision_config=reference.config.to_dict(), text_config=text))
    model.model.visual.load_state_dict(reference.state_dict())
    model.save_pretrained(tmp_path / "qwen3_5")
    encoder = load_encoder(tmp_path / "qwen3_5").eval()
    assert encoder.source_info["family"] == "qwen3_5"
    images = torch.randn(1, 3, 40, 16)
    with torch.no_grad():
        hidden, _, _ = _run_reference(reference, images)
        out = encoder(images, layers=(-1,))
    close("qwen3_5 vision whole dir", out.patches(-1), hidden[:, -1], "last block")


# ------------------------------------------------------- real names, MoE and Qwen3.5 routing
HUB_IDS = {  # the checkpoints transformers' docs name -> their config.json's model_type
    "Qwen/Qwen3-VL-4B-Instruct": "qwen3_vl",
    "Qwen/Qwen3-VL-8B-Instruct": "qwen3_vl",
    "Qwen/Qwen3-VL-30B-A3B-Instruct": "qwen3_vl_moe",
    "Qwen/Qwen3.5-27B": "qwen3_5",
    "Qwen/Qwen3.5-35B-A3B": "qwen3_5_moe",
}


@pytest.mark.parametrize("name", sorted(HUB_IDS))
def test_real_hub_ids_fail_offline_in_one_line(name, empty_cache, capsys):
    line = _one_line_not_cached(name, capsys)
    assert line.startswith(f"vlm-encoder info: error: {name}: config.json not in the Hugging Face cache")


@pytest.mark.parametrize("model_type", ["qwen3_vl_moe", "qwen3_5_moe"])
def test_whole_moe_checkpoints_give_their_tower(saved, saved_qwen3_5, model_type, tmp_path):
    """A whole MoE checkpoint's `config.json` (the real ones' `model_type`) with its tower under
    `model.visual.` (the LM's keys are never read) goes to this converter."""
    from safetensors.torch import save_file

    reference = saved[0] if model_type == "qwen3_vl_moe" else saved_qwen3_5[0]
    config_class = {"qwen3_vl_moe": transformers.Qwen3VLMoeConfig, "qwen3_5_moe": transformers.Qwen3_5MoeConfig}[model_type]
    config = config_class(vision_config=reference.config.to_dict())
    assert config.model_type == model_type
    config.save_pretrained(tmp_path)
    tower = {f"model.visual.{k}": v.contiguous() for k, v in reference.state_dict().items()}
    save_file({**tower, "model.language_model.embed_tokens.weight": torch.zeros(4, 4)}, str(tmp_path / "model.safetensors"))
    encoder = load_encoder(tmp_path).eval()
    assert encoder.source_info["family"] == model_type
    images = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        hidden, _, _ = _run_reference(reference, images)
        out = encoder(images, layers=(-1,))
    close(f"{model_type} vision whole dir", out.patches(-1), hidden[:, -1], "last block")
