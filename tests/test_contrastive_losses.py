"""ClipLoss / SigLipLoss: parity with open_clip (values and gradients, chunked or not), exact
full-batch gradients across 2 gloo processes, and memory that grows linearly with the batch."""

from __future__ import annotations

import math
import os
import socket
import tempfile

import pytest
import torch
import torch.nn.functional as F
from memory_probe import track_tensor_memory

from vlm_encoder.contrastive import ClipLoss, SigLipLoss, gather_features


def _open_clip_losses():
    # Imported lazily: the 2-process test's workers re-import this module and need not pay for it.
    import open_clip.loss

    return open_clip.loss


def _features(batch: int, dim: int, dtype=torch.float64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=gen, dtype=dtype), dim=-1)
    text = F.normalize(torch.randn(batch, dim, generator=gen, dtype=dtype), dim=-1)
    # Make the positives more similar than chance, as in training.
    text = F.normalize(text + 0.5 * image, dim=-1)
    return image, text


def _value_and_grads(loss_fn, image, text, scale, bias):
    leaves = [x.detach().clone().requires_grad_() for x in (image, text, scale, bias)]
    loss = loss_fn(*leaves)
    loss.backward()
    return [loss.detach()] + [leaf.grad for leaf in leaves]


def _assert_close_all(ours, reference, rtol, atol):
    names = ["loss", "d image", "d text", "d scale", "d bias"]
    for name, a, b in zip(names, ours, reference):
        torch.testing.assert_close(a.to(b.dtype), b, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# float64: our chunked sums agree with open_clip to 1e-6 absolute (and far better);
# float32: to float32 rounding of sums of ~B^2 terms (1e-6 relative).
TOLERANCES = {torch.float64: dict(rtol=0, atol=1e-6), torch.float32: dict(rtol=1e-6, atol=1e-6)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk_size", [None, 1, 5, 64])
@pytest.mark.parametrize("batch", [1, 13, 40])
def test_clip_loss_matches_open_clip(dtype, chunk_size, batch):
    oc_loss = _open_clip_losses()
    image, text = _features(batch, 16, dtype)
    scale = torch.tensor(math.log(1 / 0.07), dtype=dtype).exp()
    bias = torch.tensor(-2.0, dtype=dtype)
    ours = _value_and_grads(lambda i, t, s, b: ClipLoss(chunk_size=chunk_size)(i, t, s, b), image, text, scale, bias)
    ref = _value_and_grads(lambda i, t, s, b: oc_loss.ClipLoss()(i, t, s, b), image, text, scale, bias)
    _assert_close_all(ours, ref, **TOLERANCES[dtype])
    if batch > 1:
        assert ours[0].item() > 0


def test_clip_loss_without_bias_matches_open_clip():
    oc_loss = _open_clip_losses()
    image, text = _features(9, 8)
    scale = torch.tensor(30.0, dtype=torch.float64, requires_grad=True)
    ours = ClipLoss(chunk_size=4)(image, text, scale)
    ref = oc_loss.ClipLoss()(image, text, scale)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk_size", [None, 1, 5, 64])
@pytest.mark.parametrize("batch", [1, 13, 40])
def test_siglip_loss_matches_open_clip(dtype, chunk_size, batch):
    oc_loss = _open_clip_losses()
    image, text = _features(batch, 16, dtype)
    scale = torch.tensor(10.0, dtype=dtype)
    bias = torch.tensor(-10.0, dtype=dtype)
    ours = _value_and_grads(lambda i, t, s, b: SigLipLoss(chunk_size=chunk_size)(i, t, s, b), image, text, scale, bias)
    ref = _value_and_grads(lambda i, t, s, b: oc_loss.SigLipLoss()(i, t, s, b), image, text, scale, bias)
    _assert_close_all(ours, ref, **TOLERANCES[dtype])


def test_losses_accept_half_features_and_return_float32():
    oc_loss = _open_clip_losses()
    image, text = _features(12, 8, torch.float32)
    scale, bias = torch.tensor(20.0), torch.tensor(-5.0)
    for dtype in (torch.bfloat16, torch.float16):
        i, t = image.to(dtype).requires_grad_(), text.to(dtype).requires_grad_()
        clip = ClipLoss(chunk_size=5)(i, t, scale)
        sig = SigLipLoss(chunk_size=5)(i, t, scale, bias)
        (clip + sig).backward()
        assert clip.dtype == sig.dtype == torch.float32
        assert i.grad.dtype == dtype and torch.isfinite(i.grad).all()
        torch.testing.assert_close(clip, oc_loss.ClipLoss()(image, text, scale), rtol=2e-2, atol=2e-2)


def test_losses_reject_bad_input():
    image, text = _features(4, 8)
    with pytest.raises(ValueError, match="same shape"):
        ClipLoss()(image, text[:3], 1.0)
    with pytest.raises(ValueError, match="logit_bias"):
        SigLipLoss()(image, text, 1.0, None)
    with pytest.raises(ValueError, match="chunk_size"):
        ClipLoss(chunk_size=0)


# ------------------------------------------------------------------ distributed (gloo, 2 processes)
WORLD = 2
PER_RANK = 6


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        image, text = _features(WORLD * PER_RANK, 8)
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        scale = torch.tensor(14.0, dtype=torch.float64)
        bias = torch.tensor(-3.0, dtype=torch.float64)
        results = {}
        losses = {
            "clip": lambda i, t, s, b: ClipLoss(chunk_size=4)(i, t, s),
            "siglip": lambda i, t, s, b: SigLipLoss(chunk_size=4)(i, t, s, b),
        }
        for name, fn in losses.items():
            results[name] = _value_and_grads(fn, image[rows], text[rows], scale, bias)
        # Uneven batches: rank 0 holds 3 rows, rank 1 holds 5.
        uneven = torch.arange(8 * 2, dtype=torch.float64).reshape(8, 2)
        mine = uneven[:3] if rank == 0 else uneven[3:]
        gathered = gather_features(mine)
        results["uneven"] = (gathered.features, gathered.offset)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_two_ranks(out_dir: str, timeout_s: float = 120.0) -> None:
    import time

    import torch.multiprocessing as mp

    context = mp.spawn(_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"the 2-process gloo run did not finish within {timeout_s:.0f} s")


def test_distributed_gradients_equal_single_process_full_batch():
    with tempfile.TemporaryDirectory() as out_dir:
        _run_two_ranks(out_dir)
        ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]

    image, text = _features(WORLD * PER_RANK, 8)
    scale = torch.tensor(14.0, dtype=torch.float64)
    bias = torch.tensor(-3.0, dtype=torch.float64)
    full = {
        "clip": _value_and_grads(lambda i, t, s, b: ClipLoss()(i, t, s), image, text, scale, bias),
        "siglip": _value_and_grads(lambda i, t, s, b: SigLipLoss()(i, t, s, b), image, text, scale, bias),
    }
    for name in ("clip", "siglip"):
        per_rank = [r[name] for r in ranks]
        # DDP averages over ranks: the mean of the local losses and of the gradients must be
        # the single-process, full-batch loss and gradients.
        mean_loss = sum(r[0] for r in per_rank) / WORLD
        torch.testing.assert_close(mean_loss, full[name][0], rtol=0, atol=1e-10)
        d_image = torch.cat([r[1] for r in per_rank]) / WORLD
        d_text = torch.cat([r[2] for r in per_rank]) / WORLD
        torch.testing.assert_close(d_image, full[name][1], rtol=0, atol=1e-10)
        torch.testing.assert_close(d_text, full[name][2], rtol=0, atol=1e-10)
        d_scale = sum(r[3] for r in per_rank) / WORLD
        torch.testing.assert_close(d_scale, full[name][3], rtol=0, atol=1e-10)
        if name == "siglip":
            torch.testing.assert_close(sum(r[4] for r in per_rank) / WORLD, full[name][4], rtol=0, atol=1e-10)

    expected = torch.arange(16, dtype=torch.float64).reshape(8, 2)
    for rank, r in enumerate(ranks):
        torch.testing.assert_close(r["uneven"][0], expected)
        assert r["uneven"][1] == (0 if rank == 0 else 3)


# ------------------------------------------------------------------ memory
def _measure(loss_fn, batch: int, dim: int | None = None) -> tuple[int, int]:
    image, text = _features(batch, dim or DIM, torch.float32)
    image.requires_grad_()
    text.requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-5.0, requires_grad=True)
    with track_tensor_memory() as stats:
        loss_fn(image, text, scale, bias).backward()
    return stats.peak_bytes, stats.largest_numel


