"""`vlm-encoder extract`: features of a dataset's images into resumable safetensors shards.

    vlm-encoder extract --model openai/clip-vit-large-patch14-336 --dataset ./images \\
        --layers -2 -1 --select cls,patch,pooled --out feats/ --dtype bf16 --batch-size 64
    vlm-encoder extract --model preset:vit_tiny_patch16_224 --override depth=4 --dataset list.txt --out feats/
    vlm-encoder extract ... --resolution native --max-patches 576    # or --anyres 336x672,672x336,672x672
    accelerate launch --num_processes 4 -m vlm_encoder.cli extract ...    # one store, no merge
    vlm-encoder extract ... --engine ray --ray-address auto --workers 8    # Ray actors (docs/scale.md)
    vlm-encoder extract ... --engine spark --spark-master spark://head:7077    # one Spark task per shard
    N=$(vlm-encoder extract ... --out feats/ --plan-only)    # no engine: then `extract-shard --index K`
                                                             # for K < N anywhere, and `extract-finalize`

Run it again with the same arguments after an interruption: it redoes only the shards that are
missing or fail their checksum. See docs/extraction.md.
"""

from __future__ import annotations

import argparse
import sys

from ..extract.config import DEFAULT_SHARD_SIZE, DTYPES, KINDS
from .options import add_model_arguments, model_options, parse_size, writable_directory


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `extract` to the `vlm-encoder` parser."""
    parser = subparsers.add_parser(
        "extract",
        help="encoder features of a dataset into resumable safetensors shards",
        description="Extract CLS / patch / pooled features of the requested layers for every image of a dataset. "
                    "Resumable (run again with the same arguments), multi-process through `accelerate launch`.",
    )
    add_model_arguments(parser)
    parser.add_argument("--dataset", required=True, metavar="SPEC",
                        help="data spec (docs/extraction.md): folder of images, list file (.txt), folder with "
                             "metadata.jsonl, imagefolder:DIR, saved dataset folder, .parquet/.csv/.jsonl/.tar file or "
                             "glob, builtin:NAME or a hub dataset name (NAME or NAME:CONFIG)")
    parser.add_argument("--split", default=None, help="split of a datasets source (default train)")
    parser.add_argument("--image-column", default=None, help="image column of a datasets source (default the first Image)")
    parser.add_argument("--layers", type=int, nargs="+", default=[-1], metavar="L",
                        help="block indices, negatives from the end (default -1)")
    parser.add_argument("--select", default="cls,patch", metavar="KINDS",
                        help=f"comma-separated, from {','.join(KINDS)} (default cls,patch)")
    parser.add_argument("--norm", action="store_true", help="apply the final LayerNorm to the stored tokens")
    parser.add_argument("--out", required=True, type=writable_directory, metavar="DIR", help="output folder (resumed if it holds this run)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="encoder and feature dtype (default fp32)")
    parser.add_argument("--image-size", type=parse_size, default=None, metavar="N|HxW",
                        help="resize to this instead of the model's size")
    parser.add_argument("--resolution", choices=("fixed", "native"), default="fixed",
                        help="fixed: one input size; native: each image at its own aspect ratio, sides multiples of "
                             "the patch size, at most --max-patches patches, encoded alone; patches are stored "
                             "per image with their grid (default fixed)")
    parser.add_argument("--max-patches", type=int, default=None, metavar="N",
                        help="patch budget per image with --resolution native (default: the model's input size's)")
    parser.add_argument("--anyres", default=None, metavar="PINPOINTS",
                        help="LLaVA-NeXT tiling over these resolutions, e.g. 336x672,672x336,672x672 (HxW); "
                             "patches are each image's assembled token sequence, stored with its grid")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--num-workers", type=int, default=2, help="image-decoding worker processes (default 2)")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                        help=f"rows per shard (default {DEFAULT_SHARD_SIZE}); fixed for a store")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="larger images are recorded as failures (default PIL's decompression-bomb limit)")
    parser.add_argument("--device", default=None, help="torch device (default: the process's accelerator)")
    parser.add_argument("--no-fast-cpu", action="store_true",
                        help="on the CPU, keep torch's default GEMM route instead of oneDNN's prepacked one")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--wait-lock", action="store_true",
                        help="if another run is writing --out, wait for it to finish (default: refuse to start)")
    parser.add_argument("--plan-only", action="store_true",
                        help="only plan: write --out/plan.json and the manifest, print the number of shards N; then "
                             "run `vlm-encoder extract-shard --out DIR --index K` for each K < N (e.g. a Slurm array) "
                             "and `vlm-encoder extract-finalize --out DIR` (docs/scale.md)")
    engine = parser.add_argument_group("engine (docs/scale.md)")
    engine.add_argument("--engine", choices=("local", "ray", "spark"), default="local",
                        help="local: this process, or the processes of `accelerate launch`; ray: Ray actors, each "
                             "loading the model once (needs vlm-encoder[ray]); spark: one Spark task per shard, "
                             "one model per Python worker (needs vlm-encoder[spark]) (default local)")
    engine.add_argument("--workers", type=int, default=None, metavar="N",
                        help="engine workers, each holding one model (default: what the cluster's CPUs, or GPUs "
                             "with --gpus-per-worker, allow); --num-workers is per worker, for decoding")
    engine.add_argument("--ray-address", default=None, metavar="ADDR",
                        help="Ray cluster: auto (the one `ray start` made here), HOST:PORT or ray://HOST:PORT "
                             "(default: a new local Ray instance)")
    engine.add_argument("--gpus-per-worker", type=float, default=None, metavar="F",
                        help="GPUs each Ray worker reserves; 0.5 puts two on one GPU (default 0)")
    engine.add_argument("--cpus-per-worker", type=float, default=None, metavar="F",
                        help="CPUs each Ray worker reserves, for its torch threads and --num-workers decoders "
                             "(default 1)")
    engine.add_argument("--spark-master", default=None, metavar="URL",
                        help="Spark master: local[N], spark://HOST:7077, yarn, ... (default: the session of "
                             "spark-submit, else local[N,4] with N = --workers, every core without it)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..extract import ExtractConfig, run_extraction

    config = ExtractConfig(
        model=args.model,
        dataset=args.dataset,
        out=args.out,
        layers=tuple(args.layers),
        select=args.select,
        **model_options(args),
        dtype=args.dtype,
        fast_cpu=not args.no_fast_cpu,
        image_size=args.image_size,
        norm=args.norm,
        resolution=args.resolution,
        max_patches=args.max_patches,
        anyres=args.anyres,
        split=args.split,
        image_column=args.image_column,
        max_pixels=args.max_pixels,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        progress=not args.no_progress,
        wait_lock=args.wait_lock,
    )
    if args.plan_only:
        return _plan_only(args, config)
    if args.engine == "local":
        _refuse_engine_options(args)
        summary = run_extraction(config)
    else:
        summary = _engine(args).run(config)
    from accelerate import PartialState

    if args.engine != "local" or PartialState().is_main_process:
        print(summary, file=sys.stderr if not summary.complete else sys.stdout)
        if summary.rows_nonfinite:
            print(f"warning: {summary.rows_nonfinite} rows gave non-finite features (inf/NaN) in {config.dtype} and "
                  "are recorded as failures in failures.jsonl, not stored; extract with --dtype bf16 or fp32",
                  file=sys.stderr)
        if summary.all_failed:
            print(f"vlm-encoder extract: error: every one of the {summary.total_rows} images failed, none has "
                  f"features; e.g. {summary.first_failure}", file=sys.stderr)
            return 1
    return 0 if summary.complete and not summary.all_failed else 1


def _plan_only(args: argparse.Namespace, config: object) -> int:
    """`--plan-only`: the plan, and the shard count alone on stdout (`N=$(vlm-encoder extract ... --plan-only)`)."""
    from ..extract import plan_extraction

    if getattr(args, "engine", "local") != "local":
        raise ValueError("--plan-only writes a plan for `extract-shard`; it takes no --engine")
    plan = plan_extraction(config)
    print(plan.num_shards)
    print(f"planned {plan.out}: {plan.num_rows} rows in {plan.num_shards} shards of {plan.shard_size}; run "
          f"`vlm-encoder extract-shard --out {plan.out} --index K` for K = 0..{plan.num_shards - 1}, then "
          f"`vlm-encoder extract-finalize --out {plan.out}`", file=sys.stderr)
    return 0


ENGINE_OPTIONS = {"workers": ("ray", "spark"), "ray_address": ("ray",), "gpus_per_worker": ("ray",),
                  "cpus_per_worker": ("ray",), "spark_master": ("spark",)}


def _refuse_engine_options(args: argparse.Namespace) -> None:
    """An engine's option given with another engine is a mistake, not a no-op."""
    for name, engines in ENGINE_OPTIONS.items():
        if getattr(args, name) is not None and args.engine not in engines:
            flag = "--" + name.replace("_", "-")
            hint = " (the processes of a local run come from `accelerate launch`)" if args.engine == "local" else ""
            raise ValueError(f"{flag} applies to --engine {' or '.join(engines)}, not {args.engine}{hint}")


def _engine(args: argparse.Namespace) -> object:
    """The engine adapter of `--engine` with its options (`vlm_encoder.extract.engines`)."""
    _refuse_engine_options(args)
    if args.engine == "ray":
        from ..extract.engines import RayEngine

        return RayEngine(address=args.ray_address, workers=args.workers, gpus_per_worker=args.gpus_per_worker or 0.0,
                         cpus_per_worker=1.0 if args.cpus_per_worker is None else args.cpus_per_worker)
    if args.engine == "spark":
        from ..extract.engines.spark import SparkEngine

        return SparkEngine(master=args.spark_master, workers=args.workers)
    raise ValueError(f"unknown engine {args.engine!r}")
