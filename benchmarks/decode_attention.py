"""Speed check (CPU): decode_attention's PyTorch path vs dense SDPA with K/V repeated to every query head.

    python benchmarks/decode_attention.py [--T 1024 4096 8192] [--runs 20]

Baseline ``sdpa dense``: ``scaled_dot_product_attention`` on K/V already repeated to ``H_q`` heads (an MHA cache of
the same T); ``sdpa+repeat``: the repeat done inside the timed call, as transformers' ``repeat_kv`` does.
All calls are interleaved per run; the table shows the median of ``--runs`` runs and the ratio to the dense
baseline measured in the same run (< 1 = faster). GB/s counts the K and V bytes that decode_attention reads.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kvaccel.kernels.decode_attention import decode_attention


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _candidates(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> dict[str, Callable[[], object]]:
    G = q.shape[1] // k.shape[1]
    k_rep, v_rep = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    return {
        "ours": lambda: decode_attention(q, k, v, scale=scale, backend="torch"),
        "ours_lse": lambda: decode_attention(q, k, v, scale=scale, backend="torch", return_lse=True),
        "dense": lambda: F.scaled_dot_product_attention(q, k_rep, v_rep, scale=scale),
        "repeat": lambda: F.scaled_dot_product_attention(
            q, k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1), scale=scale
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--T", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    B, Hq, Hkv, D = 4, 9, 3, 64
    scale = D**-0.5
    torch.manual_seed(0)
    print(
        f"B={B} H_q={Hq} H_kv={Hkv} D={D} fp32, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"median of {args.runs} interleaved runs"
    )
    header = (
        f"{'T':>6} | {'decode_attention':>16} | {'+lse (matmul)':>13} | {'sdpa dense':>10} | "
        f"{'sdpa+repeat':>11} | {'ratio':>5} | {'ratio +lse':>10} | {'GB/s':>5}"
    )
    print(header)
    print("-" * len(header))
    for T in args.T:
        q = torch.randn(B, Hq, 1, D)
        k = torch.randn(B, Hkv, T, D)
        v = torch.randn(B, Hkv, T, D)
        fns = _candidates(q, k, v, scale)
        torch.testing.assert_close(fns["ours"](), fns["dense"](), atol=1e-5, rtol=1e-4)
        for _ in range(args.warmup):
            for fn in fns.values():
                fn()
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(args.runs):
            for name, fn in fns.items():
                times[name].append(_time(fn))
        med = {name: statistics.median(ts) for name, ts in times.items()}
        gbs = (k.numel() + v.numel()) * k.element_size() / med["ours"] / 1e9
        print(
            f"{T:>6} | {med['ours'] * 1e3:>13.3f} ms | {med['ours_lse'] * 1e3:>10.3f} ms | "
            f"{med['dense'] * 1e3:>7.3f} ms | {med['repeat'] * 1e3:>8.3f} ms | "
            f"{med['ours'] / med['dense']:>5.2f} | {med['ours_lse'] / med['dense']:>10.2f} | {gbs:>5.1f}"
        )


if __name__ == "__main__":
    main()
