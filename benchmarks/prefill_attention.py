"""Sparse prefill methods on real Q/K/V: time (estimation included) vs SDPA, and output error, per layer.

Captures the post-RoPE queries, keys and values of every layer of a model (default: the embedded SmolLM2-135M) on a
natural-text prompt (``pydoc_data.topics`` prose), then for each layer times, interleaved in one process:
SDPA causal attention (the dense baseline) and each method's ``select`` + block-sparse kernel. Reports per method the
summed time over layers, the speedup vs SDPA, the split estimation / attention, the density of computed tiles and the
relative error ``||o - o_dense|| / ||o_dense||`` (mean and max over layers). Prints a table, writes JSON.

    python benchmarks/prefill_attention.py --length 8192 --repeats 3 \
        --method a_shape --method vertical_slash --method xattention --method flexprefill --method minference \
        --method pbs --method sale --method seer --out runs/prefill_attention.json

``minference`` reads the model's searched head patterns (``kvaccel calibrate minference``; shipped for the default
model); a method that cannot bind to the model (no such file) stops the run with its error before any timing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


class _Captured(Exception):
    """Raised after the last wanted layer: the rest of the forward is not needed."""


def capture_qkv(model, ids: torch.Tensor, keep: list[int] | None = None
                ) -> tuple[list[tuple], tuple[torch.Tensor, torch.Tensor] | None]:
    """(q, k, v, scale) of the layers ``keep`` (default: all) for one dense prefill of ``ids`` (through a capturing
    prefill method; the forward stops after the last of them), and the RoPE ``(cos, sin)`` tables (SeerAttention's
    gate reads pre-RoPE q/k)."""
    import kvaccel
    from kvaccel.patches.attention import dense_prefill, rope_tables
    from kvaccel.patches.prefill.base import PrefillMethod

    captured: dict[int, tuple] = {}
    rope: list = []
    wanted = set(range(model.config.get_text_config().num_hidden_layers) if keep is None else keep)

    class Capture(PrefillMethod):
        name = "capture"

        def attention(self, ctx):
            if ctx.layer_idx in wanted:
                captured[ctx.layer_idx] = (ctx.query.clone(), ctx.key.clone(), ctx.value.clone(), ctx.scaling)
            if not rope and rope_tables(ctx) is not None:
                rope.extend(t.clone() for t in rope_tables(ctx))
            if ctx.layer_idx == max(wanted):
                raise _Captured
            return dense_prefill(ctx)

    kvaccel.patch(model, Capture())
    try:
        with torch.inference_mode():
            model(ids, use_cache=False, logits_to_keep=1)
    except _Captured:
        pass
    finally:
        kvaccel.unpatch(model)
    return [captured[i] for i in sorted(captured)], (tuple(rope) if rope else None)


CLOCK = time.perf_counter  # --clock cpu: time.process_time (1 thread: the time the process ran, not waited)


def _timed(fn, *args):
    t0 = CLOCK()
    out = fn(*args)
    return out, CLOCK() - t0


def _sdpa(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)


def _method_attention(m, q, k, v, scale, li, stats, rope):
    """One layer through a method as the patched model runs it (SeerAttention's gate also reads pre-RoPE q/k, which
    ``Seer.select_inputs`` un-rotates from the forward's RoPE tables; here from the captured ones)."""
    extra = ()
    if getattr(m, "mode", None) == "gate":
        from kvaccel.patches.prefill.seer_gate import unrotate

        t0 = CLOCK()
        extra = (unrotate(q, *rope), unrotate(k, *rope))
        stats["prefill_estimate_s"] += CLOCK() - t0
    return m.sparse_attention(q, k, v, scale, li, stats, *extra)


def run(model, layers, specs: list[str], repeats: int, rope=None, layer_ids: list[int] | None = None) -> list[dict]:
    """``layers[i]`` is model layer ``layer_ids[i]`` (per-layer thresholds and gates are indexed by it)."""
    layer_ids = list(range(len(layers))) if layer_ids is None else layer_ids
    from kvaccel.config import parse_spec

    methods = []
    for spec in specs:
        (m,) = parse_spec(spec)
        m.check_dependencies()
        m.bind(model)
        methods.append((spec, m))
    dense_s = [0.0] * len(layers)
    per = {spec: {"time": [0.0] * len(layers), "est": [0.0] * len(layers), "att": [0.0] * len(layers),
                  "err": [0.0] * len(layers), "tiles": 0, "causal": 0} for spec, _ in methods}
    with torch.inference_mode():
        for li, (q, k, v, scale) in enumerate(layers):
            ref = None
            times = {"sdpa": []} | {s: [] for s, _ in methods}
            for rep in range(repeats):
                order = [("sdpa", None)] + methods
                order = order if rep % 2 == 0 else order[::-1]
                for spec, m in order:
                    if m is None:
                        out, t = _timed(_sdpa, q, k, v, scale)
                        ref = out
                        times["sdpa"].append(t)
                    else:
                        stats = {"prefill_estimate_s": 0.0, "prefill_attention_s": 0.0, "_tiles": 0, "_causal_tiles": 0}
                        out, t = _timed(_method_attention, m, q, k, v, scale, layer_ids[li], stats, rope)
                        times[spec].append((t, stats, out))
            dense_s[li] = statistics.median(times["sdpa"])
            for spec, _ in methods:
                runs = sorted(times[spec], key=lambda r: r[0])
                t, stats, out = runs[len(runs) // 2]
                d = per[spec]
                d["time"][li], d["est"][li], d["att"][li] = t, stats["prefill_estimate_s"], stats["prefill_attention_s"]
                o = out.transpose(1, 2).float()
                d["err"][li] = float((o - ref.float()).norm() / ref.float().norm())
                d["tiles"] += stats["_tiles"]
                d["causal"] += stats["_causal_tiles"]
            print(f"layer {layer_ids[li]:2d}: sdpa {dense_s[li] * 1e3:7.1f} ms  " + "  ".join(
                f"{s} {per[s]['time'][li] * 1e3:7.1f} ms err {per[s]['err'][li]:.4f}" for s, _ in methods), flush=True)
    total_dense = sum(dense_s)
    rows = [{"method": "sdpa", "time_s": total_dense, "speedup": 1.0, "estimate_s": 0.0, "attention_s": total_dense,
             "density": 1.0, "rel_err_mean": 0.0, "rel_err_max": 0.0}]
    for spec, _ in methods:
        d = per[spec]
        tot = sum(d["time"])
        rows.append({
            "method": spec, "time_s": tot, "speedup": total_dense / tot, "estimate_s": sum(d["est"]),
            "attention_s": sum(d["att"]), "density": d["tiles"] / max(1, d["causal"]),
            "rel_err_mean": statistics.mean(d["err"]), "rel_err_max": max(d["err"]),
            "per_layer_rel_err": d["err"], "per_layer_time_s": d["time"],
        })
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None,
                   help="local path, hub id or fetched name (qwen2.5-coder-1.5b); default: the embedded SmolLM2-135M")
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--method", action="append", default=None, help="method spec (repeatable)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=str, default="all", help="'all' or comma-separated layer indices")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", help="model dtype (the captured q/k/v keep it)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time; cpu: process CPU time (only with --threads 1: on a shared machine it "
                        "leaves out the time the process waited for a core)")
    p.add_argument("--out", default="runs/prefill_attention.json")
    args = p.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        p.error(f"--clock cpu needs --threads 1 (got --threads {args.threads}): CPU time sums the threads")
    torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        global CLOCK
        from kvaccel.patches.prefill import base

        CLOCK = base.clock = time.process_time

    import kvaccel
    from kvaccel.compare import prompt_ids

    model, tok = kvaccel.load_model(args.model, dtype=args.dtype)
    ids = prompt_ids(tok, args.length)
    n_layers = model.config.get_text_config().num_hidden_layers
    keep = list(range(n_layers)) if args.layers == "all" else sorted({int(x) for x in args.layers.split(",")})
    if not all(0 <= i < n_layers for i in keep):
        p.error(f"--layers {args.layers}: the model has layers 0..{n_layers - 1}")
    layers, rope = capture_qkv(model, ids, keep)
    specs = args.method or ["a_shape", "vertical_slash", "xattention", "flexprefill", "minference", "pbs", "sale",
                            "seer"]
    rows = run(model, layers, specs, args.repeats, rope, keep)
    print(f"\nL={args.length}, {len(layers)} layers, {args.threads} threads, {args.clock} clock, median of "
          f"{args.repeats}, load average {os.getloadavg()[0]:.2f}")
    print(f"{'method':40s} {'time s':>8s} {'speedup':>8s} {'est s':>7s} {'attn s':>7s} {'density':>8s} "
          f"{'err mean':>9s} {'err max':>8s}")
    for r in rows:
        print(f"{r['method']:40s} {r['time_s']:8.3f} {r['speedup']:8.2f} {r['estimate_s']:7.3f} "
              f"{r['attention_s']:7.3f} {r['density']:8.3f} {r['rel_err_mean']:9.4f} {r['rel_err_max']:8.4f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"length": args.length, "threads": args.threads, "clock": args.clock,
                               "load_average": os.getloadavg(), "repeats": args.repeats,
                               "argv": sys.argv[1:], "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
