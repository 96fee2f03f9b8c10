"""`vlm-encoder info`: what a pretrained source is, as loaded.

    vlm-encoder info openai/clip-vit-base-patch16
    vlm-encoder info ./my_model_dir
    vlm-encoder info open_clip:ViT-B-32 --checkpoint open_clip_model.safetensors
    vlm-encoder info timm:vit_small_patch16_224 --json

Prints the family, the architecture (blocks, width, heads, parameters), the patch grid at
the native size, the pooling / projection and the preprocessing the source records.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from ..encoder import VisionEncoder


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info",
        help="describe a pretrained encoder (family, size, grid, preprocessing)",
        description="Load SOURCE (model directory, hub repo id, open_clip:ARCH or timm:NAME) and describe it.",
    )
    parser.add_argument("source", help="model directory, hub repo id, open_clip:ARCH or timm:NAME")
    parser.add_argument("--checkpoint", default=None, help="weight file (open_clip / timm, or instead of the directory's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.set_defaults(func=run)


def describe(encoder: VisionEncoder) -> dict[str, Any]:
    """A JSON-friendly description of a loaded encoder."""
    c = encoder.config
    grid = c.grid_size
    processor = getattr(encoder, "image_processor", None)
    processor_config = getattr(processor, "config", None)
    if dataclasses.is_dataclass(processor_config):
        preprocessing: Any = dataclasses.asdict(processor_config)
    else:
        preprocessing = None if processor is None else repr(processor)
    prefix = ["CLS"] * int(c.class_token) + [f"{c.num_register_tokens} registers"] * bool(c.num_register_tokens)
    return {
        "source": dict(getattr(encoder, "source_info", None) or {}),
        "blocks": encoder.num_blocks,
        "width": c.width,
        "heads": c.num_heads,
        "mlp": f"SwiGLU {c.mlp_dim}" if c.mlp_type == "swiglu" else f"{c.mlp_dim} {c.act}",
        "parameters": sum(p.numel() for p in encoder.parameters()),
        "image_size": list(c.image_size),
        "patch_size": c.input_stride,
        "grid": list(grid),
        "tokens": {"patches": grid[0] * grid[1], "prefix": prefix},
        "pool": c.pool,
        "embed_dim": c.embed_dim,
        "preprocessing": preprocessing,
        "config": c.to_dict(),
    }


def _text(d: dict[str, Any]) -> str:
    src = d["source"]
    family = src.get("family", "?")
    if src.get("vision_family"):
        family += f" (vision tower: {src['vision_family']})"
    lines = [
        f"source:        {src.get('source', '?')}",
        f"family:        {family}" + (f"  [model_type {src['model_type']}]" if src.get("model_type") else ""),
    ]
    if src.get("vision_feature_layer") is not None:
        lines.append(
            f"LLaVA uses:    layer {src['vision_feature_layer']}, strategy {src.get('vision_feature_select_strategy')!r}"
        )
    h, w = d["image_size"]
    gh, gw = d["grid"]
    prefix = " + ".join(d["tokens"]["prefix"]) or "none"
    lines += [
        f"blocks:        {d['blocks']}",
        f"width:         {d['width']} ({d['heads']} heads; MLP {d['mlp']})",
        f"parameters:    {d['parameters'] / 1e6:.2f}M ({d['parameters']:,})",
        f"native size:   {h}x{w}, patch {d['patch_size']} -> grid {gh}x{gw} ({gh * gw} patches), prefix tokens: {prefix}",
        f"pooled:        {d['pool']}" + (f", projected to {d['embed_dim']}" if d["embed_dim"] else ", no projection"),
    ]
    pre = d["preprocessing"]
    if pre is None:
        lines.append("preprocessing: none recorded with this source")
    elif isinstance(pre, dict):
        lines.append("preprocessing: " + ", ".join(f"{k}={v}" for k, v in pre.items()))
    else:
        lines.append(f"preprocessing: {pre}")
    lines.append("config:        " + json.dumps(d["config"], sort_keys=True))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..loading import load_encoder

    encoder = load_encoder(args.source, checkpoint=args.checkpoint)
    description = describe(encoder)
    print(json.dumps(description, indent=2, default=str) if args.json else _text(description))
    return 0
