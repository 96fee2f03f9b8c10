"""`python extract_with_faults.py ARGS...` = `vlm-encoder ARGS...` with one fault injected on one
rank (tests of failure handling; see test_distributed.py).

    FAULT=source_io_error   the image source raises `OSError(EIO)` (storage gone) from row FAULT_ROW on
    FAULT=worker_exception  a DataLoader worker raises an unexpected `RuntimeError` at row FAULT_ROW
    FAULT=worker_killed     the DataLoader worker reading row FAULT_ROW is SIGKILLed (e.g. by the OOM killer)
    FAULT_RANK              the rank that fails (default 1)
"""

from __future__ import annotations

import errno
import os
import signal
import sys

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


if __name__ == "__main__":
    if os.environ.get("RANK", "0") == os.environ.get("FAULT_RANK", "1"):
        _inject(os.environ["FAULT"], int(os.environ.get("FAULT_ROW", "0")))
    sys.exit(main(sys.argv[1:]))
