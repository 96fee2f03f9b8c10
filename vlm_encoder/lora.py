"""LoRA adapters through `peft`: on a tower or a whole `ContrastiveModel` (`apply_lora`), on a
`VisionLanguageModel`'s language model (`apply_lora_to_language_model`), and merged back into
plain weights for export (`merge_lora`).

`peft.inject_adapter_in_model` swaps each targeted `nn.Linear` for a `peft` LoRA layer in place,
so the model keeps its own class (a `ContrastiveModel` stays one, its `forward` unchanged), and
leaves only the adapters trainable. Merging uses each layer's `merge()` (peft's arithmetic) and
puts its base `nn.Linear` back, so the merged model has the state-dict keys of one never adapted.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence

from torch import nn


def lora_target_names(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Full names of the `nn.Linear` modules a pattern names: a pattern matches a module whose
    full name equals it, ends with `.` + it (`qkv` matches `vision.blocks.0.attn.qkv`), or
    matches it as a regular expression (`vision\\..*\\.qkv` for one tower only).

    Raises:
        ValueError: No pattern given, or no linear layer matched (the available names listed).
    """
    if not targets:
        raise ValueError("lora_targets is empty: name the linear layers to adapt, e.g. ('qkv', 'proj')")
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    chosen = [name for name in linear
              if any(name == p or name.endswith("." + p) or re.fullmatch(p, name) for p in targets)]
    if not chosen:
        suffixes = sorted({name.rsplit(".", 1)[-1] for name in linear})
        raise ValueError(f"lora_targets {tuple(targets)!r} match no linear layer; the linear layers end in {suffixes}")
    return chosen


def apply_lora(model: nn.Module, r: int, targets: Sequence[str], alpha: float | None = None,
               dropout: float = 0.0) -> list[str]:
    """Add LoRA adapters (`peft.LoraConfig`, `peft.inject_adapter_in_model`) to the linear
    layers of `model` that `targets` name (see `lora_target_names`), in place; afterwards only
    the adapters of `model` are trainable.

    Args:
        model: Any module: a `VisionEncoder`, `TextEncoder` or `ContrastiveModel`.
        r: LoRA rank.
        targets: Module-name patterns.
        alpha: LoRA scaling numerator (`alpha / r` scales the update); default `r`.
        dropout: Dropout on the adapters' input.

    Returns:
        The adapted modules' names.
    """
    from peft import LoraConfig, inject_adapter_in_model

    names = lora_target_names(model, targets)
    config = LoraConfig(r=r, lora_alpha=alpha if alpha is not None else r, lora_dropout=dropout, target_modules=names)
    inject_adapter_in_model(config, model)
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """A copy of `model` with every LoRA adapter merged into its base layer and the base
    `nn.Linear` put back: the same outputs (to float rounding), the plain model's state-dict keys.
    `model` itself is left adapted."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(model)
    layers = [(name, m) for name, m in merged.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in layers:
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(merged.get_submodule(parent_name) if parent_name else merged, child, layer.get_base_layer())
    return merged


def apply_lora_to_language_model(vlm: nn.Module, r: int, targets: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
                                 alpha: float | None = None, dropout: float = 0.0) -> list[str]:
    """LoRA on a `VisionLanguageModel`'s language model (a transformers causal LM), in place.

    The LM's own parameters are frozen and its adapters trainable; the image encoder and the
    projector are left as they are (freeze or train them as you choose). `merge_lora(vlm)` gives
    the merged model to save.

    Args:
        vlm: The `VisionLanguageModel`.
        r / targets / alpha / dropout: As `apply_lora` (default targets: the attention
            projections of Llama / Qwen / Mistral style LMs).

    Returns:
        The adapted modules' names within `vlm.language_model`.
    """
    return apply_lora(vlm.language_model, r, targets, alpha, dropout)
