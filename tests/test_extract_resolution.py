"""`vlm-encoder extract --resolution native` and `--anyres`: per-image patches `(N_i, D)` and
grids read back by `FeatureStore.get`, equal to the encoder's own output, batch-size
invariant, and a resume with other resolution flags refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_encoder import FeatureStore
from vlm_encoder.anyres import encode_anyres
from vlm_encoder.cli import main
from vlm_encoder.extract import ExtractConfig, run_extraction
from vlm_encoder.extract.model import build_encoder, build_processor
from vlm_encoder.extract.resolution import parse_pinpoints
from vlm_encoder.packing import encode_packed

TINY = {"depth": 2, "width": 32, "num_heads": 2, "image_size": 32, "patch_size": 8}
SHAPES = ((32, 96), (64, 32), (40, 40))  # (H, W): wide, tall, square


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SHAPES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img_{i}.png")
    return folder


def config(tmp_path: Path, images: Path, out: str = "out", **changes) -> ExtractConfig:
    base = {"model": "preset:vit_tiny_patch16_224", "overrides": TINY, "dataset": str(images), "out": tmp_path / out,
            "layers": (-2, -1), "select": ("cls", "patch", "pooled"), "shard_size": 2, "batch_size": 3,
            "num_workers": 0, "progress": False}
    base.update(changes)
    return ExtractConfig(**base)


def test_native_store_holds_each_images_patches_and_grid(tmp_path, images):
    cfg = config(tmp_path, images, resolution="native", max_patches=24)
    assert run_extraction(cfg).complete
    store = FeatureStore(cfg.out)
    encoder = build_encoder(cfg)
    processor = build_processor(encoder, None)
    assert store.resolution == {"mode": "native", "max_patches": 24, "sizing": "navit"}
    # navit, budget 24: 32x96 (4x12 = 48) and 64x32 (8x4 = 32) are shrunk, 40x40 (5x5 = 25) too
    for row, (h, w) in enumerate(SHAPES):
        got = store.get(row)
        gh, gw = got["grid"].tolist()
        assert gh * gw <= 24 and got["num_patches"].item() == gh * gw
        assert abs(gw / gh - w / h) < 0.5 * w / h  # aspect ratio kept (up to rounding to whole patches)
        for block in (0, 1):
            assert got[f"layer{block}.patch"].shape == (gh * gw, 32)
        # Equal to encoding the image alone at that size.
        pixels = processor.__class__(processor.config.replace(resize_mode="exact", size=(gh * 8, gw * 8),
                                                              crop_size=None))(Image.open(images / f"img_{row}.png"))
        ref = encode_packed(encoder, [pixels[0]], layers=(0, 1))[0]
        torch.testing.assert_close(got["layer0.patch"], ref.patches(0)[0], rtol=0, atol=0)
        torch.testing.assert_close(got["layer1.cls"], ref.cls(1)[0], rtol=0, atol=0)
        torch.testing.assert_close(got["pooled"], ref.pooled[0], rtol=0, atol=0)
    assert [tuple(g.shape) for g in store[-1, "patch"][:]] == [tuple(store.get(r)["layer1.patch"].shape) for r in range(3)]
    # Exported with one (N_i, D) array per row, and back through parquet unchanged.
    path = store.to_parquet(tmp_path / "native.parquet")
    from datasets import Dataset

    exported = Dataset.from_parquet(str(path)).with_format("numpy")
    for row in range(3):
        got = store.get(row)
        np.testing.assert_array_equal(exported[row]["layer1.patch"], got["layer1.patch"].numpy())
        np.testing.assert_array_equal(exported[row]["grid"], got["grid"].numpy())
        assert exported[row]["num_patches"] == got["num_patches"].item()


def test_native_is_batch_size_invariant(tmp_path, images):
    a = config(tmp_path, images, "a", resolution="native", batch_size=1)
    b = config(tmp_path, images, "b", resolution="native", batch_size=3, shard_size=3)
    run_extraction(a), run_extraction(b)
    sa, sb = FeatureStore(a.out), FeatureStore(b.out)
    for row in range(3):
        for key, value in sa.get(row).items():
            assert torch.equal(value, sb.get(row)[key]), key


def test_anyres_store_holds_the_assembled_tokens(tmp_path, images):
    cfg = config(tmp_path, images, anyres="32x64,64x32,64x64", layers=(-1,), select=("cls", "patch"))
    assert run_extraction(cfg).complete
    store = FeatureStore(cfg.out)
    encoder = build_encoder(cfg)
    assert store.resolution["pinpoints"] == [[32, 64], [64, 32], [64, 64]]
    lengths = set()
    for row in range(3):
        got = store.get(row)
        ref = encode_anyres(encoder, Image.open(images / f"img_{row}.png"), [(32, 64), (64, 32), (64, 64)], layer=-1)
        torch.testing.assert_close(got["layer1.patch"], ref.tokens, rtol=0, atol=1e-6)
        assert got["grid"].tolist() == list(ref.feature_map.shape[1:])
        assert got["num_patches"].item() == 16 + ref.feature_map.shape[1] * ref.feature_map.shape[2]
        base = encoder(ref.tiles.pixel_values[:1], layers=(-1,))
        torch.testing.assert_close(got["layer1.cls"], base.cls(-1)[0], rtol=0, atol=1e-6)
        lengths.add(got["num_patches"].item())
    assert len(lengths) > 1  # the aspect ratios give different sequence lengths


@pytest.mark.parametrize("first, second, named", [
    ({"resolution": "native", "max_patches": 24}, {"resolution": "native", "max_patches": 12}, "max_patches"),
    ({"resolution": "native"}, {}, "resolution"),
    ({"anyres": "32x64,64x32"}, {"anyres": "32x64,64x64"}, "pinpoints"),
])
def test_resume_with_other_resolution_flags_is_refused(tmp_path, images, first, second, named):
    run_extraction(config(tmp_path, images, **first))
    with pytest.raises(ValueError, match=named):
        run_extraction(config(tmp_path, images, **second))


@pytest.mark.parametrize("changes, message", [
    ({"anyres": "32x64,abc"}, "is not HxW"),
    ({"anyres": "32x64", "resolution": "native"}, "exclude each other"),
    ({"max_patches": 12}, "native. only"),
    ({"resolution": "native", "image_size": (32, 32)}, "image_size does not apply"),
    ({"resolution": "huge"}, "resolution must be one of 'fixed', 'native'"),
])
def test_bad_resolution_flags_are_named(tmp_path, images, changes, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, images, **changes)


def test_anyres_pinpoints_must_fit_the_tile_and_registers_are_refused(tmp_path, images):
    with pytest.raises(ValueError):
        run_extraction(config(tmp_path, images, anyres="30x60"))
    with pytest.raises(ValueError, match="registers"):
        run_extraction(config(tmp_path, images, "r", anyres="32x64", select=("registers",),
                              overrides={**TINY, "num_register_tokens": 2}))
    assert parse_pinpoints("336x672, 672x336") == ((336, 672), (672, 336))


def test_cli_native_and_anyres(tmp_path, images, capsys):
    tiny = [a for k, v in TINY.items() for a in ("--override", f"{k}={v}")]
    common = ["extract", "--model", "preset:vit_tiny_patch16_224", *tiny, "--dataset", str(images), "--num-workers",
              "0", "--no-progress", "--select", "patch"]
    assert main([*common, "--out", str(tmp_path / "n"), "--resolution", "native", "--max-patches", "16"]) == 0
    assert FeatureStore(tmp_path / "n").get(2)["grid"].tolist() == [4, 4]  # 40x40 -> 5x5 = 25 > 16 -> 4x4
    assert main([*common, "--out", str(tmp_path / "a"), "--anyres", "32x64,64x32,64x64"]) == 0
    assert FeatureStore(tmp_path / "a").resolution["mode"] == "anyres"
    assert main([*common, "--out", str(tmp_path / "b"), "--anyres", "32by64"]) != 0
    assert "is not HxW" in capsys.readouterr().err
