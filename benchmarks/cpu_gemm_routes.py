"""Which exact fp32 GEMM route is fastest on this CPU, on a ViT block's linear shapes.

    python benchmarks/cpu_gemm_routes.py [--batch 8] [--tokens 197] [--width 768] [--repeats 15]

Routes, interleaved in one process on the same weights and inputs (median and best of repeats):
  F.linear                  torch's default (MKL / cblas sgemm for fp32 addmm)
  mkldnn_prepacked          torch.ops.mkldnn._linear_pointwise on a weight prepacked by
                            torch.ops.mkldnn._reorder_linear_weight (what inductor `freezing` emits)
  mkldnn_matmul             torch.ops.mkldnn._linear_pointwise on the plain weight (no prepack)
  bf16 (not exact)          F.linear in bfloat16, for the ceiling
and the two GEMMs of a linear's backward (`--training`; the same FLOPs as the forward):
  grad_input torch / oneDNN     g @ W: torch's matmul (MKL) against `cpu_speed.OneDNNLinear`'s GEMM
  grad_weight torch / oneDNN    g^T @ x, likewise (transposes copied inside the oneDNN route)
Each route's max abs difference to float64, over the reference's max, is printed beside its time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=197)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--training", action="store_true", help="add the backward GEMMs (OneDNNLinear's routes)")
    a = p.parse_args()
    from vlm_encoder.cpu_speed import _gemm
    torch.manual_seed(0)
    M, D = a.batch * a.tokens, a.width
    shapes = {"qkv": (D, 3 * D), "proj": (D, D), "fc1": (D, 4 * D), "fc2": (4 * D, D)}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load {os.getloadavg()}")
    for name, (K, N) in shapes.items():
        x = torch.randn(M, K)
        w = torch.randn(N, K) / K**0.5
        b = torch.randn(N)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, M)
        ref = (x.double() @ w.double().T + b.double())
        routes = {
            "F.linear": (lambda: F.linear(x, w, b), ref),
            "mkldnn_prepacked": (lambda: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], ""), ref),
            "mkldnn_matmul": (lambda: torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], ""), ref),
            "bf16": (lambda: F.linear(x.bfloat16(), w.bfloat16(), b.bfloat16()), ref),
        }
        if a.training:
            g = torch.randn(M, N)
            ref_in, ref_w = g.double() @ w.double(), g.double().T @ x.double()
            routes.update({
                "grad_input torch": (lambda: g @ w, ref_in),
                "grad_input oneDNN": (lambda: _gemm(g, w.t(), None), ref_in),
                "grad_weight torch": (lambda: g.t() @ x, ref_w),
                "grad_weight oneDNN": (lambda: _gemm(g.t(), x.t(), None), ref_w),
            })
        err = {k: float((f().double() - r).abs().max() / r.abs().max()) for k, (f, r) in routes.items()}
        routes = {k: f for k, (f, _) in routes.items()}
        times = {k: [] for k in routes}
        for _ in range(a.repeats):
            for k, f in routes.items():
                t = time.perf_counter(); f(); times[k].append(time.perf_counter() - t)
        flops = 2 * M * K * N
        for k in routes:
            med = statistics.median(times[k])
            print(f"{name:5s} {k:19s} median {med*1e3:7.2f} ms best {min(times[k])*1e3:7.2f} ms "
                  f"{flops/med/1e9:6.0f} GFLOP/s  max rel err {err[k]:.1e}")


if __name__ == "__main__":
    main()
