"""What `make demo` runs: the encoder on real photos, what it extracts, and its pictures
(PCA of patch features, attention maps with rollout, patch similarity); then a tiny CLIP
trained from scratch on handwritten digits, and LLaVA-style stage-1 alignment of a projector.

    python examples/demo.py --out demo_output

Sections are small functions called from `main()`. The photos ship with scikit-image and the
digits with scikit-learn, so nothing is downloaded. With random weights the pictures show
little more than colour and position; with pretrained weights they show object parts. What
the trainings measured (accuracy, seconds, date, machine) is written to `<out>/results.md`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from skimage import data

from vlm_encoder import EncoderOutput, VisionEncoder, create_encoder
from vlm_encoder.viz import (
    pca_figure,
    pca_rgb,
    prepare_images,
    save_figure,
    write_attention_picture,
    write_similarity_picture,
)

PHOTOS = {"astronaut": data.astronaut, "coffee": data.coffee, "chelsea": data.chelsea}
ASTRONAUT_FACE = (250.0, 130.0)  # (x, y) in the 512 x 512 astronaut photo


def section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)))


def load_photos() -> dict[str, object]:
    """The demo photos as uint8 arrays `(H, W, 3)`, by name."""
    return {name: load() for name, load in PHOTOS.items()}


def build_encoder(model: str, seed: int) -> VisionEncoder:
    section("Encoder")
    torch.manual_seed(seed)
    encoder = create_encoder(model).eval()
    c = encoder.config
    n_params = sum(p.numel() for p in encoder.parameters())
    print(f"{model} (random weights, seed {seed}): {c.depth} blocks, width {c.width}, {c.num_heads} heads, "
          f"patch {c.patch_size}, image {c.image_size[0]}x{c.image_size[1]}, {n_params / 1e6:.1f}M parameters")
    return encoder


@torch.inference_mode()
def extract_features(encoder: VisionEncoder, pixels: torch.Tensor) -> EncoderOutput:
    """Every layer's tokens for the batch, and what came out."""
    section("Features of every layer")
    start = time.perf_counter()
    out = encoder(pixels, layers="all")
    seconds = time.perf_counter() - start
    print(f"input pixels {tuple(pixels.shape)} -> {len(out.layers)} layers in {seconds:.2f} s")
    print(f"patch grid {out.grid_size[0]}x{out.grid_size[1]}")
    print(f"cls(l)      {tuple(out.cls(-1).shape)}   (B, D)")
    print(f"patches(l)  {tuple(out.patches(-1).shape)}   (B, N, D)")
    print(f"patch_grid(l) {tuple(out.patch_grid(-1).shape)}   (B, D, h, w)")
    print(f"pooled      {tuple(out.pooled.shape) if out.pooled is not None else None}")
    print(f"concat_patches(-2, -1) {tuple(out.concat_patches((-2, -1)).shape)}   (B, N, 2D)")
    return out


def layer_statistics(out: EncoderOutput) -> None:
    """Per layer: patch-token norm, and how alike the patches of one image are."""
    section("Per-layer statistics")
    print(f"{'layer':>5}  {'mean |patch|':>12}  {'mean |cls|':>10}  {'patch-patch cosine':>18}")
    for layer in out.layers:
        patches = out.patches(layer).float()  # (B, N, D)
        unit = torch.nn.functional.normalize(patches - patches.mean(dim=-1, keepdim=True), dim=-1)
        cosine = (unit @ unit.transpose(1, 2)).mean().item()  # 1 would mean all patches alike
        print(f"{layer:>5}  {patches.norm(dim=-1).mean().item():>12.3f}  "
              f"{out.cls(layer).norm(dim=-1).mean().item():>10.3f}  {cosine:>18.3f}")


def pca_picture(out: EncoderOutput, crops: list, names: list[str], layer: int, out_dir: Path) -> Path:
    """The patch features of `layer` of all photos, one shared PCA basis, as a PNG."""
    section("PCA picture")
    rgb = pca_rgb(out.patches(layer), out.grid_size)  # (B, h, w, 3)
    resolved = layer % out.num_blocks
    fig = pca_figure(crops, rgb, names=names, layer_label=f"layer {resolved} of {out.num_blocks} blocks, shared basis")
    path = save_figure(fig, out_dir / f"pca_layer{resolved}.png")
    print(f"wrote {path}: each photo beside its patch features of layer {resolved} as RGB "
          "(3 principal components shared by all photos)")
    return path


def attention_picture(encoder: VisionEncoder, photos: dict, layer: int, out_dir: Path) -> Path:
    """Attention of `layer` per head and averaged, and the rollout through blocks 0..layer."""
    section("Attention picture")
    resolved = layer % encoder.num_blocks
    path = write_attention_picture(encoder, list(photos.values()), layer=layer, path=out_dir / f"attention_layer{resolved}.png",
                                   names=list(photos), panel_px=160)
    what = "CLS token's attention" if encoder.config.class_token else "attention (no CLS token; see the header)"
    print(f"wrote {path}: {what} over the patches at layer {resolved}, per head and averaged, and the rollout "
          f"(Abnar & Zuidema 2020) through blocks 0..{resolved}")
    return path


