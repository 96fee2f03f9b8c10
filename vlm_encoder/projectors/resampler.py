"""`resampler`: `M` learned queries cross-attend to the vision tokens.

The Perceiver Resampler of Flamingo (Alayrac et al. 2022) and the one-layer resampler of
Qwen-VL (Bai et al. 2023), in the spirit of BLIP-2's Q-Former queries: the output has
`M = num_queries` tokens whatever `N` is, and any token set works (CLS included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..specs.options import at_least
from .config import KindOptions, ProjectorConfig
from .kind import ProjectorKind, build_mlp
from .registry import register_projector


class CrossAttentionLayer(nn.Module):
    """Pre-norm cross-attention of the queries to the tokens, then a GELU MLP, both residual."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = build_mlp(dim, 4 * dim, dim, 2)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """`queries (B, M, D)` attend to `memory (B, N, D)`; returns `(B, M, D)`."""
        q = self.norm_q(queries)
        queries = queries + self.attn(q, memory, memory, need_weights=False)[0]
        return queries + self.mlp(self.norm_mlp(queries))


@dataclass(frozen=True)
class ResamplerOptions(KindOptions):
    """`resampler`.

    Attributes:
        num_queries: Number `M` of learned queries (output tokens).
        num_heads: Attention heads; must divide `out_dim`.
        depth: Cross-attention layers.
    """

    num_queries: int = at_least(1, 64)
    num_heads: int = at_least(1, 8)
    depth: int = at_least(1, 2)


@register_projector("resampler")
class ResamplerProjector(ProjectorKind):
    """Learned queries `(M, out_dim)`; the tokens are projected to `out_dim` and normed (the
    keys/values), `depth` cross-attention layers update the queries, a final LayerNorm and
    Linear give the output."""

    options_class = ResamplerOptions
    reference = "Perceiver Resampler (Flamingo) / Qwen-VL resampler / Q-Former queries"
    tokens = "num_queries"

    @classmethod
    def validate(cls, config: ProjectorConfig) -> None:
        if config.out_dim % config.options.num_heads:
            raise ValueError(
                f"resampler: out_dim={config.out_dim} must be divisible by num_heads={config.options.num_heads}"
            )

    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__()
        options: ResamplerOptions = config.options
        dim = config.out_dim
        self.num_queries = options.num_queries
        self.queries = nn.Parameter(torch.empty(options.num_queries, dim))
        nn.init.trunc_normal_(self.queries, std=0.02)
        self.kv_proj = nn.Linear(config.fused_dim, dim, bias=False)
        self.norm_kv = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(CrossAttentionLayer(dim, options.num_heads) for _ in range(options.depth))
        self.norm_out = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim, bias=config.bias)

    def num_output_tokens(self, num_tokens: int, grid: tuple[int, int] | None) -> int:
        return self.num_queries

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
        memory = self.norm_kv(self.kv_proj(x))  # (B, N, D)
        queries = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, M, D)
        for layer in self.layers:
            queries = layer(queries, memory)
        return self.proj(self.norm_out(queries))  # (B, M, D)
