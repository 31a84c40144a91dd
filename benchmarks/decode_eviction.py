"""Decode speed of eviction methods vs full attention as users see it: wall clock at the default thread count.

Each measurement runs in a fresh Python process (the model loaded anew, nothing left from another run). In it,
full attention (the stock model and ``DynamicCache``) and every method run in turn, the order reversed every
other repetition: prefill the prompt (untimed), then ``--steps`` greedy decode steps, each timed in wall clock
and in process CPU time. Before the repetitions every spec runs once as a warm-up (``--warmup-steps`` steps) that
is excluded from the speeds; its prefill and first decode step are reported as the first-call cost.

Headline: wall clock at the machine's default thread count (``--threads`` unset: PyTorch's default). Second
column (``--cpu1``, on by default): a second fresh process at 1 thread, reporting process CPU time, which other
processes on a shared machine disturb less. Reported per method: median ms per step over the steps of each
repetition, the speedup ``full / method`` of each repetition (median [min, max] over repetitions), the KV bytes
held at the end (``report()``, spare slots included) over a full cache's, and the load average at the start and
the end of each process (a loaded machine makes wall-clock figures unreliable: re-run on a quiet one).

    python benchmarks/decode_eviction.py --length 2048 --batch 1 \\
        --method "streaming(budget=0.25)" --method "keyformer(budget=0.25)" --out runs/decode_eviction_2k.json

``--plugin FILE`` runs a Python file first (e.g. one registering a variant of a method under another name, to
compare two implementations side by side in one run).
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from kvaccel.compare import input_device, prompt_ids
from kvaccel.evals.loop import FULL, cache_kwarg, kv_bytes, method, new_cache
from kvaccel.models import load_model


def decode_run(model, ids: torch.Tensor, steps: int, patched: bool) -> dict:
    """Prefill ``ids``, then ``steps`` greedy decode steps: per-step wall and CPU seconds (medians, and the first
    step), the prefill's wall seconds and the KV bytes held over a full cache's."""
    kw = cache_kwarg(model)
    with torch.inference_mode():
        cache = new_cache(model, patched)
        w0 = time.perf_counter()
        out = model(ids, **{kw: cache}, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        prefill = time.perf_counter() - w0
        wall, cpu = [], []
        for _ in range(steps):
            w0, c0 = time.perf_counter(), time.process_time()
            out = model(nxt, **{kw: cache}, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
        held, full = kv_bytes(model, cache, patched)
    return {"wall": statistics.median(wall), "cpu": statistics.median(cpu), "first_wall": wall[0],
            "prefill_wall": prefill, "kv_ratio": held / full if full else 1.0}


def measure(args: argparse.Namespace) -> dict:
    """One process's measurement (``args.threads`` threads): warm-up, then interleaved repetitions."""
    if args.plugin:
        runpy.run_path(str(args.plugin))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    model, tok = load_model()
    ids = prompt_ids(tok, args.length, input_device(model)).repeat(args.batch, 1)
    specs = [FULL] + args.method
    first = {}
    for spec in specs:  # warm-up: excluded from the speeds, its costs reported as the first call's
        with method(model, spec) as patched:
            first[spec] = decode_run(model, ids, args.warmup_steps, patched)
    runs: dict[str, list[dict]] = {s: [] for s in specs}
    for rep in range(args.repeats):
        for spec in specs if rep % 2 == 0 else specs[::-1]:
            with method(model, spec) as patched:
                runs[spec].append(decode_run(model, ids, args.steps, patched))
            r = runs[spec][-1]
            print(f"[{torch.get_num_threads()} thread(s)] rep {rep} {spec:40s} wall {r['wall'] * 1e3:7.1f} ms  "
                  f"cpu {r['cpu'] * 1e3:7.1f} ms", file=sys.stderr, flush=True)
    return {"threads": torch.get_num_threads(), "load_start": load0, "load_end": os.getloadavg(),
            "first": first, "runs": runs}


def speedups(runs: dict[str, list[dict]], spec: str, clock: str) -> list[float]:
    """``full / method`` per repetition for one clock."""
    return [f[clock] / r[clock] for f, r in zip(runs[FULL], runs[spec], strict=True)]


