"""`vlm-encoder viz`: pictures of the encoder's features.

    vlm-encoder viz pca --image cat.jpg --layer -2 --out cat_pca.png
    vlm-encoder viz pca --image a.jpg --image b.jpg --layer 6 --out shared.png   # one PCA basis

Each picture kind is a sub-subcommand (`pca` now; `attention` and `similarity` later),
sharing the model options added by `add_model_arguments`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..weights import load_state_dict_strict, read_state_dict

DEFAULT_MODEL = "vit_small_patch16_224"


def parse_override(text: str) -> tuple[str, object]:
    """`KEY=VALUE` with VALUE read as JSON when it parses (`depth=2`, `act="gelu"`, `image_size=[64,96]`)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (a VisionConfig field), got {text!r}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip(), parsed


def parse_size(text: str) -> tuple[int, int]:
    """`224` or `224x320` (H x W)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"image size must be N or HxW with positive ints, got {text!r}")
    return parts[0], parts[1]


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose and load the encoder, shared by every picture."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=DEFAULT_MODEL, metavar="SOURCE",
                       help=f"preset name (random weights; see vlm_encoder.list_presets()), or any source "
                            f"vlm_encoder.load_encoder accepts: a model directory, a hub id in the cache, "
                            f"open_clip:ARCH, timm:NAME (default {DEFAULT_MODEL})")
    group.add_argument("--checkpoint", type=Path, metavar="FILE",
                       help="weights file: for a preset, a state dict in this package's names (loaded strictly); "
                            "for other sources, what vlm_encoder.load_encoder(checkpoint=...) accepts")
    group.add_argument("--override", type=parse_override, action="append", default=[], metavar="KEY=VALUE",
                       help="change a VisionConfig field of a preset, e.g. --override depth=2 (repeatable)")
    group.add_argument("--image-size", type=parse_size, metavar="N|HxW",
                       help="input size (default: the model's native size); the position table is resampled")
    group.add_argument("--seed", type=int, default=0, help="seed of the random initialisation of presets (default 0)")
    group.add_argument("--device", default="cpu", help="torch device (default cpu)")


def build_encoder(args: argparse.Namespace):
    """The encoder that `--model`, `--override`, `--checkpoint` and `--seed` describe, in eval mode."""
    import difflib

    from vlm_encoder import PRESETS, create_encoder, load_encoder

    overrides = dict(args.override)
    torch.manual_seed(args.seed)
    if args.model in PRESETS:
        encoder = create_encoder(args.model, **overrides)
        if args.checkpoint is not None:
            load_state_dict_strict(encoder, read_state_dict(args.checkpoint), source=str(args.checkpoint))
        return encoder.to(args.device).eval()
    if overrides:
        raise ValueError(f"--override applies to presets only; {args.model!r} is not a preset")
    close = difflib.get_close_matches(args.model, PRESETS, n=3, cutoff=0.8)
    try:
        encoder = load_encoder(args.model, checkpoint=args.checkpoint)
    except (FileNotFoundError, ValueError) as err:
        if not close:
            raise
        raise ValueError(f"{err} (did you mean the preset(s) {', '.join(close)}?)") from None
    return encoder.to(args.device).eval()


def run_pca(args: argparse.Namespace) -> int:
    from ..viz import load_image, write_pca_picture

    images = [load_image(path) for path in args.image]
    encoder = build_encoder(args)
    path = write_pca_picture(
        encoder,
        images,
        layer=args.layer,
        path=args.out,
        names=[Path(p).name for p in args.image],
        image_size=args.image_size,
        panel_px=args.panel_size,
    )
    print(f"wrote {path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `viz` and its picture kinds to the `vlm-encoder` parser."""
    viz = subparsers.add_parser("viz", help="pictures of the encoder's features",
                                description="Pictures of what the encoder's layers hold.")
    kinds = viz.add_subparsers(dest="picture", metavar="PICTURE")
    pca = kinds.add_parser(
        "pca", help="patch features of a layer as RGB (3 principal components) beside the image",
        description="Reduce the patch features of one layer to their first 3 principal components (one basis shared "
                    "by all images given) and show them as RGB beside each image.",
    )
    pca.add_argument("--image", type=Path, action="append", required=True, metavar="FILE",
                     help="image file (repeat for several images sharing one PCA basis)")
    pca.add_argument("--layer", type=int, default=-1, help="block index, negatives count from the end (default -1)")
    pca.add_argument("--out", type=Path, required=True, metavar="PNG", help="output .png")
    pca.add_argument("--panel-size", type=int, default=320, metavar="PX",
                     help="side of each panel in pixels (default 320)")
    add_model_arguments(pca)
    pca.set_defaults(func=run_pca)
    viz.set_defaults(func=lambda args: viz.print_help() or 2)
