"""CLIP and SigLIP losses as modules separate from the model and the training loop.

Both take open_clip's arguments (`image_features, text_features, logit_scale[, logit_bias]`,
with `logit_scale` the multiplier, i.e. already exponentiated) and give open_clip's values
and gradients, but are computed in row blocks (`chunk_size`) so the `B x B` logits are never
materialised.

Under torch.distributed each rank computes its local loss (its own images and captions as
queries) against the features of all ranks, gathered with gradients. Averaging the
gradients over ranks, as DDP does, gives the gradients of one process on the concatenated
batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .chunked import chunked_clip_loss, chunked_logsumexp, chunked_sigmoid_loss, resolve_chunk
from .distributed import gather_features


def _as_scalar(value: torch.Tensor | float, like: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        return torch.tensor(float(value), device=like.device, dtype=torch.float32)
    if value.numel() != 1:
        raise ValueError(f"{name} must be a scalar (0-d or one element), got shape {tuple(value.shape)}")
    return value.reshape(())


def _check_features(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            "image_features and text_features must both be (B, E) with the same shape (row i of each is a pair), "
            f"got {tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )


def _check_chunk(chunk_size: int | None) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None (automatic), got {chunk_size!r}")


class _ChunkedGatheredLoss(nn.Module):
    """What both losses share: the chunk size and how features are gathered across ranks."""

    def __init__(
        self, chunk_size: int | None = None, gather_with_grad: bool = True, group: dist.ProcessGroup | None = None
    ) -> None:
        super().__init__()
        _check_chunk(chunk_size)
        self.chunk_size = chunk_size
        self.gather_with_grad = gather_with_grad
        self.group = group


class ClipLoss(_ChunkedGatheredLoss):
    """Symmetric softmax cross-entropy over the batch (CLIP, InfoNCE).

    `loss = (CE(logits, diag) + CE(logits.T, diag)) / 2` with
    `logits = logit_scale * image @ text.T (+ logit_bias)`, computed with the row and column
    log-sum-exp in blocks of `chunk_size` rows (recomputed in the backward pass). On one process
    both directions share each block (`chunked_clip_loss`); across ranks each direction is its
    own pass over this rank's rows against the gathered features.

    Args:
        chunk_size: Rows per block; `None` picks one so a block holds at most 2^24 logits.
        gather_with_grad: Under torch.distributed, let gradients flow back through the
            gathered features of other ranks (exact full-batch gradients). `False` treats
            other ranks' features as constants (open_clip's `gather_with_grad=False`).
        group: Process group to gather over (default: the world when initialised).
    """

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """The loss of this rank's pairs.

        Args:
            image_features: `(B, E)` image embeddings (normalised by the model).
            text_features: `(B, E)` text embeddings; row `i` is image `i`'s caption.
            logit_scale: Multiplier of the similarities (`exp` of the learned parameter).
            logit_bias: Optional added bias (it cancels in the softmax; accepted for parity).

        Returns:
            The scalar loss, in float32 (float64 for float64 features).
        """
        _check_features(image_features, text_features)
        scale = _as_scalar(logit_scale, image_features, "logit_scale")
        all_images, offset = gather_features(image_features, self.gather_with_grad, self.group)
        all_texts, _ = gather_features(text_features, self.gather_with_grad, self.group)
        n = image_features.shape[0]
        chunk = resolve_chunk(self.chunk_size, all_texts.shape[0], n)
        if all_texts.shape[0] == n:  # one process (or the only rank with rows): the whole batch is local
            loss = chunked_clip_loss(all_images, all_texts, scale, chunk)
            if logit_bias is not None:  # it cancels; kept in the graph so its gradient is 0, as open_clip's
                bias = _as_scalar(logit_bias, image_features, "logit_bias").to(loss.dtype)
                loss = loss + (bias - bias)
            return loss
        # Across ranks this rank's rows and columns of the global logits are different blocks.
        image_lse = chunked_logsumexp(image_features, all_texts, scale, chunk)  # (n,) over all captions
        text_lse = chunked_logsumexp(text_features, all_images, scale, chunk)  # (n,) over all images
        dtype = image_lse.dtype
        positives = scale.to(dtype) * (image_features.to(dtype) * text_features.to(dtype)).sum(dim=-1)  # (n,)
        if logit_bias is not None:
            bias = _as_scalar(logit_bias, image_features, "logit_bias").to(dtype)
            image_lse, text_lse, positives = image_lse + bias, text_lse + bias, positives + bias
        return ((image_lse - positives).mean() + (text_lse - positives).mean()) / 2


class SigLipLoss(_ChunkedGatheredLoss):
    """Pairwise sigmoid loss (SigLIP): `-sum_ij log sigmoid(y_ij (t * image_i . text_j + b)) / B`
    with `y = +1` for matching pairs and `-1` otherwise, summed over blocks of `chunk_size`
    image rows.

    Args:
        chunk_size: Image rows per block; `None` picks one so a block holds at most 2^24 logits.
        gather_with_grad: Under torch.distributed, let gradients flow back through the
            gathered captions of other ranks (exact full-batch gradients).
        group: Process group to gather over (default: the world when initialised).
    """

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float,
    ) -> torch.Tensor:
        """The loss of this rank's images against every rank's captions.

        Args:
            image_features: `(B, E)` image embeddings (normalised by the model).
            text_features: `(B, E)` text embeddings; row `i` is image `i`'s caption.
            logit_scale: Multiplier `t` of the similarities (`exp` of the learned parameter).
            logit_bias: Learned bias `b`.

        Returns:
            The scalar loss (sum over pairs divided by the local batch), in float32 (float64
            for float64 features).
        """
        _check_features(image_features, text_features)
        if logit_bias is None:
            raise ValueError("SigLipLoss needs logit_bias (build the model with objective='siglip')")
        scale = _as_scalar(logit_scale, image_features, "logit_scale")
        bias = _as_scalar(logit_bias, image_features, "logit_bias")
        all_texts, offset = gather_features(text_features, self.gather_with_grad, self.group)
        n = image_features.shape[0]
        chunk = resolve_chunk(self.chunk_size, all_texts.shape[0], n)
        return chunked_sigmoid_loss(image_features, all_texts, scale, bias, offset, chunk) / n
