"""Recall@k of the attention-aware index vs a query-agnostic ANN index (hnswlib) vs exact search.

Keys and queries are captured (post-RoPE) from the default model on prose, for a few layers. The synthetic cache of
``--cache-tokens`` tokens per kv head is the concatenation of the keys of ``cache_tokens / --length`` prefills of
*different* prose chunks of ``--length`` tokens each (the 8k default model cannot run a 128k prompt; RoPE phases
restart per chunk, so the cache has the real key distribution at the size of a long context; with ``--max-captured``
the captured chunks are repeated at earlier RoPE positions beyond that, see :func:`tile_by_rope`). The attention-aware
index is built from the queries of every chunk (sub-sampled to ``--build-queries`` per kv head), except the test
queries: the last ``--test-queries`` positions of the last chunk (held out, like decode queries after the prompt).
Ground truth: the exact top-``k`` keys by ``q · k`` (= the top-``k`` attention weights) over the whole cache.

Reported per (cache size, method, ef): recall@k averaged over layers, kv heads' query heads and test queries,
the scanned fraction (keys scored / keys held, per graph walk; hnswlib does not expose its distance count: n/a) and
the search time per query head (one thread). ``aa GQA walk`` is the attention-aware index searched once per kv head
for its G query heads together (``search_grouped``, the method's default): its scanned fraction is per walk, i.e.
for G heads at once.

    OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 .venv/bin/python benchmarks/retrieval_index.py \\
        --length 4096 --cache-tokens 32768 131072 --layers 3 10 17 24 --ef 100 200 400
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import kvaccel
from kvaccel.compare import prose
from kvaccel.kernels.attention_index import AttentionIndex


def capture(model, tok, length: int, chunks: int, layers: list[int], first: int = 0
            ) -> dict[int, tuple[np.ndarray, ...]]:
    """Post-RoPE ``q`` ``(chunks, H_q, L, D)``, ``k`` and ``v`` ``(chunks, H_kv, L, D)`` of ``layers`` on distinct
    prose chunks ``first .. first + chunks - 1`` (only the decoder layers up to the last captured one run)."""
    end = first + chunks
    ids = tok(prose(length * end * 8), return_tensors="pt", add_special_tokens=False)["input_ids"]
    if ids.shape[1] < length * end:
        raise ValueError(f"prose gives {ids.shape[1]} tokens, need {length * end}")
    store: dict[int, list] = {i: [] for i in layers}

    def record(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx in store:
            store[module.layer_idx].append(tuple(t[0].float().numpy() for t in (query, key, value)))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("retrieval_capture", record)
    previous = model.config._attn_implementation
    decoder = model.model.layers
    model.set_attn_implementation("retrieval_capture")
    model.model.layers = decoder[: max(layers) + 1]  # later layers do not change the captured q/k/v
    try:
        with torch.inference_mode():
            for c in range(first, end):
                model.model(ids[:, c * length : (c + 1) * length], use_cache=False)
    finally:
        model.model.layers = decoder
        model.set_attn_implementation(previous)
    return {i: tuple(np.stack([t[j] for t in v]) for j in range(3)) for i, v in store.items()}


def rope_shift(x: np.ndarray, offset: int, inv_freq: np.ndarray) -> np.ndarray:
    """Post-RoPE vectors ``(..., D)`` (transformers' rotate-half layout) moved by ``offset`` positions: RoPE
    rotations compose, so ``R(offset) R(p) x = R(p + offset) x`` is the vector the same token would have at
    position ``p + offset``."""
    ang = offset * inv_freq.astype(np.float64)
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def tile_by_rope(cap: dict, chunks: int, length: int, inv_freq: np.ndarray) -> dict:
    """Extend captured chunks to ``chunks`` by copies of the captured ones moved back in position: copy ``i`` of
    ``C`` captured chunks is placed ``i * C * length`` positions earlier (q, k rotated back by RoPE; v as is), the
    earliest copies first, the captured chunks last (their queries are the held-out decode queries). The copies
    repeat the text, so a query's top keys include near-duplicates from earlier copies (a repetitive document)."""
    out = {}
    for li, (q, k, v) in cap.items():
        c = q.shape[0]
        copies = -(-chunks // c)
        parts = [tuple(rope_shift(t, -i * c * length, inv_freq) if j < 2 else t for j, t in enumerate((q, k, v)))
                 for i in range(copies - 1, -1, -1)]
        out[li] = tuple(np.concatenate([p[j] for p in parts])[-chunks:] for j in range(3))
    return out


def load_or_capture(model, tok, path: str | None, length: int, chunks: int, layers: list[int],
                    max_captured: int | None = None) -> dict:
    """:func:`capture`, reusing the npz file ``path``: the chunks it lacks (same ``length``, same layers) are
    captured and appended to it. Beyond ``max_captured`` chunks, the captured ones are tiled (:func:`tile_by_rope`)."""
    if max_captured is not None and chunks > max_captured:
        cap = load_or_capture(model, tok, path, length, max_captured, layers)
        return tile_by_rope(cap, chunks, length, model.model.rotary_emb.inv_freq.float().numpy())
    cap = {}
    if path and os.path.exists(path):
        data = np.load(path)
        if any(f"q{li}" not in data for li in layers) or data[f"q{layers[0]}"].shape[2] != length:
            raise ValueError(f"{path} holds other layers or another --length; delete it to capture again")
        cap = {li: tuple(data[f"{n}{li}"][:chunks] for n in "qkv") for li in layers}
    have = min((q.shape[0] for q, _, _ in cap.values()), default=0)
    if have < chunks:
        new = capture(model, tok, length, chunks - have, layers, first=have)
        cap = {li: tuple(np.concatenate([cap[li][j], new[li][j]]) if cap else new[li][j] for j in range(3))
               for li in layers}
        if path:
            np.savez(path, **{f"{n}{li}": t for li, qkv in cap.items() for n, t in zip("qkv", qkv, strict=True)})
    return cap


def hnsw_search(keys: np.ndarray, queries: np.ndarray, k: int, efs: list[int], m: int) -> dict[int, tuple]:
    import hnswlib

    index = hnswlib.Index(space="ip", dim=keys.shape[1])
    index.init_index(max_elements=keys.shape[0], M=m, ef_construction=200, random_seed=0)
    index.set_num_threads(1)
    t0 = time.perf_counter()
    index.add_items(keys)
    build = time.perf_counter() - t0
    out = {}
    for ef in efs:
        index.set_ef(max(ef, k))
        t0 = time.perf_counter()
        labels, _ = index.knn_query(queries, k=k)
        out[ef] = (labels, (time.perf_counter() - t0) / queries.shape[0], build)
    return out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    pairs = zip(found, truth, strict=True)
    return float(np.mean([len(set(f[f >= 0]) & set(t[t >= 0])) / max(1, (t >= 0).sum()) for f, t in pairs]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=4096, help="tokens per captured prose chunk (<= 8192)")
    ap.add_argument("--cache-tokens", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 10, 17, 24])
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--ef", type=int, nargs="+", default=[100, 200, 400])
    ap.add_argument("--degree", type=int, default=32)
    ap.add_argument("--build-top-k", type=int, default=64)
    ap.add_argument("--build-queries", type=int, default=4096, help="prefill queries per kv head for the graph")
    ap.add_argument("--test-queries", type=int, default=16, help="held-out last positions of the last chunk")
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--window", type=int, default=4, help="projection: rank window of co-listed keys")
    ap.add_argument("--hubs", type=int, default=4, help="projection: best keys of a query every listed key links to")
    ap.add_argument("--no-hnsw", action="store_true")
    ap.add_argument("--max-captured", type=int, help="capture at most this many chunks; tile them by RoPE shifts "
                    "beyond (tile_by_rope): a 128k cache from 32 x 1024 captured tokens")
    ap.add_argument("--capture", help="npz file: reuse the captured q/k if it exists, else save them there")
    args = ap.parse_args()

    model, tok = kvaccel.load_model()
    cfg = model.config
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    g = hq // hkv
    chunks = max(args.cache_tokens) // args.length
    t0 = time.perf_counter()
    cap = load_or_capture(model, tok, args.capture, args.length, chunks, args.layers, args.max_captured)
    print(f"captured {chunks} x {args.length} tokens, layers {args.layers} in {time.perf_counter() - t0:.1f} s")
    rng = np.random.default_rng(0)
    rows = []
    for n_tok in args.cache_tokens:
        c = n_tok // args.length
        acc: dict[tuple[str, int], list] = {}
        for li in args.layers:
            q_all, k_all, _ = cap[li]
            for h in range(hkv):
                keys = np.ascontiguousarray(k_all[:c, h].reshape(-1, k_all.shape[-1]))
                n = keys.shape[0]
                qh = q_all[:c, h * g : (h + 1) * g]  # (c, G, L, D)
                t = args.test_queries
                test = np.ascontiguousarray(qh[c - 1, :, -t:].reshape(-1, qh.shape[-1]))
                d = qh.shape[-1]
                pool = np.concatenate([qh[: c - 1].reshape(-1, d), qh[c - 1, :, :-t].reshape(-1, d)])
                build_q = pool[rng.choice(pool.shape[0], min(args.build_queries, pool.shape[0]), replace=False)]
                index = AttentionIndex(1, keys.shape[1], 1, degree=args.degree, build_top_k=args.build_top_k,
                                       window=args.window, hubs=args.hubs)
                bt = index.build([keys], [np.zeros((n, 1), np.float32)], [np.arange(n)], [build_q])
                r0 = np.zeros(test.shape[0], np.int64)
                t0 = time.perf_counter()
                truth, _ = index.search_exact(test, r0, args.k)
                exact_s = (time.perf_counter() - t0) / test.shape[0]
                acc.setdefault(("exact", 0), []).append((1.0, 1.0, exact_s, 0.0))
                for ef in args.ef:
                    index.search(test[:1], r0[:1], args.k, max(ef, args.k))  # compile / warm
                    t0 = time.perf_counter()
                    ids, _, scanned = index.search(test, r0, args.k, max(ef, args.k))
                    dt = (time.perf_counter() - t0) / test.shape[0]
                    acc.setdefault(("attention-aware", ef), []).append((recall(ids, truth), scanned.mean() / n, dt, bt))
                    tg = np.ascontiguousarray(test.reshape(g, t, -1).transpose(1, 0, 2))  # (t, G, D): a walk per t
                    t0 = time.perf_counter()
                    gids, _, gscan = index.search_grouped(tg, r0[:t], args.k, max(ef, args.k))
                    dt = (time.perf_counter() - t0) / test.shape[0]
                    gids = gids.transpose(1, 0, 2).reshape(g * t, -1)
                    acc.setdefault(("aa GQA walk", ef), []).append((recall(gids, truth), gscan.mean() / n, dt, bt))
                if not args.no_hnsw:
                    for ef, (labels, dt, hb) in hnsw_search(keys, test, args.k, args.ef, args.hnsw_m).items():
                        acc.setdefault(("hnswlib", ef), []).append((recall(labels, truth), float("nan"), dt, hb))
        for (method, ef), vals in acc.items():
            v = np.array(vals)
            rows.append((n_tok, method, ef, *v.mean(0)))
    print(f"\nrecall@{args.k} over layers {args.layers} x {hkv} kv heads x {g * args.test_queries} held-out queries")
    print(f"{'cache':>8} {'method':>16} {'ef':>5} {'recall':>7} {'scanned':>8} {'ms/query':>9} {'build s':>8}")
    for n_tok, method, ef, rec, scan, dt, bt in rows:
        scan_s = "n/a" if np.isnan(scan) else f"{scan:.4f}"
        print(f"{n_tok:>8} {method:>16} {ef:>5} {rec:>7.3f} {scan_s:>8} {dt * 1e3:>9.3f} {bt:>8.2f}")


if __name__ == "__main__":
    main()
