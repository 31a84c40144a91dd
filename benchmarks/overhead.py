"""Overhead of kvaccel's machinery: ``kvaccel.patch(model)`` (no methods) vs stock transformers (sdpa).

Prefill of 2k and 8k-token prompts and decode after them, on the default model, stock and patched interleaved in
one process (median of --repeats). Target: overhead <= 3%.

    python benchmarks/overhead.py --lengths 2048 8192 --repeats 3 --decode-tokens 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import DynamicCache

import kvaccel
from kvaccel.compare import prompt_ids


def timed_run(model, ids, decode_tokens: int, patched: bool) -> tuple[float, float]:
    cache = kvaccel.KVAccelCache(model) if patched else DynamicCache(config=model.config)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(ids, cache=cache, use_cache=True)
        t1 = time.perf_counter()
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(decode_tokens):
            tok = model(tok, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) / decode_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    model, tok = kvaccel.load_model()
    timed_run(model, prompt_ids(tok, 128), 4, patched=False)  # warm-up
    rows = []
    for length in args.lengths:
        ids = prompt_ids(tok, length)
        times = {False: ([], []), True: ([], [])}
        for r in range(args.repeats):
            for patched in ((False, True) if r % 2 == 0 else (True, False)):  # alternate order
                if patched:
                    kvaccel.patch(model)
                p, d = timed_run(model, ids, args.decode_tokens, patched)
                if patched:
                    kvaccel.unpatch(model)
                times[patched][0].append(p)
                times[patched][1].append(d)
        sp, pp = statistics.median(times[False][0]), statistics.median(times[True][0])
        sd, pd = statistics.median(times[False][1]), statistics.median(times[True][1])
        rows.append(dict(length=length, stock_prefill_s=sp, patched_prefill_s=pp, prefill_overhead=pp / sp - 1,
                         stock_decode_ms=sd * 1e3, patched_decode_ms=pd * 1e3, decode_overhead=pd / sd - 1))
    print(f"{'length':>7} {'stock prefill s':>16} {'patched prefill s':>18} {'overhead':>9} "
          f"{'stock decode ms':>16} {'patched decode ms':>18} {'overhead':>9}")
    for r in rows:
        print(f"{r['length']:>7} {r['stock_prefill_s']:>16.3f} {r['patched_prefill_s']:>18.3f} "
              f"{r['prefill_overhead']:>+9.1%} {r['stock_decode_ms']:>16.1f} {r['patched_decode_ms']:>18.1f} "
              f"{r['decode_overhead']:>+9.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
