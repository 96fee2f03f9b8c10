"""`vlm-encoder extract-finalize`: merge the shards of a planned store into its manifest and report.

    vlm-encoder extract-finalize --out feats/     # after every `extract-shard --index K`

Exit status 0 when every shard is committed; 1 (naming the missing shards) otherwise, and
finalizing again after running them completes the store. See docs/scale.md.
"""

from __future__ import annotations

import argparse
import sys

from .options import writable_directory

SHOWN_MISSING = 20


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `extract-finalize` to the `vlm-encoder` parser."""
    parser = subparsers.add_parser(
        "extract-finalize",
        help="merge the shards of a store planned with `extract --plan-only` into its manifest",
        description="Record every committed shard of DIR in its manifest and failures.jsonl and report; "
                    "exit 1 naming the shards still missing.",
    )
    parser.add_argument("--out", required=True, type=writable_directory, metavar="DIR", help="the planned store")
    parser.add_argument("--wait-lock", action="store_true",
                        help="if another run is writing --out, wait for it to finish (default: refuse to start)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..extract import finalize_extraction

    summary = finalize_extraction(args.out, wait_lock=args.wait_lock)
    state = "complete" if summary.complete else "INCOMPLETE"
    print(f"{summary.out}: {summary.rows_written} rows written, {summary.rows_failed} failed, of "
          f"{summary.total_rows} ({state}); {summary.shards_kept} shard{'' if summary.shards_kept == 1 else 's'} committed",
          file=sys.stdout if summary.complete else sys.stderr)
    if summary.rows_nonfinite:
        print(f"warning: {summary.rows_nonfinite} rows gave non-finite features (inf/NaN) and are recorded as "
              "failures in failures.jsonl, not stored; extract with --dtype bf16 or fp32", file=sys.stderr)
    if not summary.complete:
        missing = summary.missing_shards
        shown = " ".join(map(str, missing[:SHOWN_MISSING])) + (" ..." if len(missing) > SHOWN_MISSING else "")
        print(f"vlm-encoder extract-finalize: error: {len(missing)} shards are not committed yet ({shown}); run "
              f"`vlm-encoder extract-shard --out {summary.out} --index K` for each, then finalize again",
              file=sys.stderr)
        return 1
    if summary.all_failed:
        print(f"vlm-encoder extract-finalize: error: every one of the {summary.total_rows} images failed, none has "
              f"features; e.g. {summary.first_failure}", file=sys.stderr)
        return 1
    return 0