def child(args: argparse.Namespace, threads: int | None) -> dict:
    """Run ``measure`` in a fresh Python process (``threads=None``: the default thread count); its result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "child.json"
        cmd = [sys.executable, __file__, "--child-out", str(out), "--length", str(args.length), "--batch",
               str(args.batch), "--steps", str(args.steps), "--repeats", str(args.repeats), "--warmup-steps",
               str(args.warmup_steps)]
        cmd += [a for spec in args.method for a in ("--method", spec)]
        if threads is not None:
            cmd += ["--threads", str(threads)]
        if args.plugin:
            cmd += ["--plugin", str(args.plugin)]
        env = dict(os.environ)
        if threads is not None:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        subprocess.run(cmd, check=True, env=env)
        return json.loads(out.read_text())


def fmt_ratio(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f}x [{min(xs):.2f}, {max(xs):.2f}]"


def table(args: argparse.Namespace, wall: dict, cpu1: dict | None) -> list[dict]:
    """Print the markdown table; the rows as dicts."""
    specs = [FULL] + args.method
    rows = []
    for spec in specs:
        rs, first = wall["runs"][spec], wall["first"][spec]
        w = speedups(wall["runs"], spec, "wall")
        row = {"method": spec, "length": args.length, "batch": args.batch, "steps": args.steps,
               "repeats": args.repeats, "threads": wall["threads"], "kv_ratio": rs[-1]["kv_ratio"],
               "wall_s": statistics.median(r["wall"] for r in rs), "wall_speedup": statistics.median(w),
               "wall_speedups": w, "first_prefill_s": first["prefill_wall"], "first_step_s": first["first_wall"],
               "prefill_s": statistics.median(r["prefill_wall"] for r in rs)}
        if cpu1 is not None:
            c = speedups(cpu1["runs"], spec, "cpu")
            row.update(cpu1_s=statistics.median(r["cpu"] for r in cpu1["runs"][spec]),
                       cpu1_speedup=statistics.median(c), cpu1_speedups=c)
        rows.append(row)
    print(f"\n{args.length} tokens x batch {args.batch}, {args.steps} decode steps, {args.repeats} repetitions "
          f"after a {args.warmup_steps}-step warm-up; speedup = full / method per repetition: median [min, max]")
    for name, res in (("wall", wall), ("cpu1", cpu1)):
        if res is not None:
            print(f"{name} process: {res['threads']} thread(s), load average (1, 5, 15 min) at start "
                  f"{', '.join(f'{x:.1f}' for x in res['load_start'])}, at end "
                  f"{', '.join(f'{x:.1f}' for x in res['load_end'])}")
    head = f"| method | KV bytes / full | ms/step (wall, {wall['threads']} thr) | speedup (wall) |"
    head += " ms/step (CPU, 1 thr) | speedup (CPU, 1 thr) |" if cpu1 is not None else ""
    head += " first call: prefill s / first step ms | prefill s |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for r in rows:
        line = f"| {r['method']} | {r['kv_ratio']:.3f} | {r['wall_s'] * 1e3:.1f} | {fmt_ratio(r['wall_speedups'])} |"
        if cpu1 is not None:
            line += f" {r['cpu1_s'] * 1e3:.1f} | {fmt_ratio(r['cpu1_speedups'])} |"
        line += f" {r['first_prefill_s']:.2f} / {r['first_step_s'] * 1e3:.0f} | {r['prefill_s']:.2f} |"
        print(line)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", action="append", required=True, help="method spec; repeat for several")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup-steps", type=int, default=4, help="decode steps of each spec's warm-up run")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads of the headline (wall-clock) process; default: PyTorch's default")
    ap.add_argument("--cpu1", action=argparse.BooleanOptionalAction, default=True,
                    help="also run a 1-thread process and report its CPU time (default on)")
    ap.add_argument("--plugin", type=Path, default=None, help="Python file run first in each process")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    for name in ("length", "batch", "steps", "repeats", "warmup_steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} ({getattr(args, name)}) must be >= 1")
    if args.child_out is not None:
        args.child_out.write_text(json.dumps(measure(args)))
        return
    wall = child(args, args.threads)
    cpu1 = child(args, 1) if args.cpu1 else None
    rows = table(args, wall, cpu1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
