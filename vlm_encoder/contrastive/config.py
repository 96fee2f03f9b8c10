"""`ContrastiveConfig`: both tower configs and the contrastive head, as one `config.json`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

from ..config import VisionConfig
from ..text.config import TextConfig
from ..text.hf_text import HFTextConfig

Objective = Literal["clip", "siglip"]
OBJECTIVES: tuple[str, ...] = get_args(Objective)

# Starting temperature and bias of each objective (CLIP paper; SigLIP paper: t' = ln 10, b = -10).
DEFAULT_INIT: dict[str, tuple[float, float | None]] = {
    "clip": (math.log(1 / 0.07), None),
    "siglip": (math.log(10.0), -10.0),
}
MAX_LOGIT_SCALE = math.log(100.0)

# How each text-tower config is tagged in config.json.
TEXT_TOWERS: dict[str, type] = {"clip": TextConfig, "hf": HFTextConfig}


@dataclass(frozen=True)
class ContrastiveConfig:
    """Configuration of a `ContrastiveModel`.

    Attributes:
        vision: The image tower.
        text: The text tower: a `TextConfig` (CLIP-style) or an `HFTextConfig`.
        embed_dim: Width `E` of the shared embedding space.
        objective: `clip` (softmax; no bias) or `siglip` (sigmoid; learned bias).
        init_logit_scale: Starting value of the learned log-scale (default ln(1/0.07) for
            CLIP, ln 10 for SigLIP).
        init_logit_bias: Starting value of a learned bias (default -10 for SigLIP; CLIP has
            none unless one is given).
        max_logit_scale: Upper clamp of the log-scale (ln 100: the scale never exceeds 100).
    """

    vision: VisionConfig
    text: TextConfig | HFTextConfig
    embed_dim: int = 512
    objective: Objective = "clip"
    init_logit_scale: float | None = None
    init_logit_bias: float | None = None
    max_logit_scale: float = MAX_LOGIT_SCALE

    def __post_init__(self) -> None:
        if not isinstance(self.vision, VisionConfig):
            raise TypeError(f"vision must be a VisionConfig, got {type(self.vision).__name__}")
        if not isinstance(self.text, (TextConfig, HFTextConfig)):
            raise TypeError(f"text must be a TextConfig or HFTextConfig, got {type(self.text).__name__}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r} is not supported; allowed: {', '.join(OBJECTIVES)}")
        if not isinstance(self.embed_dim, int) or isinstance(self.embed_dim, bool) or self.embed_dim <= 0:
            raise ValueError(f"embed_dim must be a positive int, got {self.embed_dim!r}")
        if self.vision.pool == "none":
            raise ValueError("the vision tower needs a pooled output (pool='cls', 'gap' or 'map'), got pool='none'")
        scale, bias = DEFAULT_INIT[self.objective]
        if self.init_logit_scale is None:
            object.__setattr__(self, "init_logit_scale", scale)
        if self.init_logit_bias is None and bias is not None:
            object.__setattr__(self, "init_logit_bias", bias)
        if self.init_logit_scale > self.max_logit_scale:
            raise ValueError(
                f"init_logit_scale={self.init_logit_scale} is above max_logit_scale={self.max_logit_scale}"
            )

    @property
    def text_tower(self) -> str:
        """`clip` or `hf`: which text tower `text` describes."""
        return "clip" if isinstance(self.text, TextConfig) else "hf"

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["vision"] = self.vision.to_dict()
        data["text"] = {"tower": self.text_tower, **self.text.to_dict()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ContrastiveConfig":
        """Build from a dict (e.g. `config.json`); unknown keys are an error, `model_type` is skipped."""
        data = {k: v for k, v in data.items() if k != "model_type"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ContrastiveConfig fields {sorted(unknown)}; known: {sorted(known)}")
        for required in ("vision", "text"):
            if required not in data:
                raise ValueError(f"ContrastiveConfig needs a {required!r} entry")
        text = dict(data["text"])
        tower = text.pop("tower", None)
        if tower not in TEXT_TOWERS:
            raise ValueError(f"text.tower={tower!r} is not supported; allowed: {', '.join(TEXT_TOWERS)}")
        data["vision"] = VisionConfig.from_dict(data["vision"])
        data["text"] = TEXT_TOWERS[tower].from_dict(text)
        return cls(**data)
