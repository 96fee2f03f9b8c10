"""Extraction on an engine against the local runner, same model, same images, same machine.

    python benchmarks/extract_engines.py                # 4096 JPEGs, local runner vs Ray and Spark, 2 workers
    python benchmarks/extract_engines.py --smoke        # 48 images, a tiny ViT: a check of the script

Contenders, interleaved (local, ray, local, ray, ...) so that load from other processes hits
each alike, every run into a fresh folder:

  local   `run_extraction(config)`: one process, torch's threads on every core, decoding in
          2 x `num_workers` DataLoader processes (as many as the 2 engine workers have in all:
          with one, this decode-bound workload ran at half the engines' rate).
  ray     `RayEngine(workers=2).run(config)` on a Ray instance of this machine started before
          the timing (a cluster exists before a job): 2 actors of 1 CPU each (Ray gives each
          one torch thread), each with `num_workers` decoders.
  spark   `SparkEngine(workers=2).run(config)`'s map on a `local[2,4]` session started before the
          timing: 2 Python workers (Spark sets each one's OMP_NUM_THREADS, torch's threads, to
          spark.task.cpus = 1), one task per shard, each worker keeping its model between tasks
          (and between runs of the same plan), each with `num_workers` decoders.

The rate of each is rows / the whole run's wall time (`summary.seconds`: plan, model loads,
encoding, writing, finalize), what a user waits for. Target: an engine >= 85% of the local
runner's images/s. The per-task scheduling overhead of an engine is estimated from the same
runs: the engine's workers were busy `sum(shard seconds)` out of `W * T_map` (W workers over
the map's wall time `T_map`); what is left, less each worker's start-up (its model load,
measured alone), divided by the tasks, is the cost of scheduling one task (a Ray round trip,
a DataLoader start, the driver's bookkeeping). For Spark it is also measured directly: a job
over the finished store's shards, every task skipping its committed shard after its checksum,
costs `W * T_job / tasks` per task.

Results: `benchmarks/results/extract_engines.{json,md}` with the CPU model (lscpu) and the date.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local Ray instance keeps to 127.0.0.1

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from extract_throughput import write_jpegs  # noqa: E402

from vlm_encoder.extract import ExtractConfig, ExtractSummary, run_extraction  # noqa: E402
from vlm_encoder.extract.engines.base import drive  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TARGET = 0.85
WORKERS = 2
FULL = {"images": 4096, "overrides": {"image_size": 64}, "shard_size": 256, "repeats": 2}
SMOKE = {"images": 48, "overrides": {"depth": 2, "width": 32, "num_heads": 2, "image_size": 32, "patch_size": 8},
         "shard_size": 8, "repeats": 1}


def cpu_model() -> str:
    """The CPU's model name, as lscpu gives it."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return "unknown CPU"


def run_local(config: ExtractConfig) -> tuple[ExtractSummary, dict]:
    """`run_extraction` with as many decoders as the engines' workers have in all."""
    return run_extraction(config.replace(num_workers=WORKERS * config.num_workers)), {}


def run_ray(config: ExtractConfig) -> tuple[ExtractSummary, dict]:
    """`RayEngine.run` as it is, with the map's wall time and the shards' busy time recorded."""
    from vlm_encoder.extract.engines import RayEngine

    engine = RayEngine(workers=WORKERS)
    timing: dict = {}

    def timed_map(plan):
        started = time.perf_counter()
        results = engine.map_shards(plan, range(plan.num_shards), progress=False)
        timing.update(map_s=time.perf_counter() - started, busy_s=sum(r.seconds for r in results),
                      tasks=len(results), workers=WORKERS)
        return results

    summary = drive(config, timed_map)  # what RayEngine.run does, with `timed_map` as its map
    return summary, timing


def ray_worker_start_s(out: Path) -> float:
    """Seconds to start one Ray worker on a finished store: the actor, its model, one skipped shard."""
    import ray

    from vlm_encoder.extract import ExtractPlan
    from vlm_encoder.extract.engines.ray import ShardActor

    started = time.perf_counter()
    actor = ray.remote(ShardActor).options(num_cpus=1).remote(ExtractPlan.load(out), None, 0)
    assert ray.get(actor.run.remote(0)).skipped
    seconds = time.perf_counter() - started
    ray.kill(actor)
    return seconds


