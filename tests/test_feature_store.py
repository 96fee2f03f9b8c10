"""`FeatureStore`: the public reader of what `extract` writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_extract import make_images, tiny_config
from torch.utils.data import DataLoader

from vlm_encoder import FeatureStore
from vlm_encoder.extract import run_extraction


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("store")
    images = make_images(tmp / "images", 10, bad=True)  # rows 10..13 fail
    assert run_extraction(tiny_config(tmp, images, shard_size=3)).complete
    return FeatureStore(tmp / "out")


def test_size_rows_and_keys(store):
    assert len(store) == 10
    assert store.row_ids.tolist() == list(range(10))
    assert store.layers == [1, 2]
    assert sorted(store.keys) == ["embeds", "layer1.cls", "layer1.patch", "layer2.cls", "layer2.patch", "pooled"]
    assert store[-1, "patch"].shape == (10, 16, 32)
    assert len(store.failures) == 4
    assert "FeatureStore" in repr(store)


def test_get_and_slicing_agree(store):
    column = store[-2, "patch"]
    assert column is not None and store.key(-2, "patch") == store.key(1, "patch") == "layer1.patch"
    everything = column[:]
    assert everything.shape == (10, 16, 32)
    for row in (0, 2, 3, 9):  # first, end and start of a shard, last
        got = store.get(row)
        torch.testing.assert_close(got["layer1.patch"], everything[row], rtol=0, atol=0)
        torch.testing.assert_close(store[None, "pooled"][row], got["pooled"], rtol=0, atol=0)
    torch.testing.assert_close(column[2:7], everything[2:7], rtol=0, atol=0)  # spans shards
    torch.testing.assert_close(column[[9, 0, 4]], everything[[9, 0, 4]], rtol=0, atol=0)
    torch.testing.assert_close(column[::4], everything[::4], rtol=0, atol=0)
    torch.testing.assert_close(column[-1], everything[9], rtol=0, atol=0)
    assert column[5:5].shape == (0, 16, 32)
    with pytest.raises(IndexError):
        column[10]
    with pytest.raises(KeyError, match="not in the store"):
        store.get(11)  # a failed row
    with pytest.raises(KeyError, match="layer0.cls"):
        store[0, "cls"]
    with pytest.raises(ValueError, match="unknown kind"):
        store[0, "tokens"]


def test_torch_dataset_view(store):
    labels = np.arange(100) * 10
    dataset = store.dataset(-1, "cls", labels=labels)
    assert len(dataset) == 10
    features, label = dataset[4]
    assert features.shape == (32,) and label == 40
    batches = list(DataLoader(dataset, batch_size=4, num_workers=1))
    assert torch.cat([f for f, _ in batches]).shape == (10, 32)
    torch.testing.assert_close(torch.cat([f for f, _ in batches]), store[-1, "cls"][:], rtol=0, atol=0)
    means = store.dataset(-2, "patch", transform=lambda t: t.mean(0))
    torch.testing.assert_close(means[3], store[-2, "patch"][3].mean(0))


def test_export_to_datasets_and_parquet(store, tmp_path):
    from datasets import Dataset

    dataset = store.to_hf_dataset(layers=[-1], kinds=["cls", "pooled"])
    assert sorted(dataset.column_names) == ["layer2.cls", "pooled", "row_id"]
    assert dataset["row_id"][:3] == [0, 1, 2]
    np.testing.assert_array_equal(np.asarray(dataset[5]["layer2.cls"], dtype=np.float32), store[-1, "cls"][5].numpy())
    path = store.to_parquet(tmp_path / "f.parquet", kinds=["patch"])
    loaded = Dataset.from_parquet(str(path))
    assert len(loaded) == 10 and "layer1.patch" in loaded.column_names


def test_parquet_export_is_written_one_shard_at_a_time(store, tmp_path):
    import pyarrow.parquet as pq

    path = store.to_parquet(tmp_path / "all.parquet")
    file = pq.ParquetFile(path)
    assert file.num_row_groups == len(store.shard_ranges()) > 1  # one per shard that holds rows
    assert file.read().equals(store.to_hf_dataset().data.table)  # the same columns, types and values
    assert [p.name for p in tmp_path.iterdir()] == ["all.parquet"]  # no partial file left beside it
    assert store.shard_ranges()[0][0] == 0 and store.shard_ranges()[-1][1] == len(store)
    part = store.to_hf_dataset(kinds=["cls"], start=3, stop=7)
    assert part["row_id"] == store.row_ids[3:7].tolist()
    np.testing.assert_array_equal(np.asarray(part["layer1.cls"], dtype=np.float32), store[-2, "cls"][3:7].numpy())
    with pytest.raises(ValueError, match="not within the store's 10 rows"):
        store.to_hf_dataset(start=5, stop=11)


def test_verify_and_incomplete_store(store, tmp_path):
    assert store.verify() == []
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(store.path, copy)
    data = bytearray((copy / "shard-00001.safetensors").read_bytes())
    data[-3] ^= 1
    (copy / "shard-00001.safetensors").write_bytes(bytes(data))
    assert FeatureStore(copy).verify() == ["shard-00001.safetensors"]
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["complete"] = False
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="incomplete"):
        FeatureStore(copy)
    assert len(FeatureStore(copy, allow_incomplete=True)) == 10
    with pytest.raises(FileNotFoundError, match="manifest"):
        FeatureStore(tmp_path)
