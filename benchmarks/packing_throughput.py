"""Native resolution: a batch of mixed-size images packed (`encode_packed`) against padding
every image's tokens to the largest one (a batch with a key-padding mask).

    python benchmarks/packing_throughput.py            # GPU workload if CUDA is there, else CPU
    python benchmarks/packing_throughput.py --quick    # CPU, ViT-S, few repeats: a check, not a result
    python benchmarks/packing_throughput.py --tiny     # tiny random ViT: smoke test of the script

The images are a fixed mix of typical photo sizes (4:3, 3:4, 16:9, 9:16, 1:1, 21:9, ...) sized
by the NaViT policy (`navit_size`: native, shrunk to at most `max_tokens` patches), random
pixels, a random-weight ViT (CLS pooling). Both contenders embed each image at its own size
(the same per-image position table), then:
  packed   `encode_packed(encoder, images, max_tokens_per_pack=...)`: packs of at most that
           many tokens, run as one batch with a block-diagonal mask;
  padded   tokens padded to the longest image `(B, T_max, D)`, mask `(B, 1, 1, T_max)`.
Before timing the pooled outputs of the two are compared (they must agree: same computation).

Reported: real tokens/s (tokens of the images, prefix included, per second), images/s, the
tokens actually processed (with padding) and peak memory: the `torch.cuda.max_memory_allocated`
rise over one call on the GPU; on the CPU the peak RSS rise over one call (sampled every 1 ms) in a
fresh process whose allocator returns freed tensors to the system (tracemalloc does not see
torch's allocations, and a process that already ran keeps freed pages). Warm-up, then interleaved
repeats, median. Results go to `benchmarks/results/packing_throughput_<workload>[_<mode>].{json,md}`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from vlm_encoder import VisionConfig, VisionEncoder
from vlm_encoder.packing import embed_images, encode_packed, navit_size

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# A web-like mix of image sizes (H, W): photos, screenshots, banners, thumbnails, icons;
# cycled to fill the batch.
PHOTO_SIZES = [
    (480, 640), (1080, 1920), (64, 64), (240, 320), (800, 200), (1024, 768), (128, 128),
    (300, 500), (1600, 900), (96, 160), (512, 512), (200, 600), (2048, 1536), (150, 150),
]


@dataclass(frozen=True)
class Workload:
    name: str
    width: int
    depth: int
    heads: int
    patch: int
    images: int
    max_tokens: int  # per image (NaViT sizing budget)
    max_tokens_per_pack: int
    dtype: str
    warmup: int
    repeats: int


WORKLOADS = {
    "cpu": Workload("cpu", 768, 12, 12, 16, 14, 576, 2048, "float32", 1, 3),
    "gpu": Workload("gpu", 1024, 24, 16, 16, 256, 1024, 8192, "bfloat16", 3, 10),
}
QUICK = dict(width=384, depth=6, heads=6, images=14, max_tokens=256, max_tokens_per_pack=1024, warmup=1, repeats=3)
TINY = dict(width=32, depth=2, heads=2, patch=8, images=7, max_tokens=16, max_tokens_per_pack=40, warmup=1, repeats=2)


# ------------------------------------------------------------------ contenders
def encode_padded(encoder: VisionEncoder, images: list[torch.Tensor]) -> list[torch.Tensor]:
    """Pooled `(1, D)` per image from a padded batch `(B, T_max, D)` with a key mask."""
    packed = embed_images(encoder, images, max_tokens_per_pack=None)
    sequences = packed.unpack(packed.tokens)  # per image (1, T_i, D)
    lengths = [s.shape[1] for s in sequences]
    T = max(lengths)
    x = torch.cat([torch.nn.functional.pad(s, (0, 0, 0, T - s.shape[1])) for s in sequences])  # (B, T, D)
    keys = torch.arange(T, device=x.device)[None] < torch.tensor(lengths, device=x.device)[:, None]  # (B, T)
    mask = keys[:, None, None, :]  # (B, 1, 1, T)
    for block in encoder.blocks:
        x, _ = block(x, attn_mask=mask)
    x = encoder.norm(x)
    return [encoder.pool(x[i : i + 1, :n]) for i, n in enumerate(lengths)]


def encode_packed_pooled(encoder: VisionEncoder, images: list[torch.Tensor], budget: int) -> list[torch.Tensor]:
    return [o.pooled for o in encode_packed(encoder, images, max_tokens_per_pack=budget)]


# ------------------------------------------------------------------ measurement
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def contenders(encoder: VisionEncoder, images: list[torch.Tensor], workload: Workload) -> dict[str, Callable[[], object]]:
    return {
        "packed": lambda: encode_packed_pooled(encoder, images, workload.max_tokens_per_pack),
        "padded": lambda: encode_padded(encoder, images),
    }


def _rss() -> int:
    """Resident set size of this process in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def cpu_memory_probe(workload: Workload, name: str) -> float:
    """In this (fresh) process, started with glibc's mmap threshold at 64 KiB so that freed
    tensors leave the RSS: the peak RSS rise over one call of `name` (sampled every 1 ms),
    after the model and images are built and one warm-up call (MiB)."""
    encoder, images = build(workload, torch.device("cpu"))
    fn = contenders(encoder, images, workload)[name]
    with torch.inference_mode():
        fn()  # warm-up: one-time buffers of the math libraries are not the contender's
        base = peak = _rss()
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, _rss())
                time.sleep(0.001)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        fn()
        stop.set()
        sampler.join()
    return (max(peak, _rss()) - base) / 2**20


