"""Speed check (CPU): SALE's score estimate vs dense causal SDPA of the same layer, and the GEMM options behind it.

    OMP_NUM_THREADS=1 python benchmarks/sale_estimate.py [--L 4096 8192] [--runs 3]

Shape of one default-model layer: B=1, H_q=9, H_kv=3, D=64, fp32. Rows (all timed interleaved per run, median of
``--runs``, ratio to SDPA measured in the same run; < 1 = cheaper than dense attention):

- ``sdpa``: ``scaled_dot_product_attention(is_causal=True, enable_gqa=True)`` — dense prefill attention.
- ``qk fp32 / bf16 / int8``: the causal ``Q K^T`` alone (GQA heads stacked, 512-row chunks), the estimator options.
- ``prepare``: centring, INT4 quantization and the exact sink + local statistics (``sale_prepare``).
- ``estimate``: the whole ``sale_estimate`` (PyTorch path, τ = 0.008), prepare included.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from kvaccel.kernels.sale_estimate import sale_estimate, sale_prepare


def _qk(q, k, dtype, chunk=512):
    G = q.shape[1] // k.shape[1]
    if dtype == torch.int8:
        qq, kk = q.clamp(-8, 7).to(torch.int8), k.clamp(-8, 7).to(torch.int8)
    else:
        qq, kk = q.to(dtype), k.to(dtype)

    def run():
        L, D = q.shape[2], q.shape[3]
        for h in range(k.shape[1]):
            kT = kk[0, h].t().contiguous()
            for r0 in range(0, L, chunk):
                rows = qq[0, h * G : (h + 1) * G, r0 : r0 + chunk].reshape(-1, D)
                if dtype == torch.int8:
                    torch._int_mm(rows, kT[:, : r0 + chunk])
                else:
                    rows @ kT[:, : r0 + chunk]

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--L", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"threads={torch.get_num_threads()}")
    print(f"{'L':>6} {'row':<12} {'median s':>9} {'x sdpa':>7}")
    for L in args.L:
        q, k, v = torch.randn(1, 9, L, 64), torch.randn(1, 3, L, 64), torch.randn(1, 3, L, 64)
        scale = 64**-0.5
        cands = {
            "sdpa": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
            "qk fp32": _qk(q, k, torch.float32),
            "qk bf16": _qk(q, k, torch.bfloat16),
            "qk int8": _qk(q * 3, k * 3, torch.int8),
            "prepare": lambda q=q, k=k, s=scale: sale_prepare(q, k, scale=s),
            "estimate": lambda q=q, k=k, s=scale: sale_estimate(q, k, scale=s, threshold=0.008, backend="torch"),
        }
        times: dict[str, list[float]] = {n: [] for n in cands}
        for fn in cands.values():
            fn()  # warm-up
        for _ in range(args.runs):
            for name, fn in cands.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        base = statistics.median(times["sdpa"])
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"{L:>6} {name:<12} {med:>9.4f} {med / base:>7.3f}")


if __name__ == "__main__":
    main()
