"""`ProjectorConfig`: the one validated, frozen description of a projector.

A projector maps one or more streams of vision tokens (several layers of one encoder, or
the patch grids of several encoders) to an LLM's width. The streams are first fused
(`fusion`), then the projector kind (`kind`) maps the fused tokens `(B, N, C)` to
`(B, M, out_dim)`. The fields every kind reads are `ProjectorConfig`'s; a kind's own options
are one dataclass per kind (`KindOptions`, subclassed beside each kind: `PoolOptions`,
`ResamplerOptions`, ...), so a field name means one thing.

In `config.json` the kind's options are the mapping `options`. The flat layout written before
they were split out (every kind's fields at the top level) is read too (`from_dict`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ..specs.options import ConfigMixin, at_least, check_fields
from ..validation import repeat_number
from .registry import projector_class

FusionKind = Literal["concat", "weighted_sum"]


def grid_field(default: Any = dataclasses.MISSING) -> Any:
    """A dataclass field holding a grid `(h, w)`, each side `>= 1`; an int `n` means `(n, n)`."""
    return dataclasses.field(default=default, metadata={"min": 1, "square": True})


def check_config(config: Any) -> None:
    """`check_fields`, after an int given for a `grid_field` has become its square grid."""
    for f in dataclasses.fields(config):
        if f.metadata.get("square"):
            object.__setattr__(config, f.name, repeat_number(getattr(config, f.name), 2))
    check_fields(config)


@dataclass(frozen=True)
class KindOptions(ConfigMixin):
    """The options of one projector kind: the base of each kind's options dataclass, and the
    options of the kinds that have none (`linear`, `identity`)."""

    def __post_init__(self) -> None:
        check_config(self)


# The kinds' options, as flat `ProjectorConfig` fields in configs saved before the split.
_FLAT_OPTIONS = (
    "hidden_dim", "scale_factor", "norm", "target_grid", "num_queries", "num_heads", "depth",
    "pos_embed_grid", "order", "num_linear",
)
_ALWAYS_SAVED_FLAT = _FLAT_OPTIONS[:7]  # the others came later


@dataclass(frozen=True)
class ProjectorConfig(ConfigMixin):
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
            (bilinear, antialiased when shrinking; an int means square). `None` means the
            grid of the first stream; streams already on that grid are left untouched.
        bias: Bias on the projector's linear layers (LLaVA's `multimodal_projector_bias`).
        options: The kind's own options, an instance of its `options_class` (e.g.
            `PoolOptions`) or a mapping of its fields; `None`: its defaults.
    """

    kind: str
    in_dim: int | tuple[int, ...] = at_least(1)
    out_dim: int = at_least(1)
    fusion: FusionKind = "concat"
    fusion_grid: tuple[int, int] | None = grid_field(None)
    bias: bool = True
    options: KindOptions | None = None

    def __post_init__(self) -> None:
        kind_class = projector_class(self.kind)
        options_class = kind_class.options_class
        if self.options is None or isinstance(self.options, Mapping):
            object.__setattr__(self, "options", options_class.from_dict(self.options or {}))
        elif type(self.options) is not options_class:
            raise ValueError(
                f"kind {self.kind!r} takes {options_class.__name__} options, got {type(self.options).__name__}"
            )
        check_config(self)
        if not self.in_dims:
            raise ValueError("in_dim must be an int or a non-empty sequence of ints (one per input stream)")
        if self.fusion == "weighted_sum" and len(set(self.in_dims)) > 1:
            raise ValueError(
                f"fusion='weighted_sum' needs every input stream to have the same width, got in_dim={self.in_dims}; "
                "use fusion='concat' for streams of different widths"
            )
        kind_class.validate(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProjectorConfig:
        """Build from a mapping (a `config.json`); unknown keys are an error, `model_type` is
        skipped. The flat layout saved before the kinds' options were split out is read as
        well: the kind's own fields become `options`, the other kinds' (unused) ones are dropped."""
        if isinstance(data, Mapping) and "options" not in data and set(_ALWAYS_SAVED_FLAT) <= set(data):
            own = {f.name for f in dataclasses.fields(projector_class(data.get("kind")).options_class)}
            options = {k: v for k, v in data.items() if k in own}
            data = {**{k: v for k, v in data.items() if k not in _FLAT_OPTIONS}, "options": options}
        return super().from_dict(data)

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
    def hidden_width(self) -> int:
        """The kind's `hidden_dim` option, or `out_dim` when it is unset (as LLaVA's
        `mlp2x_gelu`) or the kind has none."""
        return getattr(self.options, "hidden_dim", None) or self.out_dim
