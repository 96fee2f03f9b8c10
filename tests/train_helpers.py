"""Interrupting a training run from outside the library: a run killed after a given optimizer
step (its data source ends it), and a checkpoint save killed after a given file (its writers
end it). Used by tests/test_train*.py, tests/test_gpu.py and tests/adversarial/."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from vlm_encoder.train import TrainConfig, Trainer, open_pair_source
from vlm_encoder.train import checkpoint as ckpt


class Crash(BaseException):
    """Stands for the process dying: nothing catches it, no clean-up runs."""


class DiesAfter:
    """A training source that kills the run (raises `Crash`) when the batch after optimizer
    step `steps` is read: the first caption of batch `steps + 1` (`batch_size` captions a
    batch; every image readable). Steps up to `steps` are logged, checkpointed and evaluated
    as usual."""

    def __init__(self, source: Any, steps: int, batch_size: int) -> None:
        self.source, self.reads_left = source, steps * batch_size
        self.name, self.labels, self.class_names = source.name, source.labels, source.class_names
        self.in_memory = source.in_memory

    def __len__(self) -> int:
        return len(self.source)

    def image(self, index: int) -> Any:
        return self.source.image(index)

    def captions(self, index: int) -> list[str]:
        if self.reads_left == 0:
            raise Crash(f"killed before reading the captions of image {index}")
        self.reads_left -= 1
        return self.source.captions(index)


def dies_after(config: TrainConfig, steps: int) -> DiesAfter:
    """`config`'s training source, killing the run after optimizer step `steps`."""
    source = open_pair_source(config.data, config.train_split, options=config.data_options,
                              image_column=config.image_column, text_column=config.text_column,
                              label_column=config.label_column, class_names=config.class_names)
    return DiesAfter(source, steps, config.batch_size)


def run_killed_after(config: TrainConfig, steps: int, **kwargs: Any) -> Trainer:
    """Run `config` as if the process were killed after optimizer step `steps`; returns the
    trainer (its log closed, as the dead process's files would be)."""
    trainer = Trainer(config, train_source=dies_after(config, steps), **kwargs)
    with pytest.raises(Crash):
        trainer.fit()
    trainer.log.close()
    assert trainer.progress.step == steps
    return trainer


def die_after_checkpoint_file(setattr: Callable, step: int, name: str, die: Callable[[], None]) -> None:
    """Call `die()` right after the save of step `step`'s checkpoint has written its file `name`
    (into the temporary directory), by wrapping the writers the checkpoint uses.

    Args:
        setattr: `monkeypatch.setattr`, or the builtin `setattr` in a process that will die.
        step / name: The checkpoint and the file (`model.safetensors`, `manifest.json`, ...).
        die: Raises `Crash`, or kills the process.
    """
    target = f".{ckpt.checkpoint_name(step)}.tmp"

    def check(path: str | Path) -> None:
        path = Path(path)
        if path.parent.name == target and path.name == name:
            die()

    torch_save, save_file, write_text = torch.save, safetensors.torch.save_file, Path.write_text

    def saving(obj, f, *args, **kwargs):
        torch_save(obj, f, *args, **kwargs)
        if isinstance(f, (str, Path)):
            check(f)

    def saving_tensors(tensors, filename, *args, **kwargs):
        save_file(tensors, filename, *args, **kwargs)
        check(filename)

    def writing(self, data, *args, **kwargs):
        written = write_text(self, data, *args, **kwargs)
        check(self)
        return written

    setattr(torch, "save", saving)
    setattr(ckpt, "save_file", saving_tensors)
    setattr(Path, "write_text", writing)
