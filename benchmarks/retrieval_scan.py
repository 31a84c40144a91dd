"""Retrieval's per-step top-k search at N host keys per row: exact scan (bfloat16 + float32 re-scoring, float32) vs
graph walk, cache-cold, on keys and queries captured from the default model.

Each of ``--layers-cold`` index copies (3 kv heads x N keys, captured layers alternating) is searched in turn, as 30
decoder layers are in a decode step, so the keys come from memory, not cache. Per layer-step (3 kv heads x 3 query
heads, top-``--k``): median milliseconds in process CPU time and recall against the float32 exact top-k, for
``AttentionIndex.scan_rows`` (what ``retrieval`` runs while a row holds <= ``exact_below`` keys) and
``search_grouped`` (the graph walk at ``--ef``, built from the chunk's prefill queries). ``--no-graph`` skips the
build (the graph only matters past ``exact_below``).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/retrieval_scan.py --keys 7500 16384 32000 \\
        --capture runs/retr-cap-1k.npz --length 1024
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from retrieval_index import load_or_capture, recall  # noqa: E402

from kvaccel.kernels.attention_index import AttentionIndex  # noqa: E402
from kvaccel.patches.decode.retrieval import BF16_MARGIN, _match_threads  # noqa: E402


def rows_of(cap: dict, layer: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first ``n`` keys / values per kv head and every query per query head of a captured layer."""
    q, k, v = cap[layer]  # (chunks, H, L, D)
    flat = [np.ascontiguousarray(t.transpose(1, 0, 2, 3).reshape(t.shape[1], -1, t.shape[3])) for t in (q, k, v)]
    if flat[1].shape[1] < n:
        raise ValueError(f"{n} keys asked, the capture holds {flat[1].shape[1]}: capture more --chunks")
    return flat[0], flat[1][:, :n], flat[2][:, :n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, nargs="+", default=[7500, 16384, 32000], help="host keys per row")
    ap.add_argument("--capture", default="runs/retr-cap-1k.npz", help="npz of captured q/k/v (made if missing)")
    ap.add_argument("--length", type=int, default=1024, help="tokens per captured chunk")
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 17])
    ap.add_argument("--layers-cold", type=int, default=30, help="index copies searched in turn (cache-cold keys)")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--ef", type=int, default=128)
    ap.add_argument("--queries", type=int, default=10, help="held-out last positions of the keys searched for")
    ap.add_argument("--no-graph", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    _match_threads()
    chunks = -(-(max(args.keys) + args.queries) // args.length)
    model = tok = None
    if not os.path.exists(args.capture):
        import kvaccel

        model, tok = kvaccel.load_model()
    cap = load_or_capture(model, tok, args.capture, args.length, chunks, args.layers)
    print(f"{'keys':>7} {'path':<22} {'ms/layer':>9} {'recall':>7}")
    for n in args.keys:
        copies = []
        for c in range(args.layers_cold):
            q, k, v = rows_of(cap, args.layers[c % len(args.layers)], n + args.queries)
            keys, values, test = k[:, :n], v[:, :n], q[:, n : n + args.queries]  # queries after the keys
            index = AttentionIndex(3, keys.shape[2], values.shape[2], capacity=n)
            if args.no_graph:
                index.store(list(keys), list(values), [np.arange(n)] * 3)
            else:
                G = q.shape[0] // 3
                build = [np.ascontiguousarray(q[h * G : (h + 1) * G, :n:7].reshape(-1, q.shape[2])[:4096])
                         for h in range(3)]
                index.build(list(keys), list(values), [np.arange(n)] * 3, build)
            groups = np.ascontiguousarray(test.reshape(3, -1, args.queries, test.shape[2]).transpose(2, 0, 1, 3))
            copies.append((index, groups))
        paths = {"scan bfloat16+f32": lambda ix, g: ix.scan_rows(g, args.k, BF16_MARGIN)[0],
                 "scan float32": lambda ix, g: ix.scan_rows(g, args.k)[0]}
        if not args.no_graph:
            paths[f"graph walk ef={args.ef}"] = lambda ix, g: ix.search_grouped(g, np.arange(3), args.k, args.ef)[0]
        times = {p: [] for p in paths}
        recalls = {p: [] for p in paths}
        for rep in range(2):  # the first round compiles and warms up
            for s in range(args.queries):
                for index, groups in copies:
                    for p, fn in paths.items():
                        t0 = time.process_time()
                        ids = fn(index, groups[s])
                        dt = time.process_time() - t0
                        if rep:
                            times[p].append(dt)
                            if index is copies[0][0]:
                                ref, _ = index.scan_rows(groups[s], args.k)
                                recalls[p].append(recall(ids.reshape(-1, args.k), ref.reshape(-1, args.k)))
        for p in paths:
            print(f"{n:>7} {p:<22} {np.median(times[p]) * 1e3:>9.3f} {np.mean(recalls[p]):>7.3f}", flush=True)


if __name__ == "__main__":
    main()
