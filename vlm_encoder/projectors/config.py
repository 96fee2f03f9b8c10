"""`ProjectorConfig`: the one validated, frozen description of a projector.

A projector maps one or more streams of vision tokens (several layers of one encoder, or
the patch grids of several encoders) to an LLM's width. The streams are first fused
(`fusion`), then the projector kind (`kind`) maps the fused tokens `(B, N, C)` to
`(B, M, out_dim)`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

from ..validation import check_positive_int as _positive_int
from ..validation import optional_positive_pair as _optional_pair

FusionKind = Literal["concat", "weighted_sum"]
FUSION_KINDS: tuple[str, ...] = get_args(FusionKind)


@dataclass(frozen=True)
class ProjectorConfig:
    """Configuration of a `Projector`.

    Attributes:
        kind: Registered projector kind: `linear`, `mlp{N}x_gelu` (e.g. `mlp2x_gelu`),
            `identity`, `pixel_shuffle`, `pool`, `resampler`, `c_abstractor`
            (see `projectors.list_projectors()`).
        in_dim: Width of the input tokens; a tuple gives one width per input stream
            (several encoder layers, or several encoders), fused by `fusion`.
        out_dim: Width of the output tokens (the LLM's hidden size).
        fusion: How several input streams are fused: `concat` on the channel axis (the
            semantics of LLaVA's `vision_feature_layer` list) or a learned `weighted_sum`
            (softmax-normalised weights, initialised to the mean; needs equal widths).
        fusion_grid: Common patch grid `(h, w)` the streams are resampled to before fusing
            (bilinear, antialiased when shrinking). `None` means the grid of the first
            stream; streams already on that grid are left untouched.
        hidden_dim: Hidden width of the kind's MLP / conv stages (default `out_dim`, as
            LLaVA's `mlp2x_gelu`).
        bias: Bias on the projector's linear layers (LLaVA's `multimodal_projector_bias`).
        scale_factor: `pixel_shuffle`: side `s` of the `s x s` patch neighbourhoods merged
            into one token.
        norm: `pixel_shuffle`: LayerNorm on the merged tokens before the MLP (InternVL).
        target_grid: `pool` / `c_abstractor`: output grid `(h', w')` (an int means square).
        num_queries: `resampler`: number `M` of learned queries (output tokens).
        num_heads: `resampler`: attention heads; must divide `out_dim`.
        depth: `resampler`: cross-attention layers; `c_abstractor`: residual conv blocks
            before and after the pooling.
        pos_embed_grid: `c_abstractor`: a learned position embedding for an input grid
            `(h, w)` added to the tokens first (Honeybee's `pos_emb`); another input grid gets
            it resampled (bicubic). `None`: none.
    """

    kind: str
    in_dim: int | tuple[int, ...]
    out_dim: int
    fusion: FusionKind = "concat"
    fusion_grid: tuple[int, int] | None = None
    hidden_dim: int | None = None
    bias: bool = True
    scale_factor: int = 2
    norm: bool = True
    target_grid: tuple[int, int] | None = None
    num_queries: int = 64
    num_heads: int = 8
    depth: int = 2
    pos_embed_grid: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)
        if isinstance(self.in_dim, (list, tuple)):
            set_("in_dim", tuple(self.in_dim))
            if not self.in_dim:
                raise ValueError("in_dim must be an int or a non-empty sequence of ints (one per input stream)")
            for i, width in enumerate(self.in_dim):
                _positive_int(width, f"in_dim[{i}]")
        else:
            _positive_int(self.in_dim, "in_dim")
        _positive_int(self.out_dim, "out_dim")
        if self.hidden_dim is not None:
            _positive_int(self.hidden_dim, "hidden_dim")
        for name in ("scale_factor", "num_queries", "num_heads", "depth"):
            _positive_int(getattr(self, name), name)
        set_("fusion_grid", _optional_pair(self.fusion_grid, "fusion_grid"))
        set_("target_grid", _optional_pair(self.target_grid, "target_grid"))
        set_("pos_embed_grid", _optional_pair(self.pos_embed_grid, "pos_embed_grid"))
        if self.fusion not in FUSION_KINDS:
            raise ValueError(f"fusion={self.fusion!r} is not supported; allowed: {', '.join(FUSION_KINDS)}")
        if self.fusion == "weighted_sum" and len(set(self.in_dims)) > 1:
            raise ValueError(
                f"fusion='weighted_sum' needs every input stream to have the same width, got in_dim={self.in_dims}; "
                "use fusion='concat' for streams of different widths"
            )
        from .registry import projector_class  # late import: the registry imports the kinds

        projector_class(self.kind).validate(self)

    @property
    def in_dims(self) -> tuple[int, ...]:
        """The width of each input stream."""
        return self.in_dim if isinstance(self.in_dim, tuple) else (self.in_dim,)

    @property
    def num_inputs(self) -> int:
        """Number of input streams (layers or encoders) the projector fuses."""
        return len(self.in_dims)

    @property
    def fused_dim(self) -> int:
        """Width `C` of the tokens after fusion: the sum of the widths for `concat`."""
        return sum(self.in_dims) if self.fusion == "concat" else self.in_dims[0]

    @property
    def mlp_hidden_dim(self) -> int:
        return self.hidden_dim or self.out_dim

    def replace(self, **changes: Any) -> ProjectorConfig:
        """A copy with `changes` applied and validated again."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown ProjectorConfig fields: {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProjectorConfig:
        """Build from a dict (e.g. `config.json`); unknown keys are an error, `model_type` is skipped."""
        data = {k: v for k, v in data.items() if k != "model_type"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ProjectorConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)
