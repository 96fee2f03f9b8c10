"""`vlm-encoder extract-shard`: encode shards of a planned store (one Slurm array element).

    N=$(vlm-encoder extract --model ... --dataset ... --out feats/ --plan-only)
    vlm-encoder extract-shard --out feats/ --index $SLURM_ARRAY_TASK_ID     # K = 0 .. N-1
    vlm-encoder extract-shard --out feats/ --index 8 9 10 11     # several, loading the model once
    vlm-encoder extract-finalize --out feats/

A shard already committed and intact is skipped at once; two runs of the same shard write the
same bytes (each commits atomically), so a requeued or duplicated task is harmless. See docs/scale.md.
"""

from __future__ import annotations

import argparse

from .options import writable_directory


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `extract-shard` to the `vlm-encoder` parser."""
    parser = subparsers.add_parser(
        "extract-shard",
        help="encode shards of a store planned with `extract --plan-only`",
        description="Encode shard K (or each of several) of the store planned in DIR (`vlm-encoder extract ... --plan-only`) and commit it "
                    "atomically; a committed, intact shard is skipped. Finish with `vlm-encoder extract-finalize`.",
    )
    parser.add_argument("--out", required=True, type=writable_directory, metavar="DIR", help="the planned store")
    parser.add_argument("--index", required=True, type=int, nargs="+", metavar="K",
                        help="the shard, 0 .. N-1 (several: encoded in turn by one model)")
    parser.add_argument("--device", default=None,
                        help="torch device (default: the plan's, else this machine's accelerator); its type must be "
                             "the plan's")
    parser.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default the plan's)")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="image-decoding worker processes (default the plan's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..extract import ExtractPlan, ShardWorker

    plan = ExtractPlan.load(args.out)
    worker = ShardWorker(plan, args.device, batch_size=args.batch_size, num_workers=args.num_workers,
                         progress=not args.no_progress)
    for result in worker.run_many(args.index):
        state = "already committed, skipped" if result.skipped else f"committed in {result.seconds:.1f} s"
        print(f"{plan.out}: shard {result.index} of {plan.num_shards}: {result.rows} rows written, "
              f"{result.rows_failed} failed ({state})")
    return 0
