"""`VisionLanguageModel` with several vision towers (Prismatic's DINOv2 + SigLIP): each tower
runs alone on its own pixels, its grid is resized to one grid as the caller chose
(`interpolate` / `pool`, equal to `torch.nn.functional` by hand), the projector fuses, and a
save / load round trip gives the same logits."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from projectors import build_projector
from vlm_encoder import create_encoder
from vlm_encoder.anyres import LlavaNextAnyres
from vlm_encoder.vlm import VisionLanguageModel

VOCAB, D_LLM, IMAGE_ID = 64, 48, 63
DINO_LAYERS, SIGLIP_LAYERS = (-1,), (-2, -1)


def towers():
    torch.manual_seed(0)
    dino = create_encoder("vit_small_patch14_dinov2", image_size=32, patch_size=8, width=32, depth=2, num_heads=2)  # 4x4
    siglip = create_encoder("vit_base_patch16_siglip_224", image_size=48, patch_size=8, width=24, depth=2, num_heads=2)  # 6x6
    return dino.eval(), siglip.eval()


def tiny_gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=D_LLM, n_layer=2, n_head=4, n_positions=128)).eval()


def make_vlm(grid=None, resize="interpolate", kind="mlp2x_gelu", **options):
    projector = build_projector(kind, (32, 24, 24), D_LLM, **options)
    return VisionLanguageModel(list(towers()), projector, tiny_gpt2(), IMAGE_ID, [DINO_LAYERS, SIGLIP_LAYERS],
                               tower_grid=grid, tower_resize=resize).eval()


def pixels(n=2):
    return [torch.randn(n, 3, 32, 32), torch.randn(n, 3, 48, 48)]


def by_hand(tokens, grid, new_grid, resize):
    """`torch.nn.functional` on the `(B, D, h, w)` feature map, back to row-major tokens."""
    fmap = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)
    if resize == "pool":
        out = F.adaptive_avg_pool2d(fmap, new_grid)
    else:
        shrinking = new_grid[0] < grid[0] or new_grid[1] < grid[1]
        out = F.interpolate(fmap, size=new_grid, mode="bilinear", align_corners=False, antialias=shrinking)
    return out.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("resize", ["interpolate", "pool"])
@pytest.mark.parametrize("grid", [(4, 4), (6, 6), (3, 3)])
def test_each_tower_runs_alone_then_is_resized_as_chosen(grid, resize):
    vlm = make_vlm(grid, resize)
    px = pixels()
    dino, siglip = towers()  # the same weights, run on their own
    with torch.no_grad():
        streams = vlm.tower_features(px)
        alone = [*dino(px[0], layers=DINO_LAYERS).patch_tokens, *siglip(px[1], layers=SIGLIP_LAYERS).patch_tokens]
    for stream, tokens, tower_grid in zip(streams, alone, [(4, 4), (6, 6), (6, 6)]):
        assert stream.shape == (2, grid[0] * grid[1], tokens.shape[-1])
        if tower_grid == grid:
            assert torch.equal(stream, tokens)  # a tower already on the common grid is untouched
        else:
            torch.testing.assert_close(stream, by_hand(tokens, tower_grid, grid, resize), rtol=0, atol=0)


def test_image_features_fuse_the_streams_and_feed_the_lm():
    vlm = make_vlm(kind="pixel_shuffle", scale_factor=2)  # common grid: DINOv2's 4x4 -> 2x2 tokens
    px = pixels()
    assert vlm.tower_grid == (4, 4) and vlm.num_image_tokens() == 4
    with torch.no_grad():
        features = vlm.image_features(px)
        assert torch.equal(features, vlm.projector(vlm.tower_features(px), grid_size=(4, 4)))
        ids = torch.tensor([vlm.expand_image_tokens([1, IMAGE_ID, 5, 6])] * 2)
        assert vlm(ids, px).logits.shape == (2, 7, VOCAB)
        assert vlm.generate(ids, px, max_new_tokens=2, do_sample=False, pad_token_id=0).shape == (2, 2)
    assert [p.shape for p in vlm.preprocess([torch.zeros(3, 40, 50, dtype=torch.uint8)])] == [(1, 3, 32, 32), (1, 3, 48, 48)]


def test_frozen_towers_and_the_one_tower_accessors():
    vlm = make_vlm()
    vlm.train()
    assert all(not tower.training and not any(p.requires_grad for p in tower.parameters()) for tower in vlm.encoders)
    assert vlm.projector.training
    assert vlm.feature_layers == ((1,), (0, 1))
    with pytest.raises(ValueError, match="2 vision towers"):
        vlm.encoder


def test_save_load_round_trip(tmp_path):
    vlm = make_vlm((6, 6), "pool")
    single = VisionLanguageModel(towers()[0], build_projector("linear", 32, D_LLM), tiny_gpt2(), IMAGE_ID, (-1,))
    single.save_pretrained(tmp_path / "vlm")  # a one-tower save, overwritten below: its encoder/ goes
    vlm.save_pretrained(tmp_path / "vlm")
    assert {p.name for p in (tmp_path / "vlm").iterdir()} >= {"encoder_0", "encoder_1", "projector", "language_model"}
    assert not (tmp_path / "vlm" / "encoder").exists()
    config = json.loads((tmp_path / "vlm" / "vlm_config.json").read_text())
    assert config["num_encoders"] == 2 and config["tower_grid"] == [6, 6] and config["tower_resize"] == "pool"
    assert config["feature_layers"] == [[1], [0, 1]]
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "vlm")
    ids = torch.tensor([vlm.expand_image_tokens([1, IMAGE_ID, 5])] * 2)
    px = pixels()
    with torch.no_grad():
        assert torch.equal(loaded(ids, px).logits, vlm(ids, px).logits)
    assert loaded.tower_grid == (6, 6) and loaded.tower_resize == "pool"


def test_multi_tower_inputs_are_checked():
    vlm = make_vlm()
    with pytest.raises(ValueError, match="one pixel tensor per tower"):
        vlm.image_features(torch.randn(1, 3, 32, 32))
    dino, siglip = towers()
    lm = tiny_gpt2()
    with pytest.raises(ValueError, match="encoder widths per feature layer"):
        VisionLanguageModel([dino, siglip], build_projector("linear", (32, 32), D_LLM), lm, IMAGE_ID, (-1,))
    with pytest.raises(ValueError, match="one sequence of ints per tower"):
        VisionLanguageModel([dino, siglip], build_projector("linear", (32, 24), D_LLM), lm, IMAGE_ID, [(-1,)])
    with pytest.raises(ValueError, match="fusion_grid"):
        VisionLanguageModel([dino, siglip], build_projector("linear", (32, 24), D_LLM, fusion_grid=6), lm, IMAGE_ID,
                            (-1,), tower_grid=4)
    with pytest.raises(ValueError, match="tower_resize"):
        VisionLanguageModel([dino, siglip], build_projector("linear", (32, 24), D_LLM), lm, IMAGE_ID, (-1,),
                            tower_resize="nearest")
    with pytest.raises(ValueError, match="anyres=None"):
        VisionLanguageModel([dino, siglip], build_projector("linear", (32, 24), D_LLM), lm, IMAGE_ID, (-1,),
                            anyres=LlavaNextAnyres(tile_size=32, pinpoints=[[32, 32]]))
    with pytest.raises(ValueError, match="one"):
        VisionLanguageModel(dino, build_projector("linear", 32, D_LLM), lm, IMAGE_ID, (-1,), tower_grid=4)


@pytest.mark.slow  # ~12 s on the shared 2-core machine (224 and 384 px towers)
def test_the_example_runs(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "multi_tower_vlm.py"
    spec = importlib.util.spec_from_file_location("multi_tower_vlm_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main(["--out", str(tmp_path / "vlm"), "--resize", "interpolate"]) == 0
    printed = capsys.readouterr().out
    for expected in ("grid 16x16", "grid 24x24", "image tokens per image: 64", "logits equal after save / load: True"):
        assert expected in printed, expected
    assert (tmp_path / "vlm" / "encoder_1").is_dir()
