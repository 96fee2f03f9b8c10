"""Reading weight files safely and loading state dicts strictly.

Safe by default: safetensors, or a torch pickle only through `torch.load(weights_only=True)`
with no fallback. Every failure names the file and says what is wrong.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

STRIPPED_PREFIXES = ("module.", "_orig_mod.")


class WeightsError(ValueError):
    """A weight file or state dict that cannot be used as it is."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a `.safetensors` file or a torch pickle (weights only).

    Args:
        path: The file.

    Returns:
        Tensor name to tensor (on the CPU). A pickle holding `{"state_dict": ...}` or
        `{"model": ...}` is unwrapped.

    Raises:
        FileNotFoundError: No such file.
        WeightsError: The file is truncated, corrupt, not a weight file, or its pickle
            would run code (the unsafe global is named; nothing is executed).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    if path.stat().st_size == 0:
        raise WeightsError(f"{path}: the file is empty (0 bytes)")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WeightsError(
            f"{path}: refused to load, the pickle is not plain weights ({first}). "
            "Only weights_only=True loading is allowed; convert the file to safetensors in a trusted environment."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise WeightsError(f"{path}: cannot read the file as torch weights, it is truncated or corrupt ({_one_line(err)})") from None
    return _unwrap(obj, path)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise WeightsError(f"{path}: not a valid safetensors file, it is truncated or corrupt ({_one_line(err)})") from None


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected a state dict (a mapping of names to tensors), found {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"{path}: the file holds no tensors")
    return tensors


def strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes from every key."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in STRIPPED_PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix) :]
                    changed = True
        out[key] = value
    return out


def _listing(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_dict_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
    """Load `state_dict` into `module`, requiring exactly the module's keys and shapes.

    Raises:
        WeightsError: Listing missing keys, unexpected keys and shape mismatches.
    """
    state_dict = strip_prefixes(state_dict)
    if not state_dict:
        raise WeightsError(f"{source}: the state dict is empty")
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = sorted(
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches: {_listing(shapes)}")
    if problems:
        raise WeightsError(f"{source} does not fit {type(module).__name__}: " + "; ".join(problems))
    bad_dtype = sorted(k for k, v in state_dict.items() if not (v.is_floating_point() or v.dtype == expected[k].dtype))
    if bad_dtype:
        raise WeightsError(f"{source}: non-float tensors where floats are expected: {_listing(bad_dtype)}")
    module.load_state_dict(state_dict, strict=True)
