"""`python train_with_faults.py OUT MODE` = a tiny contrastive training run (one rank of several,
launched by `process_helpers.run_ranks`) with checks or faults injected; see test_training.py.

    MODE=lit_uncached   LiT, image features not cached, accum_steps 1 (items 19 and 21)
    MODE=lit_cached     LiT, image features cached, accum_steps 2 (items 19 and 21)
    MODE=fault          rank FAULT_RANK's training data fails (item 20):
        FAULT=source_error     the source raises an unexpected `RuntimeError` (storage gone) in the
                               main process, from its FAULT_AFTER-th image read on
        FAULT=worker_exception the same, in a DataLoader worker (num_workers=1)
        FAULT=worker_killed    the DataLoader worker is SIGKILLed (e.g. by the OOM killer)
    MODE=kill_in_checkpoint   one process that SIGKILLs itself after writing KILL_AFTER_PART of
                              the checkpoint of step KILL_AT_STEP (item 5)

Each rank writes `OUT/rank{r}.json` with what the test checks.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch

from vlm_encoder.train import TrainConfig, Trainer, open_pair_source
from vlm_encoder.train.evaluate import embed_source

sys.path.append(str(Path(__file__).resolve().parents[1]))  # tests/, for its helpers
from train_helpers import die_after_checkpoint_file  # noqa: E402

NUM_TRAIN, NUM_TEST, BATCH = 37, 13, 4  # 37 is not a multiple of world (2) x batch (4)


def config(out: str, **changes) -> TrainConfig:
    base = {
        "data": "builtin:shapes", "data_options": {"num_train": NUM_TRAIN, "num_test": NUM_TEST, "canvas": 16},
        "vision_overrides": {"image_size": 16, "patch_size": 8, "width": 32, "depth": 1, "num_heads": 2},
        "text_overrides": {"width": 32, "depth": 1, "num_heads": 2, "context_length": 12},
        "embed_dim": 16, "batch_size": BATCH, "lr": 1e-2, "warmup_steps": 1, "eval_split": "test", "eval_batch_size": 4,
        "progress": False, "cpu": True, "output_dir": out, "log_every": 1,
    }
    return TrainConfig(**{**base, **changes})


class FailingSource:
    """A source whose `image()` fails from its `after`-th call on (counted in the process that
    reads: the main process, or the DataLoader worker)."""

    def __init__(self, source, fault: str, after: int) -> None:
        self.source, self.fault, self.after, self.calls = source, fault, after, 0
        self.name, self.labels, self.class_names = source.name, source.labels, source.class_names
        self.in_memory = False

    def __len__(self) -> int:
        return len(self.source)

    def captions(self, index: int) -> list[str]:
        return self.source.captions(index)

    def image(self, index: int):
        self.calls += 1
        if self.calls > self.after:
            if self.fault == "worker_killed":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected: the image storage went away while reading image {index}")
        return self.source.image(index)


def lit(out: str, cached: bool) -> None:
    trainer = Trainer(config(out, lock_image=True, cache_image_features=cached, accum_steps=2 if cached else 1,
                             max_steps=9, checkpoint_every=4))
    frozen = {k: v.clone() for k, v in trainer.model.vision.state_dict().items()}
    head = trainer.model.image_proj.weight.detach().clone()
    seen: list[tuple[int, list[int]]] = []
    plain = trainer.step_inputs

    def recording(batch):
        seen.append((batch.epoch, batch.indices.tolist()))
        return plain(batch)

    trainer.step_inputs = recording
    result = trainer.fit()
    acc, model, parts = trainer.accelerator, trainer.model, trainer.parts
    # Evaluation set: gathered rows must be the dataset's rows, in order (so labels line up).
    embeds = embed_source(model, parts.eval_source, parts.processor, parts.tokenizer, batch_size=4)
    model.eval()
    with torch.no_grad():
        pixels = parts.processor([parts.eval_source.image(i) for i in range(NUM_TEST)])
        local = model.encode_image(pixels).float()
    report = {
        "rank": acc.process_index,
        "world": acc.num_processes,
        "step": result.step,
        "metrics": result.metrics,
        "seen": seen,
        "frozen_unchanged": all(torch.equal(frozen[k], v) for k, v in model.vision.state_dict().items()),
        "head_changed": not torch.equal(head, model.image_proj.weight),
        "vision_requires_grad": any(p.requires_grad for p in model.vision.parameters()),
        "eval_image_index": embeds.image_index.tolist(),
        "eval_text_owner": embeds.text_owner.tolist(),
        "eval_rows_match_dataset": bool(torch.allclose(embeds.image_embeds, local, atol=1e-5)),
        "checksum": sum(float(p.detach().double().sum()) for p in model.parameters()),
    }
    with open(os.path.join(out, f"rank{acc.process_index}.json"), "w") as handle:
        json.dump(report, handle)


def fault(out: str) -> None:
    name = os.environ["FAULT"]
    workers = 0 if name == "source_error" else 1
    source = open_pair_source("builtin:shapes", "train", options={"num_train": NUM_TRAIN, "canvas": 16})
    if os.environ.get("RANK", "0") == os.environ.get("FAULT_RANK", "1"):
        source = FailingSource(source, name, int(os.environ.get("FAULT_AFTER", "6")))
    Trainer(config(out, max_steps=50, num_workers=workers, eval_split=None), train_source=source).fit()


def kill_in_checkpoint(out: str) -> None:
    at_step, after = int(os.environ["KILL_AT_STEP"]), os.environ["KILL_AFTER_PART"]
    die_after_checkpoint_file(setattr, at_step, after, lambda: os.kill(os.getpid(), signal.SIGKILL))
    Trainer(config(out, max_steps=3, checkpoint_every=1, eval_split=None)).fit()


if __name__ == "__main__":
    torch.set_num_threads(1)
    out_dir, mode = sys.argv[1], sys.argv[2]
    if mode in ("lit_uncached", "lit_cached"):
        lit(out_dir, cached=mode == "lit_cached")
    elif mode == "fault":
        fault(out_dir)
    elif mode == "kill_in_checkpoint":
        kill_in_checkpoint(out_dir)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
