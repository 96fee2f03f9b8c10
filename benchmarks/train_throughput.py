"""Training throughput (samples/s) and peak memory of one contrastive training step: ours
(`vlm_encoder.train`: `ContrastiveForward` + chunked loss + AdamW, the path `Trainer` runs)
against open_clip's `CLIP` + `ClipLoss` + AdamW, same architecture, batch and optimizer, in
one process.

    python benchmarks/train_throughput.py                       # CUDA: ViT-B/32 + base text, batch 1024
    python benchmarks/train_throughput.py --device cpu --quick  # CPU: tiny towers, small batch
    python benchmarks/train_throughput.py --device cpu --arch b32 --batch 32 --modes both \
        --precision fp32,bf16 --steps 3                         # CPU: issue 19's workload

Modes (the issue's workloads):
- `both`: both towers trained (ViT-B/32 on CUDA).
- `locked`: the image tower locked (LiT; ViT-B/16 on CUDA). Ours embeds each image once and
  trains on cached tower features (what `Trainer` does with `lock_image` +
  `cache_image_features`); open_clip locks the tower (`lock_image_tower`) and still runs it,
  without gradients, every step.

Each contender runs at its best settings on the device: on CUDA bf16 autocast (TF32 matmuls
on), measured both eager and with `torch.compile`, and the faster of the two is compared
(`--compile eager|compiled|best`); on the CPU float32 eager, and with `--precision bf16` both
sides under `torch.autocast("cpu", torch.bfloat16)` (what accelerate's `mixed_precision: bf16`
runs). Peak memory is
`torch.cuda.max_memory_allocated` of the step (CUDA only; "n/a" on the CPU); the memory
ratio compares the two best settings.

Results: `benchmarks/results/train_throughput_<device>[_quick].{json,md}` with device, date,
settings and the ratio ours / open_clip.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import platform
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

ARCHS = {
    # ViT-B/32 (open_clip "ViT-B-32") with the standard 12-layer, 512-wide text tower.
    "b32": dict(image=224, patch=32, width=768, depth=12, heads=12, text_width=512, text_depth=12, text_heads=8,
                context=77, embed=512),
    # ViT-B/16 (open_clip "ViT-B-16"), the locked-image workload.
    "b16": dict(image=224, patch=16, width=768, depth=12, heads=12, text_width=512, text_depth=12, text_heads=8,
                context=77, embed=512),
    "tiny": dict(image=32, patch=8, width=64, depth=2, heads=2, text_width=64, text_depth=2, text_heads=2,
                 context=16, embed=64),
}


def build_ours(arch: dict, locked: bool):
    from vlm_encoder.contrastive import ContrastiveModel
    from vlm_encoder.encoder import VisionEncoder
    from vlm_encoder.presets import preset_config
    from vlm_encoder.text import TextEncoder, text_preset_config

    vision = VisionEncoder(preset_config(
        "vit_base_patch32_clip_224", image_size=arch["image"], patch_size=arch["patch"], width=arch["width"],
        depth=arch["depth"], num_heads=arch["heads"], embed_dim=None, act="gelu",
    ))
    text = TextEncoder(text_preset_config("base", width=arch["text_width"], depth=arch["text_depth"],
                                          num_heads=arch["text_heads"], context_length=arch["context"]))
    model = ContrastiveModel(vision, text, arch["embed"])
    if locked:
        model.freeze_vision()
    return model


def build_open_clip(arch: dict, locked: bool):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    model = CLIP(
        arch["embed"],
        CLIPVisionCfg(layers=arch["depth"], width=arch["width"], patch_size=arch["patch"], image_size=arch["image"],
                      head_width=arch["width"] // arch["heads"]),
        CLIPTextCfg(context_length=arch["context"], vocab_size=49408, width=arch["text_width"],
                    heads=arch["text_heads"], layers=arch["text_depth"]),
    )
    if locked:
        model.lock_image_tower()
    return model


def make_step(impl: str, model, arch: dict, batch: int, device: torch.device, locked: bool, compile_: bool,
              precision: str = "bf16"):
    """A closure running one training step; returns it and its inputs' description."""
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    params = [p for p in model.parameters() if p.requires_grad]
    if impl == "ours":  # the Trainer's optimizer (fused on a GPU, no decay on norms / biases)
        from vlm_encoder.train import TrainConfig
        from vlm_encoder.train.build import build_optimizer

        optimizer = build_optimizer(model, TrainConfig(lr=1e-4))
    else:  # open_clip's AdamW at its best: fused on a GPU
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(1, 49000, (batch, arch["context"]), device=device)
    ids[:, 0], ids[:, -1] = 49406, 49407
    mask = torch.ones_like(ids)
    pixels = torch.randn(batch, 3, arch["image"], arch["image"], device=device)
    if impl == "ours":
        from vlm_encoder import batch_invariance, fast_cpu
        from vlm_encoder.train.step import ContrastiveForward, StepInputs, loss_and_backward

        # As the Trainer builds it (`TrainConfig.fast_cpu`): oneDNN GEMMs for float32 steps on the CPU
        forward = ContrastiveForward(fast_cpu(model, enabled=device.type == "cpu"))
        if compile_:
            forward = torch.compile(forward)
        loss_fn = model.build_loss()
        if locked:  # the feature cache: the locked tower ran once per image, before training
            with torch.no_grad(), amp():
                features = model.vision.image_embeds(pixels).float()
            inputs = StepInputs(ids, mask, image_features=features)
        else:
            inputs = StepInputs(ids, mask, pixel_values=pixels)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with batch_invariance("off"):  # as the Trainer trains: batched CPU kernels
                loss, _ = loss_and_backward(forward, loss_fn, inputs, autocast=amp)
            optimizer.step()
            return loss
    else:
        from open_clip.loss import ClipLoss

        loss_fn = ClipLoss()
        run = torch.compile(model) if compile_ else model

        def step():
            optimizer.zero_grad(set_to_none=True)
            with amp():
                image, text, scale = run(pixels, ids)
                loss = loss_fn(image, text, scale)
            loss.backward()
            optimizer.step()
            return loss
    return step


