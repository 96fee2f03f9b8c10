"""Packing on mixed sizes: how the attention over a pack is run, and packed against padded and
one image at a time.

    python benchmarks/packed_attention.py            # width 384, 6 heads, 4 blocks, 6 images
    python benchmarks/packed_attention.py --repeats 5 --depth 2   # a quick check

Two measurements, each contender interleaved with the others in one process on the same
weights and inputs (warm-up, then `--repeats` rounds; median and best reported):

1. The attention kernel alone, on one pack of the images' tokens `(1, heads, T, d)`:
   loop         one fused `scaled_dot_product_attention` call per segment;
   block_mask   one call with the dense block-diagonal boolean mask `(1, 1, T, T)`;
   padded_segs  one call over the segments padded to the longest `(S, heads, L, d)` with a
                key-padding mask (gather / scatter included);
   nested       one call on a jagged nested tensor (`torch.nested`, layout `jagged`);
   flex         FlexAttention with a block mask (compiled; the compile is not timed).
   Each is checked against the loop (max abs diff) before timing.
2. The encoder end to end (embedding, blocks, final norm and pooling):
   packed       `encode_packed` (the library's path);
   packed_loop  `encode_packed` with the attention run one call per segment (the former path);
   padded       the images' tokens padded to the longest, a key-padding mask `(B, 1, 1, L)`;
   one_by_one   `encoder(image[None])` for each image.

Results: `benchmarks/results/packed_attention_cpu.{json,md}` with the CPU model, threads, load
average and date. The machine is shared: read ratios within one run, not absolute times.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from vlm_encoder import VisionConfig, VisionEncoder
from vlm_encoder.layers import attention as attention_module
from vlm_encoder.packing import embed_images, encode_packed

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# (H, W) at patch 16: 49, 256, 100, 196, 64 and 144 patches (+ CLS), mixed aspect ratios.
SIZES = [(112, 112), (128, 512), (160, 160), (224, 224), (64, 256), (192, 192)]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def time_interleaved(contenders: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict[str, float]]:
    for fn in contenders.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: {"median_ms": 1e3 * statistics.median(ts), "best_ms": 1e3 * min(ts)} for name, ts in times.items()}


def loop_attention(q, k, v, segments):
    """The former path: one fused call per segment of each row."""
    B, H, T, d = q.shape
    out = q.new_empty(B, T, H * d)
    for row, lengths in enumerate(segments.lengths):
        start = 0
        for n in lengths:
            part = slice(start, start + n)
            attended = F.scaled_dot_product_attention(q[row : row + 1, :, part], k[row : row + 1, :, part], v[row : row + 1, :, part])
            out[row, part].view(n, H, d).copy_(attended[0].transpose(0, 1))
            start += n
    return out


def kernel_contenders(lengths: list[int], heads: int, head_dim: int) -> tuple[dict, dict]:
    T, S, L = sum(lengths), len(lengths), max(lengths)
    q, k, v = (torch.randn(1, heads, T, head_dim) for _ in range(3))
    ids = torch.repeat_interleave(torch.arange(S), torch.tensor(lengths))
    mask = (ids[:, None] == ids[None, :])[None, None]  # (1, 1, T, T)
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()[:-1]])
    slot = ids * L + torch.arange(T) - starts[ids]  # each token's place in (S * L)
    key_mask = (torch.arange(L)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :]  # (S, 1, 1, L)

    def loop():
        out, start = [], 0
        for n in lengths:
            out.append(F.scaled_dot_product_attention(q[:, :, start : start + n], k[:, :, start : start + n], v[:, :, start : start + n]))
            start += n
        return torch.cat(out, dim=2)

    def block_mask():
        return F.scaled_dot_product_attention(q, k, v, mask)

    def padded_segs():
        def gather(t):
            buf = t.new_zeros(heads, S * L, head_dim)
            buf[:, slot] = t[0]
            return buf.view(heads, S, L, head_dim).transpose(0, 1)  # (S, H, L, d)
        out = F.scaled_dot_product_attention(gather(q), gather(k), gather(v), key_mask)
        return out.transpose(0, 1).reshape(heads, S * L, head_dim)[:, slot][None]

    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])

    def nested():
        def jag(t):
            return torch.nested.nested_tensor_from_jagged(t[0].transpose(0, 1).contiguous(), offsets).transpose(1, 2)
        out = F.scaled_dot_product_attention(jag(q), jag(k), jag(v))  # (S, H, j, d)
        return out.transpose(1, 2).values().transpose(0, 1)[None]

    contenders = {"loop": loop, "block_mask": block_mask, "padded_segs": padded_segs, "nested": nested}
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        blocks = create_block_mask(lambda b, h, qi, ki: ids[qi] == ids[ki], None, None, T, T, device="cpu")
        compiled = torch.compile(flex_attention)
        contenders["flex"] = lambda: compiled(q, k, v, block_mask=blocks)
    except Exception as err:  # noqa: BLE001 - a torch without FlexAttention on the CPU
        print(f"flex: not run ({type(err).__name__}: {err})")
    reference = loop()
    diffs = {}
    for name, fn in list(contenders.items()):
        try:
            diffs[name] = (fn() - reference).abs().max().item()
        except Exception as err:  # noqa: BLE001 - report a contender this torch cannot run
            print(f"{name}: not run ({type(err).__name__}: {str(err)[:120]})")
            del contenders[name]
    return contenders, diffs


def encoder_contenders(encoder: VisionEncoder, images: list[torch.Tensor]) -> tuple[dict, dict]:
    def packed():
        return [o.pooled for o in encode_packed(encoder, images)]

    def packed_loop():
        saved = attention_module._packed_attention
        attention_module._packed_attention = loop_attention
        try:
            return packed()
        finally:
            attention_module._packed_attention = saved

    def padded():
        embedded = embed_images(encoder, images, max_tokens_per_pack=max(2 ** 20, 1))
        sequences = embedded.unpack([embedded.tokens[0]])  # per image (1, T_i, D)
        L = max(s.shape[1] for s in sequences)
        x = torch.cat([F.pad(s, (0, 0, 0, L - s.shape[1])) for s in sequences])  # (B, L, D)
        lengths = torch.tensor([s.shape[1] for s in sequences])
        mask = (torch.arange(L)[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, L)
        for block in encoder.blocks:
            x, _ = block(x, attn_mask=mask)
        return [encoder.pool(encoder.norm(x[i : i + 1, : int(n)])) for i, n in enumerate(lengths)]

    def one_by_one():
        return [encoder(image[None]).pooled for image in images]

    contenders = {"packed": packed, "packed_loop": packed_loop, "padded": padded, "one_by_one": one_by_one}
    reference = one_by_one()
    diffs = {name: max((a - b).abs().max().item() for a, b in zip(fn(), reference)) for name, fn in contenders.items()}
    return contenders, diffs


def table(title: str, rows: dict, diffs: dict, base: str) -> list[str]:
    lines = [f"### {title}", "", f"| contender | median ms | best ms | x {base} (median) | max abs diff |", "|---|---:|---:|---:|---:|"]
    for name, r in rows.items():
        ratio = rows[base]["median_ms"] / r["median_ms"]
        lines.append(f"| {name} | {r['median_ms']:.2f} | {r['best_ms']:.2f} | {ratio:.2f} | {diffs[name]:.1e} |")
    return lines + [""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=str(RESULTS_DIR / "packed_attention_cpu"))
    args = parser.parse_args()
    torch.manual_seed(0)
    config = VisionConfig(image_size=224, patch_size=16, width=args.width, depth=args.depth, num_heads=args.heads)
    encoder = VisionEncoder(config).eval()
    images = [torch.randn(3, h, w) for h, w in SIZES]
    lengths = [1 + (h // 16) * (w // 16) for h, w in SIZES]
    load_before = os.getloadavg()
    with torch.no_grad():
        kernels, kernel_diffs = kernel_contenders(lengths, args.heads, args.width // args.heads)
        kernel_rows = time_interleaved(kernels, args.repeats)
        encoders, encoder_diffs = encoder_contenders(encoder, images)
        encoder_rows = time_interleaved(encoders, args.repeats)
    report = {
        "date": dt.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_model(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "width": args.width, "heads": args.heads, "depth": args.depth, "repeats": args.repeats, "tokens_per_image": lengths,
        "attention_kernel": {"results": kernel_rows, "max_abs_diff_vs_loop": kernel_diffs},
        "encoder": {"results": encoder_rows, "max_abs_diff_vs_one_by_one": encoder_diffs},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    header = [
        "# Packing on mixed sizes (`benchmarks/packed_attention.py`)", "",
        f"{report['date']}; {report['cpu']}; {report['threads']} threads; torch {report['torch']}; load average "
        f"{load_before[0]:.2f} before, {report['load_average_after'][0]:.2f} after (a shared machine: read the ratios).",
        f"ViT width {args.width}, {args.heads} heads, {args.depth} blocks, patch 16; {len(SIZES)} images of "
        f"{', '.join(map(str, lengths))} tokens (CLS included); {args.repeats} interleaved rounds.", "",
    ]
    lines = header + table("Attention over one pack (one layer)", kernel_rows, kernel_diffs, "loop")
    lines += table("Encoder end to end (pooled output)", encoder_rows, encoder_diffs, "one_by_one")
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
