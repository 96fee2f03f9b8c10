"""One data-spec grammar for every command: each form parses to its kind, each wrong form is a
one-line error listing the allowed ones, and the same small dataset written as each form opens
for extraction (image rows) and for training (image-caption pairs, where it has captions) with
the same images in the same order. Labels may be strings; class sub-folders stay labels when a
metadata file holds the captions; a caption column may mix strings and lists."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm_encoder.extract.sources import open_image_source
from vlm_encoder.processing import load_image
from vlm_encoder.specs.data import DataSpec, parse_data_spec
from vlm_encoder.train.sources import open_pair_source

N = 4
CLASSES = ("cat", "dog")  # image i is in class i % 2


def picture(i: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(i).integers(0, 255, (10, 12, 3), dtype=np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def captions(i: int) -> list[str]:
    return [f"picture {i}", f"photo {i}"]


def relative(i: int) -> str:
    return f"{CLASSES[i % 2]}/{i}.png"


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def hf_table():
    import datasets

    features = datasets.Features({
        "image": datasets.Image(), "text": datasets.List(datasets.Value("string")), "label": datasets.Value("string"),
    })
    return datasets.Dataset.from_dict({
        "image": [{"bytes": png_bytes(picture(i)), "path": None} for i in range(N)],
        "text": [captions(i) for i in range(N)],
        "label": [CLASSES[i % 2] for i in range(N)],
    }, features=features)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The same four images, captions and class labels written as every form."""
    import datasets

    root = tmp_path_factory.mktemp("forms")
    meta = root / "meta"  # class sub-folders + metadata.jsonl captions, rows in image order
    for cls in CLASSES:
        (meta / cls).mkdir(parents=True)
    for i in range(N):
        picture(i).save(meta / relative(i))
    write_jsonl(meta / "metadata.jsonl", [{"file_name": relative(i), "text": captions(i)} for i in range(N)])
    (root / "plain").mkdir()
    for i in range(N):
        picture(i).save(root / "plain" / f"{i}.png")
    (root / "images.txt").write_text("".join(f"meta/{relative(i)}\n" for i in range(N)))
    hf_table().to_parquet(str(root / "pairs.parquet"))
    with open(root / "pairs.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filepath", "text", "label"])
        writer.writerows([f"meta/{relative(i)}", captions(i)[0], CLASSES[i % 2]] for i in range(N))
    write_jsonl(root / "pairs.jsonl", [
        {"filepath": f"meta/{relative(i)}", "text": captions(i), "label": CLASSES[i % 2]} for i in range(N)
    ])
    with tarfile.open(root / "shard-00000.tar", "w") as tar:
        for i in range(N):
            for name, data in ((f"{i:06d}.png", png_bytes(picture(i))), (f"{i:06d}.txt", captions(i)[0].encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    table = hf_table()
    table.cast_column("label", datasets.ClassLabel(names=list(CLASSES))).save_to_disk(str(root / "saved"))
    (root / "repo" / "data").mkdir(parents=True)
    table.to_parquet(str(root / "repo" / "data" / "fit.parquet"))
    (root / "repo" / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/fit.parquet\n---\n"
    )
    return root


TABLE = {"image_column": "filepath"}
# spec (relative to root), kind, extraction options, pair options (None: no captions), captions per image
FORMS = {
    "metadata folder": ("meta", "imagefolder", {}, {}, 2),
    "imagefolder:DIR": ("imagefolder:{root}/meta", "imagefolder", {}, {}, 2),
    "plain folder": ("plain", "folder", {}, None, 0),
    "list file": ("images.txt", "list", {}, None, 0),
    "parquet": ("pairs.parquet", "files", {}, {"label_column": "label"}, 2),
    "parquet glob": ("pair?.parquet", "files", {}, {"label_column": "label"}, 2),
    "csv": ("pairs.csv", "files", TABLE, {**TABLE, "label_column": "label"}, 1),
    "jsonl": ("pairs.jsonl", "files", TABLE, {**TABLE, "label_column": "label"}, 2),
    "webdataset": ("shard-*.tar", "files", {}, {"image_column": "png", "text_column": "txt"}, 1),
    "save_to_disk": ("saved", "saved", {}, {"label_column": "label"}, 2),
    "hub-style repository": ("repo", "hub", {}, {"label_column": "label"}, 2),
}


def spec_of(root: Path, form: str) -> str:
    text = FORMS[form][0]
    return text.format(root=root) if "{root}" in text else str(root / text)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("form", FORMS)
def test_each_form_parses_to_its_kind(root, form):
    spec = parse_data_spec(spec_of(root, form))
    assert spec.kind == FORMS[form][1]
    assert spec.local and Path(spec.canonical.removeprefix("imagefolder:")).is_absolute()


@pytest.mark.parametrize("form", FORMS)
def test_each_form_gives_the_same_images_to_extraction_and_training(root, form, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    _, _, image_options, pair_options, per_image = FORMS[form]
    expected = [pixels(picture(i)) for i in range(N)]  # a plain folder is sorted by name: 0.png .. 3.png
    rows = open_image_source(spec_of(root, form), **image_options)
    assert len(rows) == N
    for i in range(N):
        assert np.array_equal(pixels(load_image(rows.read(i))), expected[i]), f"{form}: extraction row {i}"
    if pair_options is None:
        with pytest.raises(ValueError, match=r"has no captions \(no column 'text'\); put a metadata.jsonl") as err:
            open_pair_source(spec_of(root, form), "train")
        assert "\n" not in str(err.value)
        return
    pairs = open_pair_source(spec_of(root, form), "train", **pair_options)
    assert len(pairs) == N
    for i in range(N):
        assert np.array_equal(pixels(pairs.image(i)), expected[i]), f"{form}: pair row {i}"
        assert pairs.captions(i) == captions(i)[:per_image]
    if form != "webdataset":  # every other form carries the class of each image
        assert pairs.labels == [i % 2 for i in range(N)] and tuple(pairs.class_names) == CLASSES


def test_builtin_images_are_the_same_rows_for_extraction_and_training():
    rows = open_image_source("builtin:digits", split="test")
    pairs = open_pair_source("builtin:digits", "test")
    assert len(rows) == len(pairs) == 360 and rows.describe()["kind"] == "builtin"
    for i in (0, 1, 359):
        assert np.array_equal(np.asarray(load_image(rows.read(i))), pairs.image(i))
    assert rows.describe() == open_image_source("builtin:digits", split="test").describe()


def test_hub_names_parse_without_reading():
    assert parse_data_spec("owner/name") == DataSpec("hub", "owner/name", text="owner/name")
    spec = parse_data_spec("mnist:plain")
    assert (spec.kind, spec.location, spec.config_name, spec.canonical) == ("hub", "mnist", "plain", "mnist:plain")
    assert not spec.local and spec.root is None
    assert parse_data_spec("builtin:shapes").kind == "builtin"


@pytest.mark.parametrize("text, error, message", [
    ("", ValueError, "empty data spec; allowed: "),
    ("builtin:nope", ValueError, "unknown builtin dataset 'builtin:nope'; allowed: builtin:digits, builtin:shapes"),
    ("imagefolder:{root}/missing", FileNotFoundError, "no such folder"),
    ("{root}/x.bin", ValueError, r"unknown kind: cannot tell the format from the suffix '\.bin'; allowed: \.parquet"),
    ("{root}/nothing-*.parquet", FileNotFoundError, "no file matches"),
    ("{root}/missing/dir", FileNotFoundError, r"no such file or directory \(and not a hub name"),
    ("./missing", FileNotFoundError, "no such file or directory"),
    ("owner/name/extra", FileNotFoundError, "not a hub name such as owner/name"),
    ("two words", FileNotFoundError, "allowed: .*imagefolder:DIR"),
])
def test_wrong_forms_are_one_line_errors(tmp_path, text, error, message):
    (tmp_path / "x.bin").write_bytes(b"0")
    with pytest.raises(error, match=message) as err:
        parse_data_spec(text.format(root=tmp_path))
    assert "\n" not in str(err.value)


def test_data_spec_is_validated():
    with pytest.raises(ValueError, match="kind 'zip' is not one of"):
        DataSpec("zip", "x")
    with pytest.raises(ValueError, match="config_name is for hub specs only"):
        DataSpec("folder", "/x", config_name="c")


def test_string_labels_follow_class_names(root, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    spec = str(root / "pairs.parquet")
    pairs = open_pair_source(spec, "train", label_column="label", class_names=("dog", "cat"))
    assert pairs.labels == [1, 0, 1, 0] and pairs.class_names == ("dog", "cat")
    with pytest.raises(ValueError, match=r"labels \['dog'\] are not in class_names \['cat', 'bird'\]"):
        open_pair_source(spec, "train", label_column="label", class_names=("cat", "bird"))


def test_mixed_string_and_list_captions_with_sub_folder_labels(tmp_path, monkeypatch):
    """docs/training.md's metadata.jsonl: one caption cell a string, another a list (pyarrow
    cannot type that column); the class sub-folders still give the labels."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "mixed" / "train"
    for cls in CLASSES:
        (folder / cls).mkdir(parents=True)
    rows = []
    for i in range(N):
        picture(i).save(folder / relative(i))
        rows.append({"file_name": relative(i), "text": captions(i)[0] if i % 2 else captions(i)})
    write_jsonl(folder / "metadata.jsonl", rows)
    table = tmp_path / "mixed.jsonl"
    write_jsonl(table, [{"path": f"mixed/train/{r['file_name']}", "text": r["text"]} for r in rows])
    expected_captions = [captions(i)[0:1] if i % 2 else captions(i) for i in range(N)]
    for spec, options in ((str(tmp_path / "mixed"), {}), (f"imagefolder:{tmp_path / 'mixed'}", {}),
                          (str(table), {"image_column": "path"})):
        pairs = open_pair_source(spec, "train", **options)
        rows_ = open_image_source(spec, **options)
        assert [pairs.captions(i) for i in range(N)] == expected_captions, spec
        for i in range(N):
            assert np.array_equal(pixels(pairs.image(i)), pixels(picture(i)))
            assert np.array_equal(pixels(load_image(rows_.read(i))), pixels(picture(i)))
        if not spec.endswith(".jsonl"):
            assert pairs.labels == [0, 1, 0, 1] and pairs.class_names == CLASSES
    # The rows read here get a fingerprint of the files' content (not a random one), so an
    # extraction of them resumes.
    first, again = (open_image_source(str(tmp_path / "mixed")).describe() for _ in range(2))
    assert first == again


def test_a_plain_folder_with_class_sub_folders_stays_a_file_list(root):
    """Without a metadata file, a folder is its image files (what extraction always read);
    `imagefolder:DIR` asks `datasets` for the class labels instead."""
    folder = root / "meta"
    assert parse_data_spec(str(folder / "cat")).kind == "folder"
    rows = open_image_source(str(folder / "cat"))
    assert [rows.name(i) for i in range(len(rows))] == ["0.png", "2.png"]
    assert rows.describe()["kind"] == "folder"


def test_a_json_reader_that_cannot_type_mixed_captions_falls_back_to_json(tmp_path, monkeypatch):
    """Older `datasets` releases fail on a jsonl whose caption cells mix strings and lists, as
    the imagefolder metadata reader still does; the rows are then read with `json`."""
    import datasets
    import pyarrow as pa

    load_dataset = datasets.load_dataset

    def strict_json(path, *args, **kwargs):
        if path == "json":
            raise pa.ArrowInvalid("JSON parse error: Column(/text) changed from string to array in row 1")
        return load_dataset(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", strict_json)
    (tmp_path / "images").mkdir()
    for i in range(N):
        picture(i).save(tmp_path / "images" / f"{i}.png")
    write_jsonl(tmp_path / "a.jsonl", [{"path": f"images/{i}.png", "text": captions(i)[0] if i % 2 else captions(i)}
                                       for i in range(N)])
    pairs = open_pair_source(str(tmp_path / "a.jsonl"), "train", image_column="path")
    assert [pairs.captions(i) for i in range(N)] == [captions(i)[:1] if i % 2 else captions(i) for i in range(N)]
    assert np.array_equal(pixels(pairs.image(3)), pixels(picture(3)))
