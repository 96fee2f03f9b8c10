"""Dataset specs `extract` reads: a folder, a list file, a saved `datasets` dataset, parquet,
`imagefolder:DIR`; each gives the same features for the same images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_extract import make_images, tiny_config

from vlm_encoder import FeatureStore
from vlm_encoder.extract import open_image_source, run_extraction

N = 7


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("data") / "images", N)


@pytest.fixture(scope="module")
def folder_store(tmp_path_factory, images):
    tmp = tmp_path_factory.mktemp("folder")
    assert run_extraction(tiny_config(tmp, images, select=("cls", "patch"))).complete
    return FeatureStore(tmp / "out")


def assert_same_features(store: FeatureStore, reference: FeatureStore) -> None:
    assert len(store) == len(reference) == N
    for key in reference.keys:
        torch.testing.assert_close(store[key][:], reference[key][:], rtol=0, atol=0)


def test_folder_is_sorted_and_recursive(tmp_path, images):
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x").mkdir(parents=True)
    for name in ("b/1.jpg", "a/x/2.PNG", "a/0.jpg"):
        (tmp_path / name).write_bytes((images / "img_000.jpg").read_bytes())
    (tmp_path / "notes.txt").write_text("not an image")
    source = open_image_source(str(tmp_path))
    assert [source.name(i) for i in range(len(source))] == ["a/0.jpg", "a/x/2.PNG", "b/1.jpg"]


def test_list_file(tmp_path, images, folder_store):
    listing = tmp_path / "list.txt"
    names = sorted(p.name for p in images.iterdir())
    listing.write_text("# images\n" + "\n".join(str(images / n) for n in names) + "\n\n")
    assert run_extraction(tiny_config(tmp_path, listing, select=("cls", "patch"))).complete
    assert_same_features(FeatureStore(tmp_path / "out"), folder_store)


def test_saved_dataset_and_parquet(tmp_path, images, folder_store):
    from datasets import Dataset, Image

    paths = sorted(str(p) for p in images.iterdir())
    dataset = Dataset.from_dict({"label": list(range(N)), "picture": paths}).cast_column("picture", Image())
    dataset.save_to_disk(str(tmp_path / "saved"))
    assert run_extraction(tiny_config(tmp_path, tmp_path / "saved", out="a", select=("cls", "patch"))).complete
    store = FeatureStore(tmp_path / "a")
    assert store.manifest["fingerprint"]["dataset"]["image_column"] == "picture"
    assert_same_features(store, folder_store)

    embedded = Dataset.from_dict({"image": [{"bytes": Path(p).read_bytes(), "path": None} for p in paths]})
    embedded = embedded.cast_column("image", Image())
    embedded.to_parquet(str(tmp_path / "images.parquet"))
    assert run_extraction(tiny_config(tmp_path, tmp_path / "images.parquet", out="b", select=("cls", "patch"))).complete
    assert_same_features(FeatureStore(tmp_path / "b"), folder_store)


def test_imagefolder(tmp_path, images, folder_store, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    source = open_image_source(f"imagefolder:{images}")
    assert len(source) == N and source.kind == "imagefolder"
    config = tiny_config(tmp_path, f"imagefolder:{images}", select=("cls", "patch"))
    assert run_extraction(config).complete
    store = FeatureStore(tmp_path / "out")
    # imagefolder orders its rows itself: compare each row with the folder run's row of the same image.
    names = [source.read(i) for i in range(N)]
    by_name = {open_image_source(str(images)).read(i): i for i in range(N)}
    for row, name in enumerate(names):
        expected = folder_store.get(by_name[name])
        got = store.get(row)
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_bad_specs_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such"):
        open_image_source(str(tmp_path / "missing" / "dir"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no image files"):
        open_image_source(str(tmp_path / "empty"))
    (tmp_path / "data.bin").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown kind"):
        open_image_source(str(tmp_path / "data.bin"))
