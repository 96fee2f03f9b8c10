"""Adversarial training tests (issue 8, items 5-10, 19-21): nothing lost, every error clear.

- Item 5: a save killed between any two checkpoint files (in process, and a real SIGKILL of a
  subprocess) leaves the last complete checkpoint, which resumes to the uninterrupted result;
  each checkpoint file truncated in turn is an error naming it (resume=auto on the newest,
  or an explicit path), or, with `resume_fallback`, a warning and the next older checkpoint.
- Item 6: each state file removed in turn: RNG / sampler state refused unless
  `allow_partial_resume`, the others always an error naming the file.
- Item 7: a logit scale pushed far above ln 100 is clamped; logits and loss finite in bf16 and
  fp16 autocast.
- Item 8: NaN / inf pixels and infinite embeddings (forward hooks) skip the step, log its
  number, keep parameters and optimizer state finite; the next checkpoint loads and resumes.
- Item 9: a batch of one, identical captions, duplicate images: finite, documented losses.
- Item 10: hostile captions through the training data path keep fixed-length ids with the end
  token; captions that are not strings are errors naming the row.
- Items 19-21 (2 processes on 127.0.0.1, hard deadline): a training set not divisible by
  world x batch, evaluation counted once and in dataset order, a failing data loader on one
  rank stopping every rank, a locked image tower unchanged bitwise (feature cache on and off).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from process_helpers import PYTHON, kill_group, run_ranks
from train_helpers import Crash, die_after_checkpoint_file, dies_after

from vlm_encoder.contrastive import ClipLoss, ContrastiveModel, SigLipLoss
from vlm_encoder.encoder import VisionEncoder
from vlm_encoder.presets import preset_config
from vlm_encoder.text import TextEncoder, text_preset_config
from vlm_encoder.train import CheckpointError, TrainConfig, Trainer, list_checkpoints, load_checkpoint, open_pair_source
from vlm_encoder.train import checkpoint as ckpt
from vlm_encoder.train.batches import PairBatches
from vlm_encoder.train.metrics import read_metrics
from vlm_encoder.train.sources import HFSource

HERE = Path(__file__).resolve().parent
RANK_DEADLINE_S = 120.0
VISION = {"image_size": 16, "patch_size": 8, "width": 32, "depth": 1, "num_heads": 2}
TEXT = {"width": 32, "depth": 1, "num_heads": 2, "context_length": 12}
TINY = {
    "data": "builtin:shapes", "data_options": {"num_train": 24, "num_test": 8, "canvas": 16},
    "vision_overrides": VISION, "text_overrides": TEXT, "embed_dim": 16, "batch_size": 8, "lr": 1e-2, "warmup_steps": 2,
    "eval_split": None, "progress": False, "log_every": 1,
}


def tiny_config(tmp_path: Path, **changes) -> TrainConfig:
    return TrainConfig(**{**TINY, "output_dir": str(tmp_path / "run"), **changes})


def tiny_model(objective: str = "clip") -> ContrastiveModel:
    vision = VisionEncoder(preset_config("vit_tiny_patch16_224", **VISION))
    return ContrastiveModel(vision, TextEncoder(text_preset_config("tiny", **TEXT)), 16, objective=objective)


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert torch.equal(value, b[name]), name


def slow(*values):
    """A parametrize case left out of `make test` (run with `make test-all`)."""
    return pytest.param(*values, marks=pytest.mark.slow)


def all_finite(state) -> bool:
    if isinstance(state, torch.Tensor):
        return bool(torch.isfinite(state).all()) if state.is_floating_point() else True
    if isinstance(state, dict):
        return all(all_finite(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return all(all_finite(v) for v in state)
    return True


# ====================================================================== item 5: interrupted saves
STEPS = {"max_steps": 3, "checkpoint_every": 1, "keep_checkpoints": 3}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    trainer = Trainer(tiny_config(tmp_path_factory.mktemp("straight"), **STEPS))
    trainer.fit()
    return params(trainer.model)


# The files of a checkpoint in the order they are written, then the two renames.
PARTS = ["rng_rank0.pt", "model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json",
         "sampler.json", "manifest.json"]


FAST_PARTS = ("model.safetensors", "manifest.json")


@pytest.mark.parametrize("after", [p if p in FAST_PARTS else slow(p) for p in PARTS] + ["renamed"])
def test_save_interrupted_after_any_file_keeps_the_last_checkpoint(tmp_path, monkeypatch, uninterrupted, after):
    config = tiny_config(tmp_path, **STEPS)
    fsync_dir = ckpt._fsync_dir
    target = f".{ckpt.checkpoint_name(2)}.tmp"

    def crash():
        raise Crash(after)

    def fsync_then_crash(path):  # the second directory fsync follows the rename into place
        fsync_dir(path)
        checkpoints = Path(config.output_dir) / "checkpoints"
        if after == "renamed" and Path(path) == checkpoints and (checkpoints / ckpt.checkpoint_name(2)).is_dir():
            raise Crash(after)

    die_after_checkpoint_file(monkeypatch.setattr, 2, after, crash)
    monkeypatch.setattr(ckpt, "_fsync_dir", fsync_then_crash)
    with pytest.raises(Crash):
        Trainer(config).fit()
    monkeypatch.undo()

    checkpoints = Path(config.output_dir) / "checkpoints"
    expected = ["step_00000001", "step_00000002"] if after == "renamed" else ["step_00000001"]
    assert [p.name for p in list_checkpoints(checkpoints)] == expected
    assert (checkpoints / target).is_dir() == (after != "renamed")  # the partial one is left, ignored
    if after != "renamed":  # pointing at the temporary explicitly is a clear error, not a resume
        with pytest.raises(CheckpointError, match="interrupted save"):
            Trainer(config.with_overrides([f"resume={checkpoints / target}"])).fit()
    resumed = Trainer(config)
    result = resumed.fit()
    assert result.resumed_from.name == expected[-1] and result.step == 3
    assert_same_params(uninterrupted, params(resumed.model))  # nothing lost, nothing replayed twice
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")]  # temporaries removed


@pytest.mark.slow  # ~10 s: a fresh interpreter; the in-process crashes above cover every point fast
def test_sigkill_between_checkpoint_files_of_a_real_process(tmp_path, uninterrupted):
    out = tmp_path / "run"
    env = dict(os.environ, KILL_AT_STEP="2", KILL_AFTER_PART="optimizer.pt", OMP_NUM_THREADS="1")
    process = subprocess.Popen([PYTHON, str(HERE / "train_with_faults.py"), str(out), "kill_in_checkpoint"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=RANK_DEADLINE_S)
    finally:
        kill_group(process)
    assert process.returncode == -signal.SIGKILL, output.decode(errors="replace")[-3000:]
    checkpoints = out / "checkpoints"
    partial = checkpoints / ".step_00000002.tmp"
    assert sorted(p.name for p in partial.iterdir()) == ["model.safetensors", "optimizer.pt", "rng_rank0.pt"]
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step_00000001"]
    # The subprocess used train_with_faults' config: resume it here with the same one.
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_with_faults", HERE / "train_with_faults.py")
    faults = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(faults)
    config = faults.config(str(out), max_steps=3, checkpoint_every=1, eval_split=None, cpu=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocess ran: the same rounding
    try:
        straight = Trainer(config.with_overrides([f"output_dir={tmp_path / 'straight'}"]))
        straight.fit()
        resumed = Trainer(config)
        result = resumed.fit()
    finally:
        torch.set_num_threads(threads)
    assert result.resumed_from.name == "step_00000001" and result.step == 3
    assert_same_params(params(straight.model), params(resumed.model))
    assert not partial.exists()


@pytest.fixture
def two_checkpoints(tmp_path):
    config = tiny_config(tmp_path, max_steps=2, checkpoint_every=1, keep_checkpoints=2)
    Trainer(config).fit()
    newest = list_checkpoints(Path(config.output_dir) / "checkpoints")
    assert [p.name for p in newest] == ["step_00000001", "step_00000002"]
    return config.with_overrides(["max_steps=3"]), newest[-1]


@pytest.mark.parametrize("part", [p if p in FAST_PARTS else slow(p) for p in PARTS])
def test_each_truncated_file_is_named_or_skipped_when_falling_back(two_checkpoints, part):
    config, newest = two_checkpoints
    data = (newest / part).read_bytes()
    (newest / part).write_bytes(data[: len(data) // 2])
    # resume=auto on a broken newest checkpoint: an error naming the file and the way out.
    with pytest.raises(CheckpointError, match=rf"{part}.*resume_fallback=true.*step_00000001") as err:
        Trainer(config).fit()
    assert str(newest) in str(err.value) or part == "manifest.json"
    # An explicit path: the same file named, fallback or not.
    with pytest.raises(CheckpointError, match=part):
        Trainer(config.with_overrides([f"resume={newest}", "resume_fallback=true"])).fit()
    # Asked to fall back: the older checkpoint, a warning and a record naming the broken one.
    trainer = Trainer(config.with_overrides(["resume_fallback=true"]))
    with pytest.warns(UserWarning, match=rf"skipping broken checkpoint step_00000002.*{part}"):
        result = trainer.fit()
    assert result.resumed_from.name == "step_00000001" and result.step == 3
    records = read_metrics(trainer.log.path)
    assert [r["checkpoint"] for r in records if r["kind"] == "resume_fallback"] == ["step_00000002"]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]  # step 2 logged once


def test_fallback_with_every_checkpoint_broken_is_an_error(two_checkpoints):
    config, _ = two_checkpoints
    for path in list_checkpoints(Path(config.output_dir) / "checkpoints"):
        (path / "optimizer.pt").write_bytes(b"")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no checkpoint of .* loads"):
        Trainer(config.with_overrides(["resume_fallback=true"])).fit()


def test_corrupt_manifest_entries_are_named(two_checkpoints):
    _, newest = two_checkpoints
    manifest = json.loads((newest / "manifest.json").read_text())
    manifest["files"]["model.safetensors"] = {"bytes": "many"}
    (newest / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="manifest.json is truncated or corrupt"):
        load_checkpoint(newest)


# ================================================================= item 6: missing state files
REQUIRED_PARTS = ["model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "manifest.json"]


@pytest.mark.parametrize("missing", [("rng_rank0.pt",), ("sampler.json",), slow(("rng_rank0.pt", "sampler.json"))])
def test_missing_rng_or_sampler_state_is_refused_unless_accepted(two_checkpoints, missing):
    config, newest = two_checkpoints
    for name in missing:
        (newest / name).unlink()
    with pytest.raises(CheckpointError, match="allow-partial-resume") as err:
        Trainer(config).fit()
    assert all(name in str(err.value) for name in missing)
    with pytest.warns(UserWarning, match=missing[-1]):
        result = Trainer(config.with_overrides(["allow_partial_resume=true"])).fit()
    assert result.resumed_from == newest and result.step == 3


@pytest.mark.parametrize("part, from_manifest_too", [(p, False) if p in FAST_PARTS else slow(p, False) for p in REQUIRED_PARTS] + [
    ("model.safetensors", True), *(slow(p, True) for p in REQUIRED_PARTS[1:-1])])
def test_missing_required_file_is_an_error_even_when_partial_resume_is_allowed(two_checkpoints, part, from_manifest_too):
    config, newest = two_checkpoints
    if from_manifest_too and part != "manifest.json":  # a hand-edited checkpoint: no trace left
        manifest = json.loads((newest / "manifest.json").read_text())
        del manifest["files"][part]
        (newest / "manifest.json").write_text(json.dumps(manifest))
    (newest / part).unlink()
    with pytest.raises(CheckpointError, match=rf"{part} is missing"):
        Trainer(config.with_overrides(["allow_partial_resume=true"])).fit()


# ===================================================================== item 7: logit scale
@pytest.mark.parametrize("pushed", [20.0, 1e4, math.inf])
def test_logit_scale_far_above_ln100_is_clamped_before_and_after_a_step(tmp_path, pushed):
    trainer = Trainer(tiny_config(tmp_path, max_steps=1))
    with torch.no_grad():
        trainer.model.logit_scale.fill_(pushed)
    assert trainer.model.current_logit_scale().item() == pytest.approx(100.0)
    result = trainer.fit()
    assert not result.skipped_steps and math.isfinite(trainer.log.records[0]["loss"])
    assert trainer.model.logit_scale.item() <= math.log(100) + 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("objective", ["clip", "siglip"])
def test_logits_and_loss_are_finite_in_half_precision_with_a_huge_scale(dtype, objective):
    model = tiny_model(objective).train()
    with torch.no_grad():
        model.logit_scale.fill_(1e4)
    pixels = torch.randn(6, 3, 16, 16) * 50  # large inputs too
    tokens = model.text.tokenizer()(["same words"] * 3 + ["other words"] * 3)
    try:
        with torch.autocast("cpu", dtype=dtype):
            out = model(pixels, tokens.input_ids, tokens.attention_mask)
            logits = out.logits_per_image()
            loss = model.build_loss()(out.image_embeds, out.text_embeds, out.logit_scale, out.logit_bias)
    except RuntimeError as err:  # no CPU autocast for this dtype: the model in that dtype instead
        pytest.skip(f"no CPU autocast for {dtype}: {err}")
    assert out.logit_scale.item() == pytest.approx(100.0, rel=1e-2)
    assert torch.isfinite(logits).all() and logits.abs().max() <= 100 * 1.01 + (10 if objective == "siglip" else 0)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.logit_scale.grad.item() == 0  # above the clamp: no gradient pushes it further


def test_bf16_training_step_with_a_huge_scale(tmp_path):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    try:
        trainer = Trainer(tiny_config(tmp_path, max_steps=2, mixed_precision="bf16"))
        with torch.no_grad():
            trainer.model.logit_scale.fill_(1e4)
        result = trainer.fit()
    finally:
        AcceleratorState._reset_state(True)
    assert not result.skipped_steps
    assert all(math.isfinite(r["loss"]) for r in trainer.log.records if r["kind"] == "train")
    assert trainer.model.logit_scale.item() <= math.log(100) + 1e-6
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


# ================================================================== item 8: non-finite batches
NON_FINITE = ("nan_pixels", "inf_pixels", "inf_image_embeds", "inf_text_embeds")


def _poison(trainer: Trainer, at_step: int, how: str) -> None:
    """Make the batch of optimizer step `at_step` non-finite: in its pixels, or by a forward
    hook turning a tower's output infinite."""
    plain = trainer.step_inputs

    def inputs(batch):
        result = plain(batch)
        if trainer.progress.step + 1 == at_step and how in ("nan_pixels", "inf_pixels"):
            value = float("nan") if how == "nan_pixels" else float("inf")
            result.pixel_values = result.pixel_values.clone()
            result.pixel_values[0, 0, 0, 0] = value  # one pixel is enough
        return result

    trainer.step_inputs = inputs

    def hook(module, args, output):
        if trainer.progress.step + 1 == at_step:
            return torch.full_like(output, float("inf"))
        return output

    if how == "inf_image_embeds":
        trainer.model.image_proj.register_forward_hook(hook)
    elif how == "inf_text_embeds":
        trainer.model.text_proj.register_forward_hook(hook)


