"""`deepseek_aligner`: DeepSeek-V4's vision aligner: zero-pad the patch grid on the bottom / right to
a multiple of `s`, merge each `s x s` block (`s = 3`) into one token, then Linear, GELU, Linear.

The reference (timm `deepseek_vit.DeepseekVitAligner`, after DeepSeek's `inference/vision.py`,
which merges with `F.unfold`) orders a merged token channel-major: channel `c * s^2 + i * s + j`
holds channel `c` of the patch at row offset `i`, column offset `j` (`pixel_unshuffle`'s order,
`pixel_shuffle`'s `channel_major`). There is no norm: the tower already ends in an RMSNorm. The
merged tokens come out row-major over the `(ceil(h/s), ceil(w/s))` grid, the tokens the
reference hands its language model; the image start / end / row-separator embeddings that the
language model places around them are the language model's (`image_*` keys), not the aligner's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..specs.options import at_least
from .config import KindOptions, ProjectorConfig
from .kind import ProjectorKind, build_mlp
from .pixel_shuffle import _exact_keys, _load, _merged_width, space_to_depth
from .registry import register_projector

if TYPE_CHECKING:
    from .base import Projector


@dataclass(frozen=True)
class DeepseekAlignerOptions(KindOptions):
    """`deepseek_aligner`.

    Attributes:
        scale_factor: Side `s` of the merged patch blocks (DeepSeek `vision_downsample_ratio`, 3).
        hidden_dim: Hidden width of the MLP (default `out_dim`, as DeepSeek's `w1`).
    """

    scale_factor: int = at_least(1, 3)
    hidden_dim: int | None = at_least(1, None)


@register_projector("deepseek_aligner")
class DeepseekAlignerProjector(ProjectorKind):
    """Zero-pad to whole `s x s` blocks, merge them (`channel_major`), Linear, GELU, Linear."""

    options_class = DeepseekAlignerOptions
    needs_grid = True
    reference = "DeepSeek-V4 vision aligner"
    tokens = "ceil(h/s) * ceil(w/s)"

    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__()
        options: DeepseekAlignerOptions = config.options
        self.scale_factor = options.scale_factor
        merged = config.fused_dim * options.scale_factor**2
        self.mlp = build_mlp(merged, config.hidden_width, config.out_dim, 2, config.bias)

    def num_output_tokens(self, num_tokens: int, grid: tuple[int, int] | None) -> int:
        assert grid is not None
        return math.ceil(grid[0] / self.scale_factor) * math.ceil(grid[1] / self.scale_factor)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
        assert grid is not None
        s, (h, w) = self.scale_factor, grid
        B, _, C = x.shape
        padded = F.pad(x.reshape(B, h, w, C), (0, 0, 0, -w % s, 0, -h % s))  # (B, h', w', C), zeros bottom / right
        grid = (padded.shape[1], padded.shape[2])
        merged = space_to_depth(padded.reshape(B, -1, C), grid, s, "channel_major")  # (B, h'w'/s^2, C*s*s)
        return self.mlp(merged)  # (B, ceil(h/s)*ceil(w/s), out_dim)


def load_deepseek_v4_aligner(state_dict: Mapping[str, torch.Tensor], scale_factor: int = 3) -> Projector:
    """A `deepseek_aligner` `Projector` from DeepSeek-V4's aligner weights (`w1`, `w2`, each with
    a bias); `converters.hf_deepseek_v4.load_aligner` reads them from a whole checkpoint directory.

    Args:
        state_dict: The aligner's own keys, or the checkpoint's under `aligner.`.
        scale_factor: `s`, the config's `vision_downsample_ratio`.

    Returns:
        The projector; `proj(encoder(pixels).patches(-1), grid)` equals the reference aligner's
        output on the tower's tokens: `(B, ceil(h/s) * ceil(w/s), d_llm)`, row-major.

    Raises:
        WeightsError: Other keys, or widths that do not fit `scale_factor`.
    """
    from .base import build_projector

    name = "DeepSeek-V4 aligner"
    state = {k[len("aligner.") :] if k.startswith("aligner.") else k: v for k, v in state_dict.items()}
    state = _exact_keys(state, {f"w{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}, name)
    first, last = state["w1.weight"], state["w2.weight"]
    in_dim = _merged_width(first.shape[1], scale_factor, name)
    projector = build_projector(
        "deepseek_aligner", in_dim, int(last.shape[0]), scale_factor=scale_factor, hidden_dim=int(first.shape[0])
    )
    names = {"w1": "body.mlp.0", "w2": "body.mlp.2"}
    return _load(projector, {f"{names[k.split('.')[0]]}.{k.split('.')[1]}": v for k, v in state.items()}, name)
