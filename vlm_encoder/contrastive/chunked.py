"""Contrastive-loss kernels that never build the `(n, N)` logit matrix.

Both work on blocks of `chunk` query rows against all `N` keys, in the forward pass and again
(recomputing) in the backward pass, so the largest intermediate is `(chunk, N)` and memory
grows linearly with the batch. Half-precision inputs are computed in float32 (float64 stays
float64).

- `chunked_logsumexp(q, k, scale)`: `logsumexp_j(scale * q_i . k_j)` for each row `i`, the
  normaliser of CLIP's softmax cross-entropy.
- `chunked_clip_loss(image, text, scale)`: the whole symmetric CLIP loss of one batch. Block
  `(i, :)` of the logits serves the image->text softmax along its rows and the text->image softmax
  along its columns, so each block is computed once per pass (half the GEMMs of two
  `chunked_logsumexp`) and the backward accumulates both directions into one pair of `(N, E)`
  gradients.
- `chunked_sigmoid_loss(q, k, scale, bias, offset)`: `sum_ij softplus(-y_ij (scale q_i . k_j
  + bias))` with `y = +1` on the pairs `(i, offset + i)` and `-1` elsewhere (SigLIP).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd import Function

# Elements of one (chunk, N) block when no chunk size is given: 2^24 float32 = 64 MiB; the
# backward holds two such blocks. Still 128 rows per GEMM at N = 131,072, which runs as fast per
# row as 1,024-row blocks on a 2-core CPU (measured), while 2^27 held 1 GiB of blocks.
AUTO_CHUNK_ELEMENTS = 2**24


def resolve_chunk(chunk_size: int | None, num_keys: int, num_queries: int) -> int:
    """Rows per block: `chunk_size`, or as many as fit `AUTO_CHUNK_ELEMENTS` when `None`."""
    if chunk_size is None:
        chunk_size = max(1, AUTO_CHUNK_ELEMENTS // max(1, num_keys))
    return max(1, min(int(chunk_size), max(1, num_queries)))


def _compute(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The tensors in float32, or float64 when the features are float64."""
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    return [t.to(dtype) for t in tensors]


def _blocks(n: int, chunk: int):
    for start in range(0, n, chunk):
        yield start, min(start + chunk, n)


class _ChunkedLogSumExp(Function):
    @staticmethod
    def forward(ctx, queries, keys, scale, chunk):
        q, k, s = _compute(queries, keys, scale)
        lse = q.new_empty(q.shape[0])
        for a, b in _blocks(q.shape[0], chunk):
            logits = (q[a:b] @ k.T).mul_(s)  # (c, N)
            lse[a:b] = torch.logsumexp(logits, dim=1)
        ctx.save_for_backward(queries, keys, scale, lse)
        ctx.chunk = chunk
        return lse

    @staticmethod
    def backward(ctx, grad_lse):
        queries, keys, scale, lse = ctx.saved_tensors
        q, k, s = _compute(queries, keys, scale)
        g = grad_lse.to(q.dtype)
        dq = torch.zeros_like(q) if ctx.needs_input_grad[0] else None
        dk = torch.zeros_like(k) if ctx.needs_input_grad[1] else None
        ds = q.new_zeros(())
        alpha = float(s)
        for a, b in _blocks(q.shape[0], ctx.chunk):
            raw = q[a:b] @ k.T  # (c, N) unscaled similarities
            weights = (raw * s).sub_(lse[a:b, None]).exp_().mul_(g[a:b, None])  # g_i * softmax_ij
            ds += torch.dot(weights.flatten(), raw.flatten())
            del raw
            if dq is not None:
                dq[a:b] = (weights @ k).mul_(s)
            if dk is not None:
                dk.addmm_(weights.T, q[a:b], alpha=alpha)
        dq = dq.to(queries.dtype) if dq is not None else None
        dk = dk.to(keys.dtype) if dk is not None else None
        return dq, dk, ds.to(scale.dtype).reshape(scale.shape), None


def chunked_logsumexp(queries: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor, chunk: int) -> torch.Tensor:
    """`logsumexp_j(scale * queries_i . keys_j)` `(n,)` in float32, in blocks of `chunk` rows.

    Args:
        queries: `(n, E)`.
        keys: `(N, E)`.
        scale: 0-d multiplier of the similarities.
        chunk: Query rows per block.
    """
    return _ChunkedLogSumExp.apply(queries, keys, scale, chunk)