def measure(impl: str, arch: dict, batch: int, device: torch.device, locked: bool, steps: int, warmup: int,
            compile_: bool, precision: str) -> dict:
    torch.manual_seed(0)
    if device.type == "cuda":
        torch._dynamo.reset()
    model = (build_ours if impl == "ours" else build_open_clip)(arch, locked).to(device).train()
    step = make_step(impl, model, arch, batch, device, locked, compile_, precision)
    for _ in range(warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    del model, step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"impl": impl, "mode": "locked" if locked else "both", "samples_per_s": batch * steps / seconds,
            "peak_gib": peak, "loss": float(loss.detach()), "compile": compile_,
            "precision": "bf16 autocast" if precision == "bf16" else "fp32"}


def measure_best(impl: str, compile_modes: list[bool], **kwargs) -> dict:
    """`measure` under each compile setting; the fastest run, with all of them listed."""
    runs = [measure(impl, compile_=c, **kwargs) for c in compile_modes]
    best = max(runs, key=lambda r: r["samples_per_s"])
    return {**best, "runs": [{k: r[k] for k in ("compile", "samples_per_s", "peak_gib")} for r in runs]}


def _median_run(runs: list[dict]) -> dict:
    """The run with the median samples/s (the upper one of an even count)."""
    return sorted(runs, key=lambda r: r["samples_per_s"])[len(runs) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", choices=sorted(ARCHS), default=None,
                        help="default: b32 (both) and b16 (locked) on CUDA, tiny on the CPU")
    parser.add_argument("--compile", choices=("eager", "compiled", "best"), default=None,
                        help="default: best (eager and compiled, the faster kept) on CUDA, eager on the CPU")
    parser.add_argument("--batch", type=int, default=None, help="default: 1024 on CUDA, 64 on the CPU")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--modes", default="both,locked")
    parser.add_argument("--quick", action="store_true", help="few steps (CPU smoke measurement)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved repeats per contender; the median run is reported (default 3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--precision", default=None,
                        help="comma-separated fp32 / bf16 (bf16 autocast for both sides); "
                             "default: bf16 on CUDA, fp32 on the CPU")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(args.threads)
    compile_mode = args.compile or ("best" if cuda else "eager")
    compile_modes = {"eager": [False], "compiled": [True], "best": [False, True]}[compile_mode]
    batch = args.batch or (1024 if cuda else 64)
    steps = args.steps or (3 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else (5 if cuda else 2))
    rows = []
    for precision, mode in [(pr, m) for pr in (args.precision or ("bf16" if cuda else "fp32")).split(",")
                            for m in args.modes.split(",")]:
        locked = mode == "locked"
        arch_name = args.arch or (("b16" if locked else "b32") if cuda else "tiny")
        arch = ARCHS[arch_name]
        runs: dict[str, list[dict]] = {"open_clip": [], "ours": []}
        for _ in range(args.repeats):  # interleaved, so drift on the machine hits both alike
            for impl in ("open_clip", "ours"):
                runs[impl].append(measure_best(impl, compile_modes, arch=arch, batch=batch, device=device,
                                               locked=locked, steps=steps, warmup=warmup, precision=precision))
        pair = {impl: {**_median_run(r), "repeats": [x["samples_per_s"] for x in r]} for impl, r in runs.items()}
        ratio = pair["ours"]["samples_per_s"] / pair["open_clip"]["samples_per_s"]
        mem = (pair["ours"]["peak_gib"] / pair["open_clip"]["peak_gib"]) if cuda else None
        rows.append({"mode": mode, "precision": precision, "arch": arch_name, "ours": pair["ours"],
                     "open_clip": pair["open_clip"], "speed_ratio": ratio,
                     "memory_ratio": mem})
        print(f"{mode:>6} {precision}: ours {pair['ours']['samples_per_s']:.1f} samples/s, open_clip "
              f"{pair['open_clip']['samples_per_s']:.1f} samples/s -> {ratio:.2f}x"
              + (f", memory {mem:.2f}x" if mem is not None else ""))
    device_name = torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or platform.machine()}, {args.threads} threads)"
    report = {
        "device": device_name, "date": dt.date.today().isoformat(), "torch": torch.__version__,
        "archs": {r["arch"]: ARCHS[r["arch"]] for r in rows}, "compile": compile_mode, "batch": batch,
        "repeats": args.repeats, "steps": steps, "warmup": warmup, "rows": rows,
        "targets": {"both": "1.25x open_clip samples/s, no more memory (H100, ViT-B/32, batch 1024)",
                    "locked": "3x open_clip samples/s (H100, cached image features)"},
    }
    results_dir = args.results_dir
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = f"train_throughput_{'cuda' if cuda else 'cpu'}{'_quick' if args.quick else ''}"
    (results_dir / f"{stem}.json").write_text(json.dumps(report, indent=2))
    lines = [f"# Training throughput ({report['date']}, {device_name}, torch {torch.__version__})", "",
             f"Batch {batch}, {steps} timed steps after {warmup} warm-up, median of {args.repeats} interleaved "
             f"repeats per contender; compile setting `{compile_mode}` (each side's faster run is compared).", "",
             "| mode | precision | arch | open_clip samples/s (compiled?) | ours samples/s (compiled?) | speed ratio "
             "| best of repeats: open_clip / ours | memory ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mem = f"{r['memory_ratio']:.2f}x" if r["memory_ratio"] is not None else "n/a (CPU)"
        best = f"{max(r['open_clip']['repeats']):.1f} / {max(r['ours']['repeats']):.1f}"
        lines.append(f"| {r['mode']} | {r['precision']} | {r['arch']} | {r['open_clip']['samples_per_s']:.1f} "
                     f"({r['open_clip']['compile']}) | {r['ours']['samples_per_s']:.1f} ({r['ours']['compile']}) | "
                     f"{r['speed_ratio']:.2f}x | {best} | {mem} |")
    (results_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {results_dir / stem}.json / .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
