"""`vlm-encoder viz`: pictures of the encoder's features.

    vlm-encoder viz pca --image cat.jpg --layer -2 --out cat_pca.png
    vlm-encoder viz pca --image a.jpg --image b.jpg --layer 6 --out shared.png   # one PCA basis
    vlm-encoder viz attention --image cat.jpg --layer -1 --out cat_attention.png
    vlm-encoder viz similarity --image cat.jpg --point 120 80 --layer -2 --out cat_sim.png
    vlm-encoder viz pca --image wide.jpg --resolution native --max-patches 256 --out wide_pca.png
    vlm-encoder viz pca --image wide.jpg --anyres 336x672,672x336,672x672 --out wide_anyres.png
    vlm-encoder viz pca --dataset imagefolder:./photos --rows 0,5,9 --out photos_pca.png  # any data spec

Each picture kind is a sub-subcommand sharing the picture options (`add_picture_arguments`)
and the model options (`add_model_arguments`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .options import add_model_arguments as add_spec_arguments
from .options import model_options, parse_size

DEFAULT_MODEL = "preset:vit_small_patch16_224"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose and load the encoder, shared by every picture."""
    add_spec_arguments(parser, default=DEFAULT_MODEL)
    parser.add_argument("--image-size", type=parse_size, metavar="N|HxW",
                        help="input size (default: the model's native size); the position table is resampled")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--no-fast-cpu", action="store_true",
                        help="on the CPU, keep torch's default GEMM route instead of oneDNN's prepacked one")


def build_encoder(args: argparse.Namespace):
    """The image tower that `--model`, `--override`, `--checkpoint` and `--seed` describe, in
    eval mode; the console says which model it is, and when its weights are random."""
    import torch

    from ..cpu_speed import fast_cpu
    from ..specs.models import load_vision

    loaded = load_vision(args.model, command="viz", device=args.device, **model_options(args))
    if loaded.info.get("random_weights"):
        print(f"model: {args.model} with RANDOM WEIGHTS (a preset without --checkpoint): the pictures show the "
              "architecture, not learned features; pass --model with a trained model", file=sys.stderr)
    on_cpu = torch.device(args.device).type == "cpu"
    return fast_cpu(loaded.vision.eval(), enabled=on_cpu and not getattr(args, "no_fast_cpu", False))


def _common(args: argparse.Namespace) -> dict:
    """The picture options every kind shares, as keyword arguments of `write_*_picture`."""
    return {
        "layer": args.layer,
        "path": args.out,
        "names": args.image_names,
        "image_size": args.image_size,
        "panel_px": args.panel_size,
        "resolution": args.resolution,
        "max_patches": args.max_patches,
    }


def parse_pinpoints(text: str) -> tuple[tuple[int, int], ...]:
    """`336x672,672x336,672x672` (H x W pairs)."""
    from ..extract.resolution import parse_pinpoints as parse

    try:
        return parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _anyres(args: argparse.Namespace) -> dict:
    return {"anyres": args.anyres} if args.anyres is not None else {}


