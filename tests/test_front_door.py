"""The front door: every model spec form works in every command it fits, offline, on tiny
models, and every form that does not fit is refused in one line.

Model spec forms: our `save_pretrained` directories (encoder, `ContrastiveModel` export,
`VisionLanguageModel`), an HF directory, a hub id from the Hugging Face cache,
`open_clip:ARCH[:TAG]`, `timm:NAME` and `preset:NAME` with overrides. Commands: `extract`,
`viz`, `info`, `eval` and `train` (`vision_init`, `init_model`).
"""

from __future__ import annotations

import json
import shutil

import huggingface_hub.constants
import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image
from safetensors.torch import save_file

from vlm_encoder import ContrastiveModel, VisionConfig, VisionEncoder, VisionLanguageModel, load_encoder
from vlm_encoder.cli import main
from vlm_encoder.extract import FeatureStore
from vlm_encoder.specs.models import load_model, parse_model_spec
from vlm_encoder.text import TextConfig, TextEncoder

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")

TINY = dict(image_size=32, patch_size=8, width=32, depth=2, num_heads=2)
TINY_TEXT = dict(vocab_size=49408, context_length=12, width=32, depth=1, num_heads=2)
OPEN_CLIP_ARCH = "vlmtest-frontdoor-CLIP"
HUB_ID = "vlmtest/tiny-clip-vision"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """One tiny model in every spec form: {form: spec}."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    VisionEncoder(VisionConfig(**TINY)).save_pretrained(root / "encoder")
    contrastive = ContrastiveModel(VisionEncoder(VisionConfig(**TINY)), TextEncoder(TextConfig(**TINY_TEXT)), 16)
    contrastive.save_pretrained(root / "contrastive")
    from projectors import build_projector

    lm = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=48, n_layer=1, n_head=4, n_positions=128))
    VisionLanguageModel(VisionEncoder(VisionConfig(**TINY)), build_projector("mlp2x_gelu", (32,), 48), lm, 63,
                        (-2,), "patch").save_pretrained(root / "vlm")
    TextEncoder(TextConfig(**TINY_TEXT)).save_pretrained(root / "text")
    hf_config = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=32, patch_size=8)
    tf.CLIPVisionModel(hf_config).save_pretrained(root / "hf_clip")
    tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "hf_clip")
    # A hub repo as `huggingface_hub` caches it: snapshots/<commit>/ and refs/main.
    cache = root / "hub_cache"
    snapshot = cache / f"models--{HUB_ID.replace('/', '--')}" / "snapshots" / ("0" * 40)
    shutil.copytree(root / "hf_clip", snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    # open_clip: a registered tiny architecture and its checkpoint file as the TAG.
    (root / f"{OPEN_CLIP_ARCH}.json").write_text(json.dumps(dict(
        embed_dim=16, vision_cfg=dict(image_size=32, layers=2, width=32, head_width=16, patch_size=8),
        text_cfg=dict(context_length=12, vocab_size=49408, width=32, heads=2, layers=1))))
    open_clip.add_model_config(root / f"{OPEN_CLIP_ARCH}.json")
    oc = open_clip.create_model(OPEN_CLIP_ARCH, pretrained=None)
    save_file({k: v.contiguous() for k, v in oc.state_dict().items()}, str(root / "open_clip.safetensors"))
    tm = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, str(root / "timm.safetensors"))
    return {
        "encoder": str(root / "encoder"),
        "contrastive": str(root / "contrastive"),
        "vlm": str(root / "vlm"),
        "text": str(root / "text"),
        "hf": str(root / "hf_clip"),
        "hub": HUB_ID,
        "open_clip": f"open_clip:{OPEN_CLIP_ARCH}:{root / 'open_clip.safetensors'}",
        "timm": "timm:vit_tiny_patch16_224",
        "preset": "preset:vit_tiny_patch16_224",
        "_hub_cache": str(cache),
        "_timm_checkpoint": str(root / "timm.safetensors"),
    }


@pytest.fixture(autouse=True)
def hub_cache(models, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", models["_hub_cache"])


# Extra arguments each form needs on the command line (a timm architecture's depth comes from its
# checkpoint's name table; a preset is made tiny by overrides).
EXTRA = {
    "timm": lambda m: ["--checkpoint", m["_timm_checkpoint"]],
    "preset": lambda m: [a for k, v in TINY.items() for a in ("--override", f"{k}={v}")],
}
VISION_FORMS = ["encoder", "contrastive", "vlm", "hf", "hub", "open_clip", "timm", "preset"]
CONTRASTIVE_FORMS = ["contrastive", "open_clip"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"img_{i}.png")
    return folder


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _extra(form, models):
    return EXTRA[form](models) if form in EXTRA else []


@pytest.mark.parametrize("form", VISION_FORMS)
def test_extract_takes_every_vision_form(form, models, images, tmp_path, capsys):
    out = tmp_path / "store"
    code, _, err = run(["extract", "--model", models[form], *_extra(form, models), "--dataset", str(images),
                        "--out", str(out), "--layers", "-1", "--no-progress", "--num-workers", "0"], capsys)
    assert code == 0, err
    store = FeatureStore(out)
    assert len(store) == 3
    expected = load_encoder(models[form], **({"checkpoint": models["_timm_checkpoint"]} if form == "timm" else {}),
                            **({"overrides": TINY} if form == "preset" else {}))
    assert store[-1, "cls"].shape[-1] == expected.config.width if expected.config.class_token else True


@pytest.mark.parametrize("form", VISION_FORMS)
def test_viz_takes_every_vision_form(form, models, images, tmp_path, capsys):
    png = tmp_path / "pca.png"
    code, _, err = run(["viz", "pca", "--image", str(images / "img_0.png"), "--model", models[form],
                        *_extra(form, models), "--out", str(png), "--panel-size", "32"], capsys)
    assert code == 0, err
    assert png.is_file() and Image.open(png).size[0] == 64
    assert ("RANDOM WEIGHTS" in err) == (form == "preset")


@pytest.mark.parametrize("form", [*VISION_FORMS, "text"])
def test_info_reads_every_form(form, models, capsys):
    code, out, err = run(["info", models[form], *_extra(form, models), "--json"], capsys)
    assert code == 0, err
    description = json.loads(out)
    kind = {"contrastive": "contrastive", "open_clip": "contrastive", "vlm": "vlm", "text": "text"}.get(form, "encoder")
    assert description["kind"] == kind
    if kind == "contrastive":
        assert description["contrastive"]["embed_dim"] == 16
    if kind == "vlm":
        assert description["vlm"]["feature_layers"] == [0]  # layer -2 of 2 blocks


@pytest.mark.parametrize("form", CONTRASTIVE_FORMS)
def test_eval_takes_contrastive_forms(form, models, capsys):
    code, out, err = run(["eval", models[form], "--data", "builtin:shapes", "--data-option", "num_test=20", "--data-option", "canvas=32",
                          "--split", "test", "--json", "--cpu", "--templates", "a {}"], capsys)
    assert code == 0, err
    metrics = json.loads(out)
    assert 0.0 <= metrics["i2t_R@1"] <= metrics["i2t_R@10"] <= 1.0
    assert "zero-shot accuracy skipped: the data has no labels" in err


@pytest.mark.parametrize("form", ["encoder", "hf", "preset", "text"])
def test_eval_refuses_other_forms_in_one_line(form, models, capsys):
    code, _, err = run(["eval", models[form], "--data", "builtin:digits", "--cpu"], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("vlm-encoder eval: error: ")
    assert "eval takes a contrastive image-text model" in err


def test_extract_refuses_a_text_tower_in_one_line(models, images, tmp_path, capsys):
    code, _, err = run(["extract", "--model", models["text"], "--dataset", str(images), "--out",
                        str(tmp_path / "x")], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "extract takes a model with an image tower" in err


@pytest.mark.parametrize("form", ["encoder", "hf", "hub", "open_clip"])
def test_train_vision_init_takes_vision_forms(form, models, tmp_path, capsys):
    code, _, err = run(["train", f"vision_init={models[form]}", "lock_image=true", "max_steps=1", "batch_size=8",
                        "warmup_steps=1", "eval_split=null", "progress=false", "embed_dim=16", "text_preset=tiny",
                        "text_overrides={width: 32, depth: 1, num_heads: 2, context_length: 12}",
                        "data=builtin:shapes", "data_options={num_train: 16, num_test: 8, canvas: 32}", f"output_dir={tmp_path / 'run'}"], capsys)
    assert code == 0, err
    exported = ContrastiveModel.from_pretrained(tmp_path / "run" / "export" / "model")
    assert exported.vision.config.width == 32


@pytest.mark.parametrize("form", CONTRASTIVE_FORMS)
def test_train_init_model_takes_contrastive_forms(form, models, tmp_path, capsys):
    code, _, err = run(["train", f"init_model={models[form]}", "max_steps=1", "batch_size=8", "warmup_steps=1",
                        "eval_split=null", "progress=false", "data=builtin:shapes", "data_options={num_train: 16, num_test: 8, canvas: 32}",
                        f"output_dir={tmp_path / 'run'}"], capsys)
    assert code == 0, err
    # `info` reads what `train` exports.
    code, out, err = run(["info", str(tmp_path / "run" / "export" / "model"), "--json"], capsys)
    assert code == 0 and json.loads(out)["kind"] == "contrastive", err


def test_train_init_model_refuses_an_encoder_in_one_line(models, tmp_path, capsys):
    code, _, err = run(["train", f"init_model={models['encoder']}", f"output_dir={tmp_path / 'run'}"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "train init_model takes a contrastive image-text model" in err


def test_python_api_resolves_the_same_specs(models):
    for form in ("encoder", "contrastive", "vlm", "hf", "hub"):
        tower = load_encoder(models[form])
        assert isinstance(tower, VisionEncoder) and tower.config.width == 32
        assert tower.image_processor is not None and tower.source_info["source"] == models[form]
    assert load_model(models["contrastive"]).kind == "contrastive"
    assert load_model(models["vlm"]).kind == "vlm"
    assert parse_model_spec("vit_tiny_patch16_224").scheme == "preset"  # a bare preset name
    assert parse_model_spec("open_clip:ViT-B-32:laion2b_s34b_b79k").tag == "laion2b_s34b_b79k"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["info", "./no/such/dir"], "no such directory"),
        (["info", "foo:bar"], "unknown scheme 'foo:'"),
        (["info", "preset:vit_tiny_patch16_22"], "no preset"),
        (["info", "owner/not-cached"], "not in the Hugging Face cache"),
        (["info", "preset:vit_tiny_patch16_224", "--override", "depth=true"], "VisionConfig.depth must be an int"),
        (["info", "preset:vit_tiny_patch16_224", "--override", "depht=2"], "unknown VisionConfig field 'depht'"),
        (["extract", "--model", "preset:vit_tiny_patch16_224", "--dataset", ".", "--out", "/etc/hostname"],
         "is a file; give a directory"),
        (["info", "timm:vit_tiny_patch16_224", "--override", "depth=2"], "overrides apply to preset: models only"),
        (["train", "lock_image='false'"], "lock_image must be true or false"),
        (["train", "class_names=abc"], "class_names must be a list"),
        (["train", "lr=1e-3", "lr=abc"], "lr must be a number"),
        (["train", "--config", "/no/such.yaml"], "does not exist"),
        (["viz", "pca", "--image", "x.png", "--out", "x.png", "--layer"], "expected one argument"),
    ],
)
def test_wrong_input_is_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(argv, capsys)
    assert code == 2
    assert err.count("\n") == 1, err
    assert message in err and err.startswith("vlm-encoder"), err


def test_debug_shows_the_traceback(monkeypatch):
    with pytest.raises(FileNotFoundError):
        main(["--debug", "info", "./no/such/dir"])
    monkeypatch.setenv("VLM_ENCODER_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(["info", "./no/such/dir"])


def test_ctrl_c_is_one_line(monkeypatch, capsys):
    import vlm_encoder.commands.info as info

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(info, "run", interrupted)
    code = main(["info", "x"])
    err = capsys.readouterr().err
    assert code == 130 and err == "vlm-encoder info: interrupted; run the same command to resume\n"


def test_readme_first_snippet_runs_and_every_encoder_has_a_processor():
    """The README's first snippet as written, then with its commented alternative: a preset's
    `image_processor` turns PIL images into the encoder's input."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    encoder = namespace["encoder"]
    photos = [Image.fromarray(np.full((300, 200, 3), i * 40, dtype=np.uint8)) for i in range(4)]
    pixels = encoder.image_processor(photos)
    assert pixels.shape == (4, 3, 224, 224) and pixels.dtype == torch.float32


