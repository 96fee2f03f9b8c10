"""Parquet files and webdataset tars read by file and offset (`vlm_encoder.extract.table_sources`):
the same rows, order, image column and cells as `datasets.load_dataset` gives, the same store bytes
as a store written from `datasets`, no Arrow cache, no image read by the plan, a worker opening only
its files, and a file changed or gone since the plan naming itself."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from test_extract import checksums, tiny_config

from vlm_encoder.extract import ExtractPlan, ShardWorker, finalize_extraction, plan_extraction, run_extraction
from vlm_encoder.extract.sources import DatasetSource, _pick_image_column, open_image_source
from vlm_encoder.extract.table_sources import TableSource, tar_samples
from vlm_encoder.specs.data import load_split, parse_data_spec


def image_bytes(i: int, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(i)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20 + i % 3 * 4, 24, 3), dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def cells(n: int) -> list[bytes | None]:
    """`n` images, one missing and one that is not an image."""
    data: list[bytes | None] = [image_bytes(i) for i in range(n)]
    data[6], data[7] = None, b"not an image"
    return data


@pytest.fixture(scope="module")
def parquet(tmp_path_factory) -> Path:
    """Two parquet files (7 + 6 rows, row groups of 3) of a label, an `image` and a `mask` column."""
    folder = tmp_path_factory.mktemp("parquet")
    images = cells(13)
    table = datasets.Dataset.from_dict({
        "label": list(range(13)),
        "image": [None if b is None else {"bytes": b, "path": None} for b in images],
        "mask": [{"bytes": image_bytes(100 + i), "path": None} for i in range(13)],
    }).cast_column("image", datasets.Image()).cast_column("mask", datasets.Image())
    table.select(range(7)).to_parquet(folder / "part-0.parquet", batch_size=3)
    table.select(range(7, 13)).to_parquet(folder / "part-1.parquet", batch_size=3)
    return folder


def add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def webdataset(tmp_path_factory) -> Path:
    """Two tars (8 + 5 samples) of `txt`, `png` and `jpg` members (png is the first image field),
    with a folder entry, hidden files, a sample without png and one whose png is no image."""
    folder = tmp_path_factory.mktemp("webdataset")
    images = cells(13)
    for part, rows in enumerate((range(8), range(8, 13))):
        with tarfile.open(folder / f"shard-{part}.tar", "w") as archive:
            directory = tarfile.TarInfo("samples")
            directory.type = tarfile.DIRTYPE
            archive.addfile(directory)
            add(archive, "samples/.hidden.png", image_bytes(50))
            for i in rows:
                add(archive, f"samples/{i:04d}.txt", f"caption {i}".encode())
                if images[i] is not None:
                    add(archive, f"samples/{i:04d}.png", images[i])
                add(archive, f"samples/{i:04d}.jpg", image_bytes(200 + i, "JPEG"))
            add(archive, "__meta__.json", b"{}")
    return folder


def old_route(spec: str, image_column: str | None = None) -> DatasetSource:
    """The source as `datasets` loads it (what extraction read before `table_sources`)."""
    data = parse_data_spec(spec)
    loaded = load_split(data, None, None)
    column = _pick_image_column(loaded.dataset, image_column, data.canonical)
    return DatasetSource(loaded.dataset, data.canonical, data.file_format or data.kind, loaded.split, column,
                         root=data.root)


@pytest.mark.parametrize("kind,glob", [("parquet", "*.parquet"), ("webdataset", "*.tar")])
@pytest.mark.parametrize("image_column", [None, "mask|jpg"])
def test_rows_equal_the_datasets_route(request, kind, glob, image_column):
    folder = request.getfixturevalue(kind)
    column = None if image_column is None else image_column.split("|")[kind == "webdataset"]
    spec = str(folder / glob)
    new, old = open_image_source(spec, image_column=column), old_route(spec, column)
    assert isinstance(new, TableSource) and new.image_column == old.image_column
    assert new.image_column == (column or {"parquet": "image", "webdataset": "png"}[kind])
    assert len(new) == len(old) == 13
    assert [new.read(i) for i in range(13)] == [old.read(i) for i in range(13)]
    assert [new.name(i) for i in range(13)] == [old.name(i) for i in range(13)]
    assert new.describe() == old.describe()  # `datasets`' fingerprint too: a store begun there continues here
    if column is None:
        assert new.read(6) == b"" and new.read(7) == b"not an image"
    copy = pickle.loads(pickle.dumps(new))  # as DataLoader workers get it: no open files or cached cells
    assert "_cache" not in new.__getstate__() and [copy.read(i) for i in (12, 0)] == [new.read(12), new.read(0)]


def test_a_dataset_folder_of_parquet_files_is_read_by_file(parquet, tmp_path):
    folder = tmp_path / "repo" / "data"
    folder.mkdir(parents=True)
    for path in parquet.iterdir():
        os.symlink(path, folder / path.name.replace("part", "train"))
    new, old = open_image_source(str(tmp_path / "repo")), old_route(str(tmp_path / "repo"))
    assert isinstance(new, TableSource) and new.describe() == old.describe()
    assert [new.read(i) for i in range(13)] == [old.read(i) for i in range(13)]


def test_tar_samples_group_members_as_datasets(webdataset):
    samples = tar_samples(str(webdataset / "shard-0.tar"))
    assert [key for key, _ in samples] == [f"samples/{i:04d}" for i in range(8)]
    assert list(samples[0][1]) == ["txt", "png", "jpg"] and list(samples[6][1]) == ["txt", "jpg"]
    with tarfile.open(webdataset / "dup.tar", "w") as archive:
        add(archive, "a.png", b"1")
        add(archive, "a.png", b"2")
    with pytest.raises(ValueError, match="Duplicate field 'png' for sample 'a'"):
        tar_samples(str(webdataset / "dup.tar"))
    (webdataset / "dup.tar").unlink()


def manifest_without_time(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.pop("created")
    return manifest


@pytest.mark.parametrize("kind,glob", [("parquet", "*.parquet"), ("webdataset", "*.tar")])
def test_the_store_equals_one_written_from_datasets(request, tmp_path, monkeypatch, kind, glob):
    """Extraction from the files (no Arrow cache made) gives the shards of extraction from the
    same rows loaded by `datasets` and saved (`save_to_disk`, a `saved` source), and the store
    (shards and manifest) the `datasets` route writes for the same spec, which it continues."""
    import vlm_encoder.extract.sources as sources

    folder = request.getfixturevalue(kind)
    with monkeypatch.context() as patch:
        patch.setattr(sources, "open_table_source", lambda *args: None)  # the route before table_sources
        assert run_extraction(tiny_config(tmp_path, folder / glob, out="before", shard_size=5)).complete
    loaded = datasets.load_dataset(kind, data_files={"train": str(folder / glob)}, split="train")
    loaded.save_to_disk(tmp_path / "saved")
    assert run_extraction(tiny_config(tmp_path, tmp_path / "saved", out="old", shard_size=5)).complete

    cache = Path(datasets.config.HF_DATASETS_CACHE)
    before = set(cache.rglob("*.arrow")) if cache.exists() else set()
    plan = plan_extraction(tiny_config(tmp_path, folder / glob, out="new", shard_size=5))
    worker = ShardWorker(ExtractPlan.load(plan.out), batch_size=2)
    assert isinstance(worker.encoding.source, TableSource)
    worker.run_many([2, 0, 1])
    summary = finalize_extraction(plan.out)
    assert summary.complete and (summary.rows_written, summary.rows_failed) == (11, 2)
    assert (set(cache.rglob("*.arrow")) if cache.exists() else set()) == before  # no Arrow copy
    assert checksums(tmp_path / "new") == checksums(tmp_path / "old")
    assert (tmp_path / "new" / "failures.jsonl").read_bytes() == (tmp_path / "old" / "failures.jsonl").read_bytes()
    assert manifest_without_time(tmp_path / "new") == manifest_without_time(tmp_path / "before")
    (tmp_path / "before" / "shard-00001.safetensors").unlink()  # begun through `datasets`, finished here
    summary = run_extraction(tiny_config(tmp_path, folder / glob, out="before", shard_size=5))
    assert summary.complete and summary.shards_this_run == 1
    assert checksums(tmp_path / "before") == checksums(tmp_path / "new")


def test_the_plan_reads_no_image_and_a_worker_only_its_files(tmp_path, parquet, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    for path in parquet.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    import pyarrow.parquet as pq

    def no_reading(*args, **kwargs):
        raise AssertionError("the plan read a row group")

    with monkeypatch.context() as patch:
        patch.setattr(pq.ParquetFile, "read_row_group", no_reading)
        patch.setattr(pq.ParquetFile, "iter_batches", no_reading)
        plan = plan_extraction(tiny_config(tmp_path, folder / "*.parquet", shard_size=5))
    index = json.loads((plan.out / "plan-rows" / "files.json").read_text())
    assert [(Path(f["path"]).name, f["rows"], f["groups"]) for f in index["files"]] == \
        [("part-0.parquet", 7, [3, 3, 1]), ("part-1.parquet", 6, [3, 3])]

    # Shard 0 (rows 0-4) lies in part-0: it runs with part-1 gone; shard 2 (rows 10-12) stops naming it.
    original = (folder / "part-1.parquet").read_bytes()
    (folder / "part-1.parquet").unlink()
    worker = ShardWorker(plan)
    assert worker.run(0).rows == 5
    with pytest.raises(FileNotFoundError, match="part-1.parquet existed when the run was planned and is gone"):
        worker.run(2)
    (folder / "part-1.parquet").write_bytes(original + b"\0")
    with pytest.raises(OSError, match="part-1.parquet changed since the run was planned"):
        ShardWorker(plan).run(2)
    (folder / "part-1.parquet").write_bytes(original)
    index["files"][1]["mtime_ns"] = (folder / "part-1.parquet").stat().st_mtime_ns  # the same file restored
    (plan.out / "plan-rows" / "files.json").write_text(json.dumps(index))
    worker = ShardWorker(plan, num_workers=2)  # the source pickled into DataLoader processes
    assert [(r.rows, r.rows_failed) for r in worker.run_many([1, 2])] == [(3, 2), (3, 0)]
    assert finalize_extraction(plan.out).complete


def test_other_sources_stay_with_datasets(tmp_path, parquet):
    """A column of file paths keeps the `datasets` route (which checks each file), as do options."""
    paths = tmp_path / "paths.parquet"
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    datasets.Dataset.from_dict({"file": ["a.png"]}).to_parquet(paths)
    assert isinstance(open_image_source(str(paths), image_column="file"), DatasetSource)
    assert isinstance(open_image_source(str(parquet / "*.parquet"), options={"columns": ["image"]}), DatasetSource)


def test_a_table_of_image_paths_stays_with_datasets(tmp_path):
    """`Image` cells holding paths (what `to_parquet` writes for a column of local files): the
    `datasets` route, which stops the run when a file vanishes mid-run."""
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    table = datasets.Dataset.from_dict({"image": [str(tmp_path / "a.png")] * 3}).cast_column("image", datasets.Image())
    table.to_parquet(tmp_path / "paths.parquet")
    source = open_image_source(str(tmp_path / "paths.parquet"))
    assert isinstance(source, DatasetSource) and source.sizes == [os.path.getsize(tmp_path / "a.png")] * 3
