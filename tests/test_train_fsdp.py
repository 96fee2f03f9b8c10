"""FSDP2 (`TrainConfig.fsdp`, `train/fsdp.py`) on two real CPU/gloo processes: three optimizer
steps of a tiny CLIP run (gather-with-grad loss, GradCache micro-batches, clipping) end with
the same weights as the same steps under DDP, within 1e-5."""

from __future__ import annotations

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
