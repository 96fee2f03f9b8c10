"""Adversarial training tests, round 2 (issue 14, items 5-7): a resume with a changed config,
the run directory, metrics that lie.

- Item 5: a resumable change (lr, weight_decay, min_lr, max_steps) takes effect from the resumed
  step and is logged, `config.yaml` holds it; a change outside `RESUMABLE_FIELDS` (batch_size,
  the architecture) is refused before anything is written, naming the field and both values; a
  model of another architecture is an error listing the keys, not a `load_state_dict` traceback.
- Item 6: a torn last line of `metrics.jsonl` is dropped on resume; a run killed before its first
  checkpoint starts over without the killed run's records; pruning killed midway leaves no
  half-deleted `step_*`; `checkpoints/` that is a file or unwritable fails before the first step.
- Item 7: class names that do not name every label are refused; retrieval ties count against
  the model; a run whose every step was skipped fails (exit status 2) and exports nothing.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from train_helpers import Crash, run_killed_after

from vlm_encoder.train import TrainConfig, Trainer, list_checkpoints, open_pair_source, retrieval_recall
from vlm_encoder.train import checkpoint as ckpt
from vlm_encoder.train.build import lr_factor
from vlm_encoder.train.evaluate import embed_source
from vlm_encoder.train.metrics import read_metrics

from test_training import TEXT, TINY, VISION, tiny_config  # noqa: E402,F401  (the same tiny run)



def train_steps(config: TrainConfig) -> list[int]:
    return [r["step"] for r in read_metrics(Path(config.output_dir) / "metrics.jsonl") if r["kind"] == "train"]


@pytest.fixture
def two_steps(tmp_path) -> TrainConfig:
    """A finished 2-step run, checkpointed at each step."""
    config = tiny_config(tmp_path, max_steps=2, checkpoint_every=1, min_lr=1e-3, weight_decay=0.1)
    Trainer(config).fit()
    return config


# ============================================================ item 5: resume with a changed config
def test_resumable_changes_take_effect_are_logged_and_saved(two_steps, capsys):
    config = two_steps.with_overrides(["max_steps=4", "lr=0.02", "min_lr=0.005", "weight_decay=0.3"])
    trainer = Trainer(config)
    trainer.fit()
    run = Path(config.output_dir)
    # The lr of each resumed step follows the new config's schedule (peak 0.02, floor 0.005 at
    # step 4): not the old base lr, not the old base times the new floor ratio.
    lrs = {r["step"]: r["lr"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"}
    for step in (3, 4):
        assert lrs[step] == pytest.approx(0.02 * lr_factor(step, warmup_steps=2, total_steps=4, min_ratio=0.25))
    assert lrs[4] == pytest.approx(0.005)
    groups = trainer.parts.optimizer.param_groups
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.3] and all(g["initial_lr"] == 0.02 for g in groups)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["lr"], saved["min_lr"], saved["weight_decay"], saved["max_steps"]) == (0.02, 0.005, 0.3, 4)
    resume = next(r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "resume")
    assert resume["changed"]["lr"] == {"old": 0.01, "new": 0.02}
    assert resume["changed"]["weight_decay"] == {"old": 0.1, "new": 0.3}
    assert "lr 0.01 -> 0.02" in capsys.readouterr().err


@pytest.mark.parametrize("override, field, old, new", [
    ("batch_size=4", "batch_size", "8", "4"),
    ("vision_overrides.width=64", "vision_overrides", "'width': 32", "'width': 64"),
    ("seed=3", "seed", "0", "3"),
])
def test_a_refused_change_names_both_values_and_writes_nothing(two_steps, override, field, old, new):
    run = Path(two_steps.output_dir)
    before = {name: (run / name).read_bytes() for name in ("config.yaml", "metrics.jsonl")}
    config = two_steps.with_overrides(["max_steps=3", override])
    with pytest.raises(ValueError, match=rf"changed {field} .*{old}.* -> .*{new}.*may change on resume") as err:
        Trainer(config).fit()
    assert "lr" in str(err.value)  # the resumable fields are listed
    assert {name: (run / name).read_bytes() for name in before} == before
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000001", "step_00000002"]


def test_a_model_of_another_architecture_is_an_error_listing_the_keys(two_steps):
    from vlm_encoder.contrastive import ContrastiveModel
    from vlm_encoder.encoder import VisionEncoder
    from vlm_encoder.presets import preset_config
    from vlm_encoder.text import TextEncoder, text_preset_config

    vision = VisionEncoder(preset_config("vit_tiny_patch16_224", **{**VISION, "width": 64}))
    other = ContrastiveModel(vision, TextEncoder(text_preset_config("tiny", **TEXT)), 16)
    with pytest.raises(ValueError, match=r"another architecture.*other shapes, checkpoint vs model.*\(32.*\) vs \(64"):
        Trainer(two_steps.with_overrides(["max_steps=3"]), model=other).fit()


# ============================================================ item 6: the run directory
def test_a_torn_last_metrics_line_is_dropped_on_resume(two_steps):
    log = Path(two_steps.output_dir) / "metrics.jsonl"
    with open(log, "a") as handle:
        handle.write('{"kind": "train", "step": 3, "lo')  # a full disk, a power cut
    assert [r["step"] for r in read_metrics(log) if r["kind"] == "train"] == [1, 2]
    Trainer(two_steps.with_overrides(["max_steps=3"])).fit()
    assert train_steps(two_steps) == [1, 2, 3]
    assert all(line.startswith("{") and line.endswith("}") for line in log.read_text().splitlines())


def test_a_broken_line_before_the_last_is_an_error_naming_file_and_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"kind": "train", "step": 1}\n{"kind": "tr\n{"kind": "train", "step": 2}\n')
    with pytest.raises(ValueError, match=rf"{log} line 2 is not a JSON record"):
        read_metrics(log)


def test_a_run_killed_before_its_first_checkpoint_starts_over_without_its_records(tmp_path):
    config = tiny_config(tmp_path, max_steps=3)  # checkpoint only at the end
    run_killed_after(config, 2)
    assert train_steps(config) == [1, 2] and not list_checkpoints(Path(config.output_dir) / "checkpoints")
    result = Trainer(config).fit()
    assert result.resumed_from is None and train_steps(config) == [1, 2, 3]


def test_pruning_killed_midway_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, max_steps=3, checkpoint_every=1, keep_checkpoints=2)
    rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):  # deletes one file of step 1, then the process dies
        path = Path(path)
        if "step_00000001" in path.name and (path / "model.safetensors").exists():
            (path / "model.safetensors").unlink()
            raise Crash(f"killed while deleting {path}")
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_midway)
    with pytest.raises(Crash):
        Trainer(config).fit()
    monkeypatch.undo()
    checkpoints = Path(config.output_dir) / "checkpoints"
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step_00000002", "step_00000003"]
    for path in list_checkpoints(checkpoints):
        ckpt.verify_checkpoint(path)
    result = Trainer(config.with_overrides(["max_steps=4"])).fit()
    assert result.resumed_from.name == "step_00000003" and result.step == 4
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000003", "step_00000004"]  # temporaries gone


def test_checkpoints_that_is_a_file_fails_before_the_first_step(tmp_path):
    config = tiny_config(tmp_path, max_steps=2)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("not a directory")
    with pytest.raises(OSError, match=r"checkpoints is a file, not a directory"):
        Trainer(config).fit()
    assert train_steps(config) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only directories")
def test_unwritable_checkpoints_fails_before_the_first_step(tmp_path):
    config = tiny_config(tmp_path, max_steps=2)
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    folder.chmod(0o555)
    try:
        with pytest.raises(OSError, match=r"checkpoints is not writable"):
            Trainer(config).fit()
    finally:
        folder.chmod(0o755)
    assert train_steps(config) == []


# ============================================================ item 7: metrics that lie
def test_class_names_that_do_not_name_every_label_are_refused(tmp_path):
    import datasets

    from vlm_encoder.train.sources import HFSource

    with pytest.raises(ValueError, match=r"3 class_names .* do not name labels \[3, 4, 5, 6, 7, 8, 9\]"):
        open_pair_source("builtin:digits", "test", class_names=("zero", "one", "two"))
    table = datasets.Dataset.from_dict({"image": ["a.png"] * 4, "text": ["x"] * 4, "label": [0, 1, 2, 3]})
    with pytest.raises(ValueError, match=r"do not name labels \[2, 3\]"):
        HFSource(table, "table", "image", "text", "label", class_names=("a", "b"))
    with pytest.raises(ValueError, match="do not name labels"):  # evaluation given a source in Python
        Trainer(tiny_config(tmp_path, max_steps=1), eval_source=_Source(["x"] * 4, labels=[0, 1, 2, 3],
                                                                         class_names=("a", "b"))).fit()


def test_retrieval_ties_count_against_the_model():
    one = torch.nn.functional.normalize(torch.ones(4, 8), dim=-1)  # a constant model: every score ties
    metrics = retrieval_recall(one, one, torch.arange(4), ks=(1,))
    assert metrics == {"i2t_R@1": 0.0, "t2i_R@1": 0.0}
    images = torch.eye(3)
    texts = torch.eye(3)[[0, 0, 2]]  # images 0 and 1 share a caption (as a class name would)
    metrics = retrieval_recall(images, texts, torch.tensor([0, 1, 2]), ks=(1, 2))
    assert metrics["i2t_R@1"] == pytest.approx(1 / 3)  # image 0 ties with image 1's caption: a miss
    assert metrics["i2t_R@2"] == pytest.approx(2 / 3)


class _Source:
    """Images of distinct colours with the given captions (a `PairSource`)."""

    name, in_memory = "colours", True

    def __init__(self, captions: list[str], labels: list[int] | None = None, class_names=None) -> None:
        self._captions, self.labels, self.class_names = captions, labels, class_names

    def __len__(self) -> int:
        return len(self._captions)

    def image(self, index: int):
        from PIL import Image

        return Image.new("RGB", (16, 16), (index * 40 % 256, 90, 200 - index * 20))

    def captions(self, index: int) -> list[str]:
        return [self._captions[index]]


def test_repeated_captions_get_identical_embeddings_and_tie(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, max_steps=1))
    source = _Source(["a cat", "a dog", "a cat", "a cat", "a dog"])
    p = trainer.parts
    embeds = embed_source(p.model, source, p.processor, p.tokenizer, batch_size=2, progress=False)
    texts = embeds.text_embeds
    assert torch.equal(texts[0], texts[2]) and torch.equal(texts[0], texts[3]) and torch.equal(texts[1], texts[4])
    # Each image has a twin caption elsewhere that ties with its own: no image can be found at 1.
    assert retrieval_recall(embeds.image_embeds, texts, embeds.text_owner, ks=(1,))["i2t_R@1"] == 0.0


def test_a_run_whose_every_step_was_skipped_fails_and_exports_nothing(tmp_path, capsys):
    from vlm_encoder.cli import main

    folder = tmp_path / "pairs"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.png").write_bytes(b"<html>not an image</html>")
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": f"{i}.png", "text": f"c {i}"})
                                                     for i in range(4)))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**TINY, "data": str(folder), "data_options": {}, "batch_size": 4,
                                    "max_steps": 2, "output_dir": str(tmp_path / "run")}))
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "every one of the run's 2 steps was skipped" in err and "no readable image" in err
    assert not (tmp_path / "run" / "export").exists()
