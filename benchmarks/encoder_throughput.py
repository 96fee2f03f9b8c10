"""Throughput of "patch tokens of layer -2" against timm, open_clip and HF, same weights.

    python benchmarks/encoder_throughput.py              # GPU workload if CUDA is there, else CPU
    python benchmarks/encoder_throughput.py --quick      # CPU, batch 2, few repeats: a check, not a result
    python benchmarks/encoder_throughput.py --tiny       # a tiny random ViT: smoke test of the script
    python benchmarks/encoder_throughput.py --profile    # also profile ours and timm (torch.profiler)

One process, one architecture, one set of random weights: a timm CLIP ViT is created with
`pretrained=False` and its weights are converted into our `VisionEncoder`, an open_clip
`VisionTransformer` and an HF `CLIPVisionModel` (sdpa). Before timing, every contender's
layer -2 patch tokens are checked against timm's (relative error <= 1e-4 in float32), so
the comparison is between equal computations.

Each contender runs its own feature API with early stopping where it has one:
  ours       encoder(px, layers=(-2,)).patches(-2)
  timm       forward_intermediates(indices=[L-2], stop_early=True, intermediates_only=True)
  open_clip  visual.forward_intermediates(indices=[L-2], stop_early=True, intermediates_only=True)
  HF         CLIPVisionModel(output_hidden_states=True).hidden_states[-2] (runs every layer)

Timing: warm-up calls, then repeats in which the contenders take turns (the order rotates
each repeat, to spread drift), median per contender; CUDA events on the GPU. Results go to
`benchmarks/results/encoder_throughput_<workload>[_<mode>].{json,md}`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
from torch import nn

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PARITY_TOLERANCE = 1e-4  # max |ours - timm| / max |timm|, float32


@dataclass(frozen=True)
class Workload:
    """One benchmark setting: a timm architecture, input size, batch and precision."""

    name: str
    timm_model: str
    image_size: int
    batch_size: int
    dtype: str
    warmup: int
    repeats: int
    # Peer numbers measured by the project before this benchmark existed (images/s).
    reference: dict[str, float] = field(default_factory=dict)
    reference_device: str = ""
    target: str = ""
    timm_overrides: dict = field(default_factory=dict)


WORKLOADS: dict[str, Workload] = {
    "cpu": Workload(
        name="cpu", timm_model="vit_base_patch16_clip_224", image_size=224, batch_size=8, dtype="float32",
        warmup=2, repeats=7,
        reference={"timm": 4.8, "open_clip": 3.9, "hf": 3.7}, reference_device="2-core CPU of the project machine",
        target="ours >= timm",
    ),
    "gpu": Workload(
        name="gpu", timm_model="vit_large_patch14_clip_336", image_size=336, batch_size=128, dtype="bfloat16",
        warmup=5, repeats=20,
        reference={"timm": 1214.0, "open_clip": 1025.0, "hf": 978.0}, reference_device="one NVIDIA H100",
        target="ours >= 1.35 x timm",
    ),
}
QUICK = dict(batch_size=2, warmup=1, repeats=3)
TINY_OVERRIDES = dict(img_size=32, embed_dim=64, depth=3, num_heads=2)


# ------------------------------------------------------------------ contenders
def build_timm(workload: Workload, overrides: dict) -> nn.Module:
    import timm

    return timm.create_model(workload.timm_model, pretrained=False, num_classes=0, **overrides).eval()


def timm_dims(model: nn.Module) -> dict:
    """Architecture numbers of a timm ViT that the peers need."""
    return dict(
        width=model.embed_dim,
        depth=len(model.blocks),
        heads=model.blocks[0].attn.num_heads,
        mlp_dim=model.blocks[0].mlp.fc1.out_features,
        patch=model.patch_embed.patch_size[0],
        image=model.patch_embed.img_size[0],
    )


def build_ours(timm_model: nn.Module) -> nn.Module:
    """Our encoder with timm's weights: the package's converter when present, else the
    mapping below (CLS position row folded into the CLS token, all other names equal)."""
    try:
        from vlm_encoder.converters.timm_vit import encoder_from_timm_model
    except ImportError:
        encoder_from_timm_model = None
    if encoder_from_timm_model is not None:
        return encoder_from_timm_model(timm_model).eval()
    from vlm_encoder import VisionConfig, VisionEncoder
    from vlm_encoder.weights import load_state_dict_strict

    d = timm_dims(timm_model)
    config = VisionConfig(
        image_size=d["image"], patch_size=d["patch"], width=d["width"], depth=d["depth"], num_heads=d["heads"],
        mlp_dim=d["mlp_dim"], norm_pre=True, patch_bias=False, norm_eps=1e-5, act="gelu",
    )
    sd = dict(timm_model.state_dict())
    pos = sd.pop("pos_embed")  # (1, 1 + N, D)
    sd["cls_token"] = sd["cls_token"] + pos[:, :1]
    sd["pos_embed"] = pos[:, 1:]
    encoder = VisionEncoder(config)
    load_state_dict_strict(encoder, sd, source="timm (benchmark mapping)")
    return encoder.eval()


def build_open_clip(timm_model: nn.Module) -> nn.Module:
    """open_clip's `VisionTransformer` (as in `ViT-B-16` / `ViT-L-14-336`) with timm's weights."""
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    d = timm_dims(timm_model)
    cfg = CLIPVisionCfg(
        layers=d["depth"], width=d["width"], head_width=d["width"] // d["heads"], mlp_ratio=d["mlp_dim"] / d["width"],
        patch_size=d["patch"], image_size=d["image"],
    )
    visual = _build_vision_tower(embed_dim=d["width"], vision_cfg=cfg)
    src = timm_model.state_dict()
    sd = {
        "class_embedding": src["cls_token"][0, 0],
        "positional_embedding": src["pos_embed"][0],
        "conv1.weight": src["patch_embed.proj.weight"],
        "ln_pre.weight": src["norm_pre.weight"], "ln_pre.bias": src["norm_pre.bias"],
        "ln_post.weight": src["norm.weight"], "ln_post.bias": src["norm.bias"],
        "proj": visual.proj.detach().clone(),  # the projection is not part of the workload
    }
    names = {"norm1": "ln_1", "attn.qkv": "attn.in_proj_", "attn.proj": "attn.out_proj",
             "norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in range(d["depth"]):
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                target = f"{theirs}{kind}" if theirs.endswith("_") else f"{theirs}.{kind}"
                sd[f"transformer.resblocks.{i}.{target}"] = src[f"blocks.{i}.{ours}.{kind}"]
    visual.load_state_dict(sd, strict=True)
    return visual.eval()


def build_hf(timm_model: nn.Module) -> nn.Module:
    """HF `CLIPVisionModel` with sdpa attention and timm's weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    d = timm_dims(timm_model)
    config = CLIPVisionConfig(
        hidden_size=d["width"], intermediate_size=d["mlp_dim"], num_hidden_layers=d["depth"],
        num_attention_heads=d["heads"], image_size=d["image"], patch_size=d["patch"], hidden_act="gelu",
        layer_norm_eps=1e-5,
    )
    model = CLIPVisionModel._from_config(config, attn_implementation="sdpa")
    src = timm_model.state_dict()
    p = "vision_model." if hasattr(model, "vision_model") else ""  # transformers < 5 wraps the tower
    sd = {
        f"{p}embeddings.class_embedding": src["cls_token"][0, 0],
        f"{p}embeddings.patch_embedding.weight": src["patch_embed.proj.weight"],
        f"{p}embeddings.position_embedding.weight": src["pos_embed"][0],
        f"{p}pre_layrnorm.weight": src["norm_pre.weight"], f"{p}pre_layrnorm.bias": src["norm_pre.bias"],
        f"{p}post_layernorm.weight": src["norm.weight"], f"{p}post_layernorm.bias": src["norm.bias"],
    }
    names = {"norm1": "layer_norm1", "attn.proj": "self_attn.out_proj", "norm2": "layer_norm2",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for i in range(d["depth"]):
        hf = f"{p}encoder.layers.{i}."
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                sd[f"{hf}{theirs}.{kind}"] = src[f"blocks.{i}.{ours}.{kind}"]
        for kind in ("weight", "bias"):
            q, k, v = src[f"blocks.{i}.attn.qkv.{kind}"].chunk(3, dim=0)
            for name, part in zip("qkv", (q, k, v)):
                sd[f"{hf}self_attn.{name}_proj.{kind}"] = part
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"HF mapping incomplete: missing {missing}, unexpected {unexpected}")
    return model.eval()


