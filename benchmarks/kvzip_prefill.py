"""KVzip's prefill (prompt + reconstruction forwards + eviction) against a dense prefill, side by side in one process.

Default model, prose prompts (``kvaccel.compare.prompt_ids``), wall clock at the machine's default threads; stock
(sdpa, ``DynamicCache``) and ``kvzip`` prefills alternate, median of ``--repeats``. Also reported: the time spent
in the reconstruction scoring (``reconstruction_max_attention``) inside the kvzip prefill.

    python benchmarks/kvzip_prefill.py --lengths 1536 4096 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from transformers import DynamicCache

import kvaccel
import kvaccel.patches.evict.kvzip as kvzip_module
from kvaccel.compare import prompt_ids


def prefill(model, ids: torch.Tensor, patched: bool) -> float:
    cache = kvaccel.KVAccelCache(model) if patched else DynamicCache(config=model.config)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(ids, cache=cache, use_cache=True)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1536, 4096])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--method", default="kvzip(budget=0.25)")
    args = ap.parse_args()
    model, tok = kvaccel.load_model()
    scoring = [0.0]
    score = kvzip_module.reconstruction_max_attention

    def timed_score(*a, **kw):
        t0 = time.perf_counter()
        out = score(*a, **kw)
        scoring[0] += time.perf_counter() - t0
        return out

    kvzip_module.reconstruction_max_attention = timed_score
    prefill(model, prompt_ids(tok, 128), patched=False)  # warm-up
    print(f"{args.method}; torch threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f}", flush=True)
    print(f"{'length':>7} {'dense s':>8} {'kvzip s':>8} {'ratio':>6} {'scoring s':>10}  per-run ratios")
    for length in args.lengths:
        ids = prompt_ids(tok, length)
        times: dict[bool, list[float]] = {False: [], True: []}
        scored: list[float] = []
        for r in range(args.repeats):
            for patched in (False, True) if r % 2 == 0 else (True, False):  # alternate order
                if patched:
                    kvaccel.patch(model, args.method)
                    scoring[0] = 0.0
                times[patched].append(prefill(model, ids, patched))
                if patched:
                    kvaccel.unpatch(model)
                    scored.append(scoring[0])
        d, z = statistics.median(times[False]), statistics.median(times[True])
        runs = " ".join(f"{b / a:.2f}" for a, b in zip(times[False], times[True], strict=True))
        print(f"{length:>7} {d:>8.2f} {z:>8.2f} {z / d:>5.2f}x {statistics.median(scored):>10.2f}  {runs}", flush=True)


if __name__ == "__main__":
    main()
