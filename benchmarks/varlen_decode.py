"""Decode step time of AdaKV's packed per-head layout (varlen) vs its padded layout vs full attention.

On the default model, for each prompt length: one prefill per mode (stock transformers full attention with a
DynamicCache; ``adakv(budget, layout='varlen')``; ``adakv(budget, layout='padded')``), then ``--repeats`` rounds of
``--decode-tokens`` greedy decode steps from a copy of the post-prefill cache, the modes interleaved in a rotating
order within each round. Reports the median step time (and spread), tokens/s relative to full, the KV bytes held
(``report()``) and, per mode, the attention op alone on one layer's cache (``--op-layer``).

    OMP_NUM_THREADS=1 python benchmarks/varlen_decode.py --lengths 2048 4096 --budget 0.25 --repeats 3 \\
        --decode-tokens 48 --json runs/varlen-bench.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch
from transformers import DynamicCache

import kvaccel
from kvaccel.compare import prompt_ids
from kvaccel.kernels.decode_attention import decode_attention
from kvaccel.kernels.varlen_decode_attention import varlen_decode_attention
from kvaccel.varlen_cache import VarlenLayer

MODES = ("full", "varlen", "padded")


def prefill(model, ids: torch.Tensor, mode: str, budget: float):
    """Post-prefill ``(cache, first token, kv bytes, kv ratio)`` of one mode (the model is left unpatched)."""
    if mode != "full":
        kvaccel.patch(model, f"adakv(budget={budget}, layout='{mode}')")
    cache = DynamicCache(config=model.config) if mode == "full" else kvaccel.KVAccelCache(model)
    with torch.inference_mode():
        out = model(ids, cache=cache, use_cache=True, logits_to_keep=1)
    if mode == "full":
        nbytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
        ratio = 1.0
    else:
        rep = kvaccel.report(model)
        nbytes, ratio = rep["kv_bytes"], rep["kv_ratio"]
        kvaccel.unpatch(model)
    return cache, out.logits[:, -1:].argmax(-1), nbytes, ratio


def decode_step_s(model, cache, tok: torch.Tensor, mode: str, budget: float, steps: int) -> float:
    """Mean seconds per greedy decode step over ``steps`` steps from ``cache`` (consumed)."""
    if mode != "full":
        kvaccel.patch(model, f"adakv(budget={budget}, layout='{mode}')")
    try:
        with torch.inference_mode():
            tok = model(tok, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)  # warm step
            t0 = time.perf_counter()
            for _ in range(steps):
                tok = model(tok, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            return (time.perf_counter() - t0) / steps
    finally:
        if mode != "full":
            kvaccel.unpatch(model)


def op_time_us(layer, q: torch.Tensor, scale: float, iters: int = 200) -> float:
    """Microseconds of the decode attention op alone over one layer's cache (what the mode's decode path runs)."""
    if isinstance(layer, VarlenLayer):
        def run():
            return varlen_decode_attention(q, layer.key_buffer, layer.value_buffer, layer.seg_start, layer.seg_len,
                                           scale=scale, max_len=layer.max_len)
    elif getattr(layer, "valid", None) is not None:
        def run():
            return decode_attention(q, layer.keys, layer.values, scale=scale, valid=layer.valid)
    else:  # full attention: SDPA over every token (GQA without repeating K/V)
        def run():
            return torch.nn.functional.scaled_dot_product_attention(q, layer.keys, layer.values, scale=scale,
                                                                    enable_gqa=True)
    with torch.inference_mode():
        run()
        t0 = time.perf_counter()
        for _ in range(iters):
            run()
    return (time.perf_counter() - t0) / iters * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=48)
    ap.add_argument("--op-layer", type=int, default=10, help="layer whose cache the op-alone timing reads")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    model, tok = kvaccel.load_model()
    cfg = model.config
    scale = (cfg.hidden_size // cfg.num_attention_heads) ** -0.5
    rows = []
    for length in args.lengths:
        ids = prompt_ids(tok, length).repeat(args.batch, 1)
        state = {m: prefill(model, ids, m, args.budget) for m in MODES}
        steps = {m: [] for m in MODES}
        for r in range(args.repeats):
            order = MODES[r % 3:] + MODES[: r % 3]  # rotate who goes first
            for m in order:
                cache, first, _, _ = state[m]
                steps[m].append(decode_step_s(model, copy.deepcopy(cache), first, m, args.budget, args.decode_tokens))
        q = torch.randn(args.batch, cfg.num_attention_heads, 1, cfg.hidden_size // cfg.num_attention_heads,
                        dtype=model.dtype)
        ops = {}
        for _ in range(2):  # interleaved twice, the second round kept
            for m in MODES:
                ops[m] = op_time_us(state[m][0].layers[args.op_layer], q, scale)
        full_s = statistics.median(steps["full"])
        for m in MODES:
            med = statistics.median(steps[m])
            layer = state[m][0].layers[args.op_layer]
            row = dict(
                length=length, batch=args.batch, budget=args.budget, mode=m, step_ms=med * 1e3,
                step_ms_all=[s * 1e3 for s in steps[m]], speed_vs_full=full_s / med, kv_bytes=state[m][2],
                kv_ratio=state[m][3], op_us=ops[m],
                op_layer_slots=(layer.total_len + layer.slack_tokens if isinstance(layer, VarlenLayer)
                                else layer.keys.shape[0] * layer.keys.shape[1] * layer.keys.shape[2]),
            )
            rows.append(row)
            print(f"{length:>5} b{args.batch} {m:>6}: step {med * 1e3:7.1f} ms "
                  f"(spread {min(steps[m]) * 1e3:.1f}-{max(steps[m]) * 1e3:.1f})  x{full_s / med:.2f} of full  "
                  f"kv {state[m][2] / 2**20:6.2f} MiB (ratio {state[m][3]:.3f})  op L{args.op_layer} {ops[m]:6.0f} us  "
                  f"slots {row['op_layer_slots']}", flush=True)
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; torch threads {torch.get_num_threads()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "loadavg": load, "threads": torch.get_num_threads(), "args": vars(args)}, f,
                      indent=1)


if __name__ == "__main__":
    main()
