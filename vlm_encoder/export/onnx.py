"""An encoder as an ONNX graph for chosen layers (what `vlm-encoder export-onnx` writes).

The graph takes `pixel_values` `(B, C, H, W)` at one image size (the patch grid is fixed when
traced; the batch size is free) and returns, for each chosen layer `i`, `layer_i` `(B, T, D)`:
all of its tokens in the encoder's order (CLS, registers, patches; `norm=True` applies the
final LayerNorm), plus `pooled` `(B, D')` when the last block is among them and the model
pools (`image_embeds` with the projection, when it has one).

Uses torch's TorchScript-based exporter (`dynamo=False`), which needs `onnx` only; check the
file with `onnxruntime` (both in the `onnx` extra: `pip install vlm-encoder[onnx]`).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from ..encoder import LayerSpec, VisionEncoder

OPSET = 17


class LayersGraph(nn.Module):
    """`encoder` with a fixed layer set, returning plain tensors (what a graph can return)."""

    def __init__(self, encoder: VisionEncoder, layers: tuple[int, ...], norm: bool, pooled: bool) -> None:
        super().__init__()
        self.encoder, self.layers, self.norm, self.pooled = encoder, layers, norm, pooled

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.encoder(pixel_values, layers=self.layers, norm=self.norm)
        tokens = tuple(out.tokens(i) for i in self.layers)  # (B, T, D) each
        return (*tokens, self.encoder.project(out.pooled)) if self.pooled else tokens


def output_names(encoder: VisionEncoder, layers: LayerSpec) -> list[str]:
    """The graph's output names for `layers` (resolved as the encoder does)."""
    resolved = encoder.resolve_layers(layers)
    pooled = max(resolved) == encoder.num_blocks - 1 and encoder.config.pool != "none"
    return [f"layer_{i}" for i in resolved] + ["pooled"] * pooled


def export_onnx(
    encoder: VisionEncoder,
    path: str | os.PathLike,
    layers: LayerSpec = (-1,),
    *,
    image_size: tuple[int, int] | None = None,
    norm: bool = False,
    opset: int = OPSET,
) -> Path:
    """Write `encoder` as an ONNX graph of the chosen layers.

    Args:
        encoder: The encoder (exported in float32 on CPU, as it is otherwise).
        path: The `.onnx` file to write.
        layers: Block indices (negatives from the end) or `"all"`.
        image_size: `(H, W)` the graph takes (default: the encoder's native size).
        norm: Apply the final LayerNorm to the returned tokens.
        opset: ONNX opset.

    Returns:
        The file's path.
    """
    import warnings

    resolved = encoder.resolve_layers(layers)
    names = output_names(encoder, resolved)
    height, width = image_size or encoder.config.image_size
    if (height, width) != tuple(encoder.config.image_size):
        # The graph is for one size: resample the position table once, as the encoder does
        # on every call at that size (antialiased bicubic has no ONNX operator).
        encoder = copy.deepcopy(encoder)
        with torch.no_grad():
            encoder.set_image_size((height, width))
    graph = LayersGraph(encoder, resolved, norm, names[-1] == "pooled").eval()
    example = torch.zeros(1, encoder.config.in_channels, height, width, dtype=next(encoder.parameters()).dtype)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        # The tracer warns where the grid becomes a constant: the graph is for one size, by design.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            dynamo=False,
            input_names=["pixel_values"],
            output_names=names,
            dynamic_axes={name: {0: "batch"} for name in ["pixel_values", *names]},
            opset_version=opset,
        )
    return path