CHUNK = 16
DIM = 8


@pytest.mark.parametrize(
    "name,loss_fn",
    [
        ("clip", lambda i, t, s, b: ClipLoss(chunk_size=CHUNK)(i, t, s)),
        ("siglip", lambda i, t, s, b: SigLipLoss(chunk_size=CHUNK)(i, t, s, b)),
    ],
)
def test_memory_grows_linearly_with_batch(name, loss_fn):
    small_peak, small_largest = _measure(loss_fn, 128)
    big_peak, big_largest = _measure(loss_fn, 256)
    # The largest tensor is one (chunk, B) block or the (B, E) features, never (B, B).
    assert small_largest <= max(CHUNK, DIM) * 128 and big_largest <= max(CHUNK, DIM) * 256
    ratio = big_peak / small_peak
    assert 1.5 < ratio < 2.5, f"{name}: doubling the batch multiplied peak memory by {ratio:.2f} (expected ~2)"


def test_clip_backward_holds_one_pair_of_gradients():
    """On one process CLIP's two directions share each block and one pair of `(B, E)` gradient
    buffers; the same loss as two row-log-sum-exp passes (the distributed path's form) holds a
    pair per direction before autograd sums them, so the measure can fail."""
    from vlm_encoder.contrastive.chunked import chunked_logsumexp

    batch, dim, chunk = 2048, 64, 16
    gradient_pair, block = 2 * batch * dim * 4, chunk * batch * 4

    def two_passes(i, t, s, b):
        positives = s * (i * t).sum(-1)
        image_lse, text_lse = chunked_logsumexp(i, t, s, chunk), chunked_logsumexp(t, i, s, chunk)
        return ((image_lse - positives).mean() + (text_lse - positives).mean()) / 2

    fused_peak, fused_largest = _measure(lambda i, t, s, b: ClipLoss(chunk_size=chunk)(i, t, s), batch, dim)
    two_peak, _ = _measure(two_passes, batch, dim)
    assert fused_largest <= batch * dim
    assert fused_peak <= gradient_pair + 4 * block, fused_peak
    assert two_peak >= 2 * gradient_pair, two_peak


