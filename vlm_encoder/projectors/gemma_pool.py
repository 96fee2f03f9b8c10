"""`gemma_pool`: the connector of Gemma 3 and Gemma 4: average each `k x k` block of patches into
one token, scale, [standardise], RMSNorm, and one bias-free Linear to the LLM width.

  * Gemma 3 (`Gemma3MultiModalProjector`): the SigLIP tower's 64 x 64 patches (896 px, patch 14)
    pooled `k = 4` to 16 x 16 = 256 tokens (`nn.AvgPool2d`), RMSNorm with a weight (its
    `1 + weight` folded on load), `x @ mm_input_projection_weight`.
  * Gemma 4 (`Gemma4VisionPooler` + `Gemma4MultimodalEmbedder`): pooled `k = 3` by patch position
    (any grid whose sides `k` divides; 280 soft tokens at most from its processor), times
    `sqrt(width)` (`scale`), `(x - std_bias) * std_scale` on the towers that have
    `standardize` (the 26B / 31B), an RMSNorm without a weight, `embedding_projection`.

Tokens come out row-major over the `(h/k, w/k)` grid, the order both references feed their LLM.
The pooling runs in float32 (Gemma 4 pools in float32; Gemma 3 in the tower's dtype, the same in
float32).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.norm import RMSNorm
from ..specs.options import at_least
from .config import KindOptions, ProjectorConfig
from .kind import grid_to_tokens, tokens_to_grid
from .pixel_shuffle import MergeKind, _exact_keys, _load
from .registry import register_projector

if TYPE_CHECKING:
    from .base import Projector


@dataclass(frozen=True)
class GemmaPoolOptions(KindOptions):
    """`gemma_pool`.

    Attributes:
        kernel_size: Side `k` of the averaged patch blocks (Gemma 3: 4, its 64 x 64 grid to
            16 x 16; Gemma 4: `pooling_kernel_size`, 3).
        scale: Multiplies the pooled tokens (Gemma 4: `sqrt(width)`; Gemma 3: 1).
        standardize: Then `(x - std_bias) * std_scale`, two per-channel buffers (Gemma 4's
            `standardize` towers).
        norm_weight: The RMSNorm has a learned weight (Gemma 3) or none (Gemma 4).
        norm_eps: Epsilon of the RMSNorm.
    """

    kernel_size: int = at_least(1, 4)
    scale: float = 1.0
    standardize: bool = False
    norm_weight: bool = True
    norm_eps: float = 1e-6


@register_projector("gemma_pool")
class GemmaPoolProjector(MergeKind):
    """`k x k` average pool, `* scale`, [standardise], RMSNorm, Linear."""

    label = "gemma_pool"
    grid_hint = "Gemma's processors size images to multiples of patch_size * kernel_size"

    options_class = GemmaPoolOptions
    needs_grid = True
    reference = "Gemma 3 MultiModalProjector / Gemma 4 vision pooler + embedder"
    tokens = "N / k^2 (Gemma 3: 4096 -> 256)"

    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__()
        options: GemmaPoolOptions = config.options
        width = config.fused_dim
        self.scale_factor = options.kernel_size  # MergeKind's grid check and token count
        self.scale = options.scale
        if options.standardize:
            self.register_buffer("std_bias", torch.zeros(width))
            self.register_buffer("std_scale", torch.ones(width))
        else:
            self.std_bias = self.std_scale = None
        self.norm = RMSNorm(width, options.norm_eps, affine=options.norm_weight)
        self.proj = nn.Linear(width, config.out_dim, bias=config.bias)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
        assert grid is not None
        self._check(grid)
        k = self.scale_factor
        pooled = grid_to_tokens(F.avg_pool2d(tokens_to_grid(x.float(), grid), k))  # (B, h*w/k^2, C) float32
        pooled = pooled * self.scale
        if self.std_bias is not None:
            pooled = (pooled - self.std_bias.float()) * self.std_scale.float()
        return self.proj(self.norm(pooled.to(x.dtype)))  # (B, h*w/k^2, out_dim)


def load_gemma3_projector(state_dict: Mapping[str, torch.Tensor], kernel_size: int = 4, norm_eps: float = 1e-6) -> Projector:
    """A `gemma_pool` `Projector` from transformers' `Gemma3MultiModalProjector` weights
    (`model.multi_modal_projector.state_dict()`: `mm_input_projection_weight` `(D, D_llm)`,
    `mm_soft_emb_norm.weight`, stored as `weight` for the norm's `1 + weight`).

    Args:
        state_dict: The projector's own keys (no prefix).
        kernel_size: `patches_per_image // sqrt(mm_tokens_per_image)` (4 for 64 -> 16).
        norm_eps: The vision config's `layer_norm_eps`.

    Returns:
        The projector; `proj(tokens, grid)` on the SigLIP tower's last layer (after its
        `post_layernorm`) equals `get_image_features(...).pooler_output`.
    """
    from .base import build_projector

    source = "Gemma 3 multi-modal projector"
    state = _exact_keys(state_dict, {"mm_input_projection_weight", "mm_soft_emb_norm.weight"}, source)
    weight = state["mm_input_projection_weight"]  # (D, D_llm): x @ weight
    projector = build_projector(
        "gemma_pool", int(weight.shape[0]), int(weight.shape[1]), bias=False, kernel_size=kernel_size, norm_eps=norm_eps
    )
    norm = 1.0 + state["mm_soft_emb_norm.weight"].float()  # Gemma3RMSNorm's (1 + w), in float32 as it computes it
    return _load(projector, {"body.norm.weight": norm, "body.proj.weight": weight.t().contiguous()}, source)


def load_gemma4_projector(
    state_dict: Mapping[str, torch.Tensor], kernel_size: int = 3, norm_eps: float = 1e-6
) -> Projector:
    """A `gemma_pool` `Projector` from a Gemma 4 model's connector weights: `embed_vision`'s
    `embedding_projection.weight`, plus the vision tower's `std_bias` / `std_scale` when it has
    `standardize`.

    Args:
        state_dict: Those keys, without their `model.embed_vision.` / `model.vision_tower.` prefix.
        kernel_size: The vision config's `pooling_kernel_size`.
        norm_eps: The vision config's `rms_norm_eps`.

    Returns:
        The projector; `proj(tokens, grid)` on the tower's last layer equals the reference's
        `get_image_features(...).pooler_output` (one image's tokens, row-major).
    """
    from .base import build_projector

    source = "Gemma 4 vision embedder"
    standardize = "std_bias" in state_dict or "std_scale" in state_dict
    expected = {"embedding_projection.weight"} | ({"std_bias", "std_scale"} if standardize else set())
    state = _exact_keys(state_dict, expected, source)
    weight = state["embedding_projection.weight"]  # (D_llm, D)
    width = int(weight.shape[1])
    projector = build_projector(
        "gemma_pool", width, int(weight.shape[0]), bias=False, kernel_size=kernel_size, scale=width**0.5,
        standardize=standardize, norm_weight=False, norm_eps=norm_eps,
    )
    names = {"embedding_projection.weight": "body.proj.weight", "std_bias": "body.std_bias", "std_scale": "body.std_scale"}
    return _load(projector, {names[k]: v for k, v in state.items()}, source)
