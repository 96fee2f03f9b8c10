"""Llama 4's connector as a `pixel_shuffle` projector: no kind of its own, the math is the same.

transformers' `Llama4VisionModel` ends in `Llama4VisionPixelShuffleMLP` (`vision_adapter`) and
`Llama4ForConditionalGeneration` then applies `Llama4MultiModalProjector` (`linear_1`):

  tower last layer after `layernorm_post`, CLS (the LAST token) dropped, `(B, h*w, C)`
  -> `pixel_shuffle(x, 0.5)`: `(B, h/2 * w/2, 4C)`, row-major, channel `(i * 2 + j) * C + c`
     for the patch at row offset `i`, column offset `j` (checked equal to our `offset_major`
     `space_to_depth`; the reference reshapes a square grid only)
  -> `fc1` (no bias), GELU, `fc2` (no bias), GELU, `linear_1` (no bias) to the LLM width.

That is `pixel_shuffle` with `order='offset_major'`, `norm=False`, `num_linear=3`, `bias=False`
(its MLP is Linear, GELU, Linear, GELU, Linear), when `projector_input_dim ==
projector_output_dim == vision_output_dim` (the released checkpoints: 4096), which the loader
checks. Token budget: `(h/2) * (w/2)` per tile (Llama-4-Scout: 336 px, patch 14 -> 24 x 24 -> 144).
From a whole checkpoint directory: `converters.hf_connectors.load_llama4_connector`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from .pixel_shuffle import _exact_keys, _load, _merged_width

if TYPE_CHECKING:
    from .base import Projector

# Where a whole `Llama4ForConditionalGeneration` checkpoint keeps the two parts of the connector.
ADAPTER_PREFIX = "vision_model.vision_adapter.mlp."
PROJECTOR_PREFIX = "multi_modal_projector."


def load_llama4_projector(state_dict: Mapping[str, torch.Tensor], scale_factor: int = 2) -> Projector:
    """A `pixel_shuffle` `Projector` from Llama 4's connector weights: `fc1.weight`, `fc2.weight`
    (the tower's `vision_adapter.mlp`) and `linear_1.weight` (the model's `multi_modal_projector`).

    Args:
        state_dict: Those three keys, without their prefixes.
        scale_factor: `1 / pixel_shuffle_ratio` of the vision config (2 for `0.5`).

    Returns:
        The projector; `proj(tokens, grid_size=(h, w))` on the tower's patch tokens (last layer
        after `layernorm_post`, CLS dropped) equals the flattened image tokens the reference
        feeds its LLM (`multi_modal_projector(get_image_features(...).last_hidden_state)`).

    Raises:
        WeightsError: Other keys, or widths that do not chain.
    """
    from ..weights import WeightsError
    from .base import build_projector

    source = "Llama 4 vision adapter + multi_modal_projector"
    state = _exact_keys(state_dict, {"fc1.weight", "fc2.weight", "linear_1.weight"}, source)
    fc1, fc2, last = state["fc1.weight"], state["fc2.weight"], state["linear_1.weight"]
    hidden = int(fc1.shape[0])
    if tuple(fc2.shape) != (hidden, hidden) or last.shape[1] != hidden:
        raise WeightsError(
            f"{source}: fc1 {tuple(fc1.shape)}, fc2 {tuple(fc2.shape)}, linear_1 {tuple(last.shape)} do not chain as "
            "Linear(4C, P), Linear(P, P), Linear(P, D_llm) "
            "(projector_input_dim == projector_output_dim == vision_output_dim)"
        )
    in_dim = _merged_width(fc1.shape[1], scale_factor, source)
    projector = build_projector(
        "pixel_shuffle", in_dim, int(last.shape[0]), scale_factor=scale_factor, order="offset_major", norm=False,
        num_linear=3, hidden_dim=hidden, bias=False,
    )
    names = {"fc1.weight": "body.mlp.0.weight", "fc2.weight": "body.mlp.2.weight",
             "linear_1.weight": "body.mlp.4.weight"}
    return _load(projector, {names[k]: v for k, v in state.items()}, source)
