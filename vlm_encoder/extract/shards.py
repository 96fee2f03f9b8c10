"""The on-disk layout of a feature store: fixed row ranges per shard, checksummed shard files,
their sidecars, and the manifest.

    DIR/manifest.json              arguments fingerprint, layout, features, shard list + checksums
    DIR/shard-00003.safetensors    rows [3*S, 4*S) that decoded: `row_ids` (n,) and the features
    DIR/shard-00003.json           sidecar: sha256 and size of the shard file, its rows and failures
    DIR/failures.jsonl             every failed row: {"row", "name", "shard", "reason"}

Shard `k` always covers rows `[k*S, (k+1)*S)` for the shard size `S` recorded in the manifest,
whatever the batch size, worker count or number of processes, so a resumed run redoes exactly
the shards whose file is missing or does not match its sidecar's checksum. A shard file is
written to a temporary file, fsynced and renamed into place; its sidecar is written (the same
way) only after, so a sidecar always describes a complete file.

A failed row is kept failed by a rerun when its reason cannot go away (not an image, truncated,
non-finite features), and retried when it can (`retryable`: the file was missing or could not
be read, and is there now).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from ..pretrained import write_atomic

MANIFEST_NAME = "manifest.json"
FAILURES_NAME = "failures.jsonl"
FORMAT = "vlm_encoder.feature_store/1"
ROW_IDS = "row_ids"


@dataclass(frozen=True)
class ShardLayout:
    """Rows `[0, num_rows)` cut into shards of `shard_size` rows (the last may be shorter)."""

    num_rows: int
    shard_size: int

    @property
    def num_shards(self) -> int:
        return -(-self.num_rows // self.shard_size)

    def rows(self, shard: int) -> range:
        start = shard * self.shard_size
        return range(start, min(start + self.shard_size, self.num_rows))

    def shards_of_rank(self, rank: int, world_size: int) -> list[int]:
        """Shard `k` belongs to rank `k % world_size`."""
        return list(range(rank, self.num_shards, world_size))


def shard_path(out: Path, shard: int) -> Path:
    return out / f"shard-{shard:05d}.safetensors"


def sidecar_path(out: Path, shard: int) -> Path:
    return out / f"shard-{shard:05d}.json"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
    _fsync_dir(path.parent)


def write_shard(
    out: Path,
    shard: int,
    rows: range,
    tensors: dict[str, torch.Tensor],
    failures: list[dict[str, Any]],
    writer: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write shard `shard` (its file, then its sidecar) atomically and return the sidecar.

    Args:
        out: The store's folder.
        shard: Shard index.
        rows: The row range the shard covers.
        tensors: `row_ids` `(n,)` int64 and the feature tensors, `n` rows each.
        failures: `{"row", "name", "reason"}` for every row of the range that failed.
        writer: Provenance kept in the sidecar only (e.g. the process rank), not in the file.
    """
    sidecar_path(out, shard).unlink(missing_ok=True)  # the old sidecar no longer describes the file
    # One metadata entry: safetensors writes several in hash order, which would change the file's bytes.
    metadata = {"vlm_encoder": json.dumps({"format": FORMAT, "shard": shard, "rows": [rows.start, rows.stop]})}
    data = safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    path = shard_path(out, shard)
    write_atomic(path, data)
    _fsync_dir(out)
    sidecar = {
        "shard": shard,
        "file": path.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "row_start": rows.start,
        "row_stop": rows.stop,
        "rows_written": int(tensors[ROW_IDS].numel()),
        "rows_failed": len(failures),
        "failures": failures,
        "writer": writer or {},
    }
    write_json_atomic(sidecar_path(out, shard), sidecar)
    return sidecar


