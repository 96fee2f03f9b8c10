"""The CPU inference routes of our encoder against timm, fp32 and bf16, on the same weights.

    python benchmarks/cpu_fast_path.py                     # CLIP ViT-B/16-224, batch 8 (a few minutes on 2 cores)
    python benchmarks/cpu_fast_path.py --batch 8 32        # both batch sizes
    python benchmarks/cpu_fast_path.py --batch 8 --onnx --compile   # + ONNX Runtime fp32, + compiled timm bf16
    python benchmarks/cpu_fast_path.py --smoke --results-dir /tmp/x   # tiny tower, seconds (the test's mode)

Contenders, interleaved in one process (each repeat times every contender once, in turn), all
returning layer -2's patch tokens `(B, N, D)` from timm's `vit_base_patch16_clip_224`
architecture (random weights; ours are timm's, converted by `converters.timm_vit`):
  timm fp32              timm eager `forward_intermediates`
  timm bf16 autocast     the same under `torch.autocast("cpu", torch.bfloat16)` (fp32 weights)
  ours fp32              our encoder, plain
  ours fast_cpu fp32     `fast_cpu(encoder)`: oneDNN GEMM on prepacked weights
  ours bf16              `encoder.to(torch.bfloat16)` (fp32 pixels in: the encoder casts them)
  ours bf16 fast_cpu     `fast_cpu` of that
  ours fp32 + bf16 matmuls   `fast_cpu(encoder, matmul_dtype=torch.bfloat16)`: fp32 model, bf16 GEMMs
                         (autocast's precision: residual stream and norms in fp32)
  onnxruntime fp32       (`--onnx`) ONNX Runtime's CPU provider on timm's exported graph
  timm bf16 compiled     (`--compile`) `torch.compile` of timm under bf16 autocast (compile time
                         excluded: it is printed)

Reported per contender: img/s (median and best of repeats), the ratio of medians to timm fp32
and to timm bf16 autocast, the max abs difference to timm fp32, and for bf16 the max relative
error (max |diff| / max |ref|)
and the mean cosine to timm fp32 per token. The markdown goes to
`<results-dir>/cpu_fast_path[_smoke].md` with the CPU model, torch version, CPU flags, date and
the load average beside each batch size (the machine may be shared: the numbers are noisy).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TIMM_NAME = "vit_base_patch16_clip_224"
SMOKE_OVERRIDES = dict(img_size=32, embed_dim=32, depth=2, num_heads=2)  # patch 16 kept: 4 patches
BF16 = ("timm bf16 autocast", "timm bf16 compiled", "ours bf16", "ours bf16 fast_cpu", "ours fp32 + bf16 matmuls")


def build(smoke: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """timm's model and our encoder holding the same (random) weights."""
    import timm

    from vlm_encoder.converters.timm_vit import encoder_from_timm_model

    torch.manual_seed(0)
    timm_model = timm.create_model(TIMM_NAME, pretrained=False, num_classes=0, **(SMOKE_OVERRIDES if smoke else {}))
    return timm_model.eval(), encoder_from_timm_model(timm_model).eval()


def contenders(timm_model: torch.nn.Module, ours: torch.nn.Module, onnx: bool = False,
               compile: bool = False) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Each contender's call: fp32 pixels `(B, 3, H, W)` -> layer -2 patch tokens `(B, N, D)`."""
    from vlm_encoder import fast_cpu

    layer = len(timm_model.blocks) - 2

    def timm_fp32(px):
        return timm_model.forward_intermediates(px, indices=[layer], stop_early=True, intermediates_only=True,
                                                output_fmt="NLC")[0]  # prefix tokens already dropped

    def timm_bf16(px):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return timm_fp32(px)

    def ours_call(model):
        return lambda px: model(px, layers=(-2,)).patches(-2)

    ours_bf16 = copy.deepcopy(ours).to(torch.bfloat16)
    fns = {
        "timm fp32": timm_fp32,
        "ours fp32": ours_call(ours),
        "ours fast_cpu fp32": ours_call(fast_cpu(ours)),
        "timm bf16 autocast": timm_bf16,
        "ours bf16": ours_call(ours_bf16),
        "ours bf16 fast_cpu": ours_call(fast_cpu(ours_bf16)),
        "ours fp32 + bf16 matmuls": ours_call(fast_cpu(ours, matmul_dtype=torch.bfloat16)),
    }
    if onnx:
        fns["onnxruntime fp32"] = onnx_session(timm_model, layer)
    if compile:
        fns["timm bf16 compiled"] = torch.compile(timm_bf16, dynamic=False)
    return fns


