"""Graph search of the attention index (:mod:`kvaccel.kernels.attention_index`): HNSW's best-first search-layer for
the keys with the largest ``q · k`` (one walk per query, or one per GQA group scoring every visited key against the
group's queries), and the exact per-query heap scan used when a row is too small for a walk, batched over rows in
parallel.

``keys`` is a store (:mod:`~kvaccel.kernels.attention_index_store`): float32 rows, or quantized rows decoded token by
token as they are scored."""

from __future__ import annotations

import numpy as np
from numba import prange

from kvaccel.kernels.attention_index_heap import _FM, _dot, _pop, _push, _push_grow, _write_results
from kvaccel.kernels.attention_index_jit import kernel
from kvaccel.kernels.attention_index_store import row_of, row_vector


@kernel(fastmath=_FM)
def _beam_search(q, keys, nbrs, deg, entries, n, ef, out_ids, out_scores):
    """Best-first search (HNSW's search-layer) of one row's graph for the largest ``q · k``: a max-heap of candidates
    to expand and a heap of the ``ef`` best found (worst on top); stops when the best candidate is worse than the
    worst of a full result set. Returns the number of keys scored."""
    cap = 4 * ef + 64
    cs = np.empty(cap, np.float32)  # candidates, max-heap by score
    ci = np.empty(cap, np.int64)
    rs = np.empty(ef + 1, np.float32)  # results, max-heap by -score (worst result on top)
    ri = np.empty(ef + 1, np.int64)
    visited = np.zeros(n, np.uint8)
    kb = np.empty(q.shape[0], np.float32)  # a quantized key, decoded
    nc = np.int64(0)  # np.int64, not a literal: a literal 0 is a type of its own and compiles the heap helpers again
    nr = np.int64(0)
    scanned = 0
    for e in entries:
        if e < 0 or e >= n or visited[e]:
            continue
        visited[e] = 1
        scanned += 1
        s = _dot(q, row_vector(keys, e, kb))
        cs, ci, nc = _push_grow(cs, ci, nc, s, e)
        nr = _push(rs, ri, nr, -s, e)
        if nr > ef:
            nr = _pop(rs, ri, nr)
    while nc > 0:
        s0 = cs[0]
        node = ci[0]
        if nr >= ef and s0 < -rs[0]:
            break
        nc = _pop(cs, ci, nc)
        for t in range(deg[node]):
            y = np.int64(nbrs[node, t])  # int64 like the entries: one compiled version of the helpers
            if visited[y]:
                continue
            visited[y] = 1
            scanned += 1
            s = _dot(q, row_vector(keys, y, kb))
            if nr < ef or s > -rs[0]:
                cs, ci, nc = _push_grow(cs, ci, nc, s, y)
                nr = _push(rs, ri, nr, -s, y)
                if nr > ef:
                    nr = _pop(rs, ri, nr)
    _write_results(rs, ri, nr, out_ids, out_scores)
    return scanned


@kernel(fastmath=_FM)
def _scan_row(q, keys, n, out_ids, out_scores):
    """Exact top-k of ``q · k`` over the ``n`` keys of a row (a size-k heap); returns ``n``."""
    k = out_ids.shape[0]
    rs = np.empty(k + 1, np.float32)  # max-heap by -score: the worst kept key on top
    ri = np.empty(k + 1, np.int64)
    nr = np.int64(0)
    kb = np.empty(q.shape[0], np.float32)
    for j in range(n):
        s = _dot(q, row_vector(keys, j, kb))
        if nr < k or s > -rs[0]:
            nr = _push(rs, ri, nr, -s, j)
            if nr > k:
                nr = _pop(rs, ri, nr)
    _write_results(rs, ri, nr, out_ids, out_scores)
    return n


@kernel(parallel=True, fastmath=_FM)
def _search_rows(qs, rows, keys, nbrs, deg, entries, n, k, ef, exact_below, out_ids, out_scores, scanned):
    for r in prange(qs.shape[0]):
        g = rows[r]
        m = n[g]
        if k >= m or ef >= m or m <= exact_below:
            scanned[r] = _scan_row(qs[r], row_of(keys, g), m, out_ids[r], out_scores[r])
        else:
            scanned[r] = _beam_search(qs[r], row_of(keys, g), nbrs[g], deg[g], entries[g], m, ef, out_ids[r],
                                      out_scores[r])


