"""Speed check (CPU): SALE's score estimate vs dense causal SDPA of the same layer, and the GEMM options behind it.

    OMP_NUM_THREADS=1 python benchmarks/sale_estimate.py [--L 4096 8192] [--runs 3]

Shape of one default-model layer: B=1, H_q=9, H_kv=3, D=64, fp32. Rows (all timed interleaved per run, median of
``--runs``, ratio to SDPA measured in the same run; < 1 = cheaper than dense attention):

- ``sdpa``: ``scaled_dot_product_attention(is_causal=True, enable_gqa=True)`` — dense prefill attention.
- ``qk fp32 / bf16 / int8``: the causal ``Q K^T`` alone (GQA heads stacked, 512-row chunks), the estimator options.
- ``prepare``: centring, INT4 quantization and the exact sink + local statistics (``sale_prepare``).
- ``estimate``: the whole ``sale_estimate`` (PyTorch path, τ = 0.008), prepare included.

``--quality``: q/k of a few layers of the default model on a prose prompt (``--quality-length`` tokens); per τ,
the density of SALE's selection (CPU path, INT4) and its recall of the blocks an exact-float oracle keeps (same
definition with 8-bit values, ``sale_estimate_reference(bits=8)``), and the agreement of the CPU path with the
exact-integer INT4 reference.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from kvaccel.kernels.block_sparse_attention import causal_block_mask
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


def quality(length: int, layers: list[int], taus: list[float]) -> None:
    from dataclasses import dataclass

    import kvaccel
    from kvaccel.compare import prompt_ids
    from kvaccel.kernels.sale_estimate import sale_estimate_reference
    from kvaccel.patches.attention import dense_prefill
    from kvaccel.patches.prefill.base import PrefillMethod

    @dataclass
    class Capture(PrefillMethod):
        name = "capture"

        def attention(self, ctx):
            if ctx.layer_idx in layers:
                captured[ctx.layer_idx] = (ctx.query.clone(), ctx.key.clone(), ctx.scaling)
            return dense_prefill(ctx)

    captured: dict = {}
    model, tok = kvaccel.load_model()
    kvaccel.patch(model, Capture())
    with torch.inference_mode():
        model(prompt_ids(tok, length), use_cache=False, logits_to_keep=1)
    kvaccel.unpatch(model)
    print(f"{'layer':>5} {'tau':>8} {'density':>8} {'oracle density':>14} {'recall':>7} {'agree int4 ref':>14}")
    for li in layers:
        q, k, scale = captured[li]
        for tau in taus:
            keep = sale_estimate(q, k, scale=scale, threshold=tau, backend="torch")
            ref = torch.cat([sale_estimate_reference(q[:, h : h + 1], k[:, h // 3 : h // 3 + 1], scale=scale,
                                                     threshold=tau)[0] for h in range(q.shape[1])], 1)
            oracle = torch.cat([sale_estimate_reference(q[:, h : h + 1], k[:, h // 3 : h // 3 + 1], scale=scale,
                                                        threshold=tau, bits=8)[0] for h in range(q.shape[1])], 1)
            causal = causal_block_mask(q.shape[2], 64, 32)
            n = int(causal.sum()) * q.shape[1]
            recall = float((keep & oracle).sum() / oracle.sum().clamp(min=1))
            agree = float(((keep == ref) & causal).sum() / n)
            print(f"{li:>5} {tau:>8.4g} {float(keep.sum()) / n:>8.3f} {float(oracle.sum()) / n:>14.3f} "
                  f"{recall:>7.3f} {agree:>14.4f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--L", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quality", action="store_true", help="selection quality on the default model instead")
    ap.add_argument("--quality-length", type=int, default=2048)
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 10, 20, 29])
    ap.add_argument("--taus", type=float, nargs="+", default=[0.008, 0.002, 0.0005])
    args = ap.parse_args()
    if args.quality:
        quality(args.quality_length, args.layers, args.taus)
        return
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
