"""Peak memory of one forward + backward of the contrastive losses against the batch size:
ours (chunked, never `B x B`) and open_clip's (`B x B` logits).

    python benchmarks/loss_memory.py                 # CUDA if available: B = 4,096 ... 1,048,576
    python benchmarks/loss_memory.py --device cpu    # B = 256 ... 2,048, chunk 64, tensor-level accounting

On CUDA the peak is `torch.cuda.max_memory_allocated` above what the inputs already hold (an
out-of-memory error is recorded as such and the larger batches of that contender skipped). On
the CPU, where no allocator statistics exist, it is the peak of bytes held by tensors created
during the call (`track_tensor_memory` of tests/memory_probe.py), which counts the same
intermediates. Features are random, L2-normalised, float32 (`--dtype` to change).

Results: `benchmarks/results/loss_memory_<cpu|cuda>.json` with device, date and every row.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vlm_encoder.contrastive import ClipLoss, SigLipLoss

sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))
from memory_probe import track_tensor_memory  # noqa: E402  (the tests' CPU allocation probe)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GPU_BATCHES = [2**k for k in range(12, 21)]  # 4,096 ... 1,048,576
CPU_BATCHES = [256, 512, 1024, 2048]


def make_loss(impl: str, kind: str, chunk_size: int | None):
    if impl == "ours":
        return ClipLoss(chunk_size=chunk_size) if kind == "clip" else SigLipLoss(chunk_size=chunk_size)
    import open_clip.loss

    return open_clip.loss.ClipLoss() if kind == "clip" else open_clip.loss.SigLipLoss()


def run_once(impl: str, kind: str, batch: int, dim: int, dtype: torch.dtype, device: torch.device, chunk_size):
    """Peak bytes and seconds of one forward + backward."""
    loss_fn = make_loss(impl, kind, chunk_size)
    gen = torch.Generator(device=device).manual_seed(0)
    image = F.normalize(torch.randn(batch, dim, device=device, generator=gen), dim=-1).to(dtype).requires_grad_()
    text = F.normalize(torch.randn(batch, dim, device=device, generator=gen), dim=-1).to(dtype).requires_grad_()
    scale = torch.tensor(10.0, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True)

    def step():
        loss = loss_fn(image, text, scale, bias)
        loss.backward()
        return float(loss.detach())

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        value = step()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() - base
    else:
        start = time.perf_counter()
        with track_tensor_memory() as stats:
            value = step()
        seconds = time.perf_counter() - start
        peak = stats.peak_bytes
    return peak, seconds, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batches", type=int, nargs="*", help="batch sizes (default: by device)")
    parser.add_argument("--dim", type=int, default=None, help="embedding width (default 512 on CUDA, 64 on CPU)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--chunk-size", type=int, default=None,
        help="rows per block of ours (default: automatic on CUDA; 64 on the CPU, where the automatic block "
        "of 2^27 logits would hold the whole of these small batches)",
    )
    parser.add_argument("--losses", nargs="*", default=["clip", "siglip"], choices=["clip", "siglip"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    batches = args.batches or (GPU_BATCHES if use_cuda else CPU_BATCHES)
    dim = args.dim or (512 if use_cuda else 64)
    dtype = getattr(torch, args.dtype)
    chunk_size = args.chunk_size if args.chunk_size is not None or use_cuda else 64

    rows = []
    for kind in args.losses:
        for impl in ("ours", "open_clip"):
            failed = False
            for batch in batches:
                row = dict(loss=kind, impl=impl, batch=batch)
                if failed:
                    row["status"] = "skipped (a smaller batch ran out of memory)"
                else:
                    try:
                        peak, seconds, value = run_once(impl, kind, batch, dim, dtype, device, chunk_size)
                        row.update(status="ok", peak_bytes=peak, peak_gib=peak / 2**30, seconds=seconds, loss_value=value)
                    except torch.OutOfMemoryError:
                        failed = True
                        row["status"] = "out of memory"
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                print(json.dumps(row), flush=True)
                rows.append(row)

    name = torch.cuda.get_device_name(device) if use_cuda else (platform.processor() or platform.machine())
    report = dict(
        benchmark="loss_memory",
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        device=f"{device.type}: {name}",
        measure="torch.cuda.max_memory_allocated above the inputs" if use_cuda else "peak bytes of tensors created (dispatch-mode accounting)",
        torch=torch.__version__,
        dim=dim,
        dtype=args.dtype,
        note="seconds on the CPU include the per-operator accounting overhead; compare memory, not time",
        chunk_size=chunk_size if chunk_size is not None else "automatic",
        rows=rows,
    )
    out = args.out or RESULTS_DIR / f"loss_memory_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
