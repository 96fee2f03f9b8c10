"""`EncoderOutput`: what one forward pass of the encoder returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree


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
        class_tokens: With several class tokens (RADIO: one per teacher), one `(B, C, D)` tensor
            per requested layer, all of them in order (`cls_tokens` is the first); else `None`.
        summary_tokens: One `(B, S, D)` tensor per requested layer, the class tokens the
            config's `summary_idxs` select (RADIO's summary is `.flatten(1)` of it), or `None`.
    """

    layers: tuple[int, ...]
    patch_tokens: tuple[torch.Tensor, ...]
    cls_tokens: tuple[torch.Tensor, ...] | None
    register_tokens: tuple[torch.Tensor, ...] | None
    grid_size: tuple[int, int]
    pooled: torch.Tensor | None
    attentions: tuple[torch.Tensor, ...] | None
    num_blocks: int
    class_tokens: tuple[torch.Tensor, ...] | None = None
    summary_tokens: tuple[torch.Tensor, ...] | None = None

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

    def summary(self, layer: int = -1) -> torch.Tensor:
        """Summary tokens `(B, S, D)` of `layer` (RADIO: the class tokens `summary_idxs` picks)."""
        if self.summary_tokens is None:
            raise ValueError("this encoder has no summary tokens (VisionConfig.summary_idxs is empty)")
        return self.summary_tokens[self._position(layer)]

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
        """All tokens of `layer` `(B, T, D)` in the encoder's order: CLS (or every class token),
        registers, patches."""
        pos = self._position(layer)
        parts = []
        if self.class_tokens is not None:
            parts.append(self.class_tokens[pos])
        elif self.cls_tokens is not None:
            parts.append(self.cls_tokens[pos].unsqueeze(1))
        if self.register_tokens is not None:
            parts.append(self.register_tokens[pos])
        parts.append(self.patch_tokens[pos])
        return torch.cat(parts, dim=1)


# Which fields hold tensors (pytree children) and which are static (the pytree context).
_TENSOR_FIELDS = (
    "patch_tokens", "cls_tokens", "register_tokens", "pooled", "attentions", "class_tokens", "summary_tokens"
)
_STATIC_FIELDS = ("layers", "grid_size", "num_blocks")


def _flatten(out: EncoderOutput) -> tuple[list, tuple]:
    return [getattr(out, f) for f in _TENSOR_FIELDS], tuple(getattr(out, f) for f in _STATIC_FIELDS)


def _flatten_with_keys(out: EncoderOutput) -> tuple[list, tuple]:
    children, context = _flatten(out)
    return [(pytree.GetAttrKey(f), c) for f, c in zip(_TENSOR_FIELDS, children)], context


def _unflatten(children, context: tuple) -> EncoderOutput:
    return EncoderOutput(**dict(zip(_TENSOR_FIELDS, children)), **dict(zip(_STATIC_FIELDS, context)))


def _dumpable(context: tuple) -> str:
    import json

    return json.dumps([list(context[0]), list(context[1]), context[2]])


def _from_dumpable(text: str) -> tuple:
    import json

    layers, grid, num_blocks = json.loads(text)
    return tuple(layers), tuple(grid), num_blocks


# A pytree node, so that `torch.export.export`, `torch.compile` and `torch.utils._pytree` see
# the tensors inside (the layer indices, grid and depth are static: a fixed layer set).
pytree.register_pytree_node(
    EncoderOutput,
    _flatten,
    _unflatten,
    serialized_type_name="vlm_encoder.output.EncoderOutput",
    flatten_with_keys_fn=_flatten_with_keys,
    to_dumpable_context=_dumpable,
    from_dumpable_context=_from_dumpable,
)
