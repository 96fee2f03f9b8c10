"""`ClipTokenizer`: open_clip's bundled BPE (offline) with truncation that keeps the end token."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import CLIP_EOT_TOKEN_ID, CLIP_SOT_TOKEN_ID, CLIP_VOCAB_SIZE
from .output import TokenizedText


class ClipTokenizer:
    """Captions to `(B, L)` ids: `<start_of_text>`, BPE tokens, `<end_of_text>`, zero padding.

    Wraps `open_clip.tokenizer.SimpleTokenizer` (lower-cased, ftfy-cleaned BPE; the vocabulary
    ships with open_clip, so no network). Differences from open_clip's `tokenize`:
    special-token strings written inside a caption (e.g. the text "<end_of_text>") are dropped,
    so every row has exactly one end token and pooling finds it; and truncation keeps the
    first `L - 2` BPE tokens then the end token (open_clip overwrites the last kept token,
    which gives the same ids).

    Args:
        context_length: Ids per caption `L` (>= 2).
    """

    vocab_size = CLIP_VOCAB_SIZE
    sot_token_id = CLIP_SOT_TOKEN_ID
    eot_token_id = CLIP_EOT_TOKEN_ID
    pad_token_id = 0

    def __init__(self, context_length: int = 77) -> None:
        from open_clip.tokenizer import SimpleTokenizer

        if not isinstance(context_length, int) or context_length < 2:
            raise ValueError(f"context_length must be an int >= 2 (start + end token), got {context_length!r}")
        self.context_length = context_length
        self._bpe = SimpleTokenizer(context_length=context_length)
        if (self._bpe.sot_token_id, self._bpe.eot_token_id) != (self.sot_token_id, self.eot_token_id):
            raise RuntimeError("open_clip's bundled vocabulary changed its special-token ids")
        self._special = set(self._bpe.all_special_ids)

    def encode(self, text: str) -> list[int]:
        """BPE ids of one caption, without start/end tokens and without truncation."""
        if not isinstance(text, str):
            raise TypeError(f"captions must be str, got {type(text).__name__}")
        return [i for i in self._bpe.encode(text) if i not in self._special]

    def __call__(self, texts: str | Sequence[str]) -> TokenizedText:
        """Tokenize captions.

        Args:
            texts: One caption or a sequence of captions (any Unicode; empty is allowed).

        Returns:
            `TokenizedText` with `input_ids` and `attention_mask` of shape `(B, L)`.

        Raises:
            TypeError: `texts` is not a str or a sequence of str.
        """
        if isinstance(texts, str):
            texts = [texts]
        elif not isinstance(texts, Sequence) or isinstance(texts, (bytes, bytearray)):
            raise TypeError(f"texts must be a str or a sequence of str, got {type(texts).__name__}")
        L = self.context_length
        ids = torch.full((len(texts), L), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(texts), L), dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = [self.sot_token_id, *self.encode(text)[: L - 2], self.eot_token_id]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        return TokenizedText(input_ids=ids, attention_mask=mask)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of one row of ids: what lies between the start and the first end token
        (padding id 0 is also the BPE token "!", so it is cut by position, not by id)."""
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if self.eot_token_id in values:
            values = values[: values.index(self.eot_token_id)]
        kept = [i for i in values if i not in self._special]
        return self._bpe.decode(kept).strip()
