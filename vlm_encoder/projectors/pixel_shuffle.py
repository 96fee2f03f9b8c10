"""`pixel_shuffle`: merge `s x s` neighbouring patches into one token, then an MLP.

InternVL 1.5 (Chen et al. 2024) and Idefics3 (Laurençon et al. 2024): a space-to-depth of
the patch grid `(h, w, C) -> (h/s, w/s, C*s*s)`, so `M = N / s^2`, followed by
LayerNorm (InternVL's `mlp1`) and Linear, GELU, Linear (Idefics3 / SmolVLM: one Linear
without bias and no LayerNorm).

The merged token's channel order (`order`) decides which projector weights fit:

* `channel_major` (default): `torch.nn.functional.pixel_unshuffle`'s, channel
  `c * s^2 + i * s + j` holds channel `c` of the patch at row offset `i`, column offset `j`;
* `offset_major`: channel `(i * s + j) * C + c`, the order of transformers'
  `InternVLModel.pixel_shuffle` and `Idefics3Connector.pixel_shuffle` (the two coincide),
  so their connector weights load as they are (`load_internvl_projector`,
  `load_idefics3_connector`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..specs.options import at_least
from .config import KindOptions, ProjectorConfig
from .kind import ProjectorKind, build_mlp, grid_to_tokens, tokens_to_grid
from .registry import register_projector

if TYPE_CHECKING:
    from .base import Projector

ShuffleOrder = Literal["channel_major", "offset_major"]


@dataclass(frozen=True)
class PixelShuffleOptions(KindOptions):
    """`pixel_shuffle`.

    Attributes:
        scale_factor: Side `s` of the `s x s` patch neighbourhoods merged into one token.
        norm: LayerNorm on the merged tokens before the MLP (InternVL's `mlp1`).
        hidden_dim: Hidden width of the MLP (default `out_dim`).
        order: Channel order of a merged token: `channel_major` (`pixel_unshuffle`'s) or
            `offset_major` (InternVL's and Idefics3's); see the module docstring.
        num_linear: Linear layers of the MLP, GELU between them: 2 (InternVL) or 1
            (Idefics3's single Linear).
    """

    scale_factor: int = at_least(1, 2)
    norm: bool = True
    hidden_dim: int | None = at_least(1, None)
    order: ShuffleOrder = "channel_major"
    num_linear: int = at_least(1, 2)


def space_to_depth(x: torch.Tensor, grid: tuple[int, int], s: int, order: ShuffleOrder) -> torch.Tensor:
    """Row-major tokens `(B, h*w, C)` to merged tokens `(B, h*w/s^2, C*s^2)` in `order`."""
    if order == "channel_major":
        return grid_to_tokens(F.pixel_unshuffle(tokens_to_grid(x, grid), s))  # (B, N/s^2, C*s*s)
    B, _, C = x.shape
    h, w = grid
    x = x.reshape(B, h // s, s, w // s, s, C).permute(0, 1, 3, 2, 4, 5)  # (B, h/s, w/s, i, j, C)
    return x.reshape(B, (h // s) * (w // s), s * s * C)


class MergeKind(ProjectorKind):
    """A kind that merges each `s x s` block of neighbouring patches into one token (`N / s^2`
    tokens out): the grid must be divisible by `s` on both sides."""

    label = "pixel_shuffle"
    grid_hint = "choose a scale_factor that divides both sides or resample to another grid (fusion_grid)"
    scale_factor: int

    def _check(self, grid: tuple[int, int]) -> None:
        s = self.scale_factor
        if grid[0] % s or grid[1] % s:
            raise ValueError(f"{self.label} with scale_factor={s} needs a patch grid divisible by {s}, got "
                             f"{grid[0]}x{grid[1]}; {self.grid_hint}")

    def num_output_tokens(self, num_tokens: int, grid: tuple[int, int] | None) -> int:
        assert grid is not None
        self._check(grid)
        return num_tokens // self.scale_factor**2


@register_projector("pixel_shuffle")
class PixelShuffleProjector(MergeKind):
    """Space-to-depth token merging (InternVL / Idefics3), then LayerNorm and an MLP
    (`mlp2x_gelu` by default)."""

    options_class = PixelShuffleOptions
    needs_grid = True
    reference = "InternVL 1.5 / Idefics3 pixel shuffle"
    tokens = "N / s^2"

    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__()
        options: PixelShuffleOptions = config.options
        self.scale_factor = options.scale_factor
        self.order = options.order
        merged = config.fused_dim * options.scale_factor**2
        self.norm = nn.LayerNorm(merged) if options.norm else nn.Identity()
        self.mlp = build_mlp(merged, config.hidden_width, config.out_dim, options.num_linear, config.bias)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
        assert grid is not None
        self._check(grid)
        merged = space_to_depth(x, grid, self.scale_factor, self.order)  # (B, N/s^2, C*s*s)
        return self.mlp(self.norm(merged))  # (B, N/s^2, out_dim)


# ------------------------------------------------------------ reference weights
def _exact_keys(state_dict: Mapping[str, torch.Tensor], expected: set[str], source: str) -> dict[str, torch.Tensor]:
    from ..weights import WeightsError

    state = dict(state_dict)
    if set(state) != expected:
        raise WeightsError(
            f"{source}: expected exactly the keys {sorted(expected)}; missing {sorted(expected - set(state))}, "
            f"unexpected {sorted(set(state) - expected)}"
        )
    return state


def _merged_width(width: int, scale_factor: int, source: str) -> int:
    from ..weights import WeightsError

    if width % scale_factor**2:
        raise WeightsError(f"{source}: merged width {width} is not a multiple of scale_factor^2 = {scale_factor**2}")
    return width // scale_factor**2


def load_internvl_projector(state_dict: Mapping[str, torch.Tensor], scale_factor: int = 2) -> Projector:
    """A `pixel_shuffle` `Projector` (`order='offset_major'`) from transformers'
    `InternVLMultiModalProjector` weights (`model.multi_modal_projector.state_dict()`:
    `layer_norm`, `linear_1`, `linear_2`; `projector_hidden_act='gelu'`).

    Args:
        state_dict: The projector's own keys (no prefix).
        scale_factor: `1 / downsample_ratio` of the InternVL config (2 for `0.5`).

    Returns:
        The projector; `proj(tokens, grid_size=(h, w))` equals InternVL's
        `multi_modal_projector(pixel_shuffle(...))` on the same patch tokens.

    Raises:
        WeightsError: Other keys, or widths that `scale_factor` does not divide.
    """
    from .base import build_projector

    source = "InternVL multi_modal_projector"
    names = {"layer_norm": "body.norm", "linear_1": "body.mlp.0", "linear_2": "body.mlp.2"}
    state = _exact_keys(state_dict, {f"{k}.{p}" for k in names for p in ("weight", "bias")}, source)
    first, last = state["linear_1.weight"], state["linear_2.weight"]
    in_dim = _merged_width(first.shape[1], scale_factor, source)
    projector = build_projector(
        "pixel_shuffle", in_dim, int(last.shape[0]), scale_factor=scale_factor, order="offset_major",
        hidden_dim=int(first.shape[0]),
    )
    return _load(projector, {f"{names[k.rsplit('.', 1)[0]]}.{k.rsplit('.', 1)[1]}": v for k, v in state.items()}, source)


def load_idefics3_connector(state_dict: Mapping[str, torch.Tensor], scale_factor: int = 2) -> Projector:
    """A `pixel_shuffle` `Projector` (`order='offset_major'`, no LayerNorm, one Linear without
    bias) from transformers' `Idefics3Connector` weights (`model.connector.state_dict()`:
    `modality_projection.proj.weight`; SmolVLM's connector too).

    Args:
        state_dict: The connector's own keys (no prefix).
        scale_factor: The config's `scale_factor`.

    Returns:
        The projector; `proj(tokens, grid_size=(h, w))` equals `Idefics3Connector(tokens)`.

    Raises:
        WeightsError: Other keys, or a width that `scale_factor` does not divide.
    """
    from .base import build_projector

    source = "Idefics3 connector"
    weight = _exact_keys(state_dict, {"modality_projection.proj.weight"}, source)["modality_projection.proj.weight"]
    in_dim = _merged_width(weight.shape[1], scale_factor, source)
    projector = build_projector(
        "pixel_shuffle", in_dim, int(weight.shape[0]), scale_factor=scale_factor, order="offset_major",
        norm=False, num_linear=1, bias=False,
    )
    return _load(projector, {"body.mlp.0.weight": weight}, source)


def _load(projector: Projector, state: dict[str, torch.Tensor], source: str) -> Projector:
    from ..weights import load_state_dict_strict

    load_state_dict_strict(projector, state, source=source)
    return projector.to(next(iter(state.values())).dtype)
