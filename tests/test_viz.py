"""The PCA picture: `pca_rgb` numerics, the figure, and `vlm-encoder viz pca` end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_encoder.cli import main
from vlm_encoder.viz.figures import HEADER_PX
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
        # two images, each beside its PCA map, under a header naming the model
        assert image.size[0] == 2 * 64 and image.size[1] > 2 * (64 + 24)
        assert (image.size[1] - 2 * (64 + 24)) % HEADER_PX == 0
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
        (["--model", "vit_small_patch16_225"], "preset:vit_small_patch16_224"),
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
        assert image.size[0] == 80 and (image.size[1] - 64) % HEADER_PX == 0 and image.size[1] > 64


# ---------------------------------------------------------------- attention pictures
from vlm_encoder import create_encoder
from vlm_encoder.processing.config import ProcessorConfig
from vlm_encoder.processing.processor import ImageProcessor
from vlm_encoder.viz import (
    attention_rollout,
    cls_attention,
    heat_overlay,
    map_head_attention,
    mark_patch,
    mean_received_attention,
    patch_index,
    patch_similarity,
    point_in_processed_image,
    resolve_query,
    write_attention_picture,
    write_similarity_picture,
)
from vlm_encoder.viz.figures import HEADER_PX, TITLE_PX

NO_CLS = ["--override", "class_token=false", "--override", "pool=map"]


def _random_attention(B: int, H: int, T: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, T, T, generator=g).softmax(dim=-1)


def _tiny(**changes):
    torch.manual_seed(0)
    config = {"depth": 2, "width": 32, "num_heads": 2, "image_size": 32}
    config.update(changes)
    return create_encoder("vit_small_patch16_224", **config).eval()


def test_rollout_of_one_block_is_half_attention_half_identity():
    attention = _random_attention(2, 3, 5)
    expected = 0.5 * attention.mean(dim=1) + 0.5 * torch.eye(5)
    torch.testing.assert_close(attention_rollout([attention]), expected)


def test_rollout_multiplies_later_blocks_on_the_left():
    blocks = [_random_attention(1, 2, 4, seed=s) for s in range(3)]
    steps = [(0.5 * a.mean(dim=1)[0] + 0.5 * torch.eye(4)).double().numpy() for a in blocks]
    expected = steps[2] @ steps[1] @ steps[0]
    rollout = attention_rollout(blocks)[0]
    np.testing.assert_allclose(rollout.numpy(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rollout.sum(dim=-1), torch.ones(4))
    assert not np.allclose(expected, steps[0] @ steps[1] @ steps[2], atol=1e-4)  # the order matters here


def test_rollout_of_identity_attention_is_identity():
    eye = torch.eye(6).expand(1, 2, 6, 6)
    torch.testing.assert_close(attention_rollout([eye, eye, eye]), torch.eye(6)[None])


def test_cls_attention_drops_the_cls_and_register_columns():
    attention = _random_attention(2, 3, 1 + 2 + 4)  # CLS, 2 registers, 4 patches
    maps = cls_attention(attention, num_prefix=3)
    assert maps.shape == (2, 3, 4)
    torch.testing.assert_close(maps, attention[:, :, 0, 3:])
    assert torch.all(maps.sum(dim=-1) < 1)  # a share of the CLS row, not renormalised


def test_mean_received_attention_averages_patch_rows():
    attention = _random_attention(1, 2, 5)
    expected = attention[:, :, 1:, 1:].sum(dim=2) / 4
    torch.testing.assert_close(mean_received_attention(attention, num_prefix=1), expected)


def test_map_head_attention_reproduces_the_pooled_output():
    encoder = _tiny(class_token=False, pool="map")
    tokens = torch.randn(2, 5, 32)
    weights = map_head_attention(encoder.attn_pool, tokens)  # (B, heads, T)
    assert weights.shape == (2, 2, 5)
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(2, 2))
    head = encoder.attn_pool
    v = head.kv(tokens).reshape(2, 5, 2, 2, 16)[:, :, 1]  # (B, T, heads, d)
    pooled = torch.einsum("bht,bthd->bhd", weights, v).reshape(2, 1, 32)
    pooled = head.proj(pooled)
    pooled = pooled + head.mlp(head.norm(pooled))
    torch.testing.assert_close(pooled[:, 0], head(tokens), atol=1e-5, rtol=1e-5)


def test_query_resolution_names_what_is_missing():
    with_cls = _tiny().config
    siglip_like = _tiny(class_token=False, pool="map").config
    gap = _tiny(class_token=False, pool="gap").config
    assert resolve_query(with_cls, "auto", last_layer=False) == "cls"
    assert resolve_query(siglip_like, "auto", last_layer=True) == "map"
    assert resolve_query(siglip_like, "auto", last_layer=False) == "mean"
    assert resolve_query(gap, "auto", last_layer=True) == "mean"
    with pytest.raises(ValueError, match="no CLS token"):
        resolve_query(siglip_like, "cls", last_layer=True)
    with pytest.raises(ValueError, match="last block"):
        resolve_query(siglip_like, "map", last_layer=False)
    with pytest.raises(ValueError, match="pool='map'"):
        resolve_query(with_cls, "map", last_layer=True)
    with pytest.raises(ValueError, match="allowed: auto, cls, map, mean"):
        resolve_query(with_cls, "first", last_layer=True)


# ---------------------------------------------------------------- similarity
def test_patch_similarity_is_cosine_and_one_at_the_query():
    tokens = torch.randn(2, 6, 8)
    sims = patch_similarity(tokens[0, 4], tokens)
    assert sims.shape == (2, 6)
    assert sims[0, 4].item() == pytest.approx(1.0, abs=1e-6)
    expected = torch.nn.functional.cosine_similarity(tokens, tokens[0, 4].expand_as(tokens), dim=-1)
    torch.testing.assert_close(sims, expected)


def test_patch_index_counts_row_major_and_checks_the_grid():
    assert patch_index(1, 2, (3, 4)) == 6
    assert patch_index(-1, -1, (3, 4)) == 11
    with pytest.raises(ValueError, match="outside the 3x4 patch grid"):
        patch_index(3, 0, (3, 4))


@pytest.mark.parametrize(
    "config",
    [
        ProcessorConfig(resize_mode="exact", size=(48, 48)),
        ProcessorConfig(resize_mode="shortest_edge", size=(50, 50), crop_size=(50, 50)),
        ProcessorConfig(resize_mode="shortest_edge", size=(51, 51), crop_size=(51, 51), crop_rounding="floor"),
        ProcessorConfig(resize_mode="longest_edge", size=(64, 64), crop_size=(64, 64)),
    ],
    ids=["squash", "resize-crop", "resize-crop-floor", "fit-pad"],
)
def test_a_point_lands_where_the_processor_puts_its_pixel(config):
    # A white square on black: its centre, mapped, must be the centre of the white area the
    # processor produces (within a pixel or two of resampling blur).
    image = np.zeros((100, 200, 3), np.uint8)
    image[40:60, 130:150] = 255
    x, y = point_in_processed_image(140.0, 50.0, (100, 200), config)
    seen = ImageProcessor(config).preprocess_one(image).float().mean(dim=0)  # (H, W)
    rows, cols = torch.nonzero(seen > 127, as_tuple=True)
    assert abs(cols.float().mean().item() + 0.5 - x) < 1.5
    assert abs(rows.float().mean().item() + 0.5 - y) < 1.5


def test_a_point_cut_away_by_the_crop_is_named():
    config = ProcessorConfig(resize_mode="shortest_edge", size=(50, 50), crop_size=(50, 50))
    with pytest.raises(ValueError, match="cut away"):
        point_in_processed_image(5.0, 50.0, (100, 200), config)
    with pytest.raises(ValueError, match="outside the image"):
        point_in_processed_image(250.0, 50.0, (100, 200), config)


# ---------------------------------------------------------------- overlays
def test_heat_overlay_blends_only_the_covered_pixels():
    image = np.full((20, 18, 3), 100, np.uint8)  # a 2x2 grid at stride 8 leaves 4 rows, 2 cols bare
    heat = torch.tensor([[0.0, 1.0], [0.5, 0.25]])
    assert np.array_equal(heat_overlay(image, heat, 8, alpha=0.0), image)
    full = heat_overlay(image, heat, 8, alpha=1.0)
    assert np.array_equal(full[16:], image[16:]) and np.array_equal(full[:, 16:], image[:, 16:])
    from matplotlib import colormaps

    top_right = np.round(np.asarray(colormaps["inferno"](1.0)[:3]) * 255)
    assert np.abs(full[0, 8].astype(float) - top_right).max() <= 1
    assert np.array_equal(full[0, 8], full[7, 15])  # one colour per patch
    with pytest.raises(ValueError, match="does not fit"):
        heat_overlay(image, torch.zeros(3, 3), 8)


def test_mark_patch_draws_a_box_around_one_patch():
    image = np.zeros((32, 32, 3), np.uint8)
    marked = mark_patch(image, 1, 0, 16)
    changed = np.argwhere(marked.any(axis=-1))
    assert changed[:, 0].min() == 16 and changed[:, 0].max() == 31
    assert changed[:, 1].min() == 0 and changed[:, 1].max() == 15
    assert not marked[24, 8].any()  # the inside stays as it was
    assert not image.any()  # the input is not changed


# ---------------------------------------------------------------- pictures end to end
def _assert_png(path, width: int, rows: int, panel: int):
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG"
        assert image.size[0] == width
        extra = image.size[1] - rows * (panel + TITLE_PX)  # the header's wrapped lines
        assert extra > 0 and extra % HEADER_PX == 0, image.size
        assert np.asarray(image.convert("RGB")).std() > 1


def test_attention_cli_with_registers(tmp_path, photo, capsys):
    out = tmp_path / "att.png"
    code = main(["viz", "attention", "--image", str(photo), "--image", str(photo), "--layer", "1", "--out", str(out),
                 "--panel-size", "48", *TINY, "--override", "num_register_tokens=2"])
    assert code == 0, capsys.readouterr().err
    # per image: [image, mean, rollout] then one row of 2 heads -> 2 rows, 3 columns
    _assert_png(out, width=3 * 48, rows=4, panel=48)
    assert "CLS token's attention" in capsys.readouterr().out


@pytest.mark.parametrize("layer, shown", [("-1", "MAP pooling head"), ("0", "mean attention each patch receives")])
def test_attention_cli_without_cls_says_what_it_shows(tmp_path, photo, capsys, layer, shown):
    out = tmp_path / "att.png"
    code = main(["viz", "attention", "--image", str(photo), "--layer", layer, "--out", str(out), "--panel-size", "40",
                 "--head-cols", "1", *TINY, *NO_CLS])
    assert code == 0, capsys.readouterr().err
    assert shown in capsys.readouterr().out
    _assert_png(out, width=3 * 40, rows=3, panel=40)  # 2 heads, one per row


def test_attention_cls_query_is_rejected_without_cls(tmp_path, photo, capsys):
    code = main(["viz", "attention", "--image", str(photo), "--query", "cls", "--out", str(tmp_path / "a.png"),
                 *TINY, *NO_CLS])
    assert code == 2
    assert "no CLS token" in capsys.readouterr().err


def test_attention_maps_match_the_encoder_output(tmp_path, monkeypatch):
    # The maps drawn are the CLS row (registers dropped) and the rollout of the encoder's own weights.
    from vlm_encoder.viz import pictures

    encoder = _tiny(num_register_tokens=2)
    image = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    drawn = {}

    def capture(crops, head_maps, rollout_maps, stride, header, **kwargs):
        drawn.update(heads=head_maps[0], rollout=rollout_maps[0], header=header)
        return original(crops, head_maps, rollout_maps, stride, header, **kwargs)

    original = pictures.attention_figure
    monkeypatch.setattr(pictures, "attention_figure", capture)
    write_attention_picture(encoder, [image], layer=-1, path=tmp_path / "a.png")
    pixels, _ = pictures.prepare_images([image], encoder)
    with torch.no_grad():
        out = encoder(pixels, layers=(0, 1), output_attentions=True)
    torch.testing.assert_close(drawn["heads"], out.attentions[1][0, :, 0, 3:].reshape(2, 2, 2))
    torch.testing.assert_close(drawn["rollout"], attention_rollout(out.attentions)[0, 0, 3:].reshape(2, 2))
    assert "register columns dropped" in drawn["header"]


def test_similarity_cli_by_point_and_by_patch(tmp_path, photo, capsys):
    for where in (["--point", "59", "0"], ["--patch", "0", "-1"]):
        out = tmp_path / "sim.png"
        code = main(["viz", "similarity", "--image", str(photo), "--image", str(photo), *where, "--out", str(out),
                     "--panel-size", "50", *TINY])
        assert code == 0, capsys.readouterr().err
        _assert_png(out, width=2 * 50, rows=2, panel=50)
    with pytest.raises(SystemExit):
        main(["viz", "similarity", "--image", str(photo), "--out", str(out), *TINY])  # neither --point nor --patch


def test_similarity_picture_marks_the_query_and_maps_it_to_one(tmp_path, monkeypatch):
    from vlm_encoder.viz import pictures

    drawn = {}

    def capture(crops, maps, query_image, query_patch, stride, header, **kwargs):
        drawn.update(maps=maps, patch=query_patch, header=header)
        return original(crops, maps, query_image, query_patch, stride, header, **kwargs)

    original = pictures.similarity_figure
    monkeypatch.setattr(pictures, "similarity_figure", capture)
    image = np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    # (x=40, y=10) of a 64x64 image squashed to 32x32 is pixel (20, 5): row 0, col 1
    write_similarity_picture(_tiny(), [image], layer=0, path=tmp_path / "s.png", point=(40, 10))
    assert drawn["patch"] == (0, 1)
    assert drawn["maps"][0][0, 1].item() == pytest.approx(1.0, abs=1e-5)
    assert "point (40, 10)" in drawn["header"]
    with pytest.raises(ValueError, match="exactly one"):
        write_similarity_picture(_tiny(), [image], layer=0, path=tmp_path / "s.png", point=(1, 1), patch=(0, 0))


@pytest.fixture
def wide_and_tall(tmp_path):
    rng = np.random.default_rng(3)
    paths = []
    for name, shape in (("wide.png", (32, 96, 3)), ("tall.png", (64, 32, 3))):
        paths.append(tmp_path / name)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(paths[-1])
    return paths


@pytest.mark.parametrize("kind, extra", [("pca", []), ("similarity", ["--patch", "1", "5"]), ("attention", [])])
def test_native_resolution_keeps_each_images_shape(tmp_path, wide_and_tall, capsys, kind, extra):
    out = tmp_path / f"{kind}.png"
    images = [a for path in wide_and_tall for a in ("--image", str(path))]
    code = main(["viz", kind, *images, *extra, "--resolution", "native", "--max-patches", "12", "--out", str(out),
                 "--panel-size", "40", *TINY])
    assert code == 0, capsys.readouterr().err
    assert out.is_file()


def test_native_pca_grids_follow_the_aspect_ratio(tmp_path, wide_and_tall, monkeypatch):
    from vlm_encoder.viz import pictures

    seen = {}

    def capture(crops, rgb, **kwargs):
        seen["shapes"] = [tuple(r.shape) for r in rgb]
        seen["crops"] = [c.shape for c in crops]
        return original(crops, rgb, **kwargs)

    original = pictures.pca_figure
    monkeypatch.setattr(pictures, "pca_figure", capture)
    images = [load for load in (Image.open(p).convert("RGB") for p in wide_and_tall)]
    pictures.write_pca_picture(_tiny(), images, layer=-1, path=tmp_path / "p.png", resolution="native", max_patches=12)
    assert seen["shapes"] == [(2, 6, 3), (4, 2, 3)]  # 32x96 and 64x32 fit the 12-patch budget as they are
    assert seen["crops"] == [(32, 96, 3), (64, 32, 3)]
    with pytest.raises(ValueError, match="exclude each other"):
        pictures.write_pca_picture(_tiny(), images, layer=-1, path=tmp_path / "p.png", resolution="native",
                                   image_size=(32, 32))


def test_cli_images_share_one_pca_basis(tmp_path, photo, monkeypatch):
    from vlm_encoder.viz import load_image, pictures, prepare_images

    seen = {}
    original = pictures.pca_figure

    def capture(crops, rgb, **kwargs):
        seen["rgb"] = torch.stack(list(rgb))
        return original(crops, rgb, **kwargs)

    monkeypatch.setattr(pictures, "pca_figure", capture)
    other = tmp_path / "other.png"
    Image.fromarray(np.full((40, 60, 3), 30, np.uint8)).save(other)
    assert main(["viz", "pca", "--image", str(photo), "--image", str(other), "--out", str(tmp_path / "p.png"),
                 *TINY]) == 0
    torch.manual_seed(0)
    encoder = create_encoder("vit_small_patch16_224", depth=2, width=32, num_heads=2, image_size=32).eval()
    pixels, _ = prepare_images([load_image(photo), load_image(other)], encoder)
    with torch.no_grad():
        patches = encoder(pixels, layers=(-1,)).patches(-1)
    torch.testing.assert_close(seen["rgb"], pca_rgb(patches, (2, 2)))  # one basis over both images
    assert not torch.allclose(seen["rgb"][1], pca_rgb(patches[1:], (2, 2))[0], atol=1e-2)  # not one per image


@pytest.mark.parametrize("kind, extra", [("pca", []), ("similarity", ["--point", "80", "10"])])
def test_anyres_shows_the_assembled_unpadded_map(tmp_path, wide_and_tall, monkeypatch, capsys, kind, extra):
    from vlm_encoder.anyres import encode_anyres
    from vlm_encoder.viz import pictures

    seen = {}
    figure = "pca_figure" if kind == "pca" else "similarity_figure"
    original = getattr(pictures, figure)

    def capture(crops, maps, *args, **kwargs):
        seen["maps"] = [tuple(m.shape[:2]) for m in maps]
        seen["crops"] = [c.shape[:2] for c in crops]
        return original(crops, maps, *args, **kwargs)

    monkeypatch.setattr(pictures, figure, capture)
    out = tmp_path / "anyres.png"
    images = [a for path in wide_and_tall for a in ("--image", str(path))]
    code = main(["viz", kind, *images, *extra, "--anyres", "32x64,64x32,64x64", "--out", str(out), "--panel-size",
                 "40", *TINY])
    assert code == 0, capsys.readouterr().err
    assert out.is_file()
    expected = []
    for path in wide_and_tall:
        feats = encode_anyres(_tiny(), Image.open(path).convert("RGB"), [(32, 64), (64, 32), (64, 64)], layer=-1)
        expected.append(tuple(feats.feature_map.shape[1:]))
    assert seen["maps"] == expected and expected[0] != expected[1]
    assert seen["crops"] == [(h * 16, w * 16) for h, w in expected]  # the image drawn at the map's size
    with pytest.raises(SystemExit):
        main(["viz", kind, *images, *extra, "--anyres", "32by64", "--out", str(out), *TINY])
    assert "is not HxW" in capsys.readouterr().err
