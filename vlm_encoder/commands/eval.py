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
        description="Evaluate MODEL (a ContrastiveModel save_pretrained directory) on a dataset.",
    )
    parser.add_argument("model", help="directory written by save_pretrained (e.g. RUN/export/model)")
    parser.add_argument("--data", required=True, help="builtin:digits, builtin:shapes, hub name, folder or parquet")
    parser.add_argument("--split", default="test")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default=None)
    parser.add_argument("--class-names", nargs="*", default=None, help="zero-shot class names (default: the label names)")
    parser.add_argument("--templates", nargs="*", default=None, help="prompt templates with one {} (default: the digits ones)")
    parser.add_argument("--data-option", action="append", default=[], metavar="KEY=VALUE",
                        help="option of a builtin source, e.g. num_test=1000")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import yaml
    from accelerate import Accelerator

    from ..contrastive import ContrastiveModel
    from ..processing import ImageProcessor
    from ..train.build import use_batched_cpu_attention
    from ..train.config import DIGITS_TEMPLATES
    from ..train.evaluate import evaluate
    from ..train.sources import open_source

    options = {}
    for item in args.data_option:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--data-option {item!r} must look like key=value")
        options[key] = yaml.safe_load(value)
    accelerator = Accelerator(cpu=args.cpu)
    model = ContrastiveModel.from_pretrained(args.model, device=accelerator.device)
    use_batched_cpu_attention(model)
    processor = model.get_image_processor() or ImageProcessor.default_for(model.vision.config)
    source = open_source(args.data, args.split, options=options, image_column=args.image_column,
                         text_column=args.text_column, label_column=args.label_column,
                         class_names=tuple(args.class_names) if args.class_names else None)
    metrics = evaluate(model, source, processor, model.text.tokenizer(), templates=args.templates or DIGITS_TEMPLATES,
                       batch_size=args.batch_size, device=accelerator.device)
    if accelerator.is_main_process:
        if args.json:
            print(json.dumps(metrics))
        else:
            for key, value in metrics.items():
                print(f"{key:>16}: {value:.4f}" if isinstance(value, float) else f"{key:>16}: {value}")
    return 0