SPARK: dict = {}  # {"session": the SparkSession of the benchmark, started before the timing}


def run_spark(config: ExtractConfig) -> tuple[ExtractSummary, dict]:
    """`SparkEngine.run` as it is (its map in the benchmark's session), with the map's wall time
    and the shards' busy time recorded."""
    from vlm_encoder.extract.engines.spark import map_shards

    timing: dict = {}

    def timed_map(plan):
        started = time.perf_counter()
        results = map_shards(SPARK["session"], plan, range(plan.num_shards))
        timing.update(map_s=time.perf_counter() - started, busy_s=sum(r.seconds for r in results),
                      tasks=len(results), workers=WORKERS)
        return results

    return drive(config, timed_map), timing


def spark_task_overhead_s(out: Path) -> float:
    """Seconds per task of a Spark job over a finished store: each task skips its shard (a SHA-256
    check), so what remains is scheduling: `W * wall time / tasks`."""
    from vlm_encoder.extract import ExtractPlan
    from vlm_encoder.extract.engines.spark import map_shards

    plan = ExtractPlan.load(out)
    started = time.perf_counter()
    results = map_shards(SPARK["session"], plan, range(plan.num_shards))
    assert all(r.skipped for r in results)
    return WORKERS * (time.perf_counter() - started) / len(results)


CONTENDERS: dict[str, Callable[[ExtractConfig], tuple[ExtractSummary, dict]]] = {
    "local": run_local, "ray": run_ray, "spark": run_spark}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="48 images, a tiny ViT: a check of the script")
    parser.add_argument("--contenders", nargs="+", choices=list(CONTENDERS), default=list(CONTENDERS))
    parser.add_argument("--images", type=int, default=None, help="override the number of images")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--images-dir", type=Path, default=None,
                        help="keep the JPEGs here (written when missing) instead of a temporary folder")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    workload = dict(SMOKE if args.smoke else FULL)
    workload.update({k: v for k, v in (("images", args.images), ("repeats", args.repeats)) if v is not None})

    import ray

    if "ray" in args.contenders:
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False, logging_level="WARNING")
    spark = contextlib.ExitStack()
    if "spark" in args.contenders:
        from vlm_encoder.extract.engines.spark import spark_session

        SPARK["session"] = spark.enter_context(spark_session(workers=WORKERS, progress=False))
    rates: dict[str, list[float]] = {name: [] for name in args.contenders}
    timings: dict[str, list[dict]] = {name: [] for name in args.contenders}
    try:
        with tempfile.TemporaryDirectory(prefix="extract_engines_") as tmp:
            images = args.images_dir or Path(tmp) / "images"
            if len(list(images.glob("*.jpg"))) != workload["images"]:
                shutil.rmtree(images, ignore_errors=True)
                write_jpegs(images, workload["images"])
            config = ExtractConfig(
                model="preset:vit_tiny_patch16_224", overrides=workload["overrides"], dataset=str(images),
                out=Path(tmp) / "out", layers=(-1,), select=("cls", "patch"), batch_size=32, num_workers=1,
                shard_size=workload["shard_size"], device="cpu", progress=False,
            )
            for _ in range(workload["repeats"]):
                for name in args.contenders:
                    shutil.rmtree(config.out, ignore_errors=True)
                    summary, timing = CONTENDERS[name](config)
                    assert summary.complete and summary.rows_this_run == workload["images"], summary
                    rates[name].append(summary.rows_this_run / summary.seconds)
                    timings[name].append({"seconds": round(summary.seconds, 2), **timing})
            start_s = ray_worker_start_s(config.out) if "ray" in args.contenders else None
            spark_skip_s = spark_task_overhead_s(config.out) if "spark" in args.contenders else None
    finally:
        ray.shutdown()
        spark.close()

    median = {name: statistics.median(r) for name, r in rates.items()}
    result = {
        "mode": "smoke" if args.smoke else "full",
        "device": f"{cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()} (local runner)",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "workload": {**workload, "model": "preset:vit_tiny_patch16_224 (random weights)", "layers": [-1],
                     "select": ["cls", "patch"], "batch_size": 32, "num_workers": 1, "dtype": "fp32"},
        "images_per_s": {name: round(v, 2) for name, v in median.items()},
        "per_repeat": {name: [round(r, 2) for r in v] for name, v in rates.items()},
        "runs": timings,
        "target_ratio": TARGET,
    }
    if "local" in median:
        result["ratio_to_local"] = {name: round(v / median["local"], 3) for name, v in median.items() if name != "local"}
    if start_s is not None:
        result["ray_worker_start_s"] = round(start_s, 2)
        overheads = [(t["workers"] * (t["map_s"] - start_s) - t["busy_s"]) / t["tasks"] for t in timings["ray"]]
        result["ray_overhead_per_task_s"] = round(statistics.median(overheads), 3)
    if spark_skip_s is not None:
        result["spark_overhead_per_task_s"] = round(spark_skip_s, 3)
        idle = [(t["workers"] * t["map_s"] - t["busy_s"]) / t["tasks"] for t in timings["spark"]]
        result["spark_idle_per_task_s"] = round(statistics.median(idle), 3)
    print(json.dumps(result, indent=2))
    if not args.no_save:
        write_results(result, args.results_dir)
    return result