def peak_memory_mb(fn: Callable[[], object], device: torch.device, workload: Workload, name: str) -> float:
    """GPU: `max_memory_allocated` rise over one call. CPU: `cpu_memory_probe` in a fresh
    process (this one's allocator keeps freed pages, and tracemalloc does not see torch's
    allocations)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    command = [
        sys.executable, __file__, "--memory-probe", name, "--workload-json", json.dumps(asdict(workload)),
        "--threads", str(torch.get_num_threads()),
    ]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return float(done.stdout.strip().splitlines()[-1])


def machine_info(device: torch.device) -> dict:
    info = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_model": platform.processor() or platform.machine(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {info['cpu_model']} ({info['threads']} threads)"
    return info


# ------------------------------------------------------------------ run
def build(workload: Workload, device: torch.device) -> tuple[VisionEncoder, list[torch.Tensor]]:
    dtype = getattr(torch, workload.dtype)
    config = VisionConfig(
        image_size=224 if workload.patch == 16 else 32, patch_size=workload.patch, width=workload.width,
        depth=workload.depth, num_heads=workload.heads,
    )
    torch.manual_seed(0)
    encoder = VisionEncoder(config).eval().to(device=device, dtype=dtype)
    sizes = [PHOTO_SIZES[i % len(PHOTO_SIZES)] for i in range(workload.images)]
    if workload.patch != 16:  # tiny: scale the photos down so that the sizes stay varied
        sizes = [(max(workload.patch, h // 40), max(workload.patch, w // 40)) for h, w in sizes]
    targets = [navit_size(h, w, workload.patch, workload.max_tokens) for h, w in sizes]
    images = [torch.randn(3, h, w, device=device, dtype=dtype) for h, w in targets]
    return encoder, images


def run(workload: Workload, device: torch.device, mode: str) -> dict:
    encoder, images = build(workload, device)
    prefix = encoder.num_prefix_tokens
    lengths = [prefix + (im.shape[-2] // workload.patch) * (im.shape[-1] // workload.patch) for im in images]
    real_tokens = sum(lengths)
    packed_layout = embed_images(encoder, images, workload.max_tokens_per_pack)
    packs = packed_layout.num_packs
    processed = {
        "packed": packs * max(t.shape[1] for t in packed_layout.tokens),
        "padded": len(images) * max(lengths),
    }
    fns = contenders(encoder, images, workload)
    with torch.inference_mode():
        a, b = fns["packed"](), fns["padded"]()
        parity = max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))
        memory = {name: peak_memory_mb(fn, device, workload, name) for name, fn in fns.items()}
        for _ in range(workload.warmup):
            for fn in fns.values():
                fn()
        times: dict[str, list[float]] = {name: [] for name in fns}
        order = list(fns)
        for r in range(workload.repeats):
            for name in order[r % 2 :] + order[: r % 2]:
                sync(device)
                start = time.perf_counter()
                fns[name]()
                sync(device)
                times[name].append(time.perf_counter() - start)
    results = []
    for name in fns:
        median = statistics.median(times[name])
        results.append(
            dict(
                name=name, median_s=median, times_s=times[name], images_per_s=len(images) / median,
                real_tokens_per_s=real_tokens / median, processed_tokens=processed[name],
                padding_fraction=1 - real_tokens / processed[name], peak_memory_mb=memory[name],
            )
        )
    return dict(
        benchmark="packing_throughput", workload=asdict(workload), mode=mode, machine=machine_info(device),
        images=[list(im.shape[-2:]) for im in images], tokens_per_image=lengths, real_tokens=real_tokens,
        packs=packs, parity_pooled_max_abs=parity, results=results,
    )


def markdown(report: dict) -> str:
    w, m = report["workload"], report["machine"]
    memory_kind = "torch.cuda.max_memory_allocated rise over one call" if "CPU" not in m["device"] else "peak RSS rise over one call, fresh process, sampled every 1 ms"
    lines = [
        f"# Packing throughput: {w['name']} workload" + (f" ({report['mode']})" if report["mode"] != "full" else ""),
        "",
        f"ViT width {w['width']}, depth {w['depth']}, patch {w['patch']}, random weights, {w['dtype']}; "
        f"{w['images']} images of mixed sizes (NaViT sizing, at most {w['max_tokens']} patches each), "
        f"{report['real_tokens']} real tokens; packed into {report['packs']} pack(s) of at most {w['max_tokens_per_pack']} tokens.",
        "",
        f"- date: {m['date']}",
        f"- device: {m['device']}",
        f"- torch {m['torch']}, python {m['python']}",
        f"- warm-up {w['warmup']}, {w['repeats']} interleaved repeats, median",
        f"- pooled outputs packed vs padded, max abs difference: {report['parity_pooled_max_abs']:.1e}",
        f"- memory: {memory_kind}",
        "",
    ]
    if report["mode"] != "full":
        lines += [f"**{report['mode'].capitalize()} mode on a possibly shared machine: a check that the benchmark runs, not the reference measurement.**", ""]
    lines += [
        "| contender | real tokens/s | images/s | median s | processed tokens | padding | peak memory MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['name']} | {r['real_tokens_per_s']:.0f} | {r['images_per_s']:.2f} | {r['median_s']:.4f} | "
            f"{r['processed_tokens']} | {r['padding_fraction']:.0%} | {r['peak_memory_mb']:.1f} |"
        )
    rows = {r["name"]: r for r in report["results"]}
    lines += ["", f"Packed speed-up over padded: {rows['padded']['median_s'] / rows['packed']['median_s']:.2f}x.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default=None, help="default: gpu if CUDA is available, else cpu")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="CPU, ViT-S, few repeats")
    group.add_argument("--tiny", action="store_true", help="tiny ViT: smoke test")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--memory-probe", choices=("packed", "padded"), help=argparse.SUPPRESS)
    parser.add_argument("--workload-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_probe:  # internal: one CPU memory measurement in a fresh process
        if args.threads:
            torch.set_num_threads(args.threads)
        print(cpu_memory_probe(Workload(**json.loads(args.workload_json)), args.memory_probe))
        return 0
    name = args.workload or ("gpu" if torch.cuda.is_available() and not (args.quick or args.tiny) else "cpu")
    if name == "gpu" and not torch.cuda.is_available():
        parser.error("the gpu workload needs CUDA")
    if args.threads:
        torch.set_num_threads(args.threads)
    workload, mode = WORKLOADS[name], "full"
    if args.quick:
        workload, mode = replace(workload, **QUICK), "quick"
    if args.tiny:
        workload, mode = replace(workload, **TINY, dtype="float32"), "tiny"
    device = torch.device("cuda" if name == "gpu" else "cpu")
    report = run(workload, device, mode)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stem = f"packing_throughput_{name}" + ("" if mode == "full" else f"_{mode}")
    (args.results_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (args.results_dir / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
