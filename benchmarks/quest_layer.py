"""One layer's Quest decode step on CPU, side by side: the compiled kernels, the PyTorch ops they replace, and dense.

A cache layer of the default model's shape (``--kv-heads`` 3, ``--groups`` 3 query heads each, head dim 64) holds
``--length`` random keys and values; per repetition one token is appended and three calls are timed in rotated
order (so machine noise hits them alike): ``Quest.attention`` on the compiled CPU path
(:mod:`kvaccel.kernels.page_bounds_numba`), the same call with the compiled kernels switched off (the PyTorch
composition: page scores, top-k, slot list, gathered pages), and stock dense attention (SDPA over every key). Each
Quest call includes folding the new token into its page. Reported: median µs per call, ratio to dense, load average.

    python benchmarks/quest_layer.py --length 8192 --threads 1 --gqa head --gqa group
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from kvaccel.cache import KVAccelLayer
from kvaccel.kernels import page_bounds
from kvaccel.patches.attention import AttentionContext, PatchState
from kvaccel.patches.decode.quest import Quest


def _layer_step(gqa: str, args: argparse.Namespace, keys: torch.Tensor, values: torch.Tensor,
                g: torch.Generator) -> list[dict]:
    """Median µs per call of the three paths for one ``gqa`` mode."""
    Hkv, G, D, T = args.kv_heads, args.groups, args.head_dim, args.length
    method = Quest(budget=args.budget, dense_layers=0, gqa=gqa)
    module = torch.nn.Module()
    module.layer_idx, module.num_key_value_groups = 0, G
    state = PatchState(methods={"decode": method}, num_layers=1, original_attn="sdpa")
    compiled = page_bounds._numba_kernels
    layers = {}
    for path in ("compiled", "pytorch"):
        layer = KVAccelLayer()
        layer.update(keys.clone(), values.clone())
        method.after_prefill(AttentionContext(module, state, layer, torch.zeros(1, Hkv * G, T, D), layer.keys,
                                              layer.values, None, D**-0.5, "prefill", {}))
        layers[path] = layer

    def quest(path: str, q: torch.Tensor) -> None:
        layer = layers[path]
        page_bounds._numba_kernels = compiled if path == "compiled" else (lambda: None)
        try:
            method.attention(AttentionContext(module, state, layer, q, layer.keys, layer.values, None, D**-0.5,
                                              "decode", {}))
        finally:
            page_bounds._numba_kernels = compiled

    def dense(q: torch.Tensor) -> None:
        layer = layers["compiled"]
        F.scaled_dot_product_attention(q, layer.keys, layer.values, scale=D**-0.5, enable_gqa=True)

    calls = {"compiled": lambda q: quest("compiled", q), "pytorch": lambda q: quest("pytorch", q), "dense": dense}
    wall = {n: [] for n in calls}
    names = list(calls)
    for rep in range(args.reps + 5):
        k1, v1 = torch.randn(1, Hkv, 1, D, generator=g), torch.randn(1, Hkv, 1, D, generator=g)
        for layer in layers.values():
            layer.update(k1, v1)
        q = torch.randn(1, Hkv * G, 1, D, generator=g)
        for name in names[rep % 3 :] + names[: rep % 3]:
            t0 = time.perf_counter()
            calls[name](q)
            if rep >= 5:  # the first calls compile or load the kernels
                wall[name].append(time.perf_counter() - t0)
    base = statistics.median(wall["dense"])
    return [{"gqa": gqa, "path": n, "us_per_call": 1e6 * statistics.median(wall[n]),
             "vs_dense": base / statistics.median(wall[n])} for n in names]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--budget", type=float, default=0.125)
    ap.add_argument("--gqa", action="append", choices=["head", "group"], help="repeat for both (default: head)")
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--groups", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's default)")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    shape = (1, args.kv_heads, args.length, args.head_dim)
    keys, values = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    load0 = os.getloadavg()
    with torch.inference_mode():
        rows = [r for gqa in args.gqa or ["head"] for r in _layer_step(gqa, args, keys, values, g)]
    result = {"length": args.length, "budget": args.budget, "threads": torch.get_num_threads(), "reps": args.reps,
              "load_start": load0, "load_end": os.getloadavg(), "rows": rows}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
