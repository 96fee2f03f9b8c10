"""Adversarial multi-process checks (issue 8, items 18, 19 and 20), all on the CPU through gloo
on 127.0.0.1.

- Item 18: 2 and 4 processes computing `ClipLoss` / `SigLipLoss` with gather-with-grad, on
  uneven per-rank batches, give the loss and gradients of one process on the concatenated
  batch within 1e-6. Features are float64 so that 1e-6 measures the algorithm, not float32
  rounding (float32 is checked too, to float32 rounding: 1e-5 relative).
- Item 19 (extraction part): 3 processes on a dataset whose size is not a multiple of
  world size x batch size, with fewer shards than processes, finish, write every row exactly
  once and equal one process's store byte for byte.
- Item 20: one rank failing in its data loader (its image storage raising an I/O error, a
  worker raising an unexpected exception, a worker SIGKILLed) makes every rank exit non-zero
  within a hard 120 s deadline, and the store is never marked complete.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from process_helpers import PYTHON, free_port, run_ranks

from vlm_encoder.contrastive import ClipLoss, SigLipLoss

HERE = Path(__file__).resolve().parent
RANK_DEADLINE_S = 120.0

# ------------------------------------------------------------------ item 18: distributed losses
# Rows per rank: uneven, including a rank with a single row, so the gather's padding and the
# offsets are exercised. Chunk 3 divides none of the batches.
BATCHES = {2: [5, 3], 4: [4, 1, 3, 2]}
DIM = 8
CHUNK = 3
SCALE, BIAS = 14.0, -3.0
LOSSES = {
    "clip": lambda chunk: (lambda i, t, s, b: ClipLoss(chunk_size=chunk)(i, t, s)),
    "clip_bias": lambda chunk: (lambda i, t, s, b: ClipLoss(chunk_size=chunk)(i, t, s, b)),
    "siglip": lambda chunk: (lambda i, t, s, b: SigLipLoss(chunk_size=chunk)(i, t, s, b)),
}
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _pairs(n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` normalised image / caption pairs `(n, DIM)`, positives more similar than chance."""
    gen = torch.Generator().manual_seed(1234)
    image = F.normalize(torch.randn(n, DIM, generator=gen, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(n, DIM, generator=gen, dtype=torch.float64) + 0.5 * image, dim=-1)
    return image.to(dtype), text.to(dtype)


def _loss_and_grads(fn, image, text, weight: float = 1.0) -> list[torch.Tensor]:
    """`[loss, d image, d text, d scale, d bias]` of `weight * fn(...)` (the loss unweighted)."""
    dtype = image.dtype
    leaves = [image.clone().requires_grad_(), text.clone().requires_grad_(),
              torch.tensor(SCALE, dtype=dtype, requires_grad=True), torch.tensor(BIAS, dtype=dtype, requires_grad=True)]
    loss = fn(*leaves)
    (loss * weight).backward()
    grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]
    return [loss.detach(), *grads]


def _loss_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # forked from a process whose thread pool may be running
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=dt.timedelta(seconds=60))
    try:
        sizes = BATCHES[world_size]
        total, start = sum(sizes), sum(sizes[:rank])
        results = {}
        for dtype_name, dtype in DTYPES.items():
            image, text = _pairs(total, dtype)
            rows = slice(start, start + sizes[rank])
            for name, make in LOSSES.items():
                # Weighting each rank's mean loss by its share of the global batch makes the sum
                # over ranks the full-batch mean, so the gradients (summed across ranks by the
                # gather's backward) are the full-batch gradients, without DDP's equal weights.
                results[f"{name}/{dtype_name}"] = _loss_and_grads(make(CHUNK), image[rows], text[rows],
                                                                  sizes[rank] / total)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(world_size: int, out_dir: str) -> None:
    """Run `_loss_worker` on `world_size` processes, forked (a spawned process would spend
    seconds importing torch again; the workers touch no thread pool before setting it to 1)."""
    import torch.multiprocessing as mp

    context = mp.start_processes(_loss_worker, args=(world_size, free_port(), out_dir), nprocs=world_size,
                                 join=False, start_method="fork")
    deadline = time.monotonic() + RANK_DEADLINE_S
    try:
        while not context.join(timeout=0.5):
            if time.monotonic() > deadline:
                pytest.fail(f"{world_size} loss processes did not finish within {RANK_DEADLINE_S:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()


@pytest.mark.parametrize("world_size", [2, 4])
def test_distributed_losses_equal_one_process_on_the_concatenated_batch(world_size):
    with tempfile.TemporaryDirectory() as out_dir:
        _spawn(world_size, out_dir)
        ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(world_size)]
    sizes = BATCHES[world_size]
    total = sum(sizes)
    names = ["loss", "d image", "d text", "d scale", "d bias"]
    for dtype_name, dtype in DTYPES.items():
        tolerance = {"rtol": 0, "atol": 1e-6} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
        image, text = _pairs(total, dtype)
        for name, make in LOSSES.items():
            key = f"{name}/{dtype_name}"
            full = _loss_and_grads(make(None), image, text)  # one process, unchunked
            per_rank = [r[key] for r in ranks]
            combined = [
                sum(r[0] * n / total for r, n in zip(per_rank, sizes)),  # full-batch mean
                torch.cat([r[1] for r in per_rank]),  # each rank's rows
                torch.cat([r[2] for r in per_rank]),
                sum(r[3] for r in per_rank),  # shared parameters: summed over ranks
                sum(r[4] for r in per_rank),
            ]
            for what, ours, reference in zip(names, combined, full):
                assert ours.dtype == dtype
                label = f"{key} {what}"
                torch.testing.assert_close(ours, reference, **tolerance, msg=lambda m, label=label: f"{label}: {m}")
            assert full[0] > 0 and full[1].abs().max() > 1e-3  # the comparison is not of zeros


