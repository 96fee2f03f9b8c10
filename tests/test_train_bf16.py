"""`mixed_precision="bf16"` through the Trainer on the CPU: accelerate's CPU autocast runs the
towers in bfloat16 (no gradient scaler: bf16 has float32's range), the master weights stay
float32, and an interrupted bf16 run resumed from its checkpoint equals the straight run bitwise.
The digits quality under bf16 is in `test_train_quality.py` (slow)."""

from __future__ import annotations

import pytest
import torch
from accelerate.state import AcceleratorState

from vlm_encoder.train import Trainer
from vlm_encoder.train.checkpoint import SCALER_FILE

from test_train import params, tiny_config
from train_helpers import run_killed_after


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def bf16_config(tmp_path, **changes):
    return tiny_config(tmp_path, mixed_precision="bf16", cpu=True, **changes)


def test_bf16_runs_the_towers_in_bfloat16_with_fp32_master_weights(tmp_path):
    trainer = Trainer(bf16_config(tmp_path, max_steps=2))
    assert trainer.accelerator.device.type == "cpu" and trainer.accelerator.scaler is None
    dtypes = []
    hooks = [tower.blocks[0].mlp.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
             for tower in (trainer.model.vision, trainer.model.text)]
    before = params(trainer.model)
    result = trainer.fit()
    for hook in hooks:
        hook.remove()
    assert dtypes and set(dtypes) == {torch.bfloat16}  # both towers ran under bfloat16 autocast
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # master weights
    assert result.skipped_steps == []  # no scaler, no skipped step
    after = params(trainer.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.slow
def test_bf16_run_killed_and_resumed_equals_the_straight_run(tmp_path):
    changes = dict(max_steps=8, checkpoint_every=3, keep_checkpoints=5)
    full = Trainer(bf16_config(tmp_path / "full", **changes))
    full.fit()
    AcceleratorState._reset_state(True)
    run_killed_after(bf16_config(tmp_path / "cut", **changes), 5)  # last checkpoint: step 3
    checkpoints = sorted((tmp_path / "cut" / "run" / "checkpoints").iterdir())
    assert checkpoints and not any((c / SCALER_FILE).exists() for c in checkpoints)
    AcceleratorState._reset_state(True)
    resumed = Trainer(bf16_config(tmp_path / "cut", **changes))
    resumed.fit()
    assert resumed.progress.step == full.progress.step == 8
    a, b = params(full.model), params(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
