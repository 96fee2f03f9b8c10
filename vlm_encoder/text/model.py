"""`TextEncoder`: CLIP's text tower. Token + learned position embedding `(B, L, D)`, pre-norm
transformer blocks under a causal mask, final LayerNorm, pooled at the end-of-text token.

Because attention is causal, padding after the end token never reaches the pooled feature;
the pooled position is found by the end token's id (the first one), not by open_clip's `argmax`
over ids, which assumes the end token has the largest id. The ids are the tokenizer's: it keeps
them inside the vocabulary and always writes the end token, so the forward pass trusts them
(checking them would cost a device-to-host synchronisation per batch).
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn

from ..layers import Block, init_linears_and_norms
from ..pretrained import PretrainedMixin
from .config import TextConfig
from .hf_text import HFTokenizer
from .output import TextOutput
from .tokenizer import ClipTokenizer


class TextEncoder(PretrainedMixin, nn.Module):
    """Causal transformer over BPE ids, pooled at the end-of-text token.

    Args:
        config: The architecture.

    Example:
        >>> enc = TextEncoder(text_preset_config("tiny"))
        >>> batch = ClipTokenizer(enc.config.context_length)(["a photo of a cat"])
        >>> enc(batch.input_ids).pooled.shape  # (1, 256)
    """

    config_class = TextConfig
    model_type = "vlm_encoder.text"

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = c = config
        self.token_embed = nn.Embedding(c.vocab_size, c.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, c.context_length, c.width))
        self.blocks = nn.ModuleList(
            Block(c.width, c.num_heads, c.mlp_dim, act=c.act, norm_eps=c.norm_eps) for _ in range(c.depth)
        )
        self.norm = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.grad_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """open_clip's text init: embeddings N(0, 0.02) / N(0, 0.01), linears truncated N(0, 0.02)."""
        init_linears_and_norms(self, std=0.02)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    @property
    def width(self) -> int:
        return self.config.width

    def tokenizer(self) -> ClipTokenizer | HFTokenizer:
        """open_clip's BPE tokenizer at this model's context length, or the Hugging Face
        tokenizer of `config.tokenizer` (padded to the context length, truncated with its end
        token kept).

        Raises:
            ValueError: The config's vocabulary or special ids are not the BPE's (or not the HF
                tokenizer's end and padding ids).
        """
        c = self.config
        if c.tokenizer is not None:
            hf = HFTokenizer(c.tokenizer, c.context_length)
            ids = (hf.tokenizer.eos_token_id, hf.tokenizer.pad_token_id)
            if ids != (c.eot_token_id, c.pad_token_id) or len(hf.tokenizer) > c.vocab_size:
                raise ValueError(
                    f"the tokenizer in {c.tokenizer} (eos={ids[0]}, pad={ids[1]}, {len(hf.tokenizer)} ids) does not match "
                    f"this TextConfig (eot={c.eot_token_id}, pad={c.pad_token_id}, vocab_size={c.vocab_size})"
                )
            return hf
        if (c.vocab_size, c.sot_token_id, c.eot_token_id) != (
            ClipTokenizer.vocab_size, ClipTokenizer.sot_token_id, ClipTokenizer.eot_token_id
        ):
            raise ValueError(
                f"this TextConfig (vocab_size={c.vocab_size}, sot={c.sot_token_id}, eot={c.eot_token_id}) does not "
                f"match open_clip's BPE (vocab_size={ClipTokenizer.vocab_size}, sot={ClipTokenizer.sot_token_id}, "
                f"eot={ClipTokenizer.eot_token_id})"
            )
        return ClipTokenizer(c.context_length)

    def eot_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Index `(B,)` of the first end-of-text token of each row (0 for a row without one,
        which the tokenizer never writes)."""
        is_eot = input_ids == self.config.eot_token_id  # (B, L)
        return is_eot.int().argmax(dim=1)

    def _check_shape(self, input_ids: torch.Tensor) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a (B, L) tensor, got {shape}")
        if input_ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        L = input_ids.shape[1]
        if L > self.config.context_length:
            raise ValueError(
                f"input_ids has {L} tokens, more than context_length={self.config.context_length}; "
                "tokenize with this context length (truncation keeps the end token)"
            )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> TextOutput:
        """Encode token ids.

        Args:
            input_ids: `(B, L)` ids from `tokenizer()`, `L <= context_length`, each row holding
                an end token after position 0.
            attention_mask: Accepted for a common text-tower signature and unused: the causal
                mask already keeps padding (which follows the end token) out of the pooled
                feature.

        Returns:
            `TextOutput` with `tokens (B, L, D)` and `pooled (B, D)` at the end token.
        """
        self._check_shape(input_ids)
        B, L = input_ids.shape
        eot = self.eot_positions(input_ids)
        x = self.token_embed(input_ids) + self.pos_embed[:, :L]  # (B, L, D)
        for block in self.blocks:  # causal attention: the kernel's is_causal, no mask tensor
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x, _ = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False, causal=True)
            else:
                x, _ = block(x, causal=True)
        x = self.norm(x)
        pooled = x[torch.arange(B, device=x.device), eot]  # (B, D)
        return TextOutput(tokens=x, pooled=pooled)

    def extra_repr(self) -> str:
        c = self.config
        return f"context_length={c.context_length}, width={c.width}, depth={c.depth}, heads={c.num_heads}"
