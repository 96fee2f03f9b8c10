"""FSDP2 (`TrainConfig.fsdp`, `train/fsdp.py`) on two real CPU/gloo processes: three optimizer
steps of a tiny CLIP run (gather-with-grad loss, GradCache micro-batches, clipping) end with
the same weights as the same steps under DDP, within 1e-5 (both on torch's own GEMMs: the DDP run
would otherwise take `fast_cpu`'s oneDNN route, which FSDP shards never do); and the `Trainer` through
`vlm-encoder train ... fsdp=true` trains, evaluates, exports and resumes exactly."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

from process_helpers import PYTHON, run_ranks

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    from vlm_encoder.train import TrainConfig
    from vlm_encoder.train.setup import set_up
    from vlm_encoder.train.step import StepInputs, optimizer_step
    from vlm_encoder.train.sources import PairSource

    fsdp, out = sys.argv[1] == "fsdp", sys.argv[2]
    config = TrainConfig(
        data="builtin:shapes", data_options={"num_train": 16, "num_test": 4, "canvas": 16}, eval_split=None,
        vision_overrides={"image_size": 16, "patch_size": 8, "width": 32, "depth": 2, "num_heads": 2},
        text_overrides={"width": 32, "depth": 2, "num_heads": 2, "context_length": 12},
        embed_dim=16, batch_size=4, accum_steps=2, lr=1e-2, warmup_steps=1, grad_clip=0.5, max_steps=3,
        cpu=True, fsdp=fsdp, progress=False,
        fast_cpu=False,  # FSDP shards never take the oneDNN route: compare the same GEMMs
    )
    parts = set_up(config)
    rank = parts.accelerator.process_index
    assert parts.accelerator.num_processes == 2
    sharded = type(next(parts.model.vision.blocks[0].parameters())).__name__ == "DTensor"
    assert sharded == fsdp, "fsdp=true must shard the blocks, DDP must not"
    initial = {k: v.detach().clone() for k, v in parts.model.state_dict().items()} if not fsdp else None
    for step in range(3):
        g = torch.Generator().manual_seed(100 * step + rank)  # each rank its own batch
        inputs = StepInputs(torch.randint(1, 60, (4, 12), generator=g), torch.ones(4, 12, dtype=torch.long),
                            torch.randn(4, 3, 16, 16, generator=g))
        result = optimizer_step(parts, inputs)
        assert not result.skipped
    if fsdp:
        from vlm_encoder.train.fsdp import full_state_dict
        state = full_state_dict(parts.bare_forward)
    else:
        state = {k: v.detach().cpu() for k, v in parts.model.state_dict().items()}
    torch.save({"final": state, "initial": initial}, f"{out}/{sys.argv[1]}_rank{rank}.pt")
    """
)


def _train(tmp_path, mode: str) -> None:
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    results, _ = run_ranks([PYTHON, str(script), mode, str(tmp_path)], 2, timeout_s=300,
                           extra_env={"HF_HUB_OFFLINE": "1", "PYTHONPATH": ":".join(sys.path)})
    for r in results:
        assert r.returncode == 0, r.output[-4000:]


@pytest.mark.slow
def test_fsdp_equals_ddp(tmp_path):
    _train(tmp_path, "ddp")
    _train(tmp_path, "fsdp")
    ddp = torch.load(tmp_path / "ddp_rank0.pt")
    initial, ddp = ddp["initial"], ddp["final"]
    fsdp = [torch.load(tmp_path / f"fsdp_rank{r}.pt")["final"] for r in range(2)]
    assert ddp.keys() == fsdp[0].keys() == fsdp[1].keys()
    moved = max(float((ddp[k].float() - initial[k].float()).abs().max()) for k in ddp)
    assert moved > 1e-3  # the steps changed the weights: the comparison is not vacuous
    for name, value in ddp.items():
        for state in fsdp:  # every process gathers the same whole weights
            torch.testing.assert_close(state[name], value, atol=1e-5, rtol=0, msg=name)


# ------------------------------------------------------------------ the Trainer through the CLI
RUN = dict(
    data="builtin:shapes", data_options={"num_train": 16, "num_test": 6, "canvas": 16},
    vision_overrides={"image_size": 16, "patch_size": 8, "width": 32, "depth": 2, "num_heads": 2},
    text_overrides={"width": 32, "depth": 2, "num_heads": 2, "context_length": 12},
    embed_dim=16, batch_size=4, accum_steps=2, lr=1e-2, warmup_steps=1, grad_clip=0.5, max_steps=4,
    checkpoint_every=2, eval_split="test", eval_batch_size=4, cpu=True, progress=False,
)


def _cli_train(tmp_path, run_dir, *overrides: str) -> None:
    import yaml

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(RUN))
    argv = [PYTHON, "-m", "vlm_encoder.cli", "train", "--config", str(config), f"output_dir={run_dir}", *overrides]
    results, _ = run_ranks(argv, 2, timeout_s=300, extra_env={"HF_HUB_OFFLINE": "1", "PYTHONPATH": ":".join(sys.path)})
    for r in results:
        assert r.returncode == 0, r.output[-4000:]


def _weights(checkpoint) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "model.safetensors"))


@pytest.mark.slow
def test_fsdp_trainer_run_exports_and_resumes(tmp_path):
    """`vlm-encoder train ... fsdp=true` on two gloo processes trains, evaluates and exports a
    plain `ContrastiveModel`; its checkpoints are DDP's files (whole tensors, the optimizer
    numbered as unsharded); a run resumed from its step-2 checkpoint (as if killed right
    after it) ends bitwise equal to the straight run under FSDP, and within 1e-5 under DDP."""
    import shutil

    from vlm_encoder.contrastive import ContrastiveModel

    straight = tmp_path / "straight"
    _cli_train(tmp_path, straight, "fsdp=true")
    model = ContrastiveModel.from_pretrained(straight / "export" / "model")
    final = _weights(straight / "checkpoints" / "step_00000004")
    assert model.state_dict().keys() == final.keys()
    for name, value in model.state_dict().items():
        assert torch.equal(value, final[name]), name  # the export is the trained weights
    optimizer = torch.load(straight / "checkpoints" / "step_00000002" / "optimizer.pt")
    assert sorted(optimizer["state"]) == list(range(len(optimizer["state"])))  # numbered as DDP's
    assert all(type(t) is torch.Tensor for s in optimizer["state"].values() for t in s.values())
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "eval" and r["num_images"] == 6 for r in records)

    for mode in ("true", "false"):  # resumed under FSDP, and under DDP from the same files
        resumed = tmp_path / f"resumed_{mode}"
        shutil.copytree(straight / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
        _cli_train(tmp_path, resumed, f"fsdp={mode}")
        again = _weights(resumed / "checkpoints" / "step_00000004")
        moved = max(float((again[k] - _weights(resumed / "checkpoints" / "step_00000002")[k]).abs().max())
                    for k in again)
        assert moved > 1e-4  # the resumed steps changed the weights
        for name, value in final.items():
            if mode == "true":
                assert torch.equal(again[name], value), name
            else:
                torch.testing.assert_close(again[name], value, atol=1e-5, rtol=0, msg=name)
