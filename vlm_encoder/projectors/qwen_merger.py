"""`qwen_merger`: Qwen2.5-VL's `PatchMerger`: RMSNorm on each patch token, merge `s x s`
neighbouring patches into one token, then Linear, GELU, Linear. Qwen3-VL's mergers are the same
with a LayerNorm (`norm_type`), and its DeepStack mergers put that norm after the merge, over the
merged width (`norm_after_merge`, its `use_postshuffle_norm`).

The reference (`Qwen2_5_VLPatchMerger`) sees its tokens grouped by merge unit, so a merged
token is the concatenation of the patches at offsets `(0, 0), (0, 1), (1, 0), (1, 1)`: the
`offset_major` space-to-depth of row-major tokens (`pixel_shuffle.space_to_depth`), and the
merged tokens come out row-major over the `(h/s, w/s)` grid, the order of the reference's
final output. Unlike `pixel_shuffle` the norm is per patch token (width `C`), before the merge.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..layers.norm import NormKind, build_norm
from ..specs.options import at_least
from .config import KindOptions, ProjectorConfig
from .kind import build_mlp
from .pixel_shuffle import MergeKind, _exact_keys, _load, _merged_width, space_to_depth
from .registry import register_projector

if TYPE_CHECKING:
    from .base import Projector


@dataclass(frozen=True)
class QwenMergerOptions(KindOptions):
    """`qwen_merger`.

    Attributes:
        scale_factor: Side `s` of the merged patch neighbourhoods (Qwen `spatial_merge_size`).
        hidden_dim: Hidden width of the MLP (default: the merged width `C * s^2`, as Qwen).
        norm_eps: Epsilon of the norm (Qwen: 1e-6).
        norm_type: `rmsnorm` (Qwen2.5-VL) or `layernorm` (Qwen3-VL).
        norm_after_merge: Normalise the merged tokens (width `C * s^2`) instead of each patch
            token before the merge (Qwen3-VL's DeepStack mergers).
    """

    scale_factor: int = at_least(1, 2)
    hidden_dim: int | None = at_least(1, None)
    norm_eps: float = 1e-6
    norm_type: NormKind = "rmsnorm"
    norm_after_merge: bool = False


@register_projector("qwen_merger")
class QwenMergerProjector(MergeKind):
    """Norm per token (or per merged token), `s x s` merge (`offset_major`), Linear, GELU, Linear."""

    label = "qwen_merger"
    grid_hint = "Qwen2.5-VL's processor sizes images to multiples of patch_size * scale_factor"

    options_class = QwenMergerOptions
    needs_grid = True
    reference = "Qwen2.5-VL PatchMerger"
    tokens = "N / s^2"

    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__()
        options: QwenMergerOptions = config.options
        self.scale_factor = options.scale_factor
        self.norm_after_merge = options.norm_after_merge
        merged = config.fused_dim * options.scale_factor**2
        self.norm = build_norm(options.norm_type, merged if options.norm_after_merge else config.fused_dim, options.norm_eps)
        self.mlp = build_mlp(merged, options.hidden_dim or merged, config.out_dim, 2, config.bias)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
        assert grid is not None
        self._check(grid)
        if self.norm_after_merge:
            merged = self.norm(space_to_depth(x, grid, self.scale_factor, "offset_major"))  # (B, N/s^2, C*s*s)
        else:
            merged = space_to_depth(self.norm(x), grid, self.scale_factor, "offset_major")  # (B, N/s^2, C*s*s)
        return self.mlp(merged)  # (B, N/s^2, out_dim)


def load_qwen2_5_vl_merger(state_dict: Mapping[str, torch.Tensor], scale_factor: int = 2) -> Projector:
    """A `qwen_merger` `Projector` from transformers' `Qwen2_5_VLPatchMerger` weights (the
    vision tower's `merger.state_dict()`: `ln_q.weight`, `mlp.0`, `mlp.2`).

    Args:
        state_dict: The merger's own keys (no `merger.` prefix).
        scale_factor: The vision config's `spatial_merge_size`.

    Returns:
        The projector; `proj(encoder(pixels))` equals the reference tower's `pooler_output`
        (merged tokens row-major over the `(h/s, w/s)` grid).

    Raises:
        WeightsError: Other keys, or widths that do not fit `scale_factor`.
    """
    from ..weights import WeightsError
    from .base import build_projector

    source = "Qwen2.5-VL merger"
    expected = {"ln_q.weight"} | {f"mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    state = _exact_keys(state_dict, expected, source)
    first, last = state["mlp.0.weight"], state["mlp.2.weight"]
    in_dim = _merged_width(first.shape[1], scale_factor, source)
    if state["ln_q.weight"].shape[0] != in_dim:
        raise WeightsError(f"{source}: ln_q has width {state['ln_q.weight'].shape[0]}, mlp.0 takes {scale_factor}^2 x {in_dim}")
    projector = build_projector(
        "qwen_merger", in_dim, int(last.shape[0]), scale_factor=scale_factor, hidden_dim=int(first.shape[0])
    )
    names = {"ln_q": "body.norm", "mlp.0": "body.mlp.0", "mlp.2": "body.mlp.2"}
    return _load(projector, {f"{names[k.rsplit('.', 1)[0]]}.{k.rsplit('.', 1)[1]}": v for k, v in state.items()}, source)


def load_qwen3_vl_merger(
    state_dict: Mapping[str, torch.Tensor], scale_factor: int = 2, norm_after_merge: bool = False
) -> Projector:
    """A `qwen_merger` `Projector` (LayerNorm) from transformers' `Qwen3VLVisionPatchMerger`
    weights: the tower's `merger.state_dict()`, or one of its `deepstack_merger_list[k]`
    (`norm.weight` / `norm.bias`, `linear_fc1`, `linear_fc2`).

    Args:
        state_dict: The merger's own keys (no `merger.` prefix).
        scale_factor: The vision config's `spatial_merge_size`.
        norm_after_merge: The norm is over the merged tokens (the DeepStack mergers,
            `use_postshuffle_norm=True`), not each patch token (the main merger).

    Returns:
        The projector; `proj(encoder(pixels))` (the last layer) equals the reference tower's
        `pooler_output`, and on the layer `deepstack_visual_indexes[k]` its
        `deepstack_features[k]`, merged tokens row-major over the `(h/s, w/s)` grid.

    Raises:
        WeightsError: Other keys, or widths that do not fit `scale_factor` / `norm_after_merge`.
    """
    from ..weights import WeightsError
    from .base import build_projector

    source = "Qwen3-VL merger"
    expected = {f"{m}.{p}" for m in ("norm", "linear_fc1", "linear_fc2") for p in ("weight", "bias")}
    state = _exact_keys(state_dict, expected, source)
    first, last = state["linear_fc1.weight"], state["linear_fc2.weight"]
    in_dim = _merged_width(first.shape[1], scale_factor, source)
    norm_width = first.shape[1] if norm_after_merge else in_dim
    if state["norm.weight"].shape[0] != norm_width:
        where = "the merged tokens" if norm_after_merge else "each patch token"
        raise WeightsError(
            f"{source}: norm has width {state['norm.weight'].shape[0]}, but a norm over {where} has width {norm_width} "
            f"(norm_after_merge={norm_after_merge})"
        )
    projector = build_projector(
        "qwen_merger", in_dim, int(last.shape[0]), scale_factor=scale_factor, hidden_dim=int(first.shape[0]),
        norm_type="layernorm", norm_after_merge=norm_after_merge,
    )
    names = {"norm": "body.norm", "linear_fc1": "body.mlp.0", "linear_fc2": "body.mlp.2"}
    return _load(projector, {f"{names[k.rsplit('.', 1)[0]]}.{k.rsplit('.', 1)[1]}": v for k, v in state.items()}, source)


def load_kimi_k25_merger(
    state_dict: Mapping[str, torch.Tensor], scale_factor: int = 2, norm_eps: float = 1e-5
) -> Projector:
    """A `qwen_merger` `Projector` (LayerNorm per patch, `s x s` merge, Linear, exact GELU,
    Linear) from Kimi K2.5's `mm_projector` weights: the released names (`pre_norm`, `proj.0`,
    `proj.2`) or transformers' in memory (`pre_norm`, `in_proj`, `out_proj`). Its reference
    (`Kimi_K25MultimodalProjection` on the tower's `temporal_merge`d output) concatenates each
    merge unit's patches at offsets `(0, 0), (0, 1), (1, 0), (1, 1)`, as Qwen's merger.

    Args:
        state_dict: The connector's own keys (no `mm_projector.` prefix).
        scale_factor: The vision config's `merge_kernel_size` side.
        norm_eps: The config's `projection_layer_norm_eps` (released: `projector_ln_eps`).

    Returns:
        The projector; `proj(encoder(pixels, norm=True).patches(-1), grid)` equals the image
        tokens `get_image_features` gives the language model, row-major over `(h/s, w/s)`.

    Raises:
        WeightsError: Other keys, or widths that do not fit `scale_factor`.
    """
    from ..weights import WeightsError
    from .base import build_projector

    source = "Kimi K2.5 mm_projector"
    first_name, last_name = ("proj.0", "proj.2") if "proj.0.weight" in state_dict else ("in_proj", "out_proj")
    expected = {f"{m}.{p}" for m in ("pre_norm", first_name, last_name) for p in ("weight", "bias")}
    state = _exact_keys(state_dict, expected, source)
    first, last = state[f"{first_name}.weight"], state[f"{last_name}.weight"]
    in_dim = _merged_width(first.shape[1], scale_factor, source)
    if state["pre_norm.weight"].shape[0] != in_dim:
        raise WeightsError(f"{source}: pre_norm has width {state['pre_norm.weight'].shape[0]}, {first_name} takes {scale_factor}^2 x {in_dim}")
    projector = build_projector(
        "qwen_merger", in_dim, int(last.shape[0]), scale_factor=scale_factor, hidden_dim=int(first.shape[0]),
        norm_type="layernorm", norm_eps=norm_eps,
    )
    names = {"pre_norm": "body.norm", first_name: "body.mlp.0", last_name: "body.mlp.2"}
    return _load(projector, {f"{names[k.rsplit('.', 1)[0]]}.{k.rsplit('.', 1)[1]}": v for k, v in state.items()}, source)
