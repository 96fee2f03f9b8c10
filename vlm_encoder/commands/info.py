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
from ..vision_side import VISION_SIDE_TYPES
from .options import add_model_arguments, model_options


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info",
        help="describe a model (family, towers, size, grid, preprocessing)",
        description="Load MODEL (any model spec) and describe it: an encoder, both towers of a contrastive model "
                    "(what `train` exports) or the parts of a vision-language model.",
    )
    add_model_arguments(parser, positional=True)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.set_defaults(func=run)


def describe(encoder: VisionEncoder) -> dict[str, Any]:
    """A JSON-friendly description of a loaded encoder."""
    c = encoder.config
    grid = c.grid_size
    processor = encoder.get_image_processor()
    processor_config = getattr(processor, "config", None)
    if dataclasses.is_dataclass(processor_config):
        preprocessing: Any = dataclasses.asdict(processor_config)
    else:
        preprocessing = None if processor is None else repr(processor)
    classes = "CLS" if c.num_class_tokens == 1 else f"{c.num_class_tokens} class tokens"
    if c.summary_idxs:
        classes += f" (summary {list(c.summary_idxs)})"
    prefix = [classes] * int(c.class_token) + [f"{c.num_register_tokens} registers"] * bool(c.num_register_tokens)
    return {
        "source": dict(encoder.source_info),
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
    extra = []
    if "contrastive" in d:
        c = d["contrastive"]
        extra.append(f"contrastive:   {c['objective']}, embed_dim {c['embed_dim']}, logit scale {c['logit_scale']:.2f}, "
                     f"text tower {c['text_parameters'] / 1e6:.2f}M parameters")
    if "vlm" in d:
        v = d["vlm"]
        extra.append(f"vlm:           layers {v['feature_layers']} -> projector {v['projector'].get('kind', '?')} -> "
                     f"{v['language_model']} ({v['language_model_parameters'] / 1e6:.2f}M parameters)")
    family = src.get("family", "?")
    if src.get("vision_family"):
        family += f" (vision tower: {src['vision_family']})"
    lines = [
        f"source:        {src.get('source', '?')}" + (f"  [{d['kind']}]" if d.get("kind") else ""),
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
    if src.get("random_weights"):
        lines.append("weights:       RANDOM (a preset without a checkpoint)")
    if src.get("model_type") in VISION_SIDE_TYPES:
        lines.append("vision side:   vlm_encoder.load_vision_side(source) loads this tower with its connector: "
                     ".image_tokens(pixels) are the image tokens its language model receives")
    lines += extra
    lines.append("config:        " + json.dumps(d["config"], sort_keys=True))
    return "\n".join(lines)


def describe_model(loaded: Any) -> dict[str, Any]:
    """`describe` of the image tower, plus the other parts of a contrastive model or VLM."""
    model = loaded.model
    if loaded.kind == "text":
        return {"kind": "text", "source": loaded.info, "config": model.config.to_dict(),
                "parameters": sum(p.numel() for p in model.parameters())}
    description = {"kind": loaded.kind, **describe(loaded.vision)}
    description["source"] = dict(loaded.info)
    if loaded.kind == "contrastive":
        description["contrastive"] = {
            "objective": model.config.objective,
            "embed_dim": model.embed_dim,
            "text_tower": model.config.text.to_dict(),
            "text_parameters": sum(p.numel() for p in model.text.parameters()),
            "logit_scale": float(model.current_logit_scale().detach()),
        }
    elif loaded.kind == "vlm":
        lm = model.language_model
        description["vlm"] = {
            "projector": model.projector.config.to_dict(),
            "language_model": type(lm).__name__,
            "language_model_parameters": sum(p.numel() for p in lm.parameters()),
            "feature_layers": list(model.feature_layers),
        }
    return description


def run(args: argparse.Namespace) -> int:
    from ..specs.models import load_model

    loaded = load_model(args.model, command="info", **model_options(args))
    description = describe_model(loaded)
    if args.json:
        print(json.dumps(description, indent=2, default=str))
    elif loaded.kind == "text":
        print(f"source:        {loaded.spec.text}\nkind:          text tower only\n"
              f"parameters:    {description['parameters']:,}\nconfig:        {json.dumps(description['config'])}")
    else:
        print(_text(description))
    return 0