class _ChunkedClipLoss(Function):
    @staticmethod
    def forward(ctx, image, text, scale, chunk):
        q, k, s = _compute(image, text, scale)
        n = q.shape[0]
        row_lse = q.new_empty(n)
        col_max = q.new_full((n,), float("-inf"))  # online log-sum-exp down the columns
        col_sum = q.new_zeros(n)
        positives = q.new_zeros(())
        for a, b in _blocks(n, chunk):
            logits = (q[a:b] @ k.T).mul_(s)  # (c, N)
            positives += logits.diagonal(offset=a).sum()  # the pairs (i, i) of rows a..b
            row_lse[a:b] = torch.logsumexp(logits, dim=1)
            new_max = torch.maximum(col_max, logits.amax(dim=0))
            col_sum.mul_((col_max - new_max).exp_()).add_(logits.sub_(new_max).exp_().sum(dim=0))
            col_max = new_max
            del logits
        col_lse = col_sum.log_().add_(col_max)
        ctx.save_for_backward(image, text, scale, row_lse, col_lse)
        ctx.chunk = chunk
        return (row_lse.sum() + col_lse.sum() - 2 * positives) / (2 * n)

    @staticmethod
    def backward(ctx, grad_loss):
        image, text, scale, row_lse, col_lse = ctx.saved_tensors
        q, k, s = _compute(image, text, scale)
        n = q.shape[0]
        g = grad_loss.to(q.dtype) / (2 * n)
        dq = torch.zeros_like(q) if ctx.needs_input_grad[0] else None
        dk = torch.zeros_like(k) if ctx.needs_input_grad[1] else None
        ds = q.new_zeros(())
        alpha = float(s)
        for a, b in _blocks(n, ctx.chunk):
            # d loss / d logits_ij = g * (softmax over row i + softmax over column j - 2 [i == j]).
            weights = (q[a:b] @ k.T).mul_(s)  # (c, N) logits
            by_column = (weights - col_lse).exp_()
            weights.sub_(row_lse[a:b, None]).exp_().add_(by_column).mul_(g)
            del by_column
            weights.diagonal(offset=a).sub_(2 * g)
            weighted_keys = weights @ k  # (c, E)
            ds += torch.dot(weighted_keys.flatten(), q[a:b].flatten())  # sum_ij w_ij q_i . k_j
            if dq is not None:
                dq[a:b] = weighted_keys.mul_(s)
            if dk is not None:
                dk.addmm_(weights.T, q[a:b], alpha=alpha)
        dq = dq.to(image.dtype) if dq is not None else None
        dk = dk.to(text.dtype) if dk is not None else None
        return dq, dk, ds.to(scale.dtype).reshape(scale.shape), None


def chunked_clip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, chunk: int) -> torch.Tensor:
    """Symmetric CLIP loss (0-d, float32) of one batch, in blocks of `chunk` image rows.

    `(CE(logits, diag) + CE(logits.T, diag)) / 2` with `logits = scale * image @ text.T`, the
    `(N, N)` logits never materialised: the forward pass takes each row's log-sum-exp and, online
    across blocks, each column's; the backward recomputes each block once for both directions.

    Args:
        image: `(N, E)` image features.
        text: `(N, E)` text features; row `i` is image `i`'s caption.
        scale: 0-d multiplier of the similarities.
        chunk: Image rows per block.
    """
    return _ChunkedClipLoss.apply(image, text, scale, chunk)


def _signed_logits(q_block, k, s, bias, first_row, offset):
    """Unscaled similarities `(c, N)` and `-y * logits` (the softplus argument) of a block."""
    raw = q_block @ k.T  # (c, N)
    signed = raw * s + bias  # negatives: y = -1, so -y z = z
    rows = torch.arange(raw.shape[0], device=raw.device)
    cols = rows + offset + first_row
    inside = cols < raw.shape[1]  # offset past the keys: negatives only
    rows, cols = rows[inside], cols[inside]
    signed[rows, cols] = -signed[rows, cols]  # positives: y = +1
    return raw, signed, (rows, cols)


class _ChunkedSigmoidLoss(Function):
    @staticmethod
    def forward(ctx, queries, keys, scale, bias, offset, chunk):
        q, k, s, t = _compute(queries, keys, scale, bias)
        total = q.new_zeros(())
        for a, b in _blocks(q.shape[0], chunk):
            _, signed, _ = _signed_logits(q[a:b], k, s, t, a, offset)
            total += F.softplus(signed).sum()
        ctx.save_for_backward(queries, keys, scale, bias)
        ctx.offset, ctx.chunk = offset, chunk
        return total

    @staticmethod
    def backward(ctx, grad_total):
        queries, keys, scale, bias = ctx.saved_tensors
        q, k, s, t = _compute(queries, keys, scale, bias)
        g = grad_total.to(q.dtype)
        dq = torch.zeros_like(q) if ctx.needs_input_grad[0] else None
        dk = torch.zeros_like(k) if ctx.needs_input_grad[1] else None
        ds = q.new_zeros(())
        dt = q.new_zeros(())
        alpha = float(s)
        for a, b in _blocks(q.shape[0], ctx.chunk):
            raw, signed, (rows, cols) = _signed_logits(q[a:b], k, s, t, a, ctx.offset)
            # d softplus(-y z) / dz = -y * sigmoid(-y z): +sigmoid on negatives, -sigmoid on positives.
            dz = signed.sigmoid_()
            dz[rows, cols] = -dz[rows, cols]
            dz.mul_(g)
            ds += torch.dot(dz.flatten(), raw.flatten())
            dt += dz.sum()
            del raw
            if dq is not None:
                dq[a:b] = (dz @ k).mul_(s)
            if dk is not None:
                dk.addmm_(dz.T, q[a:b], alpha=alpha)
        dq = dq.to(queries.dtype) if dq is not None else None
        dk = dk.to(keys.dtype) if dk is not None else None
        return dq, dk, ds.to(scale.dtype).reshape(scale.shape), dt.to(bias.dtype).reshape(bias.shape), None, None


def chunked_sigmoid_loss(
    queries: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, offset: int, chunk: int
) -> torch.Tensor:
    """Summed SigLIP pair loss (0-d, float32) of `queries (n, E)` against `keys (N, E)`.

    Query `i` is paired with key `offset + i` (its own caption); every other pair is a
    negative. Pass `offset = N` (past the keys) for negatives only.
    """
    return _ChunkedSigmoidLoss.apply(queries, keys, scale, bias, offset, chunk)
