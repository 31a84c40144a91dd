"""Decode speed of eviction methods vs full attention, interleaved in one process (issue 11's acceptance).

Per repetition, full attention (the stock model and ``DynamicCache``) and every method run in turn, the order
reversed every other repetition: prefill the prompt (untimed), then ``--steps`` greedy decode steps, each timed
in wall-clock and in process CPU time (CPU time is robust to other processes on a shared machine; with one
thread it is the work the step did). Reported per method: median seconds per step over the steps of each
repetition, the speedup ``full / method`` of each repetition (the spread over repetitions), and the KV bytes
held at the end (``report()``, spare slots included) over a full cache's.

    OMP_NUM_THREADS=1 python benchmarks/decode_eviction.py --length 2048 --batch 1 --threads 1 \\
        --method "streaming(budget=0.25)" --method "h2o(budget=0.25)" --out runs/decode_eviction_2k.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from kvaccel.compare import input_device, prompt_ids
from kvaccel.evals.loop import FULL, cache_kwarg, kv_bytes, method, new_cache
from kvaccel.models import load_model


def decode_run(model, ids: torch.Tensor, steps: int, patched: bool) -> dict:
    """Prefill ``ids`` (untimed), then ``steps`` greedy decode steps; per-step wall and CPU seconds."""
    kw = cache_kwarg(model)
    with torch.inference_mode():
        cache = new_cache(model, patched)
        out = model(ids, **{kw: cache}, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        wall, cpu = [], []
        for _ in range(steps):
            w0, c0 = time.perf_counter(), time.process_time()
            out = model(nxt, **{kw: cache}, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
        held, full = kv_bytes(model, cache, patched)
    return {"wall": statistics.median(wall), "cpu": statistics.median(cpu), "kv_ratio": held / full if full else 1.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", action="append", required=True, help="method spec; repeat for several")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model()
    ids = prompt_ids(tok, args.length, input_device(model)).repeat(args.batch, 1)
    specs = [FULL] + args.method
    runs: dict[str, list[dict]] = {s: [] for s in specs}
    for rep in range(args.repeats):
        for spec in specs if rep % 2 == 0 else specs[::-1]:
            with method(model, spec) as patched:
                runs[spec].append(decode_run(model, ids, args.steps, patched))
            r = runs[spec][-1]
            print(f"rep {rep} {spec:40s} wall {r['wall'] * 1e3:7.1f} ms  cpu {r['cpu'] * 1e3:7.1f} ms", flush=True)
    rows = []
    for spec in specs:
        rs = runs[spec]
        row = {"method": spec, "length": args.length, "batch": args.batch, "steps": args.steps,
               "threads": args.threads, "kv_ratio": rs[-1]["kv_ratio"]}
        for clock in ("wall", "cpu"):
            row[f"{clock}_s"] = statistics.median(r[clock] for r in rs)
            ratios = [f[clock] / r[clock] for f, r in zip(runs[FULL], rs, strict=True)]
            row[f"{clock}_speedup"] = statistics.median(ratios)
            row[f"{clock}_speedup_min"], row[f"{clock}_speedup_max"] = min(ratios), max(ratios)
        rows.append(row)
    print(f"\n{args.length} tokens x batch {args.batch}, {args.steps} steps, {args.repeats} repetitions, "
          f"{args.threads} thread(s); speedup = full / method per repetition: median [min, max]")
    print("| method | KV bytes / full | ms/step (wall) | speedup (wall) | ms/step (CPU) | speedup (CPU) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['kv_ratio']:.3f} | {r['wall_s'] * 1e3:.1f} | {r['wall_speedup']:.2f}x "
              f"[{r['wall_speedup_min']:.2f}, {r['wall_speedup_max']:.2f}] | {r['cpu_s'] * 1e3:.1f} | "
              f"{r['cpu_speedup']:.2f}x [{r['cpu_speedup_min']:.2f}, {r['cpu_speedup_max']:.2f}] |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
