"""One layer's Keyformer decode-step scoring (``noisy_scores``) at the process's thread count vs inside
``base.one_thread``, interleaved in one process (a matmul between calls stands for the model's work).

    python benchmarks/decode_scoring_threads.py            # PyTorch's default thread count
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from kvaccel.patches.evict.base import one_thread
from kvaccel.patches.evict.keyformer import noisy_scores


def main(calls: int = 300) -> None:
    w, x = torch.randn(576, 1536), torch.randn(1, 576)
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()}")
    for B, T in [(1, 528), (2, 840)]:  # 2k x budget 0.25 (+ slack), 4k x batch 2 x budget 0.2
        q, k = torch.randn(B, 9, 1, 64), torch.randn(B, 3, T, 64)
        res: dict[bool, list[float]] = {False: [], True: []}
        for rep in range(calls):
            for serial in (False, True) if rep % 2 == 0 else (True, False):
                g = torch.Generator().manual_seed(rep)
                t = time.perf_counter()
                with one_thread(serial):
                    noisy_scores(q, k, scale=0.125, tau=1.5, generator=g)
                res[serial].append(time.perf_counter() - t)
                x @ w
        b, a = sorted(res[False]), sorted(res[True])
        p90 = int(0.9 * calls)
        print(f"B={B} T={T}: ms per call, all threads -> one thread: mean {statistics.mean(b) * 1e3:.3f} -> "
              f"{statistics.mean(a) * 1e3:.3f}, median {statistics.median(b) * 1e3:.3f} -> "
              f"{statistics.median(a) * 1e3:.3f}, p90 {b[p90] * 1e3:.3f} -> {a[p90] * 1e3:.3f}")
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
