"""`ContrastiveConfig`: both tower configs and the contrastive head, as one `config.json`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ..config import VisionConfig
from ..specs.options import ConfigMixin, at_least, check_fields
from ..text.config import TextConfig
from ..text.hf_text import HFTextConfig

Objective = Literal["clip", "siglip"]

# Starting temperature and bias of each objective (CLIP paper; SigLIP paper: t' = ln 10, b = -10).
DEFAULT_INIT: dict[str, tuple[float, float | None]] = {
    "clip": (math.log(1 / 0.07), None),
    "siglip": (math.log(10.0), -10.0),
}
MAX_LOGIT_SCALE = math.log(100.0)

# How each text-tower config is tagged in config.json.
TEXT_TOWERS: dict[str, type] = {"clip": TextConfig, "hf": HFTextConfig}


@dataclass(frozen=True)
class ContrastiveConfig(ConfigMixin):
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
    embed_dim: int = at_least(1, 512)
    objective: Objective = "clip"
    init_logit_scale: float | None = None
    init_logit_bias: float | None = None
    max_logit_scale: float = MAX_LOGIT_SCALE

    def __post_init__(self) -> None:
        check_fields(self)
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
        """Plain types; `text` carries its `tower` tag."""
        data = super().to_dict()
        data["text"] = {"tower": self.text_tower, **data["text"]}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ContrastiveConfig":
        """Build from a mapping (e.g. `config.json`): `text` is chosen by its `tower` tag.

        Raises:
            ValueError: An unknown or missing key or tower, or a value that does not fit.
        """
        text = data.get("text") if isinstance(data, Mapping) else None
        if isinstance(text, Mapping):
            text = dict(text)
            tower = text.pop("tower", None)
            if tower not in TEXT_TOWERS:
                raise ValueError(f"text.tower={tower!r} is not supported; allowed: {', '.join(TEXT_TOWERS)}")
            data = {**data, "text": TEXT_TOWERS[tower].from_dict(text)}
        return super().from_dict(data)
