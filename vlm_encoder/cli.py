"""The `vlm-encoder` console script. Each subcommand lives in `vlm_encoder/commands/<name>.py`
and exposes `register(subparsers)`, which adds its parser and sets `func(args) -> int`.

Every expected failure (a bad spec or option, a missing file or folder, a hub name that is not
cached offline, weights that do not fit, an unwritable output, Ctrl-C) is one line on stderr,
`vlm-encoder CMD: error: ...`, and exit status 2 (130 for Ctrl-C). `--debug` or
`VLM_ENCODER_DEBUG=1` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Subcommand modules, in the order `--help` lists them.
COMMANDS = ("info", "viz", "train", "eval", "extract", "extract-shard", "extract-finalize", "export-onnx")
DEBUG_VARIABLE = "VLM_ENCODER_DEBUG"


class OneLineParser(argparse.ArgumentParser):
    """An `ArgumentParser` whose usage errors are one line (`--help` still shows the usage)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="vlm-encoder", description="The vision side of vision-language models: features, pictures, training."
    )
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of a failure (also {DEBUG_VARIABLE}=1)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"vlm_encoder.commands.{name.replace('-', '_')}").register(subparsers)
    return parser


def _expected_failures() -> tuple[type[BaseException], ...]:
    """What a user's input or environment causes: reported in one line, not as a traceback."""
    from .extract.engines.base import EngineFailure
    from .train.checkpoint import CheckpointError

    return (ValueError, OSError, ImportError, CheckpointError, EngineFailure)


def one_line(err: BaseException) -> str:
    """The message of `err` on one line (the libraries underneath write several). An error
    re-raised from a worker process carries the worker's traceback: keep its first sentence
    and the traceback's last line, the error itself."""
    text = str(err)
    if "Traceback (most recent call last)" in text:
        last = [line.strip() for line in text.splitlines() if line.strip()][-1]
        text = f"{text.split('.', 1)[0]}: {last}"
    text = " ".join(text.split()) or type(err).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")
    prefix = f"vlm-encoder {args.command}"
    try:
        code = int(args.func(args) or 0)
        _leave_process_group()
        return code
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prefix}: interrupted; run the same command to resume", file=sys.stderr)
        return 130
    except _expected_failures() as err:
        if debug:
            raise
        print(f"{prefix}: error: {one_line(err)}", file=sys.stderr)
        return 2


def _leave_process_group() -> None:
    """Leave a launch's process group together, before the interpreter exits. Left to exit-time
    destructors, a gloo rank whose peers (the store's host among them) have already gone can abort
    ("terminate called without an active exception") after its command succeeded."""
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        except RuntimeError:  # a peer has left already (its command failed): nothing to leave together
            return
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
