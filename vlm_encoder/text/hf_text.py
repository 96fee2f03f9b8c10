"""A Hugging Face text model from a local directory as the text tower (mean or CLS pooling).

The directory is what `AutoModel.save_pretrained` + `AutoTokenizer.save_pretrained` write;
it is read with `local_files_only=True`, so nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..specs.options import ConfigMixin, at_least, check_fields
from .output import TextOutput, TokenizedText

HF_TEXT_TOWER_NAME = "text_tower.json"  # pooling and context length beside the HF files

HFPooling = Literal["mean", "cls"]


@dataclass(frozen=True)
class HFTextConfig(ConfigMixin):
    """Configuration of an `HFTextEncoder`.

    Attributes:
        model_dir: Local directory holding the HF model (config + weights) and its tokenizer
            (a path is kept as its string).
        pooling: `mean` (over the attention mask) or `cls` (first token).
        context_length: Tokens per caption; longer captions are truncated by the HF tokenizer,
            which keeps its closing special token.
    """

    model_dir: str
    pooling: HFPooling = "mean"
    context_length: int = at_least(2, 77)

    def __post_init__(self) -> None:
        if isinstance(self.model_dir, os.PathLike):
            object.__setattr__(self, "model_dir", os.fspath(self.model_dir))
        check_fields(self)


def _check_dir(model_dir: str) -> Path:
    path = Path(model_dir).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir} is not a local Hugging Face model directory (no config.json); "
            "save one with model.save_pretrained(dir) and tokenizer.save_pretrained(dir)"
        )
    return path


class HFTokenizer:
    """The directory's HF tokenizer, returning the same `TokenizedText` as `ClipTokenizer`.

    Args:
        model_dir: Local directory with the tokenizer files.
        context_length: Ids per caption (padded to it, truncated with the end token kept).
    """

    def __init__(self, model_dir: str, context_length: int = 77) -> None:
        from transformers import AutoTokenizer

        self.context_length = context_length
        self._tokenizer = AutoTokenizer.from_pretrained(
            str(_check_dir(model_dir)), local_files_only=True, trust_remote_code=False
        )

    def __call__(self, texts: str | Sequence[str]) -> TokenizedText:
        """Tokenize captions to `(B, L)` ids and mask."""
        if isinstance(texts, str):
            texts = [texts]
        encoded = self._tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=self.context_length, return_tensors="pt"
        )
        return TokenizedText(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])

    @property
    def tokenizer(self) -> Any:
        """The wrapped `transformers` tokenizer."""
        return self._tokenizer


class HFTextEncoder(nn.Module):
    """A local Hugging Face encoder (BERT-like) as a text tower.

    Args:
        config: Where the model is and how to pool it.
        load_weights: Load the directory's weights (True), or only build the architecture
            from its config (when the weights come from elsewhere, e.g. a saved
            `ContrastiveModel`).
    """

    def __init__(self, config: HFTextConfig, load_weights: bool = True) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        self.config = config
        path = str(_check_dir(config.model_dir))
        if load_weights:
            self.model = AutoModel.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        else:
            self.model = AutoModel.from_config(
                AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False), trust_remote_code=False
            )

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)

    def tokenizer(self) -> HFTokenizer:
        """The matching tokenizer."""
        return HFTokenizer(self.config.model_dir, self.config.context_length)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn HF gradient checkpointing on or off."""
        if enable:
            self.model.gradient_checkpointing_enable()
        else:
            self.model.gradient_checkpointing_disable()

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write the tower as a Hugging Face directory (the model and its tokenizer, so
        `AutoModel` / `AutoTokenizer` read it) plus `text_tower.json` (pooling, context length),
        published by renames like every save of this package.

        Returns:
            The directory; `HFTextEncoder.from_pretrained(directory)` gives this tower back.
        """
        from transformers import AutoTokenizer

        from ..pretrained import move_into_place, staging_directory

        target = Path(save_directory)
        with staging_directory(target) as staging:
            self.model.save_pretrained(str(staging))
            tokenizer = AutoTokenizer.from_pretrained(
                str(_check_dir(self.config.model_dir)), local_files_only=True, trust_remote_code=False
            )
            tokenizer.save_pretrained(str(staging))
            settings = {"pooling": self.config.pooling, "context_length": self.config.context_length}
            (staging / HF_TEXT_TOWER_NAME).write_text(json.dumps(settings, indent=2))
            move_into_place(staging, target, sorted(p.name for p in staging.iterdir()))
        return target

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "HFTextEncoder":
        """Load a tower written by `save_pretrained` (in eval mode).

        Raises:
            FileNotFoundError: No `text_tower.json` or no HF model in the directory.
        """
        path = Path(directory)
        if not (path / HF_TEXT_TOWER_NAME).is_file():
            raise FileNotFoundError(f"{path} has no {HF_TEXT_TOWER_NAME} (expected HFTextEncoder.save_pretrained output)")
        settings = json.loads((path / HF_TEXT_TOWER_NAME).read_text())
        return cls(HFTextConfig.from_dict({**settings, "model_dir": str(path)})).eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> TextOutput:
        """Encode token ids.

        Args:
            input_ids: `(B, L)` ids from `tokenizer()`.
            attention_mask: `(B, L)`, 1 on real tokens; required for mean pooling.

        Returns:
            `TextOutput` with `tokens (B, L, D)` (last hidden state) and `pooled (B, D)`.
        """
        if self.config.pooling == "mean" and attention_mask is None:
            raise ValueError("mean pooling needs the attention_mask (padding must not be averaged in)")
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        tokens = out.last_hidden_state  # (B, L, D)
        if self.config.pooling == "cls":
            pooled = tokens[:, 0]
        else:
            weights = attention_mask.to(tokens.dtype).unsqueeze(-1)  # (B, L, 1)
            counts = weights.sum(dim=1)
            if bool((counts == 0).any()):
                raise ValueError("a row of attention_mask is all zeros: nothing to mean-pool")
            pooled = (tokens * weights).sum(dim=1) / counts
        return TextOutput(tokens=tokens, pooled=pooled)
