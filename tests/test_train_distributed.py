"""Two CPU processes under `accelerate launch --multi_gpu --num_processes 2` (on a machine
without GPUs this starts two gloo processes; `--cpu` alone starts one): a locked-image (LiT)
run with cached features and gradient accumulation does not trip DDP's unused-parameter check, both ranks end with the same weights, and
evaluation over a set not divisible by world x batch counts every image once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap


SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    torch.set_num_threads(1)
    from vlm_encoder.train import TrainConfig, Trainer
    out = sys.argv[1]
    config = TrainConfig(
        data="builtin:shapes", data_options={"num_train": 40, "num_test": 13, "canvas": 16},
        vision_preset="vit_tiny_patch16_224",
        vision_overrides={"image_size": 16, "patch_size": 8, "width": 32, "depth": 1, "num_heads": 2},
        text_preset="tiny", text_overrides={"width": 32, "depth": 1, "num_heads": 2, "context_length": 12},
        embed_dim=16, batch_size=4, accum_steps=2, max_steps=3, lock_image=True, lr=1e-2, warmup_steps=1,
        eval_split="test", eval_batch_size=4, checkpoint_every=2, progress=False, cpu=True, output_dir=out,
    )
    trainer = Trainer(config)
    result = trainer.fit()
    rank = trainer.accelerator.process_index
    checksum = sum(float(p.double().sum()) for p in trainer.model.parameters())
    with open(f"{out}/rank{rank}.json", "w") as handle:
        json.dump({"world": trainer.accelerator.num_processes, "metrics": result.metrics, "checksum": checksum,
                   "step": result.step}, handle)
    """
)


def test_two_process_lit_run(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world"] == 2 and r["step"] == 3 for r in ranks)
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # DDP kept the ranks in step
    for r in ranks:
        assert r["metrics"]["num_images"] == 13 and r["metrics"]["num_captions"] == 13
    assert (out / "checkpoints" / "step_00000003" / "rng_rank1.pt").is_file()
