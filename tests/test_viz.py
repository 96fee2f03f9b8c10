"""The PCA picture: `pca_rgb` numerics, the figure, and `vlm-encoder viz pca` end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_encoder.cli import main
from vlm_encoder.viz import figure_size_px, fit_pca_basis, pca_figure, pca_rgb, save_figure

TINY = ["--override", "depth=2", "--override", "width=32", "--override", "num_heads=2", "--override", "image_size=32"]


def _structured_tokens(B: int = 3, N: int = 20, D: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens with variance 16, 4, 1 along three known orthonormal directions, plus small noise."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.linalg.qr(torch.randn(D, 3, generator=g, dtype=torch.float64))[0].T.float()  # (3, D)
    scales = torch.tensor([4.0, 2.0, 1.0])
    coeffs = torch.randn(B, N, 3, generator=g) * scales
    tokens = coeffs @ directions + 0.01 * torch.randn(B, N, D, generator=g) + 3.0
    return tokens, directions


def test_pca_rgb_shape_range_dtype():
    tokens, _ = _structured_tokens(B=2, N=12)
    rgb = pca_rgb(tokens, (3, 4))
    assert rgb.shape == (2, 3, 4, 3)
    assert rgb.dtype == torch.float32
    assert rgb.min() >= 0.0 and rgb.max() <= 1.0
    assert rgb.std() > 0.1  # not a constant picture


def test_minmax_scaling_spans_zero_to_one_per_channel():
    tokens, _ = _structured_tokens()
    rgb = pca_rgb(tokens, (4, 5), scaling="minmax").reshape(-1, 3)
    torch.testing.assert_close(rgb.min(dim=0).values, torch.zeros(3))
    torch.testing.assert_close(rgb.max(dim=0).values, torch.ones(3))


def test_basis_finds_the_directions_of_largest_variance_in_order():
    tokens, directions = _structured_tokens()
    basis = fit_pca_basis(tokens)
    cosines = (basis.components @ directions.T).abs()  # (3, 3)
    assert torch.all(cosines.diagonal() > 0.99), cosines


def test_sign_is_fixed_largest_loading_positive():
    tokens, _ = _structured_tokens()
    for flipped in (tokens, 2 * tokens.mean() - tokens):  # a point reflection flips every SVD sign
        components = fit_pca_basis(flipped).components
        pivot = components.abs().argmax(dim=1, keepdim=True)
        assert torch.all(components.gather(1, pivot) > 0)


def test_deterministic_and_independent_of_image_order():
    tokens, _ = _structured_tokens()
    first = pca_rgb(tokens, (4, 5))
    assert torch.equal(first, pca_rgb(tokens, (4, 5)))
    reordered = pca_rgb(tokens[[2, 0, 1]], (4, 5))
    torch.testing.assert_close(reordered, first[[2, 0, 1]], atol=1e-5, rtol=0)


def test_one_basis_is_shared_by_all_images():
    # Two images that differ mainly along one direction: with a shared basis the first
    # channel separates them (one bright, one dark); separate bases would stretch both.
    g = torch.Generator().manual_seed(1)
    D = 8
    offset = torch.zeros(D)
    offset[0] = 5.0
    a = 0.1 * torch.randn(1, 16, D, generator=g) + offset
    b = 0.1 * torch.randn(1, 16, D, generator=g) - offset
    rgb = pca_rgb(torch.cat([a, b]), (4, 4))
    assert rgb[0, ..., 0].min() > 0.9
    assert rgb[1, ..., 0].max() < 0.1
    alone = pca_rgb(b, (4, 4))  # its own basis: spans the full range again
    assert alone[0, ..., 0].max() > 0.9


def test_a_given_basis_is_reused():
    tokens, _ = _structured_tokens()
    basis = fit_pca_basis(tokens)
    torch.testing.assert_close(pca_rgb(tokens[:1], (4, 5), basis=basis), pca_rgb(tokens, (4, 5))[:1])


@pytest.mark.parametrize(
    "tokens, grid, message",
    [
        (torch.zeros(2, 12, 8), (3, 5), "grid"),
        (torch.zeros(12, 8), (3, 4), r"\(B, N, D\)"),
        (torch.zeros(1, 2, 8), (1, 2), "principal components need"),
    ],
)
def test_bad_input_is_named(tokens, grid, message):
    with pytest.raises(ValueError, match=message):
        pca_rgb(tokens, grid)


def test_unknown_scaling_is_named():
    with pytest.raises(ValueError, match="allowed: percentile, minmax"):
        fit_pca_basis(torch.randn(1, 8, 8), scaling="zscore")


def test_figure_has_the_layout_size_and_is_written_atomically(tmp_path):
    images = [np.zeros((32, 32, 3), np.uint8), np.full((32, 32, 3), 200, np.uint8)]
    fig = pca_figure(images, torch.rand(2, 2, 2, 3), names=["a", "b"], layer_label="layer 1", panel_px=50)
    path = save_figure(fig, tmp_path / "sub" / "fig.png")
    with Image.open(path) as image:
        assert image.size == figure_size_px(rows=2, cols=2, panel_px=50) == (100, 2 * (50 + 24))
    assert [p.name for p in path.parent.iterdir()] == ["fig.png"]  # no temporary file left
    with pytest.raises(ValueError, match=".png"):
        save_figure(fig, tmp_path / "fig.jpg")


@pytest.fixture
def photo(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(path)
    return path


def test_cli_writes_a_png_of_the_expected_size(tmp_path, photo, capsys):
    out = tmp_path / "pca.png"
    code = main(["viz", "pca", "--image", str(photo), "--image", str(photo), "--layer", "-1", "--out", str(out),
                 "--panel-size", "64", *TINY])
    assert code == 0, capsys.readouterr().err
    with Image.open(out) as image:
        image.load()
        assert image.format == "PNG"
        assert image.size == (2 * 64, 2 * (64 + 24))  # two images, each beside its PCA map
        assert np.asarray(image.convert("RGB")).std() > 1  # something was drawn
    assert f"wrote {out}" in capsys.readouterr().out


def test_cli_loads_a_checkpoint_and_picks_the_layer(tmp_path, photo):
    from safetensors.torch import save_file

    from vlm_encoder import create_encoder

    encoder = create_encoder("vit_small_patch16_224", depth=2, width=32, num_heads=2, image_size=32)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, weights)
    out = tmp_path / "pca.png"
    assert main(["viz", "pca", "--image", str(photo), "--layer", "0", "--out", str(out), "--checkpoint",
                 str(weights), "--image-size", "48x64", "--panel-size", "40", *TINY]) == 0
    assert out.is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "vit_small_patch16_225"], "did you mean the preset"),
        (["--layer", "5", *TINY], "out of range"),
    ],
)
def test_cli_errors_are_reported(tmp_path, photo, capsys, extra, message):
    code = main(["viz", "pca", "--image", str(photo), "--out", str(tmp_path / "x.png"), *extra])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_cli_missing_image_is_reported(tmp_path, capsys):
    assert main(["viz", "pca", "--image", str(tmp_path / "none.png"), "--out", str(tmp_path / "x.png")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_cli_reads_a_saved_model_directory(tmp_path, photo):
    from vlm_encoder import create_encoder

    directory = create_encoder("vit_small_patch16_224", depth=2, width=32, num_heads=2, image_size=32).save_pretrained(
        tmp_path / "model"
    )
    out = tmp_path / "pca.png"
    assert main(["viz", "pca", "--image", str(photo), "--out", str(out), "--model", str(directory),
                 "--panel-size", "40"]) == 0
    with Image.open(out) as image:
        assert image.size == (80, 64)
