"""What the Hugging Face converters share: reading a config, mapping activation names,
selecting a tower's keys, and a key reader that proves every key was used."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..config import Activation
from ..weights import WeightsError

# HF `hidden_act` names and ours. `gelu_new` is HF's hand-written tanh approximation, the
# same formula as `gelu_pytorch_tanh`.
HF_ACTIVATIONS: dict[str, Activation] = {
    "gelu": "gelu",
    "quick_gelu": "quick_gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
}


def _listing(keys: Iterable[str], limit: int = 20) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def hf_config(config: Any, config_class: type) -> Any:
    """`config` as an instance of the HF `config_class` (a `config.json` dict is parsed by
    that class, so HF's defaults fill the fields a file leaves out)."""
    if isinstance(config, Mapping):
        return config_class.from_dict(dict(config))
    return config


def activation(name: str, family: str) -> Activation:
    """Our `VisionConfig.act` for an HF `hidden_act`."""
    if name not in HF_ACTIVATIONS:
        raise ValueError(f"{family}: hidden_act={name!r} is not supported; supported: {', '.join(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[name]


def square(value: Any, name: str, family: str) -> int:
    """An HF size given as an int or a square pair, as an int."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{family}: only square {name} is supported, got {value!r}")
        value = value[0]
    return int(value)


def select_tower(
    state_dict: Mapping[str, torch.Tensor], prefixes: tuple[str, ...], ignored: tuple[str, ...]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Keys of one tower with its wrapper prefix removed, and the keys skipped as ignored.

    The first of `prefixes` that some key starts with is removed from the keys under it
    (e.g. `vision_model.` of a `CLIPModel`); keys outside it are kept as they are, so that
    a top-level head (`visual_projection.weight`) is still seen. With no prefix present the
    keys are used bare (a `CLIPVisionModel` saved by transformers 5). Keys starting with one
    of `ignored` (the text tower, logit scale, a classifier) are dropped.
    """
    prefix = next((p for p in prefixes if any(k.startswith(p) for k in state_dict)), "")
    tower, skipped = {}, []
    for key, value in state_dict.items():
        if key.startswith(ignored):
            skipped.append(key)
            continue
        tower[key[len(prefix) :] if prefix and key.startswith(prefix) else key] = value
    return tower, skipped


class KeyReader:
    """Takes tensors out of a state dict by name and, at the end, fails on any key not taken.

    Args:
        state_dict: The reference's tensors.
        family: Name used in error messages (e.g. `HF CLIP`).
    """

    def __init__(self, state_dict: Mapping[str, torch.Tensor], family: str) -> None:
        self._tensors = dict(state_dict)
        self._used: set[str] = set()
        self.family = family

    def has(self, key: str) -> bool:
        return key in self._tensors

    def take(self, key: str) -> torch.Tensor:
        """The tensor `key`, marked used.

        Raises:
            WeightsError: `key` is missing.
        """
        if key not in self._tensors:
            stem = key.rsplit(".", 2)[0]
            near = [k for k in self._tensors if k.startswith(stem)]
            raise WeightsError(
                f"{self.family} checkpoint is missing the key {key!r}"
                + (f"; keys near it: {_listing(near, 8)}" if near else "")
            )
        self._used.add(key)
        return self._tensors[key]

    def take_linear(self, prefix: str, bias: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`prefix.weight` and (when `bias`) `prefix.bias`."""
        return self.take(f"{prefix}.weight"), self.take(f"{prefix}.bias") if bias else None

    def ignore(self, key: str) -> None:
        """Mark an optional key as deliberately unused (e.g. DINOv2's `mask_token`)."""
        if key in self._tensors:
            self._used.add(key)

    def count_layers(self, prefix: str) -> int:
        """Number of blocks `prefix{i}.` present; they must be numbered `0..n-1`."""
        indices = set()
        for key in self._tensors:
            if key.startswith(prefix):
                head = key[len(prefix) :].split(".", 1)[0]
                if head.isdigit():
                    indices.add(int(head))
        if not indices:
            raise WeightsError(f"{self.family} checkpoint has no blocks under {prefix!r}")
        if indices != set(range(len(indices))):
            raise WeightsError(f"{self.family} checkpoint's blocks under {prefix!r} are not numbered 0..n-1: {sorted(indices)}")
        return len(indices)

    def finish(self) -> None:
        """Raise if any key was never taken or ignored.

        Raises:
            WeightsError: Listing the leftover keys.
        """
        leftover = set(self._tensors) - self._used
        if leftover:
            raise WeightsError(f"{self.family} checkpoint has keys the converter does not know: {_listing(leftover)}")


def fuse_qkv(reader: KeyReader, q: str, k: str, v: str, bias: bool = True) -> dict[str, torch.Tensor]:
    """Our fused `qkv.weight` (and `.bias`), rows q then k then v, from three linears."""
    out = {"weight": torch.cat([reader.take(f"{name}.weight") for name in (q, k, v)], dim=0)}
    if bias:
        out["bias"] = torch.cat([reader.take(f"{name}.bias") for name in (q, k, v)], dim=0)
    return out


def split_position_table(position: torch.Tensor, cls_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold the CLS row of an HF position table `(1, 1+N, D)` into the CLS token.

    Returns:
        `cls_token + pos[0]` as `(1, 1, D)` and the patch rows `(1, N, D)`.
    """
    position = position.reshape(1, -1, position.shape[-1])  # (1, 1+N, D)
    return cls_token.reshape(1, 1, -1) + position[:, :1], position[:, 1:].contiguous()
