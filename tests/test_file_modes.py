"""What the package writes gets the umask's mode, like any file written with `open`: 0644 files
and 0755 directories under umask 022, 0600 / 0700 under 077 (temporary files renamed into place
must not keep `tempfile`'s private 0600 / 0700)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_encoder import VisionEncoder, preset_config
from vlm_encoder.extract import ExtractConfig, run_extraction
from vlm_encoder.train import TrainConfig, Trainer
from vlm_encoder.viz import pca_figure, save_figure

MODES = [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)]  # umask, file mode, directory mode


@pytest.fixture(params=MODES, ids=["umask022", "umask077"])
def umask(request):
    mask, file_mode, dir_mode = request.param
    old = os.umask(mask)
    try:
        yield file_mode, dir_mode
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, str]:
    """`{relative path: octal mode}` of `root` and everything under it."""
    paths = [root, *root.rglob("*")]
    return {str(p.relative_to(root)): oct(stat.S_IMODE(p.lstat().st_mode)) for p in paths}


def assert_modes(root: Path, file_mode: int, dir_mode: int) -> None:
    found = modes(root)
    expected = {name: oct(dir_mode if (root / name).is_dir() else file_mode) for name in found}
    assert found == expected


def test_save_pretrained(tmp_path, umask):
    model = VisionEncoder(preset_config("vit_tiny_patch16_224", depth=1, width=32, num_heads=2, image_size=32))
    target = model.save_pretrained(tmp_path / "tower")
    assert_modes(target, *umask)
    model.save_pretrained(target)  # files replaced in an existing directory
    assert_modes(target, *umask)


def test_extraction_store(tmp_path, umask):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(images / f"{i}.png")
    config = ExtractConfig(
        model="preset:vit_tiny_patch16_224", dataset=str(images), out=tmp_path / "out", shard_size=2, batch_size=2,
        overrides={"depth": 1, "width": 32, "num_heads": 2, "image_size": 32, "patch_size": 8},
        layers=(-1,), select=("cls",), num_workers=0, progress=False,
    )
    assert run_extraction(config).complete
    assert len(list((tmp_path / "out").glob("*.safetensors"))) == 2
    assert_modes(tmp_path / "out", *umask)


def test_viz_png(tmp_path, umask):
    fig = pca_figure([np.zeros((16, 16, 3), np.uint8)], torch.rand(1, 2, 2, 3), names=["a"], layer_label="l", panel_px=32)
    save_figure(fig, tmp_path / "figs" / "pca.png")
    assert_modes(tmp_path / "figs", *umask)


def test_training_run_directory(tmp_path, umask):
    config = TrainConfig(
        data="builtin:shapes", data_options={"num_train": 8, "num_test": 4, "canvas": 16},
        vision_preset="vit_tiny_patch16_224",
        vision_overrides={"image_size": 16, "patch_size": 8, "width": 32, "depth": 1, "num_heads": 2},
        text_preset="tiny", text_overrides={"width": 32, "depth": 1, "num_heads": 2, "context_length": 12},
        embed_dim=16, batch_size=4, max_steps=1, checkpoint_every=1, eval_split=None, progress=False,
        output_dir=str(tmp_path / "run"),
    )
    Trainer(config).fit()
    run = tmp_path / "run"
    assert (run / "checkpoints").is_dir() and (run / "export" / "model" / "model.safetensors").is_file()
    assert_modes(run, *umask)
