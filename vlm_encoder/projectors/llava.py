"""Loading LLaVA projector weights into an `mlp{N}x_gelu` / `linear` `Projector`.

Two layouts, chosen by the caller (never guessed):

* the original LLaVA repository (`haotian-liu/LLaVA`): `mm_projector.bin` with keys
  `model.mm_projector.{0,2,...}.{weight,bias}` (an `nn.Sequential`, `mm_projector_type`
  `mlp2x_gelu`) or `model.mm_projector.{weight,bias}` (`linear`);
* transformers' `LlavaMultiModalProjector`: `linear_1`, `linear_2` (always `mlp2x_gelu`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch

from ..weights import WeightsError, load_state_dict_strict, read_state_dict, strip_prefixes

from .base import Projector, build_projector
from .mlp import mlp_depth

_HF_LLAVA_NAMES = {"linear_1": "0", "linear_2": "2"}


def _listing(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:12]) + (f", ... ({len(keys) - 12} more)" if len(keys) > 12 else "")


def _projector_from_mlp_weights(weights: dict[str, torch.Tensor], kind: str, source: str) -> Projector:
    """Build and load a projector from `{index}.{weight,bias}` keys of LLaVA's Sequential."""
    depth = mlp_depth(kind)
    linear_ids = [str(2 * i) for i in range(depth)]
    expected_weights = {f"{i}.weight" for i in linear_ids}
    if not expected_weights <= set(weights):
        raise WeightsError(
            f"{source}: a {kind} projector needs the keys {sorted(expected_weights)} (and biases); found {_listing(weights)}"
        )
    first, last = weights[f"{linear_ids[0]}.weight"], weights[f"{linear_ids[-1]}.weight"]
    options = {"bias": f"{linear_ids[0]}.bias" in weights}
    if kind != "linear" and first.shape[0] != last.shape[0]:
        options["hidden_dim"] = int(first.shape[0])
    projector = build_projector(kind, int(first.shape[1]), int(last.shape[0]), **options)
    load_state_dict_strict(projector, {f"body.mlp.{k}": v for k, v in weights.items()}, source=source)
    return projector


def load_llava_mm_projector(
    source: str | os.PathLike | Mapping[str, torch.Tensor], kind: str = "mlp2x_gelu"
) -> Projector:
    """A `Projector` from the original LLaVA repository's projector weights.

    Args:
        source: `mm_projector.bin` / `.safetensors` (read with `weights_only=True`), or a
            state dict; keys `[model.]mm_projector.*`, other keys are ignored.
        kind: LLaVA's `mm_projector_type`: `linear` or `mlp{N}x_gelu`.

    Returns:
        The projector with the file's weights; widths and bias are read from the shapes.

    Raises:
        WeightsError: No `mm_projector` keys, or keys that do not fit `kind`.
    """
    if kind != "linear" and not re.fullmatch(r"mlp\d+x_gelu", kind):
        raise ValueError(f"LLaVA projector kind must be 'linear' or 'mlp{{N}}x_gelu', got {kind!r}")
    name = str(source) if not isinstance(source, Mapping) else "state dict"
    state = strip_prefixes(read_state_dict(source) if not isinstance(source, Mapping) else dict(source))
    picked = {k.split("mm_projector.", 1)[1]: v for k, v in state.items() if "mm_projector." in k}
    if not picked:
        raise WeightsError(f"{name}: no mm_projector.* keys; found {_listing(state)}")
    if kind == "linear":
        picked = {f"0.{k}": v for k, v in picked.items()}
    return _projector_from_mlp_weights(picked, kind, name)


def convert_hf_llava_projector(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' `LlavaMultiModalProjector` weights (`linear_1.*`, `linear_2.*`, any
    prefix before them removed) to `Projector` (`mlp2x_gelu`) names.

    Raises:
        WeightsError: A key that is not `linear_1` / `linear_2`.
    """
    out = {}
    for key, value in state_dict.items():
        layer, _, param = key.rpartition(".")
        layer = layer.rsplit(".", 1)[-1]
        if layer not in _HF_LLAVA_NAMES:
            raise WeightsError(f"unexpected LLaVA projector key {key!r}; expected linear_1.* and linear_2.*")
        out[f"body.mlp.{_HF_LLAVA_NAMES[layer]}.{param}"] = value
    return out
