"""DeepStack (Qwen3-VL; Meng et al. 2024, arXiv 2406.04334): the features of several encoder
layers, each through its own connector, are added to the LM's hidden states at the image
positions after its first `k` decoder layers.

Tapped encoder layer `j` (`deepstack_layers[j]`) is projected by `deepstack_projectors[j]` to
one token per image token `(I, M, d_llm)`; after decoder layer `j` (`j < k`) the hidden states
`(B, L, d_llm)` at the placeholder positions get those tokens added, in placeholder order
(transformers' `Qwen3VLTextModel._deepstack_process`, written the same way so the sums are the
same floats).

The addition is a forward hook on each of the first `k` layers of the LM's decoder
(`lm.get_decoder().layers`, which every transformers decoder-only LM and Qwen-VL model has),
registered for one call of `forward` / `generate` and fired once per layer: in `generate` that
is the prompt's forward; the tokens decoded after it hold no image (as transformers, which passes
the DeepStack features with the pixels only). So the LM is transformers' own, unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def decoder_layers(language_model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers LM, in order (`get_decoder().layers`).

    Raises:
        ValueError: The LM has no such list (named).
    """
    get_decoder = getattr(language_model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ValueError(
            f"DeepStack adds image features after the LM's first decoder layers, but {type(language_model).__name__} "
            "has no decoder layer list (get_decoder().layers)"
        )
    return layers


def _add_at(hidden: torch.Tensor, mask: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """`hidden` `(B, L, d)` with `embeds` `(n, d)` added at the `n` true positions of `mask` `(B, L)`."""
    embeds = embeds.to(hidden.device, hidden.dtype)
    hidden = hidden.clone()
    hidden[mask, :] = hidden[mask, :] + embeds
    return hidden


@contextmanager
def deepstack_hooks(
    language_model: nn.Module, visual_pos_masks: torch.Tensor, deepstack_visual_embeds: Sequence[torch.Tensor]
) -> Iterator[None]:
    """Within the block, decoder layer `j` of `language_model` adds `deepstack_visual_embeds[j]`
    `(n, d_llm)` to its output at the `n` true positions of `visual_pos_masks` `(B, L)`, on its
    first call only (the prompt's forward).

    A batch `r` times the mask's (generate's `num_beams` / `num_return_sequences`, which repeat
    each sample's rows in place) gets each sample's features `r` times.

    Raises:
        ValueError: The first call of a tapped layer is on a sequence of another shape than the mask.
    """
    layers = decoder_layers(language_model)
    if len(deepstack_visual_embeds) > len(layers):
        raise ValueError(f"{len(deepstack_visual_embeds)} DeepStack features for an LM of {len(layers)} decoder layers")
    mask = visual_pos_masks.bool()
    handles = []

    def hook_for(j: int, embeds: torch.Tensor):
        fired = False

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            nonlocal fired
            if fired:
                return output
            fired = True
            hidden = output[0] if isinstance(output, tuple) else output  # (B, L, d)
            here, add = mask, embeds
            repeats, rest = divmod(hidden.shape[0], mask.shape[0])
            if rest or not repeats or hidden.shape[1] != mask.shape[1]:
                raise ValueError(
                    f"DeepStack: decoder layer {j} ran on {tuple(hidden.shape[:2])} tokens, the image mask is {tuple(mask.shape)}"
                )
            if repeats > 1:  # generate's beams / num_return_sequences: each sample's rows repeated in place
                per_sample = embeds.split(mask.sum(dim=1).tolist())
                here = mask.repeat_interleave(repeats, dim=0)
                add = torch.cat([tokens for tokens in per_sample for _ in range(repeats)])
            hidden = _add_at(hidden, here.to(hidden.device), add)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    try:
        for j, embeds in enumerate(deepstack_visual_embeds):
            handles.append(layers[j].register_forward_hook(hook_for(j, embeds)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def check_deepstack(
    deepstack_layers: Sequence[int], deepstack_projectors: Sequence[nn.Module], width: int, d_llm: int
) -> None:
    """Validate the DeepStack arguments of `VisionLanguageModel` (one projector per tapped layer,
    one stream of the encoder's width each, the LM's width out)."""
    from ..projectors import Projector

    if len(deepstack_layers) != len(deepstack_projectors):
        raise ValueError(
            f"DeepStack needs one projector per tapped layer: {len(deepstack_layers)} deepstack_layers, "
            f"{len(deepstack_projectors)} deepstack_projectors"
        )
    for j, projector in enumerate(deepstack_projectors):
        if not isinstance(projector, Projector):
            raise TypeError(f"deepstack_projectors[{j}] must be a projectors.Projector, got {type(projector).__name__}")
        c = projector.config
        if c.in_dims != (width,):
            raise ValueError(f"deepstack_projectors[{j}] takes in_dim={c.in_dim}; it projects one layer of width {width}")
        if c.out_dim != d_llm:
            raise ValueError(f"deepstack_projectors[{j}] has out_dim={c.out_dim}, the LM's hidden size is {d_llm}")
