"""EMA of the weights (`ema_decay`): averaged after every applied step, evaluated and exported,
checkpointed so an interrupted and resumed run equals the uninterrupted one bitwise."""

from __future__ import annotations

import pytest
import torch
from test_train import _train, params, tiny_config
from train_helpers import run_killed_after

from vlm_encoder.contrastive import ContrastiveModel
from vlm_encoder.train import TrainConfig, list_checkpoints

STEPS = dict(max_steps=5, checkpoint_every=2, ema_decay=0.9)


@pytest.mark.slow  # three short runs: ~17 s on 2 cores
def test_ema_resume_is_exact_and_the_export_holds_the_average(tmp_path):
    straight, _ = _train(tiny_config(tmp_path / "a", **STEPS))
    config = tiny_config(tmp_path / "b", **STEPS)
    run_killed_after(config, 3)  # killed after step 3: the last checkpoint is step 2
    assert (list_checkpoints(tmp_path / "b" / "run" / "checkpoints")[-1] / "ema.safetensors").is_file()
    resumed, result = _train(config)
    assert result.resumed_from.name == "step_00000002"
    ema, raw = params(straight.parts.ema.module), params(straight.model)
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)  # the average is not the weights
    got = params(resumed.parts.ema.module)
    for name in ema:
        assert torch.equal(ema[name], got[name]), name
    assert int(resumed.parts.ema.n_averaged) == int(straight.parts.ema.n_averaged) == 5
    exported = params(ContrastiveModel.from_pretrained(tmp_path / "b" / "run" / "export" / "model"))
    for name in ema:
        assert torch.equal(exported[name], got[name]), name


def test_ema_is_evaluated_and_exported(tmp_path):
    trainer, _ = _train(tiny_config(tmp_path, max_steps=2, ema_decay=0.5))
    assert trainer.final_model is trainer.parts.ema.module
    assert int(trainer.parts.ema.n_averaged) == 2
    exported = params(ContrastiveModel.from_pretrained(tmp_path / "run" / "export" / "model"))
    ema, raw = params(trainer.parts.ema.module), params(trainer.model)
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
    assert any(not torch.equal(exported[k], raw[k]) for k in raw)


def test_ema_decay_is_checked():
    with pytest.raises(ValueError, match="ema_decay must be in"):
        TrainConfig(ema_decay=1.0)