def _without_batch_invariance(model: nn.Module, px: torch.Tensor) -> torch.Tensor:
    from vlm_encoder import batch_invariance

    with batch_invariance("off"):
        return model(px, layers=(-2,)).patches(-2)


def feature_functions(models: dict[str, nn.Module], depth: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Each contender's own way to get layer -2's patch tokens `(B, N, D)`."""
    layer = depth - 2
    fns = {}
    if "ours" in models:
        fns["ours"] = lambda px, m=models["ours"]: m(px, layers=(-2,)).patches(-2)
    if "ours_batched" in models:
        fns["ours_batched"] = lambda px, m=models["ours_batched"]: _without_batch_invariance(m, px)
    if "timm" in models:
        fns["timm"] = lambda px, m=models["timm"]: m.forward_intermediates(
            px, indices=[layer], stop_early=True, intermediates_only=True, output_fmt="NLC")[0]
    if "open_clip" in models:
        fns["open_clip"] = lambda px, m=models["open_clip"]: m.forward_intermediates(
            px, indices=[layer], stop_early=True, intermediates_only=True, output_fmt="NLC")["image_intermediates"][0]
    if "hf" in models:
        fns["hf"] = lambda px, m=models["hf"]: m(pixel_values=px, output_hidden_states=True).hidden_states[-2][:, 1:]
    return fns


# ---------------------------------------------------------------- measuring
@torch.inference_mode()
def check_parity(fns: dict[str, Callable], image_size: int, device: torch.device) -> dict[str, float]:
    """Relative max error of every contender against timm on 2 images, float32."""
    generator = torch.Generator().manual_seed(0)
    px = torch.randn(2, 3, image_size, image_size, generator=generator).to(device)
    reference = fns["timm"](px).float()
    errors = {}
    for name, fn in fns.items():
        out = fn(px).float()
        if out.shape != reference.shape:
            raise RuntimeError(f"{name} returns {tuple(out.shape)}, timm {tuple(reference.shape)}")
        errors[name] = ((out - reference).abs().max() / reference.abs().max()).item()
    bad = {name: err for name, err in errors.items() if not err <= PARITY_TOLERANCE}
    if bad:
        raise RuntimeError(f"contenders disagree with timm beyond {PARITY_TOLERANCE:g} (relative): {bad}; "
                           "the weight mapping is wrong, timing them would compare different computations")
    return errors


def _time_once(fn: Callable, px: torch.Tensor, cuda: bool) -> float:
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(px)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000.0
    start_s = time.perf_counter()
    fn(px)
    return time.perf_counter() - start_s


@torch.inference_mode()
def measure(fns: dict[str, Callable], px: torch.Tensor, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per batch of each contender, `repeats` interleaved rounds after `warmup`."""
    cuda = px.is_cuda
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name](px)
    if cuda:
        torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate who goes first
        for name in order:
            times[name].append(_time_once(fns[name], px, cuda))
    return times