@pytest.mark.parametrize("how, accum_steps", [(how, 1) for how in NON_FINITE] + [
    *(slow(how, 2) for how in NON_FINITE)])
def test_non_finite_batch_is_skipped_logged_and_the_next_checkpoint_resumes(tmp_path, how, accum_steps):
    steps = {"max_steps": 4, "checkpoint_every": 2, "accum_steps": accum_steps}
    config = tiny_config(tmp_path, **steps)
    trainer = Trainer(config, train_source=dies_after(config, 2))  # killed after step 2
    _poison(trainer, 2, how)
    before = {}
    train_step = trainer.train_step

    def step(inputs):
        if trainer.progress.step == 1:
            before.update(params(trainer.model))
        return train_step(inputs)

    trainer.train_step = step
    with pytest.raises(Crash):
        trainer.fit()
    trainer.log.close()
    assert trainer.progress.step == 2 and trainer.progress.skipped_steps == [2]
    assert_same_params(before, params(trainer.model))  # the skipped step changed nothing
    skipped = [r for r in read_metrics(trainer.log.path) if r["kind"] == "skipped_step"]
    assert [r["step"] for r in skipped] == [2] and "non-finite" in skipped[0]["reason"]
    # The checkpoint written right after the skipped step is valid and finite.
    parts = load_checkpoint(list_checkpoints(trainer.checkpoint_dir)[-1])
    assert parts.trainer_state["step"] == 2 and parts.trainer_state["skipped_steps"] == [2]
    assert all_finite(parts.model) and all_finite(parts.optimizer["state"])
    resumed = Trainer(config)
    result = resumed.fit()
    assert result.resumed_from.name == "step_00000002" and result.step == 4 and result.skipped_steps == [2]
    assert all(torch.isfinite(p).all() for p in resumed.model.parameters())


