"""`TextEncoder`: CLIP's text tower. Token + learned position embedding `(B, L, D)`, pre-norm
transformer blocks under a causal mask, final LayerNorm, pooled at the end-of-text token.

Because attention is causal, padding after the end token never reaches the pooled feature;
the pooled position is found by the end token's id and checked, never guessed (open_clip's
`argmax` over ids would read position 0 of a row without an end token).
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn

from ..layers import Block, init_linears_and_norms
from ..pretrained import PretrainedMixin
from .config import TextConfig
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
        if not isinstance(config, TextConfig):
            raise TypeError(f"config must be a TextConfig, got {type(config).__name__}")
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

    def tokenizer(self) -> ClipTokenizer:
        """open_clip's BPE tokenizer at this model's context length.

        Raises:
            ValueError: The config's vocabulary or special ids are not the BPE's.
        """
        c = self.config
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
        """Index `(B,)` of the first end-of-text token of each row.

        Raises:
            ValueError: A row without an end token, or with it at position 0 (pooling would
                read the first position or padding).
        """
        positions = self._eot_positions(input_ids)
        self._check_values(input_ids, positions)
        return positions

    def _eot_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_eot = input_ids == self.config.eot_token_id  # (B, L)
        return is_eot.int().argmax(dim=1)  # first occurrence; 0 when absent

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

    def _check_values(self, input_ids: torch.Tensor, eot: torch.Tensor) -> None:
        """Ids inside the vocabulary and an end token after position 0 in every row: one
        host-device synchronisation (none under `torch.compile`, which these data-dependent
        checks would split into several graphs)."""
        if torch.compiler.is_compiling() or not input_ids.numel():
            return
        V = self.config.vocab_size
        flags = torch.stack([((input_ids < 0) | (input_ids >= V)).any(), (eot == 0).any()]).tolist()
        if flags[0]:
            raise ValueError(
                f"input_ids hold ids outside the vocabulary [0, {V}): "
                f"min {int(input_ids.min())}, max {int(input_ids.max())}"
            )
        if flags[1]:
            rows = (eot == 0).nonzero().flatten()[:8].tolist()
            raise ValueError(
                f"rows {rows} of input_ids have no end-of-text token (id {self.config.eot_token_id}) after "
                "position 0; tokenize with ClipTokenizer, which always keeps the end token"
            )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> TextOutput:
        """Encode token ids.

        Args:
            input_ids: `(B, L)` ids with `L <= context_length`, each row holding an end token.
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
