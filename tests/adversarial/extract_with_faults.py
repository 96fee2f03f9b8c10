"""`python extract_with_faults.py ARGS...` = `vlm-encoder ARGS...` with one fault injected on one
rank (tests of failure handling; see test_distributed.py), or slowed down so a test can kill it
mid-run (test_extraction.py, tests/test_extract.py).

    FAULT=source_io_error   the image source raises `OSError(EIO)` (storage gone) from row FAULT_ROW on
    FAULT=worker_exception  a DataLoader worker raises an unexpected `RuntimeError` at row FAULT_ROW
    FAULT=worker_killed     the DataLoader worker reading row FAULT_ROW is SIGKILLed (e.g. by the OOM killer)
    FAULT_RANK              the rank that fails (default 1)
    SLOW_BATCH_S=seconds    every rank sleeps this long after each batch it encodes
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time

from vlm_encoder.cli import main
from vlm_encoder.extract import runner, sources


def _inject(fault: str, row_from: int) -> None:
    if fault == "source_io_error":
        read = sources.FileListSource.read

        def failing_read(self, row: int) -> str:
            if row >= row_from:
                raise OSError(errno.EIO, "Input/output error (injected: the image storage went away)", self.paths[row])
            return read(self, row)

        sources.FileListSource.read = failing_read
        return
    getitem = runner.RowDataset.__getitem__

    def failing_getitem(self, row: int):
        if row >= row_from:
            if fault == "worker_exception":
                raise RuntimeError(f"injected: unexpected failure reading row {row}")
            if fault == "worker_killed":
                os.kill(os.getpid(), signal.SIGKILL)
        return getitem(self, row)

    if fault not in ("worker_exception", "worker_killed"):
        raise SystemExit(f"unknown FAULT={fault!r}")
    runner.RowDataset.__getitem__ = failing_getitem


def _slow_down(seconds: float) -> None:
    add = runner._ShardAssembler.add

    def add_then_sleep(self, batch, features) -> None:
        add(self, batch, features)
        time.sleep(seconds)

    runner._ShardAssembler.add = add_then_sleep


if __name__ == "__main__":
    if os.environ.get("SLOW_BATCH_S"):
        _slow_down(float(os.environ["SLOW_BATCH_S"]))
    if os.environ.get("RANK", "0") == os.environ.get("FAULT_RANK", "1"):
        _inject(os.environ["FAULT"], int(os.environ.get("FAULT_ROW", "0")))
    sys.exit(main(sys.argv[1:]))
