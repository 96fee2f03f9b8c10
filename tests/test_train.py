"""Training: gradient accumulation, exact resume, strict checkpoints, the non-finite guard, LiT
feature caching, config round trip, evaluation, data sources and the commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from train_helpers import run_killed_after

from vlm_encoder.contrastive import ContrastiveModel
from vlm_encoder.encoder import VisionEncoder
from vlm_encoder.presets import preset_config
from vlm_encoder.text import TextEncoder, text_preset_config
from vlm_encoder.train import CheckpointError, TrainConfig, Trainer, list_checkpoints, open_pair_source
from vlm_encoder.train.evaluate import retrieval_recall, shard
from vlm_encoder.train.metrics import read_metrics
from vlm_encoder.train.step import ContrastiveForward, StepInputs, loss_and_backward

TINY = dict(
    data="builtin:shapes",
    data_options={"num_train": 40, "num_test": 13, "canvas": 16},
    vision_preset="vit_tiny_patch16_224",
    vision_overrides={"image_size": 16, "patch_size": 8, "width": 32, "depth": 1, "num_heads": 2},
    text_preset="tiny",
    text_overrides={"width": 32, "depth": 1, "num_heads": 2, "context_length": 12},
    embed_dim=16,
    batch_size=8,
    lr=1e-2,
    warmup_steps=2,
    eval_split=None,
    progress=False,
    log_every=1,
)


def tiny_config(tmp_path: Path, **changes) -> TrainConfig:
    return TrainConfig(**{**TINY, "output_dir": str(tmp_path / "run"), **changes})


def tiny_model(objective: str = "clip") -> ContrastiveModel:
    vision = VisionEncoder(preset_config("vit_tiny_patch16_224", **TINY["vision_overrides"]))
    text = TextEncoder(text_preset_config("tiny", **TINY["text_overrides"]))
    return ContrastiveModel(vision, text, 16, objective=objective)


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# ---------------------------------------------------------------- accumulation
@pytest.mark.parametrize("objective", ["clip", "siglip"])
@pytest.mark.parametrize("locked", [False, True])
def test_grad_accumulation_equals_full_batch(objective, locked):
    model = tiny_model(objective).double()
    if locked:
        model.freeze_vision()
    tokens = model.text.tokenizer()([f"caption number {i}" for i in range(12)])
    pixels = torch.randn(12, 3, 16, 16, dtype=torch.float64)
    forward, loss_fn = ContrastiveForward(model), model.build_loss()
    inputs = StepInputs(tokens.input_ids, tokens.attention_mask, pixel_values=pixels)

    full_loss, _ = loss_and_backward(forward, loss_fn, inputs, accum_steps=1)
    full = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    accum_loss, _ = loss_and_backward(forward, loss_fn, inputs, accum_steps=3)
    accum = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    assert torch.allclose(full_loss, accum_loss, rtol=0, atol=1e-12)
    assert full.keys() == accum.keys() and "logit_scale" in full
    for name in full:
        assert torch.allclose(full[name], accum[name], rtol=1e-9, atol=1e-12), name
    # Micro-batches alone (no shared negatives) would give other gradients: the test can fail.
    model.zero_grad(set_to_none=True)
    for part in inputs.split(3):
        loss_and_backward(forward, loss_fn, part, accum_steps=1)
    alone = model.text_proj.weight.grad
    assert not torch.allclose(alone, full["text_proj.weight"], atol=1e-6)


# ----------------------------------------------------------------- resume
def _train(config: TrainConfig, **kwargs) -> tuple[Trainer, object]:
    trainer = Trainer(config, **kwargs)
    return trainer, trainer.fit()


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
    steps = dict(max_steps=7, checkpoint_every=2, accum_steps=2, keep_checkpoints=2)
    straight, _ = _train(tiny_config(tmp_path / "a", **steps))
    config = tiny_config(tmp_path / "b", **steps)
    first = run_killed_after(config, 5)  # killed after step 5: last checkpoint is step 4
    assert [p.name for p in list_checkpoints(first.checkpoint_dir)] == ["step_00000002", "step_00000004"]
    resumed, result = _train(config)
    assert result.resumed_from.name == "step_00000004" and result.step == 7
    expected, got = params(straight.model), params(resumed.model)
    changed = params(tiny_model())  # a fresh init differs, so equality is meaningful
    assert any(not torch.equal(expected[k], changed[k]) for k in expected)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert list_checkpoints(resumed.checkpoint_dir)[-1].name == "step_00000007"
    assert len(list_checkpoints(resumed.checkpoint_dir)) == 2  # keep the last k
    # The replayed step 5 is logged once.
    train_steps = [r["step"] for r in read_metrics(tmp_path / "b" / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert train_steps == list(range(1, 8))


@pytest.fixture
def checkpointed(tmp_path):
    config = tiny_config(tmp_path, max_steps=2, checkpoint_every=2)
    trainer, _ = _train(config)
    return config, list_checkpoints(trainer.checkpoint_dir)[-1]


@pytest.mark.parametrize("part", ["model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"])
def test_truncated_or_missing_checkpoint_part_is_named(checkpointed, part):
    config, path = checkpointed
    more = config.with_overrides(["max_steps=3"])
    data = (path / part).read_bytes()
    (path / part).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=part):
        Trainer(more).fit()
    (path / part).unlink()
    with pytest.raises(CheckpointError, match=f"{part} is missing"):
        Trainer(more).fit()


def test_missing_manifest_is_an_error(checkpointed):
    config, path = checkpointed
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        Trainer(config.with_overrides(["max_steps=3"])).fit()


@pytest.mark.parametrize("part", ["rng_rank0.pt", "sampler.json"])
def test_missing_rng_or_sampler_state_refused_unless_allowed(checkpointed, part):
    config, path = checkpointed
    (path / part).unlink()
    with pytest.raises(CheckpointError, match="allow-partial-resume"):
        Trainer(config.with_overrides(["max_steps=3"])).fit()
    with pytest.warns(UserWarning, match=part):
        result = Trainer(config.with_overrides(["max_steps=3", "allow_partial_resume=true"])).fit()
    assert result.step == 3


def test_resume_never_refuses_a_directory_with_checkpoints(checkpointed):
    config, _ = checkpointed
    with pytest.raises(ValueError, match="already holds checkpoints"):
        Trainer(config.with_overrides(["resume=never", "max_steps=3"])).fit()


# ----------------------------------------------------------- non-finite guard
def test_nan_batch_is_skipped_and_logged(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, max_steps=3))
    plain = trainer.step_inputs

    def poisoned(batch):
        inputs = plain(batch)
        if trainer.progress.step == 1:  # the batch of step 2
            inputs.pixel_values = torch.full_like(inputs.pixel_values, float("nan"))
        return inputs

    before = {}
    trainer.step_inputs = poisoned
    original_step = trainer.train_step

    def step(inputs):
        if trainer.progress.step == 1:
            before.update(params(trainer.model))
        result = original_step(inputs)
        if trainer.progress.step == 2:
            after = params(trainer.model)
            assert all(torch.equal(before[k], after[k]) for k in before)  # parameters untouched
        return result

    trainer.train_step = step
    result = trainer.fit()
    assert result.skipped_steps == [2]
    skipped = [r for r in read_metrics(trainer.log.path) if r["kind"] == "skipped_step"]
    assert [r["step"] for r in skipped] == [2]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_non_finite_starting_weights_are_refused_by_name(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.logit_scale.fill_(float("nan"))
    model.save_pretrained(tmp_path / "bad")
    with pytest.raises(ValueError, match=rf"init_model {tmp_path / 'bad'} has non-finite .* logit_scale"):
        Trainer(tiny_config(tmp_path, init_model=str(tmp_path / "bad"), max_steps=1)).fit()


def test_logit_scale_is_clamped_in_place(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, max_steps=1))
    with torch.no_grad():
        trainer.model.logit_scale.fill_(9.0)
    trainer.fit()
    assert trainer.model.logit_scale.item() <= trainer.model.max_logit_scale + 1e-6


# ----------------------------------------------------------------- LiT
def test_locked_image_tower_runs_once_per_image_and_stays_frozen(tmp_path):
    model = tiny_model()
    rows = []
    model.vision.register_forward_hook(lambda module, args, kwargs_out: rows.append(args[0].shape[0]))
    frozen = {k: v.clone() for k, v in model.vision.state_dict().items()}
    proj = model.image_proj.weight.detach().clone()
    trainer = Trainer(tiny_config(tmp_path, lock_image=True, epochs=3), model=model)
    trainer.fit()
    assert sum(rows) == 40  # 40 training images, once each, over 3 epochs
    assert all(torch.equal(frozen[k], v) for k, v in model.vision.state_dict().items())
    assert not model.vision.training and all(not p.requires_grad for p in model.vision.parameters())
    assert not torch.equal(proj, model.image_proj.weight)  # the new head trains


def test_locked_image_features_that_are_not_finite_are_left_out_and_counted(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, lock_image=True, max_steps=6))
    plain = trainer.model.vision.image_embeds
    calls = []

    def poisoned(pixels):
        out = plain(pixels)
        if not calls:  # the first cached batch starts with image 0
            out = out.clone()
            out[0] = float("nan")
        calls.append(out.shape[0])
        return out

    trainer.model.vision.image_embeds = poisoned
    result = trainer.fit()
    assert not trainer.feature_cache.valid[0] and trainer.feature_cache.valid[1:].all()
    assert result.skipped_images == 1 and result.skipped_steps == []
    skipped = [r for r in read_metrics(trainer.log.path) if r["kind"] == "skipped_image"]
    assert [(r["index"], r["reason"]) for r in skipped] == [(0, "non-finite features from the locked image tower")]
    assert torch.isfinite(trainer.feature_cache.features).all()


def test_tensorboard_scalars_match_the_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = Trainer(tiny_config(tmp_path, max_steps=3, eval_split="test", eval_every=3))
    trainer.fit()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    records = read_metrics(trainer.log.path)
    losses = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in logged] == [s for s, _ in losses] == [1, 2, 3]
    assert [v for _, v in logged] == pytest.approx([v for _, v in losses], rel=1e-6)
    assert any(tag.startswith("eval/") for tag in events.Tags()["scalars"])


def test_lit_from_a_pretrained_image_tower(tmp_path):
    """`vision_init` loads the tower through `load_encoder`; its own preprocessing is used,
    the tower stays bitwise frozen and the export carries the preprocessing."""
    from vlm_encoder.processing import ImageProcessor, ProcessorConfig

    tower = VisionEncoder(preset_config("vit_tiny_patch16_224", **TINY["vision_overrides"]))
    tower.image_processor = ImageProcessor(ProcessorConfig(resize_mode="exact", size=16, mean=(0.4, 0.5, 0.6),
                                                           std=(0.2, 0.2, 0.2)))
    tower.save_pretrained(tmp_path / "tower")
    config = tiny_config(tmp_path, vision_init=str(tmp_path / "tower"), lock_image=True, max_steps=3)
    trainer = Trainer(config)
    assert trainer.parts.processor == tower.image_processor
    trainer.fit()
    for name, value in tower.state_dict().items():
        assert torch.equal(trainer.model.vision.state_dict()[name], value), name
    exported = ContrastiveModel.from_pretrained(tmp_path / "run" / "export" / "model")
    assert exported.vision.image_processor == tower.image_processor
    with pytest.raises(ValueError, match="init_model and vision_init both given"):
        tiny_config(tmp_path, vision_init=str(tmp_path / "tower"), init_model=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="vision_checkpoint is set without vision_init"):
        tiny_config(tmp_path, vision_checkpoint="w.safetensors")


# ---------------------------------------------------------------- config
def test_config_yaml_overrides_and_resolved_copy(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**TINY, "output_dir": str(tmp_path / "run"), "max_steps": 1}))
    config = TrainConfig.from_yaml(path).with_overrides(["lr=0.002", "vision_overrides.depth=2", "templates=['a {}']"])
    assert config.lr == 0.002 and config.vision_overrides["depth"] == 2 and config.templates == ("a {}",)
    assert config.vision_overrides["width"] == 32  # other keys kept
    Trainer(config).fit()
    assert TrainConfig.from_yaml(tmp_path / "run" / "config.yaml") == config
    with pytest.raises(ValueError, match="unknown TrainConfig field 'lrr'"):
        config.with_overrides(["lrr=1"])
    with pytest.raises(ValueError, match="divisible by accum_steps"):
        config.with_overrides(["accum_steps=3"])
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"nope": 1})


# -------------------------------------------------------------- evaluation
def test_eval_counts_each_image_once_when_not_divisible(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, eval_split="test", eval_batch_size=4, max_steps=1))
    result = trainer.fit()
    assert result.metrics["num_images"] == 13 and result.metrics["num_captions"] == 13
    assert {r["kind"] for r in read_metrics(trainer.log.path)} >= {"train", "eval"}
    assert (tmp_path / "run" / "plots" / "loss.png").is_file()
    for tower in ("model", "vision", "text"):
        assert (tmp_path / "run" / "export" / tower / "model.safetensors").is_file()
    assert sorted(i for r in range(3) for i in shard(13, r, 3)) == list(range(13))


def test_retrieval_recall_on_known_similarities():
    images = torch.eye(4)
    texts = torch.eye(4)[[0, 1, 2, 3, 1]]  # the last caption also describes image 1
    owner = torch.tensor([0, 1, 2, 3, 2])  # ... but is labelled as image 2's
    metrics = retrieval_recall(images, texts, owner, ks=(1, 2))
    assert metrics["t2i_R@1"] == pytest.approx(4 / 5)
    assert metrics["i2t_R@1"] == pytest.approx(3 / 4)  # image 1's caption ties image 2's: against the model


def test_digits_zero_shot_metrics_exist(tmp_path):
    config = tiny_config(tmp_path, data="builtin:digits", data_options={}, eval_split="test", max_steps=1,
                         vision_overrides={**TINY["vision_overrides"], "image_size": 16}, batch_size=16)
    result = Trainer(config).fit()
    assert result.metrics["num_images"] == 360
    assert 0.0 <= result.metrics["zero_shot_top1"] <= 1.0


# ------------------------------------------------------------------ data
def test_builtin_sources():
    digits = open_pair_source("builtin:digits", "test")
    assert len(digits) == 360 and len(open_pair_source("builtin:digits", "train")) == 1437
    assert digits.captions(0)[0].startswith("a photo of the digit")
    a = open_pair_source("builtin:shapes", "train", options={"num_train": 5, "canvas": 32, "seed": 3})
    b = open_pair_source("builtin:shapes", "train", options={"num_train": 5, "canvas": 32, "seed": 3})
    test = open_pair_source("builtin:shapes", "test", options={"num_test": 5, "canvas": 32, "seed": 3})
    assert a.captions(0) == b.captions(0) and a.image(0).tobytes() == b.image(0).tobytes()
    assert [a.captions(i) for i in range(5)] != [test.captions(i) for i in range(5)]
    assert a.image(0).size == (32, 32)
    with pytest.raises(ValueError, match="unknown builtin"):
        open_pair_source("builtin:nope", "train")


def test_imagefolder_with_captions_skips_and_counts_unreadable_images(tmp_path):
    from PIL import Image

    folder = tmp_path / "pairs"
    folder.mkdir()
    rows = []
    for i in range(9):
        Image.new("RGB", (20, 20), (i * 20, 100, 200 - i * 20)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": [f"colour {i}", f"shade {i}"]})
    (folder / "broken.png").write_bytes(b"<html>not an image</html>")
    rows.append({"file_name": "broken.png", "text": ["broken"]})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    config = tiny_config(tmp_path, data=str(folder), data_options={}, batch_size=10, max_steps=2,
                         eval_split="train", eval_batch_size=4)
    trainer = Trainer(config)
    result = trainer.fit()
    assert result.skipped_images >= 1
    assert result.metrics["skipped_images"] == 1 and result.metrics["num_images"] == 9
    assert result.metrics["num_captions"] == 18  # several captions per image
    assert any(r["kind"] == "skipped_image" and "broken.png" in r["reason"] for r in read_metrics(trainer.log.path))


# -------------------------------------------------------------- commands
def test_train_and_eval_commands(tmp_path, capsys):
    from vlm_encoder.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**TINY, "output_dir": str(tmp_path / "run"), "max_steps": 2}))
    assert main(["train", "--config", str(path), "batch_size=4"]) == 0
    assert "run directory" in capsys.readouterr().out
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["batch_size"] == 4
    model_dir = tmp_path / "run" / "export" / "model"
    assert main(["eval", str(model_dir), "--data", "builtin:shapes", "--data-option", "num_test=13",
                 "--data-option", "canvas=16", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["num_images"] == 13 and "t2i_R@10" in metrics


@pytest.mark.parametrize("accum_steps", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_compiled_training_forward_matches_eager(tmp_path, accum_steps):
    """`compile: true` on the CPU (inductor): the whole training forward is one graph, and the
    parameters after a few steps equal the eager run's to float tolerance, with and without
    GradCache accumulation."""
    import torch._dynamo

    steps = dict(max_steps=3, accum_steps=accum_steps)
    eager, _ = _train(tiny_config(tmp_path / "eager", **steps))
    torch._dynamo.reset()
    compiled, _ = _train(tiny_config(tmp_path / "compiled", compile=True, **steps))
    a, b = params(eager.model), params(compiled.model)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-4, rtol=1e-4, msg=name)
    explanation = torch._dynamo.explain(compiled.parts.bare_forward._orig_mod)(
        torch.randint(1, 100, (4, 12)).index_fill_(1, torch.tensor([11]), 49407), torch.ones(4, 12, dtype=torch.long),
        pixel_values=torch.randn(4, 3, 16, 16),
    )
    assert explanation.graph_break_count == 0


def test_grad_checkpointing_run_equals_the_plain_run(tmp_path):
    """`grad_checkpointing: true` recomputes the blocks of both towers in the backward pass
    (with GradCache accumulation on top): the parameters after training equal the plain run's."""
    steps = dict(max_steps=3, accum_steps=2)
    plain, _ = _train(tiny_config(tmp_path / "plain", **steps))
    checkpointed, _ = _train(tiny_config(tmp_path / "ckpt", grad_checkpointing=True, **steps))
    assert checkpointed.model.vision.grad_checkpointing and checkpointed.model.text.grad_checkpointing
    a, b = params(plain.model), params(checkpointed.model)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=1e-6, msg=name)