def test_a_batch_with_no_readable_image_is_a_skipped_step(tmp_path):
    from vlm_encoder.processing import ImageLoadError

    shapes = open_pair_source("builtin:shapes", "train", options=TINY["data_options"])

    class BrokenFirstBatch:
        name, labels, class_names, in_memory = "broken", None, None, False

        def __len__(self):
            return len(shapes)

        def image(self, index):
            if index in first:
                raise ImageLoadError(f"image-{index}.png", "truncated image file")
            return shapes.image(index)

        def captions(self, index):
            return shapes.captions(index)

    config = tiny_config(tmp_path, max_steps=2)
    trainer = Trainer(config, train_source=BrokenFirstBatch())
    first = set(trainer.parts.sampler.batch(0, 0))
    result = trainer.fit()
    assert result.skipped_steps == [1] and result.skipped_images == 8
    assert "no readable image" in next(r for r in trainer.log.records if r["kind"] == "skipped_step")["reason"]


# ======================================================== item 9: degenerate contrastive batches
def _embeds(rows: list[int], dim: int = 8) -> torch.Tensor:
    table = torch.nn.functional.normalize(torch.randn(max(rows) + 1, dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    return table[rows]


def test_degenerate_batches_give_the_documented_losses():
    scale, bias = torch.tensor(10.0), torch.tensor(-5.0)
    one_image, one_text = _embeds([0]), _embeds([1])
    # A batch of one: CLIP's softmax over one logit is 0 exactly; SigLIP is softplus(-(s cos + b)).
    assert ClipLoss()(one_image, one_text, scale).item() == 0.0
    cos = (one_image * one_text).sum()
    assert SigLipLoss()(one_image, one_text, scale, bias).item() == pytest.approx(
        torch.nn.functional.softplus(-(scale * cos + bias)).item(), rel=1e-6)
    # Duplicate images and identical captions: every logit equal, CLIP's loss is log(B).
    for batch in (2, 7):
        images, texts = _embeds([0] * batch), _embeds([1] * batch)
        assert ClipLoss()(images, texts, scale).item() == pytest.approx(math.log(batch), rel=1e-6)
        s = scale * (images[0] * texts[0]).sum() + bias
        expected = torch.nn.functional.softplus(-s) + (batch - 1) * torch.nn.functional.softplus(s)
        assert SigLipLoss()(images, texts, scale, bias).item() == pytest.approx(expected.item(), rel=1e-5)
    # Identical captions only (distinct images): finite, at least log(B) for CLIP's text side.
    images, texts = _embeds(list(range(6))), _embeds([7] * 6)
    loss = ClipLoss()(images, texts, scale)
    assert torch.isfinite(loss) and loss.item() >= math.log(6) / 2 - 1e-6


class ListSource:
    """In-memory pairs: `images[i]` (PIL) with `captions[i]` (a list of strings)."""

    in_memory, labels, class_names, name = True, None, None, "list"

    def __init__(self, images, captions):
        self.images, self._captions = images, captions

    def __len__(self):
        return len(self.images)

    def image(self, index):
        return self.images[index]

    def captions(self, index):
        return self._captions[index]


@pytest.mark.parametrize("objective, case", [("clip", "batch_of_one"), ("clip", "identical_captions_and_images"),
                                             ("siglip", "batch_of_one"), slow("siglip", "identical_captions_and_images")])
def test_degenerate_batches_train_with_finite_losses(tmp_path, objective, case):
    from PIL import Image

    image = Image.new("RGB", (16, 16), (200, 30, 30))
    if case == "batch_of_one":
        shapes = open_pair_source("builtin:shapes", "train", options={"num_train": 3, "canvas": 16})
        source = ListSource([shapes.image(i) for i in range(3)], [shapes.captions(i) for i in range(3)])
        batch = 1
    else:
        source = ListSource([image] * 8, [["a red square"]] * 8)
        batch = 8
    trainer = Trainer(tiny_config(tmp_path, batch_size=batch, max_steps=3, objective=objective), train_source=source)
    result = trainer.fit()
    losses = [r["loss"] for r in trainer.log.records if r["kind"] == "train"]
    assert not result.skipped_steps and len(losses) == 3 and all(math.isfinite(v) for v in losses)
    if objective == "clip":
        expected = 0.0 if batch == 1 else math.log(batch)
        assert losses == pytest.approx([expected] * 3, abs=1e-5)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


# ============================================================ item 10: hostile captions
HOSTILE = {
    "empty": "",
    "long": "a photo of a cat " * 600,  # ~10,000 characters
    "emoji": "\U0001f600\U0001f408\u200d\u2b1b a cat \U0001f3f3\ufe0f\u200d\U0001f308",
    "rtl": "\u0642\u0637\u0629 \u05d7\u05ea\u05d5\u05dc \u202ehidden\u202c",
    "zero_width": "a\u200bc\u200ca\u200dt\ufeff",
    "nul": "a\x00cat\x00",
    "special": "<end_of_text> <start_of_text>",
    "whitespace": " \t\n\r ",
}


def test_hostile_captions_give_fixed_length_ids_through_the_training_batches(tmp_path):
    from PIL import Image

    assert len(HOSTILE["long"]) >= 10_000
    model = tiny_model()
    tokenizer = model.text.tokenizer()
    names = list(HOSTILE)
    source = ListSource([Image.new("RGB", (16, 16), (i * 20, 0, 0)) for i in range(len(names))],
                        [[HOSTILE[n]] for n in names])
    from vlm_encoder.processing import ImageProcessor

    batches = PairBatches(source, ImageProcessor.default_for(model.vision.config), tokenizer, seed=0)
    batch = batches[(0, 0, list(range(len(names))))]
    L = tokenizer.context_length
    assert batch.input_ids.shape == (len(names), L) and batch.attention_mask.shape == (len(names), L)
    for name, ids, mask in zip(names, batch.input_ids.tolist(), batch.attention_mask.tolist()):
        n = sum(mask)
        assert ids[0] == tokenizer.sot_token_id, name
        assert ids[n - 1] == tokenizer.eot_token_id and ids.count(tokenizer.eot_token_id) == 1, name
        assert all(i == 0 for i in ids[n:]) and mask == [1] * n + [0] * (L - n), name
    assert sum(batch.attention_mask[names.index("long")]) == L  # truncated, end token kept
    with torch.no_grad():
        embeds = model.encode_text(batch.input_ids, batch.attention_mask)
    assert torch.isfinite(embeds).all()
    # And a whole training run over them.
    result = Trainer(tiny_config(tmp_path, batch_size=len(names), max_steps=2), train_source=source).fit()
    assert result.step == 2 and not result.skipped_steps


@pytest.mark.parametrize("bad, message", [
    (None, "got NoneType"), (5, "got int"), ([], "no caption"), (["ok", None], "got NoneType"),
])
def test_captions_that_are_not_strings_are_errors_naming_the_row(bad, message):
    import datasets
    from PIL import Image

    data = datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8))] * 3, "text": [["x"]] * 3})
    source = HFSource(data, "pairs[train]", "image", "text")
    source._texts = [["fine"], ["also fine"], bad]  # as read from a column of mixed types (e.g. JSON lines)
    assert source.captions(0) == ["fine"]
    with pytest.raises(ValueError, match=rf"pairs\[train\] row 2, column 'text'.*{message}"):
        source.captions(2)


