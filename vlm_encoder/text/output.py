"""Typed outputs of the text side: tokenized captions and text-encoder features."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenizedText:
    """Captions as fixed-length ids.

    Attributes:
        input_ids: `(B, L)` long token ids, padded after the end token.
        attention_mask: `(B, L)` long, 1 on real tokens (start and end included), 0 on padding.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def to(self, device: str | torch.device) -> "TokenizedText":
        """The same ids on `device`."""
        return TokenizedText(self.input_ids.to(device), self.attention_mask.to(device))

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class TextOutput:
    """What one forward pass of a text tower returns.

    Attributes:
        tokens: `(B, L, D)` token features after the final LayerNorm.
        pooled: `(B, D)` caption features (end-of-text token, CLS or masked mean).
    """

    tokens: torch.Tensor
    pooled: torch.Tensor
