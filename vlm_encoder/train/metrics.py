"""Run metrics: one JSON object per line in `metrics.jsonl` (and TensorBoard scalars when
`tensorboard` is installed), written by the main process only."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from ..pretrained import write_atomic


class MetricsLog:
    """Append-only metrics of a run.

    Each record has `kind` (`train`, `eval`, `skipped_step`, `skipped_images`, ...), `step`
    and its values. A resumed run appends to the same file.

    Args:
        path: The JSONL file.
        enabled: Write (False on non-main processes).
        tensorboard_dir: Also write TensorBoard scalars there, when `tensorboard` is installed.
    """

    def __init__(self, path: str | os.PathLike, enabled: bool = True, tensorboard_dir: str | os.PathLike | None = None) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self.records: list[dict[str, Any]] = []
        self._writer = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard_dir is not None:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._writer = SummaryWriter(str(tensorboard_dir))
                except ImportError:
                    self._writer = None

    def write(self, kind: str, step: int, **values: Any) -> dict[str, Any]:
        """Record `values` of `kind` at `step` (non-finite floats are written as strings)."""
        record = {"kind": kind, "step": int(step), "time": round(time.time(), 3), **values}
        self.records.append(record)
        if not self.enabled:
            return record
        safe = {k: (repr(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(safe) + "\n")
        if self._writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self._writer.add_scalar(f"{kind}/{key}", value, step)
        return record

    def cut_after(self, step: int | None) -> None:
        """Keep only the records of steps up to `step` (`None`: none), atomically: a resumed run
        replays the steps after its checkpoint, a run started over replays them all, so the
        records of the interrupted run's later steps (and a torn last line) go."""
        if not self.enabled:
            return
        kept = [] if step is None else [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        if kept or self.path.exists():
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        self.records = [r for r in self.records if step is not None and r.get("step", 0) <= step]

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a `metrics.jsonl`. A torn last line (a write cut short by a full disk or a
    power cut) is left out; any other line that is not a JSON object is an error naming the file
    and the line."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                break  # the torn last line
            raise ValueError(f"{path} line {number} is not a JSON record ({err}): {line[:80]!r}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path} line {number} is not a JSON object: {line[:80]!r}")
        records.append(record)
    return records
