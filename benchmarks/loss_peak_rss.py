"""Peak memory of the default (chunked) CLIP / SigLIP loss, forward + backward, at a large batch.

    python benchmarks/loss_peak_rss.py                      # B = 131,072, 512-d (slow on 2 cores: minutes)
    python benchmarks/loss_peak_rss.py --batch 16384        # a check that it runs
    python benchmarks/loss_peak_rss.py --probe-blocks 4     # B = 131,072 memory probe: minutes

Each run is its own subprocess; its peak is the kernel's high-water mark of resident memory
(`ru_maxrss`), total and above the process after `import torch` (tracemalloc does not see
torch's tensors). `--probe-blocks K` is a memory probe: every chunked loop (forward and backward)
runs only its first K blocks, so the run makes every allocation of the full run (inputs, per-row
results, gradient buffers, blocks, the autograd accumulation) in the same order but skips most of
the arithmetic; its loss value is not the loss, its peak is the full run's (blocks are freed as
they go, so more of them do not raise it). Results are appended to `benchmarks/results/loss_peak_rss_cpu.md`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "loss_peak_rss_cpu.md"


def child(kind: str, batch: int, dim: int, probe_blocks: int = 0) -> None:
    import itertools

    import torch
    import torch.nn.functional as F

    from vlm_encoder.contrastive import ClipLoss, SigLipLoss, chunked

    if probe_blocks:
        every_block = chunked._blocks
        chunked._blocks = lambda n, chunk: itertools.islice(every_block(n, chunk), probe_blocks)

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    start = time.perf_counter()
    loss = (ClipLoss() if kind == "clip" else SigLipLoss())(image, text, scale, bias)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(loss=kind, batch=batch, dim=dim, probe_blocks=probe_blocks, value=float(loss),
                          seconds=seconds,
                          peak_rss_gib=peak / 2**30, above_torch_import_gib=(peak - base) / 2**30)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=131072)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--losses", nargs="*", default=["clip", "siglip"])
    p.add_argument("--probe-blocks", type=int, default=0, help="memory probe: only the first K blocks of each loop")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child, a.batch, a.dim, a.probe_blocks)
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), "?")
    lines = []
    for kind in a.losses:
        load = os.getloadavg()[0]
        out = subprocess.run([sys.executable, __file__, "--child", kind, "--batch", str(a.batch), "--dim", str(a.dim),
                              "--probe-blocks", str(a.probe_blocks)],
                             check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        row = json.loads(out)
        print(out, flush=True)
        name = row["loss"] + (f" (memory probe: {a.probe_blocks} blocks per loop)" if a.probe_blocks else "")
        lines.append(f"| {name} | {row['batch']} | {row['dim']} | {row['peak_rss_gib']:.2f} | "
                     f"{row['above_torch_import_gib']:.2f} | {row['seconds']:.0f} | {load:.1f} |")
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    header = "" if RESULTS.exists() else (
        "# Peak memory of the default chunked losses (forward + backward, CPU)\n\n"
        "| loss | batch | dim | peak RSS GiB | above `import torch` GiB | seconds | load avg |\n|---|---:|---:|---:|---:|---:|---:|\n")
    with RESULTS.open("a") as f:
        f.write(header + "\n".join(lines) + f"\n<!-- {date}, {cpu}, {os.cpu_count()} cpus -->\n")


if __name__ == "__main__":
    main()
