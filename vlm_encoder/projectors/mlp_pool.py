"""`mlp_pool`: PerceptionLM's connector: Linear, GELU, Linear on every patch token, THEN 2D
adaptive average pooling of the projected grid by `pooling_ratio`.

transformers' `PerceptionLMMultiModalProjector` (on the PE tower's last layer, CLS dropped when
`vision_use_cls_token`): `linear_1`, GELU, `linear_2`, then `PerceptionLMAdaptiveAvgPooling`,
`adaptive_avg_pool2d` of the square `(h, h)` grid to `(h // r, h // r)`, row-major (`nn.Identity`
for `projector_pooling_ratio == 1`). The order differs from `pool` (pool, then MLP): the GELU
sits between them, so the two do not commute. A non-square grid is pooled to
`(h // r, w // r)` (the reference accepts square grids only). Token budget: `(h // r) * (w // r)`
(Perception-LM-1B/3B/8B: 448 px, patch 14 -> 32 x 32, r = 2 -> 256 tokens per tile).
From a whole checkpoint directory: `converters.hf_connectors.load_perception_lm_connector`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..specs.options import at_least
from .config import KindOptions, ProjectorConfig
from .kind import ProjectorKind, build_mlp, grid_to_tokens, tokens_to_grid
from .pixel_shuffle import _exact_keys, _load
from .registry import register_projector

if TYPE_CHECKING:
    from .base import Projector


@dataclass(frozen=True)
class MLPPoolOptions(KindOptions):
    """`mlp_pool`.

    Attributes:
        pooling_ratio: `r`: the projected `(h, w)` grid is average-pooled to `(h // r, w // r)`
            (PerceptionLM's `projector_pooling_ratio`; 1: no pooling).
        hidden_dim: Hidden width of the MLP (default `out_dim`, as PerceptionLM).
    """

    pooling_ratio: int = at_least(1, 2)
    hidden_dim: int | None = at_least(1, None)


@register_projector("mlp_pool")
class MLPPoolProjector(ProjectorKind):
    """`mlp2x_gelu` on each token, then adaptive 2D average pooling by `pooling_ratio`."""

    options_class = MLPPoolOptions
    needs_grid = True
    reference = "PerceptionLM multi-modal projector"
    tokens = "(h // r) * (w // r)"

    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__()
        self.pooling_ratio = config.options.pooling_ratio
        self.mlp = build_mlp(config.fused_dim, config.hidden_width, config.out_dim, 2, config.bias)

    def _pooled(self, grid: tuple[int, int]) -> tuple[int, int]:
        r = self.pooling_ratio
        if grid[0] < r or grid[1] < r:
            raise ValueError(
                f"mlp_pool with pooling_ratio={r} needs a patch grid of at least {r}x{r}, got {grid[0]}x{grid[1]}"
            )
        return grid[0] // r, grid[1] // r

    def num_output_tokens(self, num_tokens: int, grid: tuple[int, int] | None) -> int:
        assert grid is not None
        h, w = self._pooled(grid)
        return h * w

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
        assert grid is not None
        x = self.mlp(x)  # (B, h*w, out_dim)
        if self.pooling_ratio == 1:
            return x
        pooled = F.adaptive_avg_pool2d(tokens_to_grid(x, grid), self._pooled(grid))  # (B, out_dim, h//r, w//r)
        return grid_to_tokens(pooled)  # (B, (h//r)*(w//r), out_dim)


PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")


def load_perception_lm_projector(state_dict: Mapping[str, torch.Tensor], pooling_ratio: int = 1) -> Projector:
    """An `mlp_pool` `Projector` from transformers' `PerceptionLMMultiModalProjector` weights
    (`model.multi_modal_projector.state_dict()`: `linear_1`, `linear_2`, each with a bias).

    Args:
        state_dict: The projector's own keys (no prefix).
        pooling_ratio: The config's `projector_pooling_ratio`.

    Returns:
        The projector; `proj(tokens, grid_size=(h, w))` on the tower's last layer (CLS dropped)
        equals `get_image_features(...).pooler_output`.

    Raises:
        WeightsError: Other keys.
    """
    from .base import build_projector

    source = "PerceptionLM multi_modal_projector"
    state = _exact_keys(state_dict, {f"linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}, source)
    first, last = state["linear_1.weight"], state["linear_2.weight"]
    projector = build_projector(
        "mlp_pool", int(first.shape[1]), int(last.shape[0]), pooling_ratio=pooling_ratio, hidden_dim=int(first.shape[0])
    )
    names = {"linear_1": "body.mlp.0", "linear_2": "body.mlp.2"}
    return _load(projector, {f"{names[k.split('.')[0]]}.{k.split('.')[1]}": v for k, v in state.items()}, source)
