"""`TextConfig`: the validated, frozen description of the CLIP-style text transformer, and
its named presets (`tiny`, `small`, `base`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ..specs.options import ConfigMixin, at_least, check_fields

TextActivation = Literal["gelu", "quick_gelu", "gelu_tanh"]

# open_clip's bundled BPE: 49,152 merges-built tokens + <start_of_text> + <end_of_text>.
CLIP_VOCAB_SIZE = 49408
CLIP_SOT_TOKEN_ID = 49406
CLIP_EOT_TOKEN_ID = 49407


@dataclass(frozen=True)
class TextConfig(ConfigMixin):
    """Configuration of a `TextEncoder` (CLIP's text tower: causal transformer, pooled at the
    end-of-text token).

    Attributes:
        vocab_size: Rows of the token embedding; must hold every id the tokenizer emits.
        context_length: Tokens per caption `L` (start and end tokens included).
        width: Token width `D`.
        depth: Number of transformer blocks.
        num_heads: Attention heads; must divide `width`.
        mlp_dim: Hidden width of each block's MLP (default `4 * width`).
        act: MLP activation (`gelu`, `quick_gelu` as OpenAI CLIP, `gelu_tanh`).
        norm_eps: Epsilon of every LayerNorm.
        eot_token_id: Id of the end-of-text token, where the caption is pooled.
        sot_token_id: Id of the start-of-text token (first position).
        pad_token_id: Id written after the end token.
        tokenizer: A local directory holding a Hugging Face tokenizer (`AutoTokenizer` files
            beside a `config.json`) whose ids these are, e.g. MetaCLIP 2's XLM-R tokenizer;
            `None`: open_clip's BPE (`ClipTokenizer`).
    """

    vocab_size: int = at_least(1, CLIP_VOCAB_SIZE)
    context_length: int = at_least(2, 77)  # start token + end token
    width: int = at_least(1, 512)
    depth: int = at_least(1, 12)
    num_heads: int = at_least(1, 8)
    mlp_dim: int | None = at_least(1, None)
    act: TextActivation = "gelu"
    norm_eps: float = 1e-5
    eot_token_id: int = CLIP_EOT_TOKEN_ID
    sot_token_id: int = CLIP_SOT_TOKEN_ID
    pad_token_id: int = 0
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        check_fields(self)
        if self.mlp_dim is None:
            object.__setattr__(self, "mlp_dim", 4 * self.width)
        if self.width % self.num_heads:
            raise ValueError(f"width={self.width} must be divisible by num_heads={self.num_heads}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")
        for name in ("eot_token_id", "sot_token_id", "pad_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ValueError(f"{name}={value} is outside the vocabulary [0, {self.vocab_size})")
        if self.eot_token_id in (self.sot_token_id, self.pad_token_id):
            raise ValueError("eot_token_id must differ from sot_token_id and pad_token_id (pooling finds it by id)")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


# (width, depth, heads): `base` is CLIP ViT-B's text tower.
TEXT_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(width=256, depth=4, num_heads=4),
    "small": dict(width=384, depth=8, num_heads=6),
    "base": dict(width=512, depth=12, num_heads=8),
}


def text_preset_config(name: str, **overrides: Any) -> TextConfig:
    """The `TextConfig` of a preset (`tiny`, `small`, `base`) with `overrides` applied.

    Raises:
        ValueError: Unknown preset name or invalid overrides.
    """
    if name not in TEXT_PRESETS:
        raise ValueError(f"unknown text preset {name!r}; allowed: {', '.join(TEXT_PRESETS)}")
    return TextConfig(**{**TEXT_PRESETS[name], **overrides})