def test_open_clip_memory_is_quadratic_so_the_measure_can_fail():
    oc_loss = _open_clip_losses()
    loss_fn = lambda i, t, s, b: oc_loss.ClipLoss()(i, t, s)  # noqa: E731
    small_peak, small_largest = _measure(loss_fn, 128)
    big_peak, _ = _measure(loss_fn, 256)
    assert small_largest == 128 * 128
    assert big_peak / small_peak > 3.5


@pytest.mark.slow  # ~15 s each on 2 busy cores
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_default_chunked_loss_equals_the_full_logits_loss_at_8192(kind):
    """The default (`chunk_size=None`: automatic blocks) against the `B x B` logits loss at
    B = 8,192 (64-d features keep it fast): loss and gradients."""
    import torch.nn.functional as F

    from vlm_encoder.contrastive import ClipLoss, SigLipLoss

    g = torch.Generator().manual_seed(0)
    B = 8192
    feats = [F.normalize(torch.randn(B, 64, generator=g), dim=-1).requires_grad_() for _ in range(2)]
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    ours = (ClipLoss() if kind == "clip" else SigLipLoss())(*feats, scale, bias)
    assert ClipLoss().chunk_size is None
    grads = torch.autograd.grad(ours, feats)
    logits = feats[0] @ feats[1].T * scale + bias  # (B, B)
    labels = torch.arange(B)
    if kind == "clip":
        full = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    else:
        signs = 2 * torch.eye(B) - 1
        full = -F.logsigmoid(signs * logits).sum() / B
    full_grads = torch.autograd.grad(full, feats)
    assert torch.allclose(ours, full, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, full_grads):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, float(b.abs().max()))
