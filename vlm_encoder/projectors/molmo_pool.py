"""`molmo_pool`: Molmo2's vision adapter: several ViT layers concatenated on the channel axis,
each `p_h x p_w` window of patches pooled by one cross-attention query (the window's mean), then
a SwiGLU MLP to the LLM width.

transformers' `Molmo2Model.get_image_features` + `Molmo2Adapter`, read exactly:

  * features: `torch.cat([hidden_states[l + 1] for l in vision_feature_layer], -1)`, in the
    config's order (default `[24, 18]`: here the `Projector`'s input streams in that order,
    `fusion='concat'`), `(crops, N, C * L)`; there is no final norm.
  * pooling sets (`image_token_pooling`, built by `Molmo2ImageProcessor.arange_for_pooling`): the
    patch-index grid of a crop padded with `-1` to multiples of the window, the padding split
    `floor` before / `ceil` after on each side (centred), cut into `p_h x p_w` windows, row-major;
    each row of indices is one output token, `-1` slots are padding.
  * attention pool (`image_pooling_2d`, `Molmo2VisionAttention` with `hidden_size = C * L`): the
    query is the mean of the window's valid patches, keys / values its patches (padding masked),
    `q/k/v_proj` with bias, softmax over the window, `o_proj` to the adapter width.
  * projector (`image_projector`): `down_proj(silu(gate_proj(x)) * up_proj(x))`, no biases.

`forward(x, grid)` builds the pooling sets of one `(h, w)` grid itself (one crop per batch row);
`pool_indexed(features, index)` takes the processor's `image_token_pooling` over the flattened
patches of all crops (Molmo2's multi-crop layout: low-res image first, then the overlapping
crops), as the reference. Token budget per grid: `ceil(h / p_h) * ceil(w / p_w)` (Molmo2-8B:
378 px, patch 14 -> 27 x 27 -> 14 x 14 = 196 per crop with 2 x 2 windows).
From a whole checkpoint directory: `converters.hf_connectors.load_molmo2_connector`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..specs.options import at_least
from .config import KindOptions, ProjectorConfig, grid_field
from .kind import ProjectorKind
from .pixel_shuffle import _exact_keys, _load
from .registry import register_projector

if TYPE_CHECKING:
    from .base import Projector


@dataclass(frozen=True)
class MolmoPoolOptions(KindOptions):
    """`molmo_pool`.

    Attributes:
        pool_size: The window `(p_h, p_w)` pooled into one token (Molmo2's processor
            `pooling_size`, `[2, 2]`; an int means square).
        num_heads: Query heads of the pooling attention.
        num_kv_heads: Key / value heads (`None`: `num_heads`; fewer: grouped-query).
        head_dim: Width of one head.
        attn_dim: Output width of the pooling attention's `o_proj` (the adapter's `hidden_size`;
            default `head_dim * num_heads`).
        mlp_dim: Hidden width of the SwiGLU projector (`intermediate_size`; default `out_dim`).
        attention_bias: Biases on the pooling attention's projections (Molmo2: yes).
    """

    pool_size: tuple[int, int] = grid_field((2, 2))
    num_heads: int = at_least(1, 1)
    num_kv_heads: int | None = at_least(1, None)
    head_dim: int = at_least(1, 64)
    attn_dim: int | None = at_least(1, None)
    mlp_dim: int | None = at_least(1, None)
    attention_bias: bool = True


def pooling_index(
    grid: tuple[int, int], pool_size: tuple[int, int], device: torch.device | None = None
) -> torch.Tensor:
    """Molmo2's pooling sets of one `(h, w)` patch grid: `(ceil(h/p_h) * ceil(w/p_w), p_h * p_w)`
    row-major patch indices, `-1` for the centred padding (`arange_for_pooling`)."""
    (h, w), (ph, pw) = grid, pool_size
    pad_h, pad_w = -h % ph, -w % pw
    index = torch.arange(h * w, device=device).reshape(h, w)
    index = F.pad(index, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2), value=-1)
    rows, cols = index.shape[0] // ph, index.shape[1] // pw
    return index.reshape(rows, ph, cols, pw).permute(0, 2, 1, 3).reshape(rows * cols, ph * pw)


@register_projector("molmo_pool")
class MolmoPoolProjector(ProjectorKind):
    """Attention pooling of `p_h x p_w` windows (mean query), then a SwiGLU MLP (Molmo2)."""

    options_class = MolmoPoolOptions
    needs_grid = True
    reference = "Molmo2 vision adapter (attention pooling)"
    tokens = "ceil(h/p_h) * ceil(w/p_w)"

    @classmethod
    def validate(cls, config: ProjectorConfig) -> None:
        o: MolmoPoolOptions = config.options
        if o.num_kv_heads is not None and o.num_heads % o.num_kv_heads:
            raise ValueError(f"molmo_pool: num_heads={o.num_heads} is not a multiple of num_kv_heads={o.num_kv_heads}")

    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__()
        o: MolmoPoolOptions = config.options
        self.pool_size = o.pool_size
        self.num_heads, self.num_kv_heads, self.head_dim = o.num_heads, o.num_kv_heads or o.num_heads, o.head_dim
        width, inner = config.fused_dim, o.num_heads * o.head_dim
        kv = self.num_kv_heads * o.head_dim
        attn_dim, mlp_dim = o.attn_dim or inner, o.mlp_dim or config.out_dim
        self.q_proj = nn.Linear(width, inner, bias=o.attention_bias)
        self.k_proj = nn.Linear(width, kv, bias=o.attention_bias)
        self.v_proj = nn.Linear(width, kv, bias=o.attention_bias)
        self.o_proj = nn.Linear(inner, attn_dim, bias=o.attention_bias)
        self.gate_proj = nn.Linear(attn_dim, mlp_dim, bias=config.bias)
        self.up_proj = nn.Linear(attn_dim, mlp_dim, bias=config.bias)
        self.down_proj = nn.Linear(mlp_dim, config.out_dim, bias=False)

    def num_output_tokens(self, num_tokens: int, grid: tuple[int, int] | None) -> int:
        assert grid is not None
        return math.ceil(grid[0] / self.pool_size[0]) * math.ceil(grid[1] / self.pool_size[1])

    def _pool(self, windows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Windows `(M, k, C)` with their valid slots `(M, k)` (each row has one) to `(M, out_dim)`."""
        M, k, _ = windows.shape
        weights = valid.to(windows.dtype)[..., None]  # (M, k, 1)
        query = (windows * weights).sum(1) / weights.sum(1)  # (M, C): the mean of the valid patches
        q = self.q_proj(query).view(M, self.num_heads, 1, self.head_dim)  # (M, H, 1, d)
        keys = self.k_proj(windows).view(M, k, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (M, Hkv, k, d)
        values = self.v_proj(windows).view(M, k, self.num_kv_heads, self.head_dim).transpose(1, 2)
        repeat = self.num_heads // self.num_kv_heads
        keys, values = keys.repeat_interleave(repeat, 1), values.repeat_interleave(repeat, 1)  # (M, H, k, d)
        pooled = F.scaled_dot_product_attention(q, keys, values, attn_mask=valid[:, None, None, :])  # (M, H, 1, d)
        x = self.o_proj(pooled.reshape(M, self.num_heads * self.head_dim))  # (M, attn_dim)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (M, out_dim)

    def pool_indexed(self, features: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The adapter on the processor's pooling sets, as the reference.

        Args:
            features: Fused patch tokens of every crop, `(crops, N, C)` or flat `(P, C)`.
            index: `image_token_pooling` `(T, k)`: indices into the flattened patches, `-1` padding.

        Returns:
            `(T', out_dim)`: one token per row of `index` that has a valid slot (the reference
            drops the others), in `index`'s order.
        """
        flat = features.reshape(-1, features.shape[-1])  # (P, C)
        valid = index >= 0
        keep = valid.any(-1)
        index, valid = index[keep], valid[keep]
        return self._pool(flat[index.clamp(min=0)], valid)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
        assert grid is not None
        B, N, C = x.shape
        index = pooling_index(grid, self.pool_size, x.device)  # (T, k)
        valid = (index >= 0).expand(B, -1, -1)  # (B, T, k)
        windows = x[:, index.clamp(min=0)]  # (B, T, k, C)
        T, k = index.shape
        return self._pool(windows.reshape(B * T, k, C), valid.reshape(B * T, k)).view(B, T, -1)  # (B, T, out_dim)


# ------------------------------------------------------------ reference weights
# A saved checkpoint holds the adapter under the released names (transformers writes them back on
# save: `vision_backbone.image_pooling_2d.wq`, `image_projector.w1` = gate, `w2` = down, `w3` = up);
# in memory transformers names it `multi_modal_projector.image_pooling_2d.q_proj`, ...
ADAPTER_PREFIXES = (
    "model.vision_backbone.", "vision_backbone.", "model.multi_modal_projector.", "multi_modal_projector."
)
_RELEASED = {f"image_pooling_2d.w{n}": f"image_pooling_2d.{n}_proj" for n in "qkvo"} | {
    "image_projector.w1": "image_projector.gate_proj", "image_projector.w2": "image_projector.down_proj",
    "image_projector.w3": "image_projector.up_proj",
}
_NAMES = {f"image_pooling_2d.{n}_proj": f"body.{n}_proj" for n in "qkvo"} | {
    f"image_projector.{n}_proj": f"body.{n}_proj" for n in ("gate", "up", "down")
}


def _renamed(key: str) -> str:
    """A released adapter name as transformers' (`image_projector.w1.weight` -> `...gate_proj.weight`)."""
    module, _, param = key.rpartition(".")
    return f"{_RELEASED[module]}.{param}" if module in _RELEASED else key


def load_molmo2_adapter(
    state_dict: Mapping[str, torch.Tensor],
    *,
    num_layers: int,
    num_heads: int,
    pool_size: tuple[int, int] | int = (2, 2),
) -> Projector:
    """A `molmo_pool` `Projector` from transformers' `Molmo2Adapter` weights
    (`model.multi_modal_projector.state_dict()`: `image_pooling_2d.{q,k,v,o}_proj`,
    `image_projector.{gate,up,down}_proj`) or the released names a saved checkpoint holds under
    `model.vision_backbone.` (`image_pooling_2d.w{q,k,v,o}`, `image_projector.w1/w3/w2`);
    `num_kv_heads`, `head_dim` and the widths are read from the shapes.

    Args:
        state_dict: The adapter's own keys (no prefix).
        num_layers: `len(vision_feature_layer)`: the input streams concatenated.
        num_heads: The adapter config's `num_attention_heads`.
        pool_size: The processor's `pooling_size` `(p_h, p_w)`.

    Returns:
        The projector; on the tower's layers `vision_feature_layer` (in that order),
        `proj.body.pool_indexed(...)` equals the reference's `get_image_features` tokens, and
        `proj(layers, grid)` does for one crop of grid `(h, w)`.

    Raises:
        WeightsError: Other keys, or shapes that do not fit `num_layers` / `num_heads`.
    """
    from ..weights import WeightsError
    from .base import build_projector

    source = "Molmo2 adapter"
    state_dict = {_renamed(k): v for k, v in state_dict.items()}
    attn_bias = "image_pooling_2d.q_proj.bias" in state_dict
    mlp_bias = "image_projector.gate_proj.bias" in state_dict
    expected = {f"{k}.weight" for k in _NAMES}
    expected |= {f"image_pooling_2d.{n}_proj.bias" for n in "qkvo"} if attn_bias else set()
    expected |= {f"image_projector.{n}_proj.bias" for n in ("gate", "up")} if mlp_bias else set()
    state = _exact_keys(state_dict, expected, source)
    q, k = state["image_pooling_2d.q_proj.weight"], state["image_pooling_2d.k_proj.weight"]
    o = state["image_pooling_2d.o_proj.weight"]
    gate, down = state["image_projector.gate_proj.weight"], state["image_projector.down_proj.weight"]
    if q.shape[0] % num_heads or q.shape[1] % num_layers:
        raise WeightsError(
            f"{source}: q_proj {tuple(q.shape)} does not fit num_heads={num_heads}, num_layers={num_layers}"
        )
    head_dim = q.shape[0] // num_heads
    projector = build_projector(
        "molmo_pool", (int(q.shape[1]) // num_layers,) * num_layers, int(down.shape[0]), bias=mlp_bias,
        pool_size=pool_size, num_heads=num_heads, num_kv_heads=int(k.shape[0]) // head_dim, head_dim=head_dim,
        attn_dim=int(o.shape[0]), mlp_dim=int(gate.shape[0]), attention_bias=attn_bias,
    )
    renamed = {f"{_NAMES[key.rsplit('.', 1)[0]]}.{key.rsplit('.', 1)[1]}": v for key, v in state.items()}
    return _load(projector, renamed, source)
