"""`vlm-encoder eval`: zero-shot classification and retrieval recall of a trained model.

    vlm-encoder eval runs/digits/export/model --data builtin:digits --split test
    vlm-encoder eval runs/mine/export/model --data ./my_folder --split test --json
    accelerate launch --num_processes 2 -m vlm_encoder.cli eval MODEL --data ...

Zero-shot accuracy needs labels (a label column, or imagefolder class folders) and class
names; retrieval recall at 1, 5 and 10 is reported for every dataset.
"""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="zero-shot accuracy and retrieval recall of a trained contrastive model",
        description="Evaluate MODEL (a contrastive image-text model) on a dataset.",
    )
    parser.add_argument("model", help="a contrastive model: a ContrastiveModel save_pretrained directory (e.g. "
                                      "RUN/export/model), an HF CLIP or MetaCLIP 2 directory or hub id, or "
                                      "open_clip:ARCH[:TAG]")
    parser.add_argument("--data", required=True, help="data spec with captions (docs/training.md): builtin:NAME, a folder "
                        "with metadata.jsonl, imagefolder:DIR, saved dataset, .parquet/.csv/.jsonl/.tar, hub name")
    parser.add_argument("--split", default="test")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default=None)
    parser.add_argument("--class-names", nargs="*", default=None, help="zero-shot class names (default: the label names)")
    parser.add_argument("--templates", nargs="*", default=None, help="prompt templates with one {} (default: neutral ones, 'a photo of a {}.' ...)")
    parser.add_argument("--data-option", action="append", default=[], metavar="KEY=VALUE",
                        help="option of a builtin source (e.g. num_test=1000) or of datasets.load_dataset "
                             "(values are YAML)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from accelerate import Accelerator

    from ..specs.models import load_model
    from ..specs.options import parse_yaml
    from ..train.config import DEFAULT_TEMPLATES
    from ..train.evaluate import evaluate
    from ..train.sources import open_pair_source

    options = {}
    for item in args.data_option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--data-option {item!r} must look like key=value")
        options[key.strip()] = parse_yaml(value, f"--data-option {item!r}")
    accelerator = Accelerator(cpu=args.cpu)
    model = load_model(args.model, need="contrastive", command="eval", device=accelerator.device).model
    processor = model.vision.image_processor
    source = open_pair_source(args.data, args.split, options=options, image_column=args.image_column,
                         text_column=args.text_column, label_column=args.label_column,
                         class_names=tuple(args.class_names) if args.class_names else None)
    if accelerator.is_main_process and source.labels is None:
        print("zero-shot accuracy skipped: the data has no labels (name a label column with --label-column, or use "
              "class sub-folders); retrieval recall only", file=sys.stderr)
    elif accelerator.is_main_process and not source.class_names:
        print("zero-shot accuracy skipped: the labels have no class names (pass --class-names NAME ...); "
              "retrieval recall only", file=sys.stderr)
    metrics = evaluate(model, source, processor, model.text.tokenizer(), templates=args.templates or DEFAULT_TEMPLATES,
                       batch_size=args.batch_size, device=accelerator.device, progress=not args.no_progress)
    if accelerator.is_main_process:
        if args.json:
            print(json.dumps(metrics))
        else:
            for key, value in metrics.items():
                print(f"{key:>16}: {value:.4f}" if isinstance(value, float) else f"{key:>16}: {value}")
    return 0