def read_sidecar(out: Path, shard: int) -> dict[str, Any] | None:
    """The sidecar of a shard, or `None` when missing or unreadable."""
    try:
        return json.loads(sidecar_path(out, shard).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def valid_sidecar(out: Path, shard: int, rows: range) -> dict[str, Any] | None:
    """The sidecar of a complete, intact shard (its file's size and SHA-256 match), else `None`."""
    sidecar = read_sidecar(out, shard)
    if sidecar is None or sidecar.get("row_start") != rows.start or sidecar.get("row_stop") != rows.stop:
        return None
    path = shard_path(out, shard)
    try:
        if path.stat().st_size != sidecar.get("bytes"):
            return None
    except OSError:
        return None
    return sidecar if file_sha256(path) == sidecar.get("sha256") else None


def read_manifest(out: Path) -> dict[str, Any] | None:
    path = out / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); remove it or choose another --out") from None


def fingerprint_differences(recorded: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two arguments fingerprints (nested keys joined by '.')."""
    diffs = []
    for key in sorted(set(recorded) | set(current)):
        a, b = recorded.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += fingerprint_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {json.dumps(a, default=str)} in the store, {json.dumps(b, default=str)} now")
    return diffs


def check_fingerprint(out: Path, manifest: dict[str, Any], fingerprint: dict[str, Any]) -> None:
    """Refuse to mix runs: raise `ValueError` naming every argument that differs."""
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{out / MANIFEST_NAME} is not a feature-store manifest of format {FORMAT!r}")
    # JSON round trip, so tuples and lists compare equal.
    current = json.loads(json.dumps(fingerprint, default=str))
    diffs = fingerprint_differences(manifest.get("fingerprint", {}), current)
    if diffs:
        raise ValueError(
            f"{out} holds features extracted with other arguments; choose another --out or repeat the "
            "original arguments (batch size and workers may differ). Differences:\n  " + "\n  ".join(diffs)
        )


# Reasons of failures that can go away: a rerun retries the row once its file is there.
RETRYABLE_REASONS = ("no such file", "cannot be read")
NONFINITE_REASON = "non-finite features (inf/NaN)"


def retryable(reason: str) -> bool:
    """Whether a failure's reason can go away (a missing or unreadable file), so a rerun retries it."""
    return reason.startswith(RETRYABLE_REASONS)


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Delete the temporary files that interrupted writes left (a shard, a sidecar, the
    manifest or `failures.jsonl` of a process killed between creating and renaming one). Call
    it only when no process writes the store (the run holds the directory's lock and its
    processes are not writing). Returns the files removed."""
    stale = sorted({*out.glob(".shard-*.tmp"), *out.glob(f".{MANIFEST_NAME}.*.tmp"), *out.glob(f".{FAILURES_NAME}.*.tmp")})
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def finalize_manifest(out: Path, manifest: dict[str, Any], layout: ShardLayout) -> dict[str, Any]:
    """Record the shard list and checksums from the sidecars, write `failures.jsonl` and the manifest.

    Returns:
        The manifest written; `complete` is true when every shard has a sidecar.
    """
    shards, failures = [], []
    for shard in range(layout.num_shards):
        sidecar = read_sidecar(out, shard)
        if sidecar is None:
            continue
        shards.append({k: sidecar[k] for k in ("shard", "file", "sha256", "bytes", "row_start", "row_stop",
                                                "rows_written", "rows_failed")})
        failures += [dict(f, shard=shard) for f in sidecar["failures"]]
    lines = "".join(json.dumps(f, sort_keys=True) + "\n" for f in failures)
    write_atomic(out / FAILURES_NAME, lines.encode())
    manifest = dict(
        manifest,
        shards=shards,
        complete=len(shards) == layout.num_shards,
        rows_written=sum(s["rows_written"] for s in shards),
        rows_failed=sum(s["rows_failed"] for s in shards),
        rows_nonfinite=sum(f["reason"].startswith(NONFINITE_REASON) for f in failures),
        rows_retryable=sum(retryable(f["reason"]) for f in failures),
    )
    write_json_atomic(out / MANIFEST_NAME, manifest)
    return manifest
