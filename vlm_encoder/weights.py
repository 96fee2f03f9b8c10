"""Reading weight files safely and loading state dicts strictly.

Safe by default: safetensors, or a torch pickle only through `torch.load(weights_only=True)`
with no fallback. Every failure is one line that names the file and says what is wrong.

Bounds on hostile files: a safetensors header larger than `MAX_HEADER_BYTES` or declaring
more than `MAX_TENSORS` tensors is refused before it is parsed, so a crafted header cannot
exhaust memory. Both are module constants; raise them for a trusted file that needs more.
"""

from __future__ import annotations

import io
import itertools
import os
import pickle
import pickletools
import re
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

STRIPPED_PREFIXES = ("module.", "_orig_mod.")
# The header of the largest public single-file checkpoints is well under 1 MiB.
MAX_HEADER_BYTES = 16 * 2**20
MAX_TENSORS = 65_536
# Globals a torch pickle of plain weights may name (torch's own types and rebuild helpers).
_PLAIN_GLOBALS = ("torch.", "collections.OrderedDict", "_codecs.encode", "builtins.set")
_MAX_PICKLE_SCAN_BYTES = 64 * 2**20


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
        WeightsError: The file is truncated, corrupt, not a weight file, its safetensors
            header is over the limits, or its pickle would run code (the unsafe global is
            named; nothing is executed).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    if path.stat().st_size == 0:
        raise WeightsError(f"{path}: the file is empty (0 bytes)")
    if path.suffix == ".safetensors":
        return read_safetensors(path)[0]
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        raise WeightsError(
            f"{path}: refused to load: {_unsafe_reason(err, path)}. Only plain weights are read "
            "(torch.load with weights_only=True) and nothing in the file was run; if you trust the file, "
            "convert it to safetensors in a separate environment."
        ) from None
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for truncated or corrupt files
        raise WeightsError(
            f"{path}: cannot read the file as torch weights, it is truncated or corrupt ({_one_line(err)})"
        ) from None
    return _unwrap(obj, path)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300]}" if text else type(err).__name__


# ---------------------------------------------------------------------------- safetensors
def check_safetensors_header(path: str | os.PathLike) -> None:
    """Refuse a safetensors file whose header is truncated or over the limits, reading at
    most `MAX_HEADER_BYTES` of it.

    Raises:
        WeightsError: Naming the file and the limit it breaks.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise WeightsError(
                f"{path}: truncated safetensors file ({size} bytes, shorter than the 8-byte header length)"
            )
        length = int.from_bytes(head, "little")
        if length > MAX_HEADER_BYTES:
            raise WeightsError(
                f"{path}: safetensors header length field claims {length} bytes (the file has {size}), over the "
                f"limit of {MAX_HEADER_BYTES} (vlm_encoder.weights.MAX_HEADER_BYTES): the file is corrupt or hostile"
            )
        if length > size - 8:
            raise WeightsError(
                f"{path}: truncated safetensors file: the header claims {length} bytes but only {size - 8} follow"
            )
        header = handle.read(length)
    # Every tensor entry is a JSON object, so the count of "{" bounds the number of tensors.
    objects = header.count(b"{") - 1
    if objects > MAX_TENSORS:
        raise WeightsError(
            f"{path}: safetensors header declares up to {objects} tensors, over the limit of {MAX_TENSORS} "
            "(vlm_encoder.weights.MAX_TENSORS): the file is corrupt or hostile"
        )


ALIGNMENT = 64  # bytes: what torch's CPU allocator gives every tensor


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, copied into torch's own (64-byte aligned) memory when it is not aligned."""
    return tensor if tensor.data_ptr() % ALIGNMENT == 0 else tensor.clone()