@kernel(fastmath=_FM)
def _add_candidate(ck, ci, cscore, cnode, nc, nslot, best, sc, node):
    """Store ``node``'s per-head scores ``sc`` in a new slot and push it on the candidate heap with key ``best``,
    doubling the buffers when they are full. Returns the (possibly new) buffers, heap size and slot count."""
    cap = cnode.shape[0]
    if nslot == cap:
        cap *= 2
        ck2 = np.empty(cap, np.float32)
        ci2 = np.empty(cap, np.int64)
        cs2 = np.empty((cap, cscore.shape[1]), np.float32)
        cn2 = np.empty(cap, np.int64)
        ck2[:nc], ci2[:nc], cs2[:nslot], cn2[:nslot] = ck[:nc], ci[:nc], cscore[:nslot], cnode[:nslot]
        ck, ci, cscore, cnode = ck2, ci2, cs2, cn2
    cscore[nslot] = sc
    cnode[nslot] = node
    nc = _push(ck, ci, nc, best, nslot)
    return ck, ci, cscore, cnode, nc, nslot + 1


@kernel(fastmath=_FM)
def _group_search(qg, keys, nbrs, deg, entries, n, ef, out_ids, out_scores):
    """One best-first search for the ``G`` query heads of a kv head (GQA): every key visited is scored against all
    ``G`` queries (one memory read), each head keeps its own ``ef`` best; candidates are ordered by the largest
    score normalised by the query norm, and the search stops when the best candidate improves no head."""
    G = qg.shape[0]
    inv = np.empty(G, np.float32)
    for g in range(G):
        inv[g] = 1.0 / max(np.sqrt(_dot(qg[g], qg[g])), np.float32(1e-6))
    cap = 4 * ef + 64
    ck = np.empty(cap, np.float32)  # candidate heap key: max_g s_g / |q_g|
    ci = np.empty(cap, np.int64)  # candidate slot in cscore
    cscore = np.empty((cap, G), np.float32)
    cnode = np.empty(cap, np.int64)
    nslot = np.int64(0)
    rs = np.empty((G, ef + 1), np.float32)  # per head: max-heap by -score (worst kept on top)
    ri = np.empty((G, ef + 1), np.int64)
    nr = np.zeros(G, np.int64)
    visited = np.zeros(n, np.uint8)
    sc = np.empty(G, np.float32)
    kb = np.empty(qg.shape[1], np.float32)
    nc = np.int64(0)
    scanned = 0
    total = entries.shape[0]
    for step in range(total + n):
        if step < total:
            y = entries[step]
            if y < 0 or y >= n or visited[y]:
                continue
        else:
            if nc == 0:
                break
            slot = ci[0]
            useful = False
            for g in range(G):
                if nr[g] < ef or cscore[slot, g] >= -rs[g, 0]:
                    useful = True
                    break
            if not useful:
                break
            nc = _pop(ck, ci, nc)
            node = cnode[slot]
            y = -1
            for t in range(deg[node]):
                z = np.int64(nbrs[node, t])
                if visited[z]:
                    continue
                visited[z] = 1
                scanned += 1
                best = np.float32(-np.inf)  # the candidate heap's dtype
                improves = False
                kz = row_vector(keys, z, kb)
                for g in range(G):
                    sc[g] = _dot(qg[g], kz)
                    if sc[g] * inv[g] > best:
                        best = sc[g] * inv[g]
                    if nr[g] < ef or sc[g] > -rs[g, 0]:
                        improves = True
                        nr[g] = _push(rs[g], ri[g], nr[g], -sc[g], z)
                        if nr[g] > ef:
                            nr[g] = _pop(rs[g], ri[g], nr[g])
                if improves:
                    ck, ci, cscore, cnode, nc, nslot = _add_candidate(ck, ci, cscore, cnode, nc, nslot, best, sc, z)
            continue
        # an entry point
        visited[y] = 1
        scanned += 1
        best = np.float32(-np.inf)
        ky = row_vector(keys, y, kb)
        for g in range(G):
            sc[g] = _dot(qg[g], ky)
            best = max(best, sc[g] * inv[g])
            nr[g] = _push(rs[g], ri[g], nr[g], -sc[g], y)
            if nr[g] > ef:
                nr[g] = _pop(rs[g], ri[g], nr[g])
        ck, ci, cscore, cnode, nc, nslot = _add_candidate(ck, ci, cscore, cnode, nc, nslot, best, sc, y)
    for g in range(G):
        _write_results(rs[g], ri[g], nr[g], out_ids[g], out_scores[g])
    return scanned


@kernel(parallel=True, fastmath=_FM)
def _search_groups(qs, rows, keys, nbrs, deg, entries, n, k, ef, exact_below, out_ids, out_scores, scanned):
    for p in prange(qs.shape[0]):
        g = rows[p]
        m = n[g]
        if k >= m or ef >= m or m <= exact_below:
            scanned[p] = m
            for h in range(qs.shape[1]):
                _scan_row(qs[p, h], row_of(keys, g), m, out_ids[p, h], out_scores[p, h])
        else:
            scanned[p] = _group_search(qs[p], row_of(keys, g), nbrs[g], deg[g], entries[g], m, ef, out_ids[p],
                                       out_scores[p])