# ------------------------------------------------------------------ item 19: uneven extraction
def _extract_argv(images: Path, out: Path, *extra: str, script: str | None = None) -> list[str]:
    from test_extract import cli_args

    head = [PYTHON, str(HERE / script)] if script else [PYTHON, "-m", "vlm_encoder.cli"]
    return [*head, *cli_args(images, out, "--device", "cpu", *extra)]


def _every_row_once(out: Path, num_rows: int) -> None:
    from vlm_encoder import FeatureStore

    store = FeatureStore(out)
    rows = store.row_ids.tolist() + [f["row"] for f in store.failures]
    assert sorted(rows) == list(range(num_rows)), "a row is missing or written twice"
    assert store.verify() == []


def _describe(results) -> str:
    return "\n".join(f"--- rank {r.rank}: exit {r.returncode}\n{r.output[-3000:]}" for r in results)


def test_three_processes_on_uneven_sizes_write_every_row_once(tmp_path):
    """15 rows (11 images, 4 broken) in shards of 8 (8 and 7 rows) for 3 processes in batches
    of 3: 15 is no multiple of 3 x 3, batches end short inside each shard, and rank 2 has no
    shard at all (it must still meet the others at the end, not hang or fail)."""
    from test_extract import checksums, make_images, tiny_config

    from vlm_encoder.extract import run_extraction

    images = make_images(tmp_path / "images", 11, bad=True)
    assert run_extraction(tiny_config(tmp_path, images, out="single", shard_size=8, batch_size=4)).complete
    out = tmp_path / "ddp"
    argv = _extract_argv(images, out, "--shard-size", "8", "--batch-size", "3", "--num-workers", "1")
    results, _ = run_ranks(argv, 3, RANK_DEADLINE_S, log_dir=tmp_path / "logs")
    assert [r.returncode for r in results] == [0, 0, 0], _describe(results)
    _every_row_once(out, 15)
    assert checksums(out) == checksums(tmp_path / "single")
    writers = [json.loads(p.read_text())["writer"] for p in sorted(out.glob("shard-*.json"))]
    assert [(w["rank"], w["world_size"]) for w in writers] == [(0, 3), (1, 3)]


# ------------------------------------------------------------------ item 20: a failing rank
@pytest.mark.parametrize(
    "fault,fault_rank,workers",
    [
        ("source_io_error", 1, 1),  # the image storage of rank 1 goes away: not a per-image failure
        ("worker_exception", 0, 2),  # an unexpected exception in a worker of rank 0 (the rendezvous host)
        pytest.param("worker_killed", 1, 1, marks=pytest.mark.slow),  # a worker of rank 1 SIGKILLed
    ],
)
def test_a_rank_failing_in_its_data_loader_stops_every_rank(tmp_path, fault, fault_rank, workers):
    from test_extract import make_images

    images = make_images(tmp_path / "images", 18, bad=True)  # 22 rows, 6 shards: 3 per rank
    out = tmp_path / "out"
    # Row 4 is the first row of shard 1 (rank 1's first); row 0 is rank 0's first.
    env = {"FAULT": fault, "FAULT_RANK": str(fault_rank), "FAULT_ROW": "4" if fault_rank == 1 else "0"}
    argv = _extract_argv(images, out, "--batch-size", "2", "--num-workers", str(workers),
                         script="extract_with_faults.py")
    results, elapsed = run_ranks(argv, 2, RANK_DEADLINE_S, extra_env=env, log_dir=tmp_path / "logs")
    codes = [r.returncode for r in results]
    assert None not in codes, f"a rank hung (killed after {RANK_DEADLINE_S:.0f} s):\n{_describe(results)}"
    assert all(code != 0 for code in codes), f"every rank must fail, exit codes {codes}:\n{_describe(results)}"
    assert elapsed < RANK_DEADLINE_S
    failing = results[fault_rank].output
    expected = {"source_io_error": "Input/output error", "worker_exception": "injected: unexpected failure",
                "worker_killed": "exited unexpectedly"}[fault]
    assert expected in failing, _describe(results)
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"]
