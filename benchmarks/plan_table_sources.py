"""Planning an extraction of a parquet file and of webdataset tars: read by file and offset
(`vlm_encoder.extract.table_sources`) against the `datasets` route it replaced.

    python benchmarks/plan_table_sources.py                 # 2,000 images (96 x 96 JPEG)
    python benchmarks/plan_table_sources.py --images 20000

Each route plans the same spec (`plan_extraction`, a tiny random ViT: the model costs the same on
both sides) in a fresh process with an empty `datasets` cache. Reported: wall time of the plan,
the process's peak RSS (the driver's), the time and peak RSS of opening the source alone, and the bytes
`datasets` wrote to its Arrow cache (the copy of the data it makes before the first image is
encoded, on the driver and again on every worker). The old route is reached by making
`open_table_source` decline, which is what it does for specs it does not take.

Results go to `benchmarks/results/plan_table_sources_<images>.{json,md}` with the machine and date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
TINY = {"depth": 3, "width": 32, "num_heads": 2, "image_size": 32, "patch_size": 8}

CHILD = r"""
import json, os, resource, sys, time
mode, route, spec, out = sys.argv[1:5]
import datasets  # imported by both routes: outside the timings
import vlm_encoder.extract.sources as sources
if route == "datasets":
    sources.open_table_source = lambda *args: None
from vlm_encoder.extract import ExtractConfig, plan_extraction
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
if mode == "open":
    rows = len(sources.open_image_source(spec))
else:
    config = ExtractConfig(model="preset:vit_tiny_patch16_224", overrides=json.loads(sys.argv[5]), dataset=spec,
                           out=out, layers=(-1,), select=("cls",), shard_size=256, num_workers=0, progress=False)
    rows = plan_extraction(config).num_rows
seconds = time.perf_counter() - started
print(json.dumps({"rows": rows, "seconds": seconds, "rss_base_mib": rss0 / 1024,
                  "rss_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_data(root: Path, n: int) -> dict[str, str]:
    """`n` 96 x 96 JPEGs as one parquet file (`datasets`' Image column, row groups of 100) and as
    4 webdataset tars (`.jpg` + `.txt` per sample)."""
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    blobs = []
    for i in range(n):
        buffer = io.BytesIO()
        base = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
        Image.fromarray(base).resize((96, 96)).save(buffer, format="JPEG", quality=90)
        blobs.append(buffer.getvalue())
    table = datasets.Dataset.from_dict({"caption": [f"image {i}" for i in range(n)],
                                        "image": [{"bytes": b, "path": None} for b in blobs]})
    table.cast_column("image", datasets.Image()).to_parquet(root / "images.parquet", batch_size=100)
    per = -(-n // 4)
    for part in range(4):
        with tarfile.open(root / f"shard-{part:05d}.tar", "w") as archive:
            for i in range(part * per, min(n, (part + 1) * per)):
                for name, data in ((f"{i:08d}.jpg", blobs[i]), (f"{i:08d}.txt", f"image {i}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    return {"parquet": str(root / "images.parquet"), "webdataset": str(root / "shard-*.tar")}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def child(mode: str, route: str, spec: str, tmp: Path) -> dict:
    cache = tmp / f"cache-{mode}"
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, mode, route, spec, str(tmp / f"out-{mode}"), json.dumps(TINY)],
                          env=env, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["arrow_cache_mib"] = folder_bytes(cache) / 2**20 if cache.exists() else 0.0
    return result


def measure(route: str, spec: str, tmp: Path) -> dict:
    """Opening the source alone, then the whole plan, each in a fresh process and cache."""
    opened, planned = child("open", route, spec, tmp), child("plan", route, spec, tmp)
    return {"rows": planned["rows"], "open_s": opened["seconds"], "open_rss_mib": opened["rss_peak_mib"],
            "plan_s": planned["seconds"], "rss_base_mib": planned["rss_base_mib"],
            "rss_peak_mib": planned["rss_peak_mib"], "arrow_cache_mib": planned["arrow_cache_mib"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as name:
        root = Path(name)
        specs = make_data(root, args.images)
        sizes = {"parquet": Path(specs["parquet"]).stat().st_size,
                 "webdataset": sum(p.stat().st_size for p in root.glob("shard-*.tar"))}
        for fmt, spec in specs.items():
            for route in ("datasets", "files"):
                tmp = root / f"{fmt}-{route}"
                tmp.mkdir()
                result = measure(route, spec, tmp)
                rows.append({"format": fmt, "route": route, "data_mib": sizes[fmt] / 2**20, **result})
                print(json.dumps(rows[-1]))
    meta = {"date": dt.date.today().isoformat(), "machine": platform.platform(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "images": args.images}
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"plan_table_sources_{args.images}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [
        f"# Planning a parquet / webdataset extraction: by file and offset vs `datasets` ({meta['date']})",
        "",
        f"{args.images} images (96 x 96 JPEG), {meta['machine']}, {meta['cpus']} CPUs. Each route in a fresh "
        "process with an empty `datasets` cache; a tiny random ViT (the model costs the same on both sides). "
        "`open`: opening the source alone; `plan`: `plan_extraction` (opening the source, model load, fingerprint, "
        "manifest), each in a fresh process after `import datasets, vlm_encoder.extract` (base RSS); peak RSS of "
        "that process (the driver's); Arrow cache: bytes `datasets` wrote (made again on every worker).",
        "",
        "| format | route | data MiB | open s | open peak RSS MiB | plan s | plan peak RSS MiB | base RSS MiB "
        "| Arrow cache MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['format']} | {r['route']} | {r['data_mib']:.1f} | {r['open_s']:.2f} "
                     f"| {r['open_rss_mib']:.0f} | {r['plan_s']:.2f} | {r['rss_peak_mib']:.0f} "
                     f"| {r['rss_base_mib']:.0f} | {r['arrow_cache_mib']:.1f} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
