"""Training data through `datasets`, on real files: the same image-caption pairs written as an
imagefolder (jsonl and csv metadata), parquet (file, glob, folder), csv / tsv / jsonl file
lists, webdataset tar shards and `save_to_disk` folders must read back as the same pairs; a
hub-style repository folder (README `configs:`) loads as the hub would; bad specs are named."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm_encoder.train import TrainConfig, Trainer, open_pair_source

N = 6


def pairs() -> list[tuple[Image.Image, list[str]]]:
    rng = np.random.default_rng(0)
    return [
        (Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)), [f"picture {i}", f"photo {i}"])
        for i in range(N)
    ]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_files(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, (image, _) in enumerate(pairs()):
        image.save(folder / f"{i}.png")
        names.append(f"{i}.png")
    return names


def hf_dataset():
    import datasets

    data = pairs()
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Sequence(datasets.Value("string"))})
    return datasets.Dataset.from_dict(
        {"image": [{"bytes": png_bytes(im), "path": None} for im, _ in data], "text": [c for _, c in data]},
        features=features,
    )


def assert_same_pairs(source, captions_per_image: int = 2) -> None:
    expected = pairs()
    assert len(source) == N
    for i, (image, captions) in enumerate(expected):
        got = source.image(i)
        assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(image)), f"row {i}"
        assert source.captions(i) == captions[:captions_per_image]


# ------------------------------------------------------------- the formats
def test_imagefolder_with_csv_metadata(tmp_path):
    folder = tmp_path / "folder"
    names = write_files(folder)
    with open(folder / "metadata.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", "text"])
        writer.writerows([n, f"picture {i}"] for i, n in enumerate(names))
    assert_same_pairs(open_pair_source(str(folder), "train"), captions_per_image=1)


def test_parquet_file_glob_and_folder(tmp_path):
    shards = tmp_path / "parquet"
    shards.mkdir()
    dataset = hf_dataset()
    dataset.select(range(0, 3)).to_parquet(str(shards / "train-00000.parquet"))
    dataset.select(range(3, N)).to_parquet(str(shards / "train-00001.parquet"))
    assert_same_pairs(open_pair_source(str(shards / "train-*.parquet"), "train"))
    assert_same_pairs(open_pair_source(str(shards), "train"))
    one = tmp_path / "all.parquet"
    dataset.to_parquet(str(one))
    assert_same_pairs(open_pair_source(str(one), "train"))
    assert_same_pairs(open_pair_source(str(one), "validation"))  # a single file is the split asked for


def test_saved_dataset_and_dataset_dict(tmp_path):
    import datasets

    dataset = hf_dataset()
    dataset.save_to_disk(str(tmp_path / "saved"))
    assert_same_pairs(open_pair_source(str(tmp_path / "saved"), "train"))
    datasets.DatasetDict({"train": dataset, "test": dataset.select(range(2))}).save_to_disk(str(tmp_path / "dict"))
    assert_same_pairs(open_pair_source(str(tmp_path / "dict"), "train"))
    assert len(open_pair_source(str(tmp_path / "dict"), "test")) == 2
    with pytest.raises(ValueError, match=r"no split 'validation'; splits: \['test', 'train'\]"):
        open_pair_source(str(tmp_path / "dict"), "validation")


@pytest.mark.parametrize("suffix", ["csv", "tsv", "jsonl"])
def test_file_list_with_relative_image_paths(tmp_path, suffix):
    """open_clip's csv datasets: a table of image paths and captions, paths relative to it."""
    names = write_files(tmp_path / "images")
    rows = [{"filepath": f"images/{n}", "title": f"picture {i}"} for i, n in enumerate(names)]
    path = tmp_path / f"pairs.{suffix}"
    if suffix == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, ["filepath", "title"], delimiter="\t" if suffix == "tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    source = open_pair_source(str(path), "train", image_column="filepath", text_column="title")
    assert_same_pairs(source, captions_per_image=1)