# ===================================================== items 19-21: two processes, hard deadline
def _ranks(tmp_path: Path, mode: str, **env) -> tuple[list, float, Path]:
    out = tmp_path / "run"
    argv = [PYTHON, str(HERE / "train_with_faults.py"), str(out), mode]
    results, elapsed = run_ranks(argv, 2, RANK_DEADLINE_S, extra_env=env, log_dir=tmp_path / "logs")
    return results, elapsed, out


def _describe(results) -> str:
    return "\n".join(f"--- rank {r.rank} exit {r.returncode}\n{r.output[-2500:]}" for r in results)


@pytest.mark.parametrize("mode", ["lit_uncached", pytest.param("lit_cached", marks=pytest.mark.slow)])
def test_two_processes_uneven_data_and_a_locked_image_tower(tmp_path, mode):
    results, _, out = _ranks(tmp_path, mode)
    assert all(r.returncode == 0 for r in results), _describe(results)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    # 37 samples, 2 x 4 per global batch: 4 batches an epoch, 5 samples left out of each.
    for r in ranks:
        assert r["world"] == 2 and r["step"] == 9
        assert r["frozen_unchanged"] and not r["vision_requires_grad"] and r["head_changed"]
        assert r["eval_image_index"] == list(range(13)) and r["eval_text_owner"] == list(range(13))
        assert r["eval_rows_match_dataset"]  # gathered rows are the dataset's rows: labels line up
        assert r["metrics"]["num_images"] == 13 and r["metrics"]["num_captions"] == 13
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # the ranks stayed in step
    by_epoch: dict[int, list[int]] = {}
    for r in ranks:
        assert [len(indices) for _, indices in r["seen"]] == [4] * 9
        for epoch, indices in r["seen"]:
            by_epoch.setdefault(epoch, []).extend(indices)
    assert sorted(by_epoch) == [0, 1, 2]
    for epoch in (0, 1):  # full epochs: 32 distinct samples, none twice
        assert len(by_epoch[epoch]) == 32 and len(set(by_epoch[epoch])) == 32
    assert (out / "checkpoints" / "step_00000009" / "rng_rank1.pt").is_file()


@pytest.mark.parametrize("fault, fault_rank", [
    ("source_error", "1"),
    pytest.param("source_error", "0", marks=pytest.mark.slow),
    pytest.param("worker_exception", "1", marks=pytest.mark.slow),
    pytest.param("worker_killed", "1", marks=pytest.mark.slow),
])
def test_a_rank_failing_in_its_training_data_stops_every_rank(tmp_path, fault, fault_rank):
    start = time.monotonic()
    results, elapsed, out = _ranks(tmp_path, "fault", FAULT=fault, FAULT_RANK=fault_rank, FAULT_AFTER="6")
    assert all(r.returncode is not None for r in results), f"a rank hung:\n{_describe(results)}"
    assert all(r.returncode != 0 for r in results), _describe(results)
    assert elapsed < RANK_DEADLINE_S and time.monotonic() - start < RANK_DEADLINE_S + 30
    failing = results[int(fault_rank)].output
    expected = "DataLoader worker" if fault == "worker_killed" else "injected: the image storage went away"
    assert expected in failing, failing[-3000:]
    assert not list_checkpoints(out / "checkpoints")  # no checkpoint claims a step that did not finish
