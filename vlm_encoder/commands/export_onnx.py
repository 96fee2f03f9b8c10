"""`vlm-encoder export-onnx`: an encoder as an ONNX graph for chosen layers.

    vlm-encoder export-onnx openai/clip-vit-base-patch16 --layers -2 -1 --out clip.onnx
    vlm-encoder export-onnx ./my_model_dir --layers 5 11 --image-size 336 --norm --out enc.onnx

The graph takes `pixel_values` (B, C, H, W) at one size (default: the model's native size)
and returns `layer_<i>` (B, T, D) per layer (CLS and registers first, then patches) and
`pooled` when the last block is chosen. Needs the `onnx` package (`vlm-encoder[onnx]`).
"""

from __future__ import annotations

import argparse

from .options import add_model_arguments, model_options, parse_size


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export-onnx",
        help="write an encoder as an ONNX graph of chosen layers",
        description="Load MODEL's image tower and write it as an ONNX graph returning the chosen layers' tokens.",
    )
    add_model_arguments(parser, positional=True)
    parser.add_argument("--layers", type=int, nargs="+", default=[-1], metavar="L",
                        help="block indices to return (negatives from the end; default -1)")
    parser.add_argument("--image-size", type=parse_size, default=None, metavar="N|HxW",
                        help="input size the graph takes (default: the model's native size)")
    parser.add_argument("--norm", action="store_true", help="apply the final LayerNorm to the returned tokens")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument("--out", required=True, metavar="FILE", help="the .onnx file to write")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..export.onnx import export_onnx, output_names
    from ..specs.models import load_model

    try:
        import onnx  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        raise ImportError("export-onnx needs the onnx package: pip install 'vlm-encoder[onnx]'") from None
    encoder = load_model(args.model, need="vision", command="export-onnx", **model_options(args)).vision.float().cpu()
    path = export_onnx(encoder, args.out, tuple(args.layers), image_size=args.image_size, norm=args.norm,
                       opset=args.opset)
    size = args.image_size or encoder.config.image_size
    print(f"wrote {path}: pixel_values (B, {encoder.config.in_channels}, {size[0]}, {size[1]}) -> "
          f"{', '.join(output_names(encoder, tuple(args.layers)))}")
    return 0
