"""`vlm-encoder train`: contrastive image-text training from a YAML config.

    vlm-encoder train --config examples/configs/digits.yaml
    vlm-encoder train --config my.yaml lr=5e-4 batch_size=512 vision_overrides.depth=6
    accelerate launch --num_processes 2 -m vlm_encoder.cli train --config my.yaml

Overrides are `key=value`, read like the YAML file by each field's type (YAML 1.2: `lr=1e-3` is a
float, `mixed_precision=no` the string "no", booleans only `true` / `false`). The resolved config is saved as
`config.yaml` in the run directory; a run directory with checkpoints is resumed from its last
complete one (`resume=auto`, the default).
"""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a contrastive image-text model (CLIP, SigLIP, LiT)",
        description="Train from a YAML TrainConfig with key=value overrides (see docs/training.md).",
    )
    parser.add_argument("--config", default=None, help="YAML file of TrainConfig fields (default: all defaults)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lr=1e-3 vision_overrides.depth=4")
    parser.add_argument("--allow-partial-resume", action="store_true",
                        help="resume from a checkpoint without RNG or sampler state (the run will not be exact)")
    parser.add_argument("--resume-fallback", action="store_true",
                        help="with resume=auto, skip a newest checkpoint that does not load (truncated or "
                             "corrupt file) and resume from the newest older one that does")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from ..train import TrainConfig, train

    overrides = list(args.overrides) + (["allow_partial_resume=true"] if args.allow_partial_resume else []) + (
        ["resume_fallback=true"] if args.resume_fallback else [])
    config = TrainConfig.from_yaml(args.config, overrides) if args.config else TrainConfig().with_overrides(overrides)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    result = train(config)
    if not PartialState().is_main_process:
        return 0  # under `accelerate launch`, the main process reports for all
    if result.metrics:
        print(json.dumps({"step": result.step, **result.metrics}, indent=2))
    print(f"run directory: {result.output_dir} ({result.step} steps, {result.seconds:.1f} s, "
          f"{len(result.skipped_steps)} skipped steps, {result.skipped_images} skipped images)")
    return 0