# ---------------------------------------------------------------- every data spec form, every command
from test_data_specs import FORMS as DATA_FORMS  # noqa: E402
from test_data_specs import root as data_root  # noqa: E402,F401  (a fixture)
from test_data_specs import spec_of  # noqa: E402

CAPTIONED = [form for form, (_, _, _, pair, _) in DATA_FORMS.items() if pair is not None]


def _columns(options: dict, style: str) -> list[str]:
    names = {"image_column": "image-column", "text_column": "text-column", "label_column": "label-column"}
    if style == "flags":
        return [a for k, v in options.items() for a in (f"--{names[k]}", v)]
    return [f"{k}={v}" for k, v in options.items()]


@pytest.mark.parametrize("form", DATA_FORMS)
def test_extract_takes_every_data_form(form, data_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    image_options = DATA_FORMS[form][2]
    preset = [a for k, v in TINY.items() for a in ("--override", f"{k}={v}")]
    code, _, err = run(["extract", "--model", "preset:vit_tiny_patch16_224", *preset, "--dataset",
                        spec_of(data_root, form), *_columns({k: v for k, v in image_options.items()}, "flags"),
                        "--out", str(tmp_path / "store"), "--no-progress", "--num-workers", "0"], capsys)
    assert code == 0, err
    assert len(FeatureStore(tmp_path / "store")) == 4


@pytest.mark.parametrize("form", CAPTIONED)
def test_eval_and_train_take_every_captioned_data_form(form, data_root, models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    spec, pair_options = spec_of(data_root, form), DATA_FORMS[form][3]
    code, out, err = run(["eval", models["contrastive"], "--data", spec, "--split", "train", "--json", "--cpu",
                          "--templates", "a {}", *_columns(pair_options, "flags")], capsys)
    assert code == 0, err
    metrics = json.loads(out)
    has_labels = "label_column" in pair_options or DATA_FORMS[form][1] == "imagefolder"  # class sub-folders
    assert ("zero_shot_top1" in metrics) == has_labels, metrics
    code, _, err = run(["train", f"init_model={models['contrastive']}", f"data={spec}", "max_steps=1",
                        "batch_size=4", "warmup_steps=1", "eval_split=null", "progress=false",
                        *_columns(pair_options, "overrides"), f"output_dir={tmp_path / 'run'}"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("form", [f for f in DATA_FORMS if f not in CAPTIONED])
def test_train_refuses_caption_less_data_in_one_line(form, data_root, tmp_path, capsys):
    code, _, err = run(["train", f"data={spec_of(data_root, form)}", "max_steps=1", f"output_dir={tmp_path}"],
                       capsys)
    assert code == 2 and err.count("\n") == 1 and "caption" in err, err


def test_a_worker_process_error_is_one_line_naming_the_error():
    from vlm_encoder.cli import one_line

    worker = OSError("Caught OSError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                     '  File "x.py", line 1, in f\n    read()\n' + "x" * 900 + "\nOSError: [Errno 5] Input/output error\n")
    text = one_line(worker)
    assert "\n" not in text and text.endswith("OSError: [Errno 5] Input/output error")
    assert text.startswith("Caught OSError in DataLoader worker process 0")


@pytest.mark.parametrize("form", DATA_FORMS)
def test_viz_takes_every_data_form(form, data_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    image_options = DATA_FORMS[form][2]
    preset = [a for k, v in TINY.items() for a in ("--override", f"{k}={v}")]
    png = tmp_path / "pca.png"
    code, out, err = run(["viz", "pca", "--dataset", spec_of(data_root, form), *_columns(image_options, "flags"),
                          "--rows", "0,3", "--model", "preset:vit_tiny_patch16_224", *preset, "--out", str(png),
                          "--panel-size", "32"], capsys)
    assert code == 0, err
    with Image.open(png) as image:  # two rows of panels (rows 0 and 3), each image beside its map
        assert image.size[0] == 64 and image.size[1] >= 2 * 32


def test_viz_refuses_both_or_neither_image_source(data_root, tmp_path, capsys):
    for extra in ([], ["--image", "x.png", "--dataset", str(data_root / "plain")]):
        code, _, err = run(["viz", "pca", *extra, "--out", str(tmp_path / "x.png")], capsys)
        assert code == 2 and "--image FILE (repeatable) or --dataset SPEC" in err, err
    code, _, err = run(["viz", "pca", "--dataset", str(data_root / "plain"), "--rows", "9", "--out",
                        str(tmp_path / "x.png")], capsys)
    assert code == 2 and "out of range" in err
