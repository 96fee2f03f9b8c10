"""Command-line options that several commands share, parsed by the package's one grammar:
a model spec (`specs.models`), `--override KEY=VALUE` (typed by `VisionConfig`'s fields,
`specs.options`) and sizes."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..specs.models import FORMS


def add_model_arguments(parser: argparse.ArgumentParser, *, default: str | None = None, positional: bool = False) -> None:
    """`--model SPEC` (or a positional `model`), `--checkpoint`, `--override`, `--seed`,
    `--patch-remainder`."""
    group = parser.add_argument_group("model")
    spec_help = f"model spec: {FORMS}" + (f" (default {default}: random weights)" if default else "")
    if positional:
        group.add_argument("model", metavar="MODEL", help=spec_help)
    else:
        group.add_argument("--model", required=default is None, default=default, metavar="SPEC", help=spec_help)
    group.add_argument("--checkpoint", default=None, metavar="FILE",
                       help="weight file loaded into the model: instead of the directory's (same names), a preset's "
                            "state dict, or an open_clip / timm checkpoint")
    group.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                       help="change a VisionConfig field of a preset:NAME model, e.g. --override depth=4 "
                            "(repeatable; values are YAML: 64, [224, 320], true)")
    group.add_argument("--seed", type=int, default=0, help="seed of a preset's random weights (default 0)")
    group.add_argument("--patch-remainder", choices=("error", "drop"), default=None,
                       help="image sides that are not a multiple of the patch stride: drop floors the grid (the "
                            "last pixels are ignored, as the HF, timm and open_clip references do), error refuses "
                            "them (default: the model's own policy)")


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of `specs.models.load_model` that `add_model_arguments` gave."""
    from ..config import VisionConfig
    from ..specs.options import apply_overrides

    return {
        "checkpoint": args.checkpoint,
        "overrides": apply_overrides(VisionConfig, {}, args.override),
        "seed": args.seed,
        "patch_remainder": args.patch_remainder,
    }


def parse_size(text: str) -> tuple[int, int]:
    """`224` or `224x320` (H x W)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    parts = parts * 2 if len(parts) == 1 else parts
    if len(parts) != 2 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"image size must be N or HxW with positive ints, got {text!r}")
    return parts[0], parts[1]


def writable_directory(text: str) -> Path:
    """An output directory: it may not exist yet, but must not be a file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; give a directory")
    return path
