"""`mixed_precision="fp16"` through the Trainer on the CPU: float16 autocast with a gradient
scaler (accelerate alone would train in float32 and keep no scaler), overflow steps skipped
with the scale lowered and the parameters untouched, the scaler state checkpointed and an
interrupted fp16 run resumed bitwise."""

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


def fp16_config(tmp_path, **changes):
    return tiny_config(tmp_path, mixed_precision="fp16", **changes)


def test_fp16_runs_in_float16_with_a_scaler(tmp_path):
    trainer = Trainer(fp16_config(tmp_path, max_steps=10))
    assert isinstance(trainer.accelerator.scaler, torch.amp.GradScaler)
    dtypes = []
    block = trainer.model.vision.blocks[0].mlp
    handle = block.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    before = params(trainer.model)
    result = trainer.fit()
    handle.remove()
    assert dtypes and set(dtypes) == {torch.float16}  # the towers ran under float16 autocast
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # master weights stay fp32
    # The scaler starts at 2**16 and halves on each overflow, as on a GPU: the first steps are
    # skipped until the scale fits, then every step is taken.
    skipped = result.skipped_steps
    assert skipped == list(range(1, len(skipped) + 1)) and len(skipped) < 10
    assert trainer.accelerator.scaler.get_scale() == 2.0 ** (16 - len(skipped))
    after = params(trainer.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_overflow_step_is_skipped_and_the_scale_lowered(tmp_path):
    trainer = Trainer(fp16_config(tmp_path, max_steps=1))
    scaler = trainer.accelerator.scaler
    scaler._init_scale = 2.0**60  # fp16 gradients overflow at this scale
    before = params(trainer.model)
    with pytest.raises(ValueError, match="every one of the run's 1 steps was skipped"):  # nothing trained
        trainer.fit()
    assert trainer.progress.skipped_steps == [1]
    assert scaler.get_scale() == 2.0**59  # backoff factor 0.5
    after = params(trainer.model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_fp16_checkpoint_holds_the_scaler_and_resumes_bitwise(tmp_path):
    # The first steps overflow until the scale fits (test above); 14 steps take some updates.
    changes = dict(max_steps=14, checkpoint_every=3, keep_checkpoints=5)
    full = Trainer(fp16_config(tmp_path / "full", **changes))
    full.fit()
    assert len(full.progress.skipped_steps) < 14
    AcceleratorState._reset_state(True)
    run_killed_after(fp16_config(tmp_path / "cut", **changes), 7)
    checkpoints = sorted((tmp_path / "cut" / "run" / "checkpoints").iterdir())
    assert checkpoints and all((c / SCALER_FILE).is_file() for c in checkpoints)
    saved = torch.load(checkpoints[-1] / SCALER_FILE, weights_only=True)
    assert saved["scale"] > 0
    AcceleratorState._reset_state(True)
    resumed = Trainer(fp16_config(tmp_path / "cut", **changes))
    resumed.fit()
    assert resumed.accelerator.scaler.get_scale() == full.accelerator.scaler.get_scale()
    a, b = params(full.model), params(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