def similarity_picture(encoder: VisionEncoder, photos: dict, layer: int, point: tuple[float, float], out_dir: Path) -> Path:
    """Cosine similarity of the patch under `point` of the first photo to every patch of all photos."""
    section("Patch similarity picture")
    resolved = layer % encoder.num_blocks
    first = next(iter(photos))
    path = write_similarity_picture(encoder, list(photos.values()), layer=layer, point=point,
                                    path=out_dir / f"similarity_layer{resolved}.png", names=list(photos), panel_px=240)
    print(f"wrote {path}: cosine similarity of the patch under pixel {point} of {first} (boxed) to every patch "
          f"of every photo, layer {resolved}")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo_output"), help="folder for the pictures")
    parser.add_argument("--model", default="vit_base_patch16_224", help="encoder preset (random weights)")
    parser.add_argument("--layer", type=int, default=-4, help="layer of the PCA picture (default -4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-threads", type=int, default=1,
                        help="CPU threads for the two trainings (default 1: their models are tiny, and more threads "
                        "only slow them down when the cores are shared)")
    parser.add_argument(
        "--sections", default="encoder,training,llava",
        help="comma-separated: encoder (features and pictures), training (CLIP-style on builtin:digits), "
        "llava (stage-1 projector alignment)",
    )
    args = parser.parse_args(argv)
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = sections - {"encoder", "training", "llava"}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; allowed: encoder, training, llava")

    start, load = time.perf_counter(), os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    results = []
    if "encoder" in sections:
        encoder = build_encoder(args.model, args.seed)
        photos = load_photos()
        pixels, crops = prepare_images(list(photos.values()), encoder)
        out = extract_features(encoder, pixels)
        layer_statistics(out)
        pca_picture(out, crops, list(photos), args.layer, args.out)
        attention_picture(encoder, photos, -1, args.out)
        similarity_picture(encoder, photos, args.layer, ASTRONAUT_FACE, args.out)
    with threads(args.train_threads):
        if "training" in sections:
            results.append(train_digits(args.out / "digits"))
        if "llava" in sections:
            results.append(llava_stage1(args.out / "llava_stage1"))
    if results:
        seconds = time.perf_counter() - start
        path = write_results(args.out / "results.md", results, seconds, args.train_threads, load)
        print(f"\nwrote {path}: what the trainings measured; the whole demo took {seconds:.0f} s")
    return 0


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Run the block with `n` torch CPU threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def machine() -> str:
    """The CPU model and core count, for the results file."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} cores"


def write_results(path: Path, results: list[dict], seconds: float, train_threads: int, load: float | None) -> Path:
    """The trainings' measured numbers as a small Markdown file (what the README points to)."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    busy = f" (load average {load:.1f} at the start)" if load is not None else ""
    lines = [
        "# `make demo` results",
        "",
        f"Measured by `examples/demo.py` on {now}: {machine()}{busy}, "
        f"torch {torch.__version__}, {train_threads} thread(s) for the trainings. The whole demo took {seconds:.0f} s.",
        "",
        "| section | result | steps | seconds |",
        "|---|---|---:|---:|",
        *(f"| {r['section']} | {r['summary']} | {r['steps']} | {r['seconds']:.0f} |" for r in results),
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def _example(name: str):
    """Load a sibling example script as a module (examples/ is not a package)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(f"vlm_encoder_example_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def train_digits(out_dir: Path) -> dict:
    """CLIP-style training from scratch on scikit-learn's digits, zero-shot on the held-out split.

    Returns:
        The results row: `section`, `summary`, `steps`, `seconds`.
    """
    section("Contrastive training on builtin:digits (zero-shot, held-out split)")
    print("a 2-block ViT and a 2-block text tower from scratch (examples/configs/digits.yaml), "
          "then zero-shot on the 360 held-out digits")
    result = _example("train_digits").run_digits_demo(out_dir)
    top1 = f"{100 * result['zero_shot_top1']:.1f}%"
    print(f"zero-shot top-1 on held-out digits: {top1} "
          f"({result['steps']} steps, {result['seconds']:.0f} s); plots: {', '.join(result['plots'])}")
    summary = f"{top1} zero-shot top-1 on the 360 held-out digits"
    return {"section": "CLIP-style training on `builtin:digits`", "summary": summary, "steps": result["steps"],
            "seconds": result["seconds"]}


def llava_stage1(out_dir: Path) -> dict:
    """LLaVA stage 1: train only the projector between a frozen encoder and a frozen small LM.

    Returns:
        The results row: `section`, `summary`, `steps`, `seconds`.
    """
    section("LLaVA-style stage-1 alignment (projector only)")
    module = _example("llava_stage1")
    start = time.perf_counter()
    result = module.run(module.QUICK, out_dir)
    seconds = time.perf_counter() - start
    print({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()})
    return {"section": "LLaVA stage 1 (tiny LM pretraining, then the projector alone)",
            "steps": module.QUICK.lm_steps + module.QUICK.projector_steps, "seconds": seconds,
            "summary": f"caption loss {result['loss_before']:.2f} -> {result['loss_after']:.2f}; "
                       f"{result['accuracy']:.0%} exact captions of 64 new images"}


if __name__ == "__main__":
    raise SystemExit(main())