def read_safetensors(
    path: str | os.PathLike, keep: Callable[[str], bool] | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors of a safetensors file (those whose names pass `keep`) and all its names.

    Tensors not kept are never read. The header is checked first (`check_safetensors_header`).
    Each tensor is 64-byte aligned, as one torch allocates: safetensors' buffers are only
    8-byte aligned, and MKL's small-row GEMMs on AMD CPUs give other float32 bits on such
    weights, so a saved and reloaded model would differ from the original in the last bit
    (`tests/test_encoder.py`'s round trips). A misaligned tensor is copied as it is read, one
    at a time, so loading still holds one copy of the weights.

    Raises:
        FileNotFoundError: No such file.
        WeightsError: The file is truncated, corrupt or over the header limits (one line
            naming the file).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    check_safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            names = list(handle.keys())
            tensors = {k: _aligned(handle.get_tensor(k)) for k in names if keep is None or keep(k)}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as err:
        raise WeightsError(
            f"{path}: not a valid safetensors file, it is truncated or corrupt ({_one_line(err)})"
        ) from None
    return tensors, names


# ---------------------------------------------------------------------------- pickles
def _unsafe_reason(err: pickle.UnpicklingError, path: Path) -> str:
    """What the refused pickle wanted, naming the globals it would import."""
    named = re.findall(r"GLOBAL ([\w.]+)", str(err))
    unsafe = sorted(set(named) | {g for g in _pickle_globals(path) if not g.startswith(_PLAIN_GLOBALS)})
    if unsafe:
        return f"the pickle would import {', '.join(unsafe)}, which plain weights never need"
    lines = [
        line.strip()
        for line in str(err).splitlines()
        if line.strip()
        and not line.startswith(("Weights only load failed", "Please file an issue", "Check the documentation"))
    ]
    return f"the pickle holds more than plain weights ({lines[0][:300] if lines else 'UnpicklingError'})"


def _pickle_globals(path: Path) -> set[str]:
    """Globals (`module.name`) a pickle file imports, found by reading its opcodes with
    `pickletools` (nothing is executed). Best effort: empty when the file cannot be scanned."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                entries = [i for i in archive.infolist() if i.filename.endswith("data.pkl")]
                if not entries or entries[0].file_size > _MAX_PICKLE_SCAN_BYTES:
                    return set()
                data = archive.read(entries[0])
        else:
            with open(path, "rb") as handle:
                data = handle.read(_MAX_PICKLE_SCAN_BYTES)
    except (OSError, zipfile.BadZipFile, ValueError):
        return set()
    found: set[str] = set()
    stream = io.BytesIO(data)
    while stream.tell() < len(data):  # a legacy torch file is several pickles in a row
        start = stream.tell()
        try:
            found |= _globals_of_one_pickle(stream)
        except Exception:  # noqa: BLE001 - a corrupt stream ends the scan
            break
        if stream.tell() == start:
            break
    return found


def _globals_of_one_pickle(stream: io.BytesIO) -> set[str]:
    found: set[str] = set()
    strings: list[str] = []
    memo: dict[int, object] = {}
    last: object = None
    for opcode, arg, _ in pickletools.genops(stream):
        name = opcode.name
        if name in ("GLOBAL", "INST"):
            found.add(str(arg).replace(" ", "."))
        elif name == "STACK_GLOBAL" and len(strings) >= 2:
            found.add(f"{strings[-2]}.{strings[-1]}")
        elif isinstance(arg, str) and ("UNICODE" in name or "STRING" in name):
            strings.append(str(arg))
            last = arg
            continue
        elif name == "MEMOIZE":
            memo[len(memo)] = last
            continue
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = last
            continue
        elif name in ("GET", "BINGET", "LONG_BINGET") and isinstance(memo.get(arg), str):
            strings.append(memo[arg])
            last = memo[arg]
            continue
        last = None
    return found


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected a state dict (a mapping of names to tensors), found {type(obj).__name__}")
    not_names = [repr(k) for k in obj if not isinstance(k, str)]
    if not_names:
        raise WeightsError(f"{path}: state dict keys must be strings, found {_listing(not_names)}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"{path}: the file holds no tensors")
    return tensors


# ---------------------------------------------------------------------------- state dicts
def strip_key(key: str) -> str:
    """`key` without its `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes."""
    changed = True
    while changed:
        changed = False
        for prefix in STRIPPED_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                changed = True
    return key


def strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes from every key.

    Raises:
        WeightsError: Two keys become the same name (e.g. `module.a` and `a`): one would be
            lost.
    """
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    clashes = []
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise WeightsError(f"state dict keys must be strings, found {key!r}")
        name = strip_key(key)
        if name in out:
            clashes.append(f"{origin[name]!r} and {key!r}")
        out[name] = value
        origin[name] = key
    if clashes:
        raise WeightsError(
            f"state dict keys collide once the {'/'.join(STRIPPED_PREFIXES)} prefixes are removed: {_listing(clashes)}"
        )
    return out


@contextmanager
def naming(source: str) -> Iterator[None]:
    """Make every `WeightsError` raised inside name `source` (the file being read)."""
    try:
        yield
    except WeightsError as err:
        if source in str(err):
            raise
        raise WeightsError(f"{source}: {err}") from None


def _listing(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_dict_strict(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "state dict", assign: bool = False
) -> None:
    """Load `state_dict` into `module`, requiring exactly the module's keys and shapes.

    `module.` / `_orig_mod.` prefixes are removed first. Everything is checked against
    `module.state_dict()` before anything is loaded, so `module` may be on the `meta` device.

    Args:
        assign: Make the tensors the module's own (`load_state_dict(assign=True)`: no copy,
            e.g. into a module built on `meta`), cast to the module's dtypes and contiguous.

    Raises:
        WeightsError: Listing missing keys, unexpected keys, values that are not tensors,
            shape mismatches and non-float tensors for float parameters.
    """
    with naming(source):
        state_dict = strip_prefixes(state_dict)
    if not state_dict:
        raise WeightsError(f"{source}: the state dict is empty")
    not_tensors = sorted(f"{k} ({type(v).__name__})" for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise WeightsError(f"{source}: values that are not tensors: {_listing(not_tensors)}")
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
    bad_dtype = sorted(
        f"{k} ({v.dtype})"
        for k, v in state_dict.items()
        if v.dtype != expected[k].dtype and not (v.is_floating_point() and expected[k].is_floating_point())
    )
    if bad_dtype:
        raise WeightsError(f"{source}: tensors whose dtype cannot be cast to the model's: {_listing(bad_dtype)}")
    if assign:
        state_dict = _owned(state_dict, expected)
    module.load_state_dict(state_dict, strict=True, assign=assign)


def _owned(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict`'s tensors as a module may own them: its dtypes, contiguous, each the whole
    of its own storage (two parameters assigned one storage would be tied, and a view into a
    larger tensor, such as a converter's slice, cannot be saved by safetensors)."""
    owned: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state_dict.items():
        value = value.detach().to(expected[key].dtype)
        storage = value.untyped_storage()
        whole = (value.is_contiguous() and value.storage_offset() == 0
                 and storage.nbytes() == value.numel() * value.element_size())
        if value.numel() and (not whole or storage.data_ptr() in seen):
            value = value.clone(memory_format=torch.contiguous_format)
        seen.add(value.untyped_storage().data_ptr())
        owned[key] = value
    return owned


def build_and_load(
    build: Callable[[], nn.Module], state_dict: Mapping[str, torch.Tensor], source: str = "state dict"
) -> nn.Module:
    """`build()` holding `state_dict`, checked before the module is allocated.

    The module is built on the `meta` device (shapes only, no memory) and `state_dict` checked
    against it as `load_state_dict_strict` does, so a config that does not fit its weights (a
    width of 16384 beside a small file) is a `WeightsError` naming `source` before anything
    is allocated. The checked tensors then become the module's (`assign=True`): loading holds
    one copy of the weights, never a random initialisation beside them. A module with state
    the dict does not hold (non-persistent buffers computed in `__init__`) is then built
    again for real and loaded by copy.

    Raises:
        WeightsError: As `load_state_dict_strict`.
    """
    with torch.device("meta"):
        module = build()
    if state_dict or module.state_dict():  # a module without parameters saves an empty file
        load_state_dict_strict(module, state_dict, source, assign=True)
    if any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers())):
        module = build()
        load_state_dict_strict(module, state_dict, source)
    return module