def onnx_session(timm_model: torch.nn.Module, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """ONNX Runtime (CPU provider, torch's thread count) on timm's graph to block `layer`, exported
    with a dynamic batch."""
    import tempfile

    import onnxruntime as ort

    class Graph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = timm_model

        def forward(self, px):
            return self.model.forward_intermediates(px, indices=[layer], stop_early=True, intermediates_only=True,
                                                    output_fmt="NLC")[0]

    size = timm_model.patch_embed.img_size[0]
    path = Path(tempfile.mkdtemp()) / "timm.onnx"
    torch.onnx.export(Graph().eval(), (torch.randn(2, 3, size, size),), str(path), dynamo=False, input_names=["px"],
                      output_names=["tokens"], dynamic_axes={"px": {0: "batch"}, "tokens": {0: "batch"}})
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda px: torch.from_numpy(session.run(None, {"px": px.numpy()})[0])


@torch.inference_mode()
def accuracy(fns: dict[str, Callable], px: torch.Tensor) -> dict[str, dict[str, float]]:
    """Max abs diff, max relative error and mean per-token cosine of each contender to timm fp32."""
    ref = fns["timm fp32"](px).float()
    out = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        y = fn(px).float()
        print(f"{name}: first call {time.perf_counter() - start:.1f} s (compilation, packing)", flush=True)
        diff = float((y - ref).abs().max())
        out[name] = dict(max_abs=diff, max_rel=diff / float(ref.abs().max()),
                         cosine=float(F.cosine_similarity(y, ref, dim=-1).mean()))
    return out


@torch.inference_mode()
def measure(fns: dict[str, Callable], px: torch.Tensor, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each contender, interleaved: repeat r times every contender once."""
    for _ in range(warmup):
        for fn in fns.values():
            fn(px)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(px)
            times[name].append(time.perf_counter() - start)
    return times


def machine() -> dict[str, str]:
    """CPU model, flags that matter to the GEMM routes, torch, threads, date."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        lscpu = ""
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    model = fields.get("Model name", platform.processor() or "?").strip()
    flags = set(fields.get("Flags", "").split())
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "avx512_fp16")
    return dict(cpu=model, cores=str(os.cpu_count()), flags=" ".join(f for f in wanted if f in flags) or "?",
                torch=torch.__version__, threads=str(torch.get_num_threads()),
                date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))


def table(batch: int, times: dict[str, list[float]], acc: dict[str, dict[str, float]], load: tuple) -> str:
    base = statistics.median(times["timm fp32"])
    base_bf16 = statistics.median(times["timm bf16 autocast"])
    lines = [f"### batch {batch} (load average before / after: {load[0]:.1f} / {load[1]:.1f})", "",
             "| contender | img/s median | img/s best | x timm fp32 | max abs diff | max rel err | mean cosine "
             "| x timm bf16 autocast |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, ts in times.items():
        med = statistics.median(ts)
        a = acc[name]
        rel = f"{a['max_rel']:.1e}" if name in BF16 else ""
        cos = f"{a['cosine']:.6f}" if name in BF16 else ""
        lines.append(f"| {name} | {batch / med:.2f} | {batch / min(ts):.2f} | {base / med:.2f} | "
                     f"{a['max_abs']:.1e} | {rel} | {cos} | {base_bf16 / med:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[8])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch (and ONNX Runtime) threads; default: torch's")
    p.add_argument("--skip", nargs="*", default=[], help="contenders to leave out (e.g. 'ours fp32' 'ours bf16')")
    p.add_argument("--onnx", action="store_true", help="add ONNX Runtime fp32 on timm's exported graph")
    p.add_argument("--compile", action="store_true", help="add torch.compile of timm under bf16 autocast")
    p.add_argument("--smoke", action="store_true", help="a tiny tower (width 32, 2 blocks, 32 px), 2 repeats")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    a = p.parse_args(argv)
    if a.smoke:
        a.repeats = min(a.repeats, 2)
    if a.threads:
        torch.set_num_threads(a.threads)
    timm_model, ours = build(a.smoke)
    fns = contenders(timm_model, ours, onnx=a.onnx, compile=a.compile)
    fns = {name: fn for name, fn in fns.items() if name not in a.skip}
    size = timm_model.patch_embed.img_size[0]
    info = machine()
    sections = []
    for batch in a.batch:
        px = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        before = os.getloadavg()[0]
        acc = accuracy(fns, px)
        times = measure(fns, px, a.warmup, a.repeats)
        sections.append(table(batch, times, acc, (before, os.getloadavg()[0])))
        print(sections[-1], flush=True)
    head = (f"# CPU inference routes: `{TIMM_NAME}`{' (smoke: tiny tower)' if a.smoke else ''}, layer -2 patches\n\n"
            f"{info['cpu']} ({info['cores']} cores; flags: {info['flags']}), torch {info['torch']}, "
            f"{info['threads']} threads, {info['date']}. Median and best of {a.repeats} interleaved repeats "
            f"after {a.warmup} warm-up; random weights shared by all contenders. Machine shared with other "
            "jobs: noisy numbers, the load average is beside each table.\n\n")
    a.results_dir.mkdir(parents=True, exist_ok=True)
    path = a.results_dir / f"cpu_fast_path{'_smoke' if a.smoke else ''}.md"
    path.write_text(head + "\n".join(sections))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
