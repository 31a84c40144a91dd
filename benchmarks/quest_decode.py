"""Quest decode step vs stock, interleaved step by step in one process, and top-1 agreement under teacher forcing.

Two copies of the model: one stock (``DynamicCache``), one patched with each ``--method``. Each prefills the same
prompt (untimed); then, for ``--steps`` steps, the stock model's greedy token is fed to every model (teacher
forcing), the models taking turns at every step (order rotated each step) so machine noise hits them alike. Reported
per method: median wall ms per step, the per-step ratio ``stock / method`` (median [p10, p90]), the fraction of steps
whose argmax equals stock's (top-1 agreement; the missed steps listed with stock's top-2 logit margin there), the
first step's wall ms (it includes compiling or loading the CPU kernels: run with a fresh ``NUMBA_CACHE_DIR`` for a
cold start), Quest's attended tokens and metadata bytes, and the load average at the start and end (the machine is
shared: wall clock is noisy under load).

    python benchmarks/quest_decode.py --length 8192 --steps 64 --method "quest(budget=0.125)"
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

import kvaccel
from kvaccel.cache import KVAccelCache, cache_kwarg
from kvaccel.compare import prompt_ids
from kvaccel.models import load_model


def _quantile(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", action="append", required=True, help="decode method spec; repeat for several")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's default)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    load0 = os.getloadavg()
    stock, tok = load_model()
    ids = prompt_ids(tok, args.length)
    kw = cache_kwarg(stock)
    models = {"stock": stock}
    for spec in args.method:
        m, _ = load_model()
        kvaccel.patch(m, spec)
        models[spec] = m
    caches, nxt, wall, agree = {}, {}, {n: [] for n in models}, {n: 0 for n in models}
    missed = {n: [] for n in models}  # (step, stock's top-2 logit margin) where the argmax differs from stock's
    with torch.inference_mode():
        for name, m in models.items():  # prefill (untimed)
            caches[name] = KVAccelCache(m) if name != "stock" else None
            out = m(ids, **({kw: caches[name]} if caches[name] is not None else {}), use_cache=True, logits_to_keep=1)
            if caches[name] is None:
                caches[name] = out.cache if hasattr(out, "cache") else out.past_key_values
            nxt[name] = out.logits[:, -1].argmax(-1, keepdim=True)
        forced = nxt["stock"]
        names = list(models)
        for step in range(args.steps):
            order = names[step % len(names):] + names[: step % len(names)]
            for name in order:
                w0 = time.perf_counter()
                out = models[name](forced, **{kw: caches[name]}, use_cache=True, logits_to_keep=1)
                wall[name].append(time.perf_counter() - w0)
                nxt[name] = out.logits[:, -1].argmax(-1, keepdim=True)
                if name == "stock":
                    top2 = out.logits[:, -1].float().topk(2, dim=-1).values
                    margin = float((top2[:, 0] - top2[:, 1]).min())
            for name in names:
                same = torch.equal(nxt[name], nxt["stock"])
                agree[name] += int(same)
                if not same:
                    missed[name].append((step, round(margin, 4)))
            forced = nxt["stock"]
    rows = []
    for name in names:
        ratio = [s / w for s, w in zip(wall["stock"], wall[name], strict=True)]
        row = {"method": name, "ms_per_step": 1e3 * statistics.median(wall[name]),
               "speedup_median": statistics.median(ratio), "speedup_p10": _quantile(ratio, 0.1),
               "speedup_p90": _quantile(ratio, 0.9), "top1_agreement": agree[name] / args.steps,
               "first_step_ms": 1e3 * wall[name][0], "missed_steps_and_stock_margin": missed[name]}
        if name != "stock":
            rep = kvaccel.report(models[name])
            stats = models[name]._kvaccel_state.layer_stats
            att = [s["quest_attended_tokens"] for s in stats if s.get("quest_attended_tokens") is not None]
            row["attended_tokens_mean"] = statistics.mean(att) if att else None
            row["metadata_bytes"] = sum(s.get("quest_metadata_bytes") or 0 for s in stats)
            row["kv_bytes"] = rep["kv_bytes"]
        rows.append(row)
    result = {"length": args.length, "steps": args.steps, "threads": torch.get_num_threads(),
              "load_start": load0, "load_end": os.getloadavg(), "rows": rows}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
