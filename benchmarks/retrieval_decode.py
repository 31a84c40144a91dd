"""Decode-step latency of retrieval attention vs dense attention over the whole cache, side by side in one run.

Attention step (``--cache-tokens``): for each captured layer of the default model, a synthetic cache of N tokens per
kv head (concatenated prose chunks, as in ``benchmarks/retrieval_index.py``, beyond ``--max-captured`` chunks repeated
at earlier RoPE positions; the last ``--steps`` tokens of the last
chunk are held out and decoded one at a time with their real queries). Per step, interleaved:
``dense`` = SDPA of the new query over all N keys (what stock transformers does), ``retrieval`` = the method's own
``attention`` (static sink + window on the device, graph search + host attention over ``top_k`` keys, LSE merge).
Reported: median ms per layer, speedup, device-resident KV bytes / full cache, host bytes, recall@top_k, relative
error of the output vs dense, ``mass`` = the exact softmax weight on static + retrieved keys and ``oracle`` = on
static + the exact top_k host keys (what any top_k retrieval could cover), and the method's time split.

End to end (``--e2e LENGTH``): ``--model`` (default: the default model) on a prose prompt of LENGTH tokens (up to
the model's context), stock full attention vs ``retrieval``, stepped alternately; greedy decode of ``--steps`` tokens
by the stock model, the same tokens fed to the retrieval side (teacher forcing). One copy of the model serves both
(``--copies 1``, the default: stock steps on a ``DynamicCache``, retrieval steps inside ``kvaccel.patched`` on a
``KVAccelCache``; only the forward is timed); ``--copies 2`` loads a second, patched copy. Reported: median
decode-step time over the steps where every layer's graph was ready (and, separately, while some were still building
in the background: exact over the host keys), the graph build time and the steps served before it was ready, top-1
agreement and KL(full || retrieval) per step, and the floor: the stock model stepped over a cache of ``sink + window``
tokens (what a step would cost if the host part were free); step times both in wall time and in process CPU time
(``time.process_time``: less sensitive to other jobs on a shared machine), with the load average, and which search
path ran (exact scan below ``exact_below`` host keys per row, else the graph). ``recall``: each graph search the
method runs (every layer, step and query head, as it searches them: grouped per kv head with ``group_search``) is
compared with the exact top-``k`` host keys by ``q . k`` of the same query (:class:`RecallProbe`, wrapped around the
layer's index; its time is taken out of the step times); exact-scan layer-steps return the exact top-k and are not
counted. ``--wait-index`` waits for the graph builds after prefill, so every step uses the index.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/retrieval_decode.py --length 1024 \\
        --cache-tokens 32768 131072 --layers 3 17 --steps 16 --capture runs/retr-cap-1k.npz --max-captured 32
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/retrieval_decode.py --e2e 8100 --steps 64 --exact-below 0 --wait-index
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/retrieval_decode.py --model qwen2.5-coder-1.5b --e2e 16384 --steps 64
    .venv/bin/python benchmarks/retrieval_decode.py --e2e 8000 --steps 64 --storage kv_int8

``--storage`` stacks a quantized storage method (``kv_int8``, ``kv_int4(group_size=32)``...): the host store holds
its codes; ``host KV`` is then the store's bytes (codes, scales, offsets) against float32.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

import kvaccel
from kvaccel.cache import KVAccelCache, KVAccelLayer
from kvaccel.compare import prompt_ids
from kvaccel.patches.attention import AttentionContext, PatchState
from kvaccel.patches.decode.retrieval import STATE_ATTR, Retrieval, wait_for_index

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from retrieval_index import load_or_capture  # noqa: E402

TIMES = ("search_s", "host_s", "device_s", "merge_s")


def method_options(args) -> dict:
    """The Retrieval options given on the command line (the method's defaults otherwise)."""
    names = ("exact_below", "ef_per_key", "scan_precision")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def attention_step(args, model, tok) -> None:
    cfg = model.config
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    g = hq // hkv
    chunks = max(args.cache_tokens) // args.length
    cap = load_or_capture(model, tok, args.capture, args.length, chunks, args.layers, args.max_captured)
    print(f"{'cache':>8} {'layer':>5} {'dense ms':>9} {'retr ms':>8} {'speedup':>8} {'device KV':>10} "
          f"{'host MB':>8} {'recall':>7} {'rel err':>8} {'mass':>6} {'oracle':>6} {'build s':>8}  "
          "time split (search/host/device/merge ms)")
    for n_tok in args.cache_tokens:
        c = n_tok // args.length
        for li in args.layers:
            q_all, k_all, v_all = (torch.from_numpy(t[:c]) for t in cap[li])
            D = k_all.shape[-1]
            scale = D**-0.5
            K = k_all.permute(1, 0, 2, 3).reshape(1, hkv, -1, D)  # chunks concatenated along tokens
            V = v_all.permute(1, 0, 2, 3).reshape(1, hkv, -1, v_all.shape[-1])
            Qa = q_all.permute(1, 0, 2, 3).reshape(1, hq, -1, D)
            N, S = K.shape[2], args.steps
            layer = KVAccelLayer()
            layer.update(K[:, :, : N - S].contiguous(), V[:, :, : N - S].contiguous())
            method = Retrieval(top_k=args.top_k, ef=args.ef, sink=args.sink, window=args.window,
                               build_queries=args.build_queries, build_query_ratio=args.build_query_ratio,
                               spill_every=args.spill_every, background_build=False, **method_options(args))
            state = PatchState({"decode": method}, 1, "sdpa")
            module = SimpleNamespace(layer_idx=0)
            ctx = AttentionContext(module, state, layer, Qa[:, :, : N - S], layer.keys, layer.values, None, scale,
                                   "prefill", {})
            method.after_prefill(ctx)
            st = getattr(layer, STATE_ATTR)
            warm = st.index.search(Qa[0, :g, -1].numpy(), np.zeros(g, np.int64), args.top_k, args.ef)
            st.index.attend(warm[0], warm[1], np.zeros(g, np.int64), scale)  # compile / warm
            st.index.attend_union_groups(np.repeat(warm[0][None], hkv, 0), np.repeat(warm[1][None], hkv, 0), scale,
                                         Qa[0, :, -1].reshape(hkv, g, -1).numpy(), K[0, :, :8].numpy(),
                                         V[0, :, :8].numpy(), np.ones((hkv, 8), np.bool_))
            st.index.search_grouped(Qa[0, :g, -1][None].numpy(), np.zeros(1, np.int64), args.top_k, args.ef)
            for name in TIMES:
                setattr(st, name, 0.0)
            dense_t, retr_t, recalls, errs, masses, oracle = [], [], [], [], [], []
            for s in range(N - S, N):
                q = Qa[:, :, s : s + 1]
                t0 = time.perf_counter()
                ref = F.scaled_dot_product_attention(q, K[:, :, : s + 1], V[:, :, : s + 1], scale=scale,
                                                     enable_gqa=True)
                t1 = time.perf_counter()
                layer.update(K[:, :, s : s + 1], V[:, :, s : s + 1])
                ctx = AttentionContext(module, state, layer, q, layer.keys, layer.values, None, scale, "decode", {})
                out = method.attention(ctx)
                t2 = time.perf_counter()
                dense_t.append(t1 - t0)
                retr_t.append(t2 - t1)
                errs.append(float((out.transpose(1, 2) - ref).norm() / ref.norm()))
                rows = np.arange(hq) // g
                qn = q[0, :, 0].numpy()
                ef = method._ef(int(st.index.n.max()))  # the search list the method used
                if method.group_search:
                    gi, _, _ = st.index.search_grouped(qn.reshape(hkv, g, -1), np.arange(hkv), args.top_k, ef)
                    ids = gi.reshape(hq, -1)
                else:
                    ids, _, _ = st.index.search(qn, rows, args.top_k, ef)
                exact, _ = st.index.search_exact(qn, rows, args.top_k)
                recalls.append(np.mean([len(np.intersect1d(a, b[b >= 0])) / max(1, (b >= 0).sum())
                                        for a, b in zip(ids, exact, strict=True)]))
                # softmax mass of the exact attention on static + retrieved keys, and on static + exact top-k
                logits = torch.einsum("hd,htd->ht", q[0, :, 0], K[0, rows, : s + 1]) * scale
                w = torch.softmax(logits, -1).numpy()
                for h in range(hq):
                    held = st.index.n[rows[h]]
                    host_pos = st.index.positions[rows[h], :held]
                    static = 1.0 - w[h, host_pos].sum()
                    masses.append(static + w[h, host_pos[ids[h][ids[h] >= 0]]].sum())
                    oracle.append(static + w[h, host_pos[exact[h][exact[h] >= 0]]].sum())
            full = K[:, :, : N].numel() * 4 * 2
            dm, rm = statistics.median(dense_t) * 1e3, statistics.median(retr_t) * 1e3
            split = "/".join(f"{getattr(st, n) / S * 1e3:.2f}" for n in TIMES)
            print(f"{N:>8} {li:>5} {dm:>9.2f} {rm:>8.2f} {dm / rm:>7.2f}x {layer.nbytes() / full:>10.4f} "
                  f"{st.index.nbytes() / 2**20:>8.1f} {np.mean(recalls):>7.3f} {np.mean(errs):>8.2e} "
                  f"{np.mean(masses):>6.3f} {np.mean(oracle):>6.3f} "
                  f"{st.build_s:>8.2f}  {split}")


class RecallProbe:
    """Recall of the true top-k in an end-to-end run: wraps ``search`` / ``search_grouped`` of every retrieval
    layer's index (this benchmark only; the library is unchanged) so each graph search is compared with
    ``search_exact`` of the same queries (each query head against its kv row): the share of the exact top-``k`` host
    keys by ``q . k`` the search returned, per layer. The exact scan's time is kept apart (:meth:`take`) so the
    caller can leave it out of the step times."""

    def __init__(self, cache: KVAccelCache):
        self.sum: dict[int, float] = {}
        self.rows: dict[int, int] = {}
        self.wall = self.cpu = 0.0
        self.total_wall = 0.0  # all reference scans: they run inside the method's search timer (retrieval_search_s)
        for li, layer in enumerate(cache.layers):
            st = getattr(layer, STATE_ATTR, None)
            if st is None:
                continue
            index = st.index
            for name in ("search", "search_grouped"):
                setattr(index, name, self._wrap(li, index, getattr(index, name), name == "search_grouped"))

    def _wrap(self, li: int, index, search, grouped: bool):
        def probed(queries: np.ndarray, rows: np.ndarray, k: int, *args, **kwargs):
            out = search(queries, rows, k, *args, **kwargs)
            t0, c0 = time.perf_counter(), time.process_time()
            q = queries.reshape(-1, queries.shape[-1])
            qrows = np.repeat(rows, queries.shape[1]) if grouped else rows  # (P, G, D): G query heads per kv row
            got = out[0].reshape(q.shape[0], -1)
            exact, _ = index.search_exact(q, qrows, k)
            for i in np.nonzero(index.n[qrows] > 0)[0]:
                want = exact[i][exact[i] >= 0]
                self.sum[li] = self.sum.get(li, 0.0) + len(np.intersect1d(got[i], want)) / len(want)
                self.rows[li] = self.rows.get(li, 0) + 1
            dt = time.perf_counter() - t0
            self.wall += dt
            self.total_wall += dt
            self.cpu += time.process_time() - c0
            return out

        return probed

    def take(self) -> tuple[float, float]:
        """Wall and CPU seconds spent in the exact reference scans since the last call."""
        out, self.wall, self.cpu = (self.wall, self.cpu), 0.0, 0.0
        return out

    def per_layer(self) -> dict[int, float]:
        return {li: self.sum[li] / self.rows[li] for li in sorted(self.rows)}


def end_to_end(args, model, tok) -> None:
    """Stock and retrieval stepped alternately (full, retrieval, full, ...) so machine noise hits both alike; the
    retrieval side is fed the stock model's greedy tokens (teacher forcing). With ``--copies 1`` both run on
    ``model`` (retrieval inside ``kvaccel.patched``), with ``--copies 2`` retrieval on a second, patched copy."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and args.e2e + args.steps > limit:
        raise SystemExit(f"--e2e {args.e2e} + --steps {args.steps} exceeds the model's context ({limit} tokens); "
                         "use a shorter prompt")
    ids = prompt_ids(tok, args.e2e)
    steps = args.steps
    spec = Retrieval(top_k=args.top_k, ef=args.ef, sink=args.sink, window=args.window,
                     build_queries=args.build_queries, build_query_ratio=args.build_query_ratio,
                     spill_every=args.spill_every, **method_options(args))
    methods = (spec,) if args.storage is None else (spec, args.storage)
    if args.copies == 2:
        patched, _ = kvaccel.load_model(args.model)
        kvaccel.patch(patched, *methods)
        retr = contextlib.nullcontext  # always patched
    else:
        patched = model

        def retr():
            return kvaccel.patched(model, *methods)
    notes: set[str] = set()
    try:
        with torch.inference_mode():
            t0 = time.perf_counter()
            out_f = model(ids, use_cache=True, logits_to_keep=1)  # stock: its own DynamicCache
            p_full = time.perf_counter() - t0
            with retr():
                t0 = time.perf_counter()
                out_r = patched(ids, cache=KVAccelCache(patched), use_cache=True, logits_to_keep=1)
                p_ret = time.perf_counter() - t0
                notes.update(kvaccel.report(patched)["notes"])
            cache_f, cache_r = out_f.cache, out_r.cache
            # floor: the stock model over a cache as small as retrieval's static part (what a step would cost if
            # the host part were free)
            cache_s = model(ids[:, -(args.sink + args.window) :], use_cache=True, logits_to_keep=1).cache
            waited = wait_for_index(cache_r) if args.wait_index else 0.0
            probe = RecallProbe(cache_r)
            l_full, l_ret, t_full, t_ret, t_small, ready = [out_f.logits[0, -1]], [out_r.logits[0, -1]], [], [], [], []
            c_full, c_ret, c_small = [], [], []  # process CPU time (all threads) of each step
            for i in range(steps):
                nxt = torch.tensor([[int(l_full[-1].argmax())]])
                t0, c0 = time.perf_counter(), time.process_time()
                out_f = model(nxt, cache=cache_f, use_cache=True)
                t_full.append(time.perf_counter() - t0)
                c_full.append(time.process_time() - c0)
                t0, c0 = time.perf_counter(), time.process_time()
                model(nxt, cache=cache_s, use_cache=True)
                t_small.append(time.perf_counter() - t0)
                c_small.append(time.process_time() - c0)
                # every layer's index finished before this step (a layer installs it at its own step)
                ready.append(all(getattr(layer, STATE_ATTR).pending is None
                                 or getattr(layer, STATE_ATTR).pending.done() for layer in cache_r.layers))
                with retr():
                    t0, c0 = time.perf_counter(), time.process_time()
                    out_r = patched(nxt, cache=cache_r, use_cache=True)
                    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                    pw, pc = probe.take()  # the recall reference scans are not part of the step
                    t_ret.append(wall - pw)
                    c_ret.append(cpu - pc)
                    if i == steps - 1 or args.copies == 1:
                        rep = kvaccel.report(patched)
                        notes.update(rep["notes"])
                l_full.append(out_f.logits[0, -1])
                l_ret.append(out_r.logits[0, -1])
    finally:
        if args.copies == 2:
            kvaccel.unpatch(patched)
    l_full, l_ret = torch.stack(l_full[:-1]), torch.stack(l_ret[:-1])
    lp_full, lp_ret = l_full.float().log_softmax(-1), l_ret.float().log_softmax(-1)
    kl = (lp_full.exp() * (lp_full - lp_ret)).sum(-1)
    top1 = (l_full.argmax(-1) == l_ret.argmax(-1)).float().mean()
    pairs = [(f, r, m) for f, r, m, ok in zip(t_full, t_ret, t_small, ready, strict=True) if ok]  # same steps
    cpairs = [(f, r, m) for f, r, m, ok in zip(c_full, c_ret, c_small, ready, strict=True) if ok]
    host = sum(v for v in rep["retrieval_host_bytes"] if v)
    build = sum(v for v in rep["retrieval_build_s"] if v)
    knn = sum(v for v in rep["retrieval_build_knn_s"] if v)
    before = rep["retrieval_steps_before_index"]
    scanned = [v for v in rep["retrieval_scanned_fraction"] if v is not None]
    cfg = model.config
    print(f"e2e model {args.model or 'default'} ({cfg.model_type}, {cfg.num_hidden_layers} layers, "
          f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads, {model.dtype}), copies {args.copies}; "
          f"prompt {args.e2e} tokens, {steps} decode steps, "
          f"{'+'.join(m if isinstance(m, str) else m.spec() for m in methods)}")
    print(f"  prefill s: full {p_full:.2f}, retrieval {p_ret:.2f}; graph build in the background: {build:.2f} s "
          f"(faiss kNN {knn:.2f} s), {len(rep['retrieval_build_s'])} layers; waited {waited:.2f} s after prefill; "
          f"steps served exactly before the index was ready: {min(before)}..{max(before)} per layer")
    if pairs:
        mf, mr, ms = (statistics.median(p[i] for p in pairs) for i in (0, 1, 2))
        ratios = sorted(f / r for f, r, _ in pairs)
        print(f"  decode step ms (median over the {len(pairs)} steps with every index ready, interleaved): "
              f"full {mf * 1e3:.1f}, retrieval {mr * 1e3:.1f} -> {mf / mr:.2f}x (per-step ratio quartiles "
              f"{ratios[len(ratios) // 4]:.2f} / {ratios[len(ratios) // 2]:.2f} / {ratios[3 * len(ratios) // 4]:.2f}); "
              f"floor = stock over {args.sink + args.window} cached tokens {ms * 1e3:.1f} -> at most {mf / ms:.2f}x")
        cf, cr, cs = (statistics.median(p[i] for p in cpairs) for i in (0, 1, 2))
        print(f"  decode step CPU ms (process time, same steps): full {cf * 1e3:.1f}, retrieval {cr * 1e3:.1f} -> "
              f"{cf / cr:.2f}x; floor {cs * 1e3:.1f} -> at most {cf / cs:.2f}x; load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; torch threads {torch.get_num_threads()}")
    building = [(f, r) for f, r, ok in zip(t_full, t_ret, ready, strict=True) if not ok]
    if building:
        mf, mr = (statistics.median(p[i] for p in building) for i in (0, 1))
        print(f"  decode step ms while some index was still building ({len(building)} steps, exact over the host "
              f"keys): full {mf * 1e3:.1f}, retrieval {mr * 1e3:.1f}")
    print(f"  device KV {rep['kv_bytes'] / 2**20:.1f} MB of {rep['kv_bytes_full'] / 2**20:.1f} MB "
          f"({rep['kv_ratio']:.3f}); host {host / 2**20:.1f} MB (host keys of a layer, all its rows: up to "
          f"{max(rep['retrieval_host_tokens'])}); scanned fraction {np.mean(scanned) if scanned else float('nan'):.4f}")
    store = sum(v for v in rep["retrieval_host_kv_bytes"] if v)
    tokens = sum(v for v in rep["retrieval_host_tokens"] if v)
    head = cfg.hidden_size // cfg.num_attention_heads if getattr(cfg, "head_dim", None) is None else cfg.head_dim
    print(f"  host KV store {store / 2**20:.1f} MB for {tokens} tokens x kv head ({store / (2 * tokens * head):.3f} "
          f"bytes per element held, capacity included; float32: 4)")
    print(f"  fidelity (teacher-forced): top-1 agreement {top1:.3f}, mean KL {kl.mean():.4f}, max KL {kl.max():.4f}")
    rec = probe.per_layer()
    if rec:
        vals = np.array(list(rec.values()))
        print(f"  recall of the exact top-{args.top_k} host keys (graph searches, {sum(probe.rows.values())} "
              f"query-head searches over {len(rec)} layers): mean {vals.mean():.3f}, min layer {vals.min():.3f} "
              f"(layer {min(rec, key=rec.get)}), max layer {vals.max():.3f}; per layer "
              + " ".join(f"{li}:{r:.3f}" for li, r in rec.items()))
    else:
        print("  recall: no graph search ran (every layer-step was the exact scan)")
    print(f"  search path: {sum(rep['retrieval_exact_steps'])} layer-steps exact scan, "
          f"{sum(rep['retrieval_graph_steps'])} graph search; notes: {sorted(notes)}")
    for name in ("search_s", "host_attention_s", "device_attention_s", "merge_s", "insert_s"):
        total = sum(v for v in rep[f"retrieval_{name}"] if v is not None)
        if name == "search_s":
            total -= probe.total_wall  # the recall reference scans ran inside the search timer
        print(f"  retrieval_{name}: {total / steps * 1e3:.2f} ms/step (all layers)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-tokens", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--length", type=int, default=4096, help="tokens per captured prose chunk")
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 17])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--ef", type=int, default=128)
    ap.add_argument("--sink", type=int, default=128)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--spill-every", type=int, default=64)
    ap.add_argument("--build-queries", type=int, default=8192)
    ap.add_argument("--exact-below", type=int, help="Retrieval's exact_below (default: the method's)")
    ap.add_argument("--ef-per-key", type=float, help="Retrieval's ef_per_key (default: the method's)")
    ap.add_argument("--scan-precision", choices=("auto", "float32", "bfloat16"),
                    help="Retrieval's scan_precision (default: the method's)")
    ap.add_argument("--build-query-ratio", type=float, default=0.125)
    ap.add_argument("--wait-index", action="store_true",
                    help="e2e: wait for the background graph builds after prefill (every timed step uses the index)")
    ap.add_argument("--capture", help="npz file of captured q/k/v (shared with retrieval_index.py)")
    ap.add_argument("--max-captured", type=int, help="capture at most this many chunks; tile them by RoPE shifts "
                    "beyond (retrieval_index.tile_by_rope)")
    ap.add_argument("--e2e", type=int, help="end to end with a prompt of this many tokens")
    ap.add_argument("--model", help="model name or path for kvaccel.load_model (default: the default model)")
    ap.add_argument("--storage", help="e2e: a storage method stacked on retrieval (its host store), e.g. kv_int8")
    ap.add_argument("--copies", type=int, choices=(1, 2), default=1,
                    help="e2e: 1 = stock and retrieval share one model (retrieval inside kvaccel.patched), "
                    "2 = a second, patched copy")
    args = ap.parse_args()
    model, tok = kvaccel.load_model(args.model)
    if args.e2e:
        end_to_end(args, model, tok)
    else:
        attention_step(args, model, tok)


if __name__ == "__main__":
    main()
