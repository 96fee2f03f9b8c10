"""The demo's two trainings on one CPU thread against more, interleaved in one process.

    python benchmarks/demo_threads.py                      # 1 against 2 threads, 1 round
    python benchmarks/demo_threads.py --threads 1 4 --rounds 2

Each round runs every training in the order A B B A (then B A A B), so a change in the
machine's load hits both settings alike; the load average is printed beside every run,
since on shared cores it decides the result. The digits training is shortened to
`--digits-epochs` (11 steps an epoch), the LLaVA stage-1 run to `--llava-steps` LM and
projector steps each. Prints one line per run, then the median and best per setting
(what `benchmarks/results/demo.md` quotes).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def digits(epochs: int) -> float:
    from train_digits import run_digits_demo

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        run_digits_demo(Path(tmp) / "run", [f"epochs={epochs}"], progress=False)
        return time.perf_counter() - start


def llava(steps: int) -> float:
    import llava_stage1

    cfg = llava_stage1.Stage1Config(lm_steps=steps, projector_steps=steps)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):  # its own prints and progress bars
        start = time.perf_counter()
        llava_stage1.run(cfg, Path(tmp))
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs=2, default=(1, 2), metavar=("A", "B"))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--digits-epochs", type=int, default=10)
    parser.add_argument("--llava-steps", type=int, default=60)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(EXAMPLES))
    runs = {"digits": lambda: digits(args.digits_epochs), "llava": lambda: llava(args.llava_steps)}
    seconds: dict[tuple[str, int], list[float]] = {}
    a, b = args.threads
    for r in range(args.rounds):
        order = (a, b, b, a) if r % 2 == 0 else (b, a, a, b)
        for name, run in runs.items():
            for threads in order:
                torch.set_num_threads(threads)
                s = run()
                seconds.setdefault((name, threads), []).append(s)
                print(f"round {r} {name:6} threads={threads}: {s:6.1f} s  (load average {os.getloadavg()[0]:.1f})",
                      flush=True)
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    for (name, threads), xs in seconds.items():
        print(f"{name:6} threads={threads}: median {statistics.median(xs):6.1f} s, best {min(xs):6.1f} s  "
              f"({', '.join(f'{x:.1f}' for x in xs)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
