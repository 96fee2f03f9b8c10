"""`EncoderOutput`: what one forward pass of the encoder returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EncoderOutput:
    """Features of the requested layers.

    Layer `i` is the output of block `i` (0-based); requested negative indices are resolved
    against the encoder's depth (`-1` is the last block).

    Attributes:
        layers: The requested layers as non-negative block indices, in the order asked.
        patch_tokens: One `(B, N, D)` tensor per requested layer, patches in row-major order.
        cls_tokens: One `(B, D)` tensor per requested layer, or `None` without a CLS token.
        register_tokens: One `(B, R, D)` tensor per requested layer, or `None` without registers.
        grid_size: The patch grid `(h, w)`; `N = h * w`.
        pooled: `(B, D)` pooled output when the last block ran, else `None`.
        attentions: One `(B, heads, T, T)` attention-probability tensor per requested layer
            when asked for (`T` counts the prefix tokens first), else `None`.
        num_blocks: Depth of the encoder, to resolve negative indices in the helpers.
    """

    layers: tuple[int, ...]
    patch_tokens: tuple[torch.Tensor, ...]
    cls_tokens: tuple[torch.Tensor, ...] | None
    register_tokens: tuple[torch.Tensor, ...] | None
    grid_size: tuple[int, int]
    pooled: torch.Tensor | None
    attentions: tuple[torch.Tensor, ...] | None
    num_blocks: int

    def _position(self, layer: int) -> int:
        resolved = layer + self.num_blocks if layer < 0 else layer
        if resolved not in self.layers:
            raise ValueError(
                f"layer {layer} was not requested; this output holds layers {list(self.layers)} "
                f"(of {self.num_blocks} blocks)"
            )
        return self.layers.index(resolved)

    def patches(self, layer: int = -1) -> torch.Tensor:
        """Patch tokens `(B, N, D)` of `layer` (a block index, negatives from the end)."""
        return self.patch_tokens[self._position(layer)]

    def cls(self, layer: int = -1) -> torch.Tensor:
        """CLS token `(B, D)` of `layer`."""
        if self.cls_tokens is None:
            raise ValueError("this encoder has no CLS token (e.g. SigLIP); use `pooled` or `patches()`")
        return self.cls_tokens[self._position(layer)]

    def patch_grid(self, layer: int = -1) -> torch.Tensor:
        """Patch tokens of `layer` as a feature map `(B, D, h, w)`."""
        tokens = self.patches(layer)
        B, N, D = tokens.shape
        h, w = self.grid_size
        return tokens.transpose(1, 2).reshape(B, D, h, w)

    def concat_patches(self, layers: tuple[int, ...] | list[int] | None = None) -> torch.Tensor:
        """Patch tokens of several layers concatenated on the channel axis `(B, N, k*D)`.

        Args:
            layers: Which of the requested layers, in this order; default all of them in the
                order they were requested.
        """
        chosen = self.layers if layers is None else layers
        return torch.cat([self.patches(layer) for layer in chosen], dim=-1)

    def tokens(self, layer: int = -1) -> torch.Tensor:
        """All tokens of `layer` `(B, T, D)` in the encoder's order: CLS, registers, patches."""
        pos = self._position(layer)
        parts = []
        if self.cls_tokens is not None:
            parts.append(self.cls_tokens[pos].unsqueeze(1))
        if self.register_tokens is not None:
            parts.append(self.register_tokens[pos])
        parts.append(self.patch_tokens[pos])
        return torch.cat(parts, dim=1)