def test_webdataset_shards(tmp_path):
    """img2dataset-style tar shards: `{key}.png` + `{key}.txt` per sample."""
    for shard, rows in enumerate((range(0, 4), range(4, N))):
        with tarfile.open(tmp_path / f"shard-{shard:05d}.tar", "w") as tar:
            for i in rows:
                image, captions = pairs()[i]
                for name, data in ((f"{i:06d}.png", png_bytes(image)), (f"{i:06d}.txt", captions[0].encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    source = open_pair_source(str(tmp_path / "shard-*.tar"), "train", image_column="png", text_column="txt")
    assert_same_pairs(source, captions_per_image=1)
    with pytest.raises(ValueError, match=r"image_column='image' is not a column; columns: \[.*'png'"):
        open_pair_source(str(tmp_path / "shard-*.tar"), "train")


def test_hub_style_repository_folder(tmp_path):
    """A dataset repository as it is on the hub (README `configs:` naming the data files per
    split) loads from a local clone exactly as `load_dataset(owner/name)` reads it."""
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    dataset = hf_dataset()
    dataset.to_parquet(str(repo / "data" / "fit.parquet"))
    dataset.select(range(2)).to_parquet(str(repo / "data" / "heldout.parquet"))
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/fit.parquet\n"
        "  - split: test\n    path: data/heldout.parquet\n---\n# pairs\n"
    )
    assert_same_pairs(open_pair_source(str(repo), "train"))
    assert len(open_pair_source(str(repo), "test")) == 2
    with pytest.raises(ValueError, match=r"no split 'validation'"):
        open_pair_source(str(repo), "validation")


# ---------------------------------------------------------------- errors
def test_bad_specs_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="no file matches"):
        open_pair_source(str(tmp_path / "nothing-*.parquet"), "train")
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        open_pair_source(str(tmp_path / "missing" / "dir"), "train")
    (tmp_path / "x.bin").write_bytes(b"0")
    with pytest.raises(ValueError, match=r"cannot tell the format from the suffix '\.bin'; allowed: \.parquet"):
        open_pair_source(str(tmp_path / "x.bin"), "train")
    with pytest.raises(ConnectionError, match="no-such-owner/no-such-pairs: no local file or folder"):
        open_pair_source("no-such-owner/no-such-pairs", "train")
    with pytest.raises(ValueError, match="streaming=True is not supported"):
        open_pair_source("no-such-owner/no-such-pairs", "train", options={"streaming": True})
    with pytest.raises(ValueError, match="trust_remote_code is not allowed"):
        open_pair_source("no-such-owner/no-such-pairs", "train", options={"trust_remote_code": True})


def test_non_string_caption_is_an_error_naming_the_row(tmp_path):
    import datasets

    path = tmp_path / "bad.parquet"
    datasets.Dataset.from_dict({"image": [png_bytes(pairs()[0][0])] * 2, "text": ["fine", None]}).to_parquet(str(path))
    source = open_pair_source(str(path), "train")
    assert source.captions(0) == ["fine"]
    with pytest.raises(ValueError, match=r"row 1, column 'text'.*got NoneType"):
        source.captions(1)


# ------------------------------------------------------------ end to end
def test_training_reads_a_parquet_folder_and_evaluates_its_test_split(tmp_path):
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    hf_dataset().to_parquet(str(repo / "data" / "train-0.parquet"))
    hf_dataset().to_parquet(str(repo / "data" / "test-0.parquet"))
    config = TrainConfig(
        data=str(repo), eval_split="test", output_dir=str(tmp_path / "run"),
        vision_preset="vit_tiny_patch16_224",
        vision_overrides={"image_size": 16, "patch_size": 8, "width": 32, "depth": 1, "num_heads": 2},
        text_preset="tiny", text_overrides={"width": 32, "depth": 1, "num_heads": 2, "context_length": 12},
        embed_dim=16, batch_size=3, max_steps=2, warmup_steps=1, eval_batch_size=4, progress=False,
    )
    result = Trainer(config).fit()
    assert result.metrics["num_images"] == N and result.metrics["num_captions"] == 2 * N
    assert result.skipped_images == 0


def test_hub_name_loads_from_the_datasets_cache_offline(tmp_path, monkeypatch):
    """A hub name whose dataset was downloaded and prepared once loads offline from the
    `datasets` cache, as it does for a user without network after a first run. The cache entry
    is made the way `datasets` makes one (a prepared parquet build, moved to
    `{owner}___{name}/default/0.0.0/{hash}` with `{name}-{split}.arrow`)."""
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "datasets_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    hf_dataset().to_parquet(str(tmp_path / "train.parquet"))
    datasets.load_dataset("parquet", data_files={"train": str(tmp_path / "train.parquet")}, cache_dir=str(cache))
    (built,) = [p for p in (cache / "parquet").glob("*/*/*") if p.is_dir()]
    entry = cache / "someone___pairs" / "default" / "0.0.0" / built.name
    entry.parent.mkdir(parents=True)
    built.rename(entry)
    (entry / "parquet-train.arrow").rename(entry / "pairs-train.arrow")

    assert_same_pairs(open_pair_source("someone/pairs", "train"))
    with pytest.raises(ValueError, match=r"someone/pairs: no split 'test'"):
        open_pair_source("someone/pairs", "test")