def test_hugging_face_text_tower_trains_through_the_config(tmp_path):
    """`text_model`: a local HF model directory (a tiny BERT) as the text tower, pooled by
    `text_pooling`; it trains, evaluates, exports and loads back."""
    from transformers import BertConfig, BertModel, BertTokenizer

    from vlm_encoder.text import HFTextEncoder

    bert = tmp_path / "bert"
    bert.mkdir()
    words = sorted({w for c in ("red green blue yellow purple white circle square triangle above below left right "
                                "of a an the").split() for w in [c]})
    (bert / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizer(str(bert / "vocab.txt")).save_pretrained(str(bert))
    BertModel(BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(str(bert))
    config = tiny_config(tmp_path, text_model=str(bert), text_pooling="cls", max_steps=3, eval_split="test",
                         eval_batch_size=8)
    trainer = Trainer(config)
    assert isinstance(trainer.model.text, HFTextEncoder) and trainer.model.text.config.pooling == "cls"
    before = params(trainer.model)
    result = trainer.fit()
    assert not result.skipped_steps and "i2t_R@1" in result.metrics
    after = params(trainer.model)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("text."))
    exported = ContrastiveModel.from_pretrained(tmp_path / "run" / "export" / "model")
    assert isinstance(exported.text, HFTextEncoder)
    tower = HFTextEncoder.from_pretrained(tmp_path / "run" / "export" / "text")  # a plain HF directory + pooling
    assert tower.config.pooling == "cls" and tower.config.context_length == 12
    tokens = tower.tokenizer()(["a red circle above a blue square"])
    trainer.model.text.eval()
    with torch.no_grad():
        torch.testing.assert_close(tower(tokens.input_ids, tokens.attention_mask).pooled,
                                   trainer.model.text(tokens.input_ids, tokens.attention_mask).pooled, rtol=0, atol=0)
    with pytest.raises(ValueError, match="text_pooling must be one of 'mean', 'cls', got the string 'max'"):
        tiny_config(tmp_path, text_model=str(bert), text_pooling="max")


def test_a_resume_is_announced_and_lit_caching_and_eval_show_progress(tmp_path, capsys):
    """A resumed run says where it resumed from; LiT's feature caching and the evaluation show
    progress bars (on stderr, with `progress`)."""
    config = tiny_config(tmp_path, max_steps=2, checkpoint_every=2, lock_image=True, eval_split="test",
                         eval_batch_size=8, progress=True)
    _train(config)
    first = capsys.readouterr().err
    assert "caching LiT image features" in first and "eval" in first and "resuming from" not in first
    _train(config.with_overrides(["max_steps=3"]))
    err = capsys.readouterr().err
    assert "resuming from" in err and "at step 2 of 3" in err


# ------------------------------------------------------------ CPU GEMM route
def test_fast_cpu_route_trains_as_the_plain_route(tmp_path):
    from vlm_encoder.cpu_speed import PackedLinear, fast_cpu_available

    if not fast_cpu_available():
        pytest.skip("torch built without oneDNN")
    runs, before = {}, {}
    for fast in (True, False):
        trainer = Trainer(tiny_config(tmp_path / str(fast), max_steps=4, fast_cpu=fast))
        before[fast] = params(trainer.parts.model)
        trainer.fit()
        packed = [m for m in trainer.parts.bare_forward.modules() if isinstance(m, PackedLinear)]
        assert bool(packed) == fast  # the route is on by default on the CPU, off when asked
        assert not any(isinstance(m, PackedLinear) for m in trainer.parts.model.modules())  # saved model untouched
        runs[fast] = params(trainer.parts.model)
    for name in runs[True]:  # same start, same steps: only the order of the sums differs
        assert torch.equal(before[True][name], before[False][name]), name
        assert torch.allclose(runs[True][name], runs[False][name], rtol=1e-4, atol=1e-5), name
    assert max((runs[True][k] - before[True][k]).abs().max() for k in runs[True]) > 1e-3  # the steps moved it