def write_results(result: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    stem = "extract_engines" + ("_smoke" if result["mode"] == "smoke" else "")
    (folder / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    w = result["workload"]
    lines = [
        f"# Extraction engines against the local runner ({result['mode']})",
        "",
        f"- date: {result['date']}",
        f"- device: {result['device']}",
        (f"- workload: {w['images']} JPEGs (300-500 px), {w['model']} at {w['overrides'].get('image_size')} px, "
         f"layer -1 cls + patch, {w['dtype']}, batch {w['batch_size']}, {w['num_workers']} decode worker per "
         f"engine worker ({WORKERS * w['num_workers']} for the local runner), shards of {w['shard_size']} rows"),
        f"- engines: {WORKERS} workers of 1 CPU each; the rate is rows / the whole run's wall time",
        "",
        "| contender | images/s (median) | ratio to local (median) | best of repeats | ratio to local (best) "
        "| per repeat |",
        "|---|---|---|---|---|---|",
    ]
    best_local = max(result["per_repeat"].get("local", [0])) or None
    for name, rate in result["images_per_s"].items():
        ratio = result.get("ratio_to_local", {}).get(name)
        shown = "1" if name == "local" else (f"{ratio:.3f}" if ratio is not None else "-")
        best = max(result["per_repeat"][name])
        best_ratio = f"{best / best_local:.3f}" if best_local else "-"
        lines.append(f"| {name} | {rate} | {shown} | {best} | {best_ratio} | {result['per_repeat'][name]} |")
    lines.append("")
    for name, ratio in result.get("ratio_to_local", {}).items():
        lines.append(f"- {name}: {ratio:.3f} of the local runner's images/s (target >= {TARGET}): "
                     f"{'met' if ratio >= TARGET else 'NOT met'}.")
    if "ray_overhead_per_task_s" in result:
        lines.append(f"- ray: one worker's start-up (actor, model, one skipped shard) {result['ray_worker_start_s']} s; "
                     f"scheduling overhead per task (1 shard) {result['ray_overhead_per_task_s']} s, estimated as "
                     "(workers x (map wall time - start-up) - shards' busy time) / tasks.")
    if "spark_overhead_per_task_s" in result:
        lines.append(f"- spark: per task (1 shard), a job whose tasks all skip their committed shard: "
                     f"{result['spark_overhead_per_task_s']} s (workers x job wall time / tasks); in the timed runs, "
                     f"workers x map wall time - shards' busy time, per task: {result['spark_idle_per_task_s']} s "
                     "(median; the first run's includes each Python worker's start: torch import, model load).")
    lines += ["", f"Runs: `{json.dumps(result['runs'])}`", ""]
    (folder / f"{stem}.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