@torch.inference_mode()
def profile(fns: dict[str, Callable], px: torch.Tensor, names: tuple[str, ...] = ("ours", "timm")) -> str:
    """torch.profiler table (top ops by self time) of one call of each named contender."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if px.is_cuda else [])
    sort = "self_device_time_total" if px.is_cuda else "self_cpu_time_total"
    reports = []
    for name in names:
        fns[name](px)
        with torch_profile(activities=activities) as prof:
            fns[name](px)
            if px.is_cuda:
                torch.cuda.synchronize()
        reports.append(f"--- {name}\n" + prof.key_averages().table(sort_by=sort, row_limit=12))
    return "\n".join(reports)


# ------------------------------------------------------------------ reporting
def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib.metadata import version

    return dict(
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {cpu}",
        cpu_model=cpu,
        threads=torch.get_num_threads(),
        python=platform.python_version(),
        torch=torch.__version__,
        timm=version("timm"),
        open_clip=version("open_clip_torch"),
        transformers=version("transformers"),
    )


def summarise(times: dict[str, list[float]], batch: int) -> list[dict]:
    ours = statistics.median(times["ours"]) if "ours" in times else None
    rows = []
    for name, samples in times.items():
        median = statistics.median(samples)
        rows.append(dict(
            name=name, images_per_s=batch / median, median_s=median, times_s=samples,
            ours_speedup=(median / ours) if ours else None,  # > 1: ours is faster than this contender
        ))
    return rows


def markdown(report: dict) -> str:
    w = report["workload"]
    lines = [
        f"# Encoder throughput: {w['name']} workload ({report['mode']})",
        "",
        f"Patch tokens of layer -2 of `{w['timm_model']}` (random weights, shared by all contenders), "
        f"{w['image_size']}px, batch {w['batch_size']}, {w['dtype']}.",
        "",
        f"- date: {report['machine']['date']}",
        f"- device: {report['machine']['device']} ({report['machine']['threads']} threads)",
        f"- torch {report['machine']['torch']}, timm {report['machine']['timm']}, "
        f"open_clip {report['machine']['open_clip']}, transformers {report['machine']['transformers']}",
        f"- warm-up {w['warmup']}, {w['repeats']} interleaved repeats, median; compile: {report['compile']}",
        f"- parity vs timm (relative max error, float32): "
        + ", ".join(f"{k} {v:.1e}" for k, v in report["parity"].items()),
        "",
    ]
    if report.get("note"):
        lines += [f"**{report['note']}**", ""]
    timm_rate = next((row["images_per_s"] for row in report["results"] if row["name"] == "timm"), None)
    lines += ["| contender | images/s | median s/batch | x timm | ours (eager) speed-up vs this |",
              "|---|---:|---:|---:|---:|"]
    for row in report["results"]:
        speedup = f"{row['ours_speedup']:.2f}x" if row["ours_speedup"] else "-"
        vs_timm = f"{row['images_per_s'] / timm_rate:.2f}" if timm_rate else "-"
        lines.append(f"| {row['name']} | {row['images_per_s']:.2f} | {row['median_s']:.4f} | {vs_timm} | {speedup} |")
    lines += ["", f"Target: {w['target']}. Peer numbers measured earlier on {w['reference_device']}: "
              + ", ".join(f"{k} {v:g} img/s" for k, v in w["reference"].items()) + "."]
    return "\n".join(lines) + "\n"


def write_report(report: dict, results_dir: Path, stem: str) -> tuple[Path, Path]:
    from vlm_encoder.pretrained import write_atomic

    json_path, md_path = results_dir / f"{stem}.json", results_dir / f"{stem}.md"
    write_atomic(json_path, (json.dumps(report, indent=2) + "\n").encode())
    write_atomic(md_path, markdown(report).encode() if "results" in report else report["markdown"].encode())
    return json_path, md_path


def write_gpu_placeholder(results_dir: Path) -> None:
    """Mark the GPU workload as not yet measured, unless a measurement is there."""
    stem = "encoder_throughput_gpu"
    if (results_dir / f"{stem}.json").exists():
        return
    w = asdict(WORKLOADS["gpu"])
    text = (f"# Encoder throughput: gpu workload\n\nNot yet measured (no CUDA device where this was run). "
            f"Run `python benchmarks/encoder_throughput.py` on a GPU machine: it picks this workload "
            f"(`{w['timm_model']}`, {w['image_size']}px, batch {w['batch_size']}, {w['dtype']}) by itself, "
            f"eager and `torch.compile`d.\n\nTarget: {w['target']}. Peers on {w['reference_device']}: "
            + ", ".join(f"{k} {v:g} img/s" for k, v in w["reference"].items()) + ".\n")
    write_report(dict(status="not yet measured", workload=w, markdown=text), results_dir, stem)


# ----------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=("auto", "cpu", "gpu"), default="auto",
                        help="auto: gpu when CUDA is available, else cpu")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="batch 2, 1 warm-up, 3 repeats (checks it runs)")
    mode.add_argument("--tiny", action="store_true", help="a tiny ViT (width 64, 3 blocks, 32px): smoke test")
    parser.add_argument("--batch-size", type=int, help="override the workload's batch")
    parser.add_argument("--repeats", type=int, help="override the number of timed repeats")
    parser.add_argument("--threads", type=int, help="torch threads for every contender (default: torch's)")
    parser.add_argument("--compile", choices=("auto", "none", "ours", "all"), default="auto",
                        help="torch.compile: auto = ours on GPU (eager ours kept as its own row), none on CPU")
    parser.add_argument("--contenders", default="ours,timm,open_clip,hf", help="comma-separated subset")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables of ours and timm")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-save", action="store_true", help="print only")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    workload_name = args.workload if args.workload != "auto" else ("gpu" if cuda else "cpu")
    if workload_name == "gpu" and not cuda:
        raise SystemExit("the gpu workload needs CUDA; use --workload cpu")
    device = torch.device("cuda" if workload_name == "gpu" else "cpu")
    workload, overrides, mode = WORKLOADS[workload_name], {}, "full"
    if args.quick:
        workload, mode = replace(workload, **QUICK), "quick"
    if args.tiny:
        workload, mode = replace(workload, **QUICK, image_size=TINY_OVERRIDES["img_size"]), "tiny"
        overrides = TINY_OVERRIDES
    if args.batch_size:
        workload = replace(workload, batch_size=args.batch_size)
    if args.repeats:
        workload = replace(workload, repeats=args.repeats)
    if args.threads:
        torch.set_num_threads(args.threads)
    compile_mode = args.compile if args.compile != "auto" else ("ours" if device.type == "cuda" else "none")
    wanted = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = set(wanted) - {"ours", "timm", "open_clip", "hf"}
    if unknown or "timm" not in wanted:
        raise SystemExit(f"--contenders must include timm (the reference) and name only ours, timm, open_clip, hf; "
                         f"got {wanted}")

    torch.manual_seed(0)
    print(f"workload {workload.name} ({mode}): {workload.timm_model} {workload.image_size}px, "
          f"batch {workload.batch_size}, {workload.dtype}, device {device}, {torch.get_num_threads()} threads",
          flush=True)
    timm_model = build_timm(workload, overrides)
    builders = {"ours": build_ours, "timm": lambda m: m, "open_clip": build_open_clip, "hf": build_hf}
    models = {name: builders[name](timm_model).to(device) for name in wanted}
    if "ours" in models and device.type == "cpu":
        # Ours on the CPU: the default keeps each image's features bitwise independent of its
        # batch (batched calls, per image only where a kernel was found batch-variant);
        # `batch_invariance("off")` drops the guarantee (its cost is the gap between the rows).
        models["ours_batched"] = models["ours"]
    depth = timm_dims(timm_model)["depth"]

    # Parity in float32 (TF32 off) before any cast: equal weights, equal computation.
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    parity = check_parity(feature_functions(models, depth), workload.image_size, device)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    print("parity vs timm (relative max error): " + ", ".join(f"{k} {v:.1e}" for k, v in parity.items()), flush=True)

    dtype = getattr(torch, workload.dtype)
    models = {name: model.to(dtype) for name, model in models.items()}
    fns = feature_functions(models, depth)
    if compile_mode != "none":
        compiled = {n: torch.compile(fns[n]) for n in fns if compile_mode == "all" or n == "ours"}
        for name, fn in compiled.items():
            fns[f"{name}+compile" if compile_mode == "ours" else name] = fn
    px = torch.randn(workload.batch_size, 3, workload.image_size, workload.image_size,
                     generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    times = measure(fns, px, workload.warmup, workload.repeats)
    rows = summarise(times, workload.batch_size)
    for row in rows:
        speedup = f"  ours is x{row['ours_speedup']:.2f} this" if row["ours_speedup"] else ""
        print(f"{row['name']:>15}: {row['images_per_s']:9.2f} img/s  (median {row['median_s']:.4f} s/batch){speedup}")
    if args.profile:
        print(profile(fns, px))

    report = dict(
        mode=mode, compile=compile_mode, workload=asdict(workload), timm_overrides=overrides,
        machine=machine_info(device), parity=parity, results=rows,
        note={"quick": "Quick mode: batch 2 and 3 repeats on a possibly shared machine; a check that the "
                       "benchmark runs, not the reference measurement.",
              "tiny": "Tiny mode: smoke test of the script on a tiny ViT; numbers mean nothing."}.get(mode, ""),
    )
    if not args.no_save:
        stem = f"encoder_throughput_{workload.name}" + ("" if mode == "full" else f"_{mode}")
        json_path, md_path = write_report(report, args.results_dir, stem)
        if device.type == "cpu" and mode != "tiny":
            write_gpu_placeholder(args.results_dir)
        print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