def _rows(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rows takes comma-separated row numbers, e.g. 0,5,9; got {text!r}") from None


def _load(args: argparse.Namespace):
    from ..processing import load_image

    if args.panel_size < 16:
        raise ValueError(f"--panel-size must be at least 16 pixels, got {args.panel_size}")
    if bool(args.image) == bool(args.dataset):
        raise ValueError("give the images as --image FILE (repeatable) or --dataset SPEC (one of the two)")
    if args.image:
        images = [load_image(path) for path in args.image]
        args.image_names = [Path(p).name for p in args.image]
    else:
        from ..extract.sources import open_image_source

        source = open_image_source(args.dataset, split=args.split, image_column=args.image_column)
        rows = args.rows if args.rows is not None else list(range(min(4, len(source))))
        bad = [r for r in rows if not -len(source) <= r < len(source)]
        if bad:
            raise ValueError(f"--rows {bad} out of range: {args.dataset} has {len(source)} images")
        rows = [r % len(source) for r in rows]
        images = [load_image(source.read(r)) for r in rows]
        args.image_names = [source.name(r) for r in rows]
    return images, build_encoder(args)


def run_pca(args: argparse.Namespace) -> int:
    from ..viz import write_pca_picture

    images, encoder = _load(args)
    path = write_pca_picture(encoder, images, **_common(args), **_anyres(args))
    print(f"wrote {path}")
    return 0


def run_attention(args: argparse.Namespace) -> int:
    from ..viz import write_attention_picture
    from ..viz.attention import QUERY_DESCRIPTIONS, resolve_query

    images, encoder = _load(args)
    resolved = encoder.resolve_layers((args.layer,))[0]
    query = resolve_query(encoder.config, args.query, last_layer=resolved == encoder.num_blocks - 1)
    path = write_attention_picture(encoder, images, query=query, head_cols=args.head_cols, **_common(args))
    print(f"wrote {path}: {QUERY_DESCRIPTIONS[query]}, layer {resolved}, per head, their mean, and the rollout")
    return 0


def run_similarity(args: argparse.Namespace) -> int:
    from ..viz import write_similarity_picture

    images, encoder = _load(args)
    path = write_similarity_picture(
        encoder, images, patch=tuple(args.patch) if args.patch else None,
        point=tuple(args.point) if args.point else None, **_common(args), **_anyres(args),
    )
    print(f"wrote {path}")
    return 0


def add_picture_arguments(parser: argparse.ArgumentParser, image_help: str, panel_px: int) -> None:
    """The options every picture kind shares: images, layer, output, panel size, resolution."""
    parser.add_argument("--image", type=Path, action="append", default=[], metavar="FILE", help=image_help)
    parser.add_argument("--dataset", metavar="SPEC",
                        help="take the images from a data spec instead (any form extract takes: a folder, a list file, "
                             "imagefolder:DIR, parquet/csv/jsonl/webdataset, a save_to_disk folder, a hub name, "
                             "builtin:NAME)")
    parser.add_argument("--split", default=None, help="split of a --dataset (default train)")
    parser.add_argument("--image-column", default=None, help="image column of a --dataset")
    parser.add_argument("--rows", type=_rows, default=None, metavar="I,J,...",
                        help="rows of the --dataset to show (default the first 4)")
    parser.add_argument("--layer", type=int, default=-1, help="block index, negatives count from the end (default -1)")
    parser.add_argument("--out", type=Path, required=True, metavar="PNG", help="output .png")
    parser.add_argument("--panel-size", type=int, default=panel_px, metavar="PX",
                        help=f"side of each panel in pixels (default {panel_px})")
    parser.add_argument("--resolution", choices=("fixed", "native"), default="fixed",
                        help="fixed: the model's input size (or --image-size); native: each image at its own aspect "
                             "ratio, sides multiples of the patch size, at most --max-patches patches, encoded "
                             "packed (vlm_encoder.packing) (default fixed)")
    parser.add_argument("--max-patches", type=int, metavar="N",
                        help="patch budget per image with --resolution native (default: the patches of the model's "
                             "input size; images are only shrunk to fit, never enlarged)")
    add_model_arguments(parser)


def add_anyres_argument(parser: argparse.ArgumentParser) -> None:
    """`--anyres PINPOINTS` (pictures of the patch features: pca, similarity)."""
    parser.add_argument("--anyres", type=parse_pinpoints, default=None, metavar="PINPOINTS",
                        help="tile each image LLaVA-NeXT style over these resolutions, e.g. 64x128,128x64,128x128 "
                             "(HxW, multiples of the model's square input size), and show the assembled, unpadded "
                             "feature map beside the whole image")


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
    add_picture_arguments(pca, "image file (repeat for several images sharing one PCA basis)", 320)
    add_anyres_argument(pca)
    pca.set_defaults(func=run_pca)

    attention = kinds.add_parser(
        "attention", help="attention maps of a layer per head and averaged, and attention rollout",
        description="The attention of one query over the patches at --layer, per head and averaged over heads, "
                    "and attention rollout through blocks 0..layer (Abnar & Zuidema 2020: mean of heads, plus "
                    "identity, rows renormalised, multiplied over blocks). The query is the CLS token; register "
                    "columns (DINOv2 with registers) and the CLS column are dropped, so a map is the share of "
                    "the CLS attention each patch gets. Models without a CLS token: the MAP pooling head's "
                    "learned query (SigLIP, last block) or the mean attention each patch receives. The picture's "
                    "header says which.",
    )
    add_picture_arguments(attention, "image file (repeatable: one block of panels per image)", 200)
    attention.add_argument("--query", choices=("auto", "cls", "map", "mean"), default="auto",
                           help="whose attention: auto (cls if the model has a CLS token, else map for a MAP head at "
                                "the last block, else mean), cls, map, or mean (attention received by each patch, "
                                "averaged over the patch queries) (default auto)")
    attention.add_argument("--head-cols", type=int, default=6, metavar="N", help="heads per row of panels (default 6)")
    attention.set_defaults(func=run_attention)

    similarity = kinds.add_parser(
        "similarity", help="cosine similarity of one patch to every patch, as a heat map over the image",
        description="Pick a patch of the first image and show the cosine similarity of its feature at --layer to "
                    "every patch (of every image given), one colour scale for all, the chosen patch boxed.",
    )
    add_picture_arguments(similarity, "image file; the query patch is in the first (repeat to compare with others)", 320)
    where = similarity.add_mutually_exclusive_group(required=True)
    where.add_argument("--point", type=float, nargs=2, metavar=("X", "Y"),
                       help="a point in the first image's own pixels (x right, y down); the patch that covers it "
                            "after resize and crop is the query")
    where.add_argument("--patch", type=int, nargs=2, metavar=("ROW", "COL"),
                       help="the query patch by its position in the patch grid (negatives count from the end)")
    add_anyres_argument(similarity)
    similarity.set_defaults(func=run_similarity)
    viz.set_defaults(func=lambda args: viz.print_help() or 2)
