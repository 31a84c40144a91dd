"""Attention-aware graph index over keys held in host memory (RetrievalAttention, https://arxiv.org/abs/2409.10516).

Queries and keys of an attention head are out of distribution: a key-only ANN index (HNSW on keys) finds the keys
nearest to other *keys*, not the keys a *query* attends to. RetrievalAttention therefore builds the graph from the
prefill queries, RoarGraph-style (https://arxiv.org/abs/2408.08933):

1. exact kNN at build time (faiss ``IndexFlatIP``): every (sub-sampled) prefill query's ``build_top_k`` keys with the
   largest ``q · k`` (its ranked list), and every key's nearest query;
2. projection of the query→key bipartite graph onto keys (:func:`_project`): a key at rank ``i`` of a query's list
   gets as candidates the keys within ``window`` ranks of ``i`` and the query's ``hubs`` best keys; every key also
   gets its nearest query's ``hubs`` best keys. A key keeps the ``degree`` candidates that the most queries share
   (ties: the better rank). Then reverse edges (into the slack up to ``max_degree``) and one in-edge for every key
   without any;
3. entry points: the keys most often some prefill query's top key, plus the top keys of random prefill queries;
   then every key not reachable from them is linked from its nearest reachable key (connectivity enhancement,
   :func:`_connect`), which also records a spanning tree of the graph (``parent``: the edge each key is reached by);
4. search: best-first search maximising ``q · k`` (HNSW's search-layer with ``ef`` results), compiled with
   numba and batched over every (query head, query) row of a layer in one parallel call.

Tokens that leave the recent window later are *inserted*: each new key is searched in the graph with itself as the
query (its ``degree`` largest-``k · k'`` keys become its out-edges) and reverse edges are added where a node has room;
one reverse edge is always made, the new key's spanning-tree edge.

A full neighbour list that must take an edge (an in-edge at build, the connection of an unreachable key, the tree
edge of an inserted key) is re-selected by the occlusion rule of HNSW / NSG neighbour selection (:func:`_prune_insert`,
inner product as similarity): the least similar neighbour that a more similar one occludes goes, spanning-tree edges
never do, so every key stays reachable from the entry points.

Build cost: the exact kNN (``queries x keys x dim``, faiss BLAS) dominates; the projection is linear in ``queries x
build_top_k x (2 window + hubs)`` and selects each node's ``degree`` edges with a small heap. The build is a
:class:`GraphBuild` job that reads only the keys stored when it was made and writes only its own arrays, so it runs
in another thread (every compiled function is ``nogil``; faiss releases the GIL) while the index serves exact
attention over the stored keys (:meth:`AttentionIndex.attend_all`); :meth:`AttentionIndex.install` then puts the
graphs in and links the keys stored meanwhile. Recall, keys scanned and the scan / walk crossover are measured in
``docs/results.md`` (section "Retrieval attention").

One ``AttentionIndex`` holds the host K/V store and the graphs of ``rows`` independent heads (row = ``b * H_kv +
h``), padded to a common capacity that doubles as tokens arrive. :meth:`AttentionIndex.search_exact` (a full scan) is
the reference the approximate search is measured against; when ``k`` (or ``ef``) covers every key of a row the
compiled search scans the row exactly.

Rows too small for a walk to pay off are searched exactly by :meth:`AttentionIndex.scan_rows` instead: all queries
of all rows against all stored keys in one batched matmul (optionally over a bfloat16 copy of the keys, then the
best ``k + margin`` re-scored in float32) and a linear-time compiled top-k selection (the walk's cost barely grows
with the keys, the scan's linearly).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

__all__ = ["AttentionIndex", "GraphBuild"]


def _torch():
    import torch

    return torch

#: scan_rows computes at most this many scores per row at once (queries in blocks): 64 MiB per row in float32
SCAN_BLOCK_SCORES = 1 << 24

#: scan_rows' bfloat16 key copy grows in steps of this many keys per row (a regrowth copies it)
SCAN_COPY_STEP = 1024

#: fast-math without the no-NaN/no-inf assumptions (-inf marks empty slots): lets the dot products vectorise
_FM = {"reassoc", "contract", "nsz", "arcp"}


# ------------------------------------------------------------------------------------------ compiled parts


@njit(cache=True, nogil=True, fastmath=_FM, inline="always")
def _dot(a, b):
    s = np.float32(0.0)
    for i in range(a.shape[0]):
        s += a[i] * b[i]
    return s


@njit(cache=True, nogil=True, fastmath=_FM)
def _push(hs, hi, size, s, i):
    """Push ``(s, i)`` onto the max-heap ``hs``/``hi`` of ``size`` items; returns the new size."""
    c = size
    hs[c] = s
    hi[c] = i
    while c > 0:
        p = (c - 1) >> 1
        if hs[p] >= hs[c]:
            break
        hs[p], hs[c] = hs[c], hs[p]
        hi[p], hi[c] = hi[c], hi[p]
        c = p
    return size + 1


@njit(cache=True, nogil=True, fastmath=_FM)
def _pop(hs, hi, size):
    """Drop the top of the max-heap; returns the new size."""
    size -= 1
    hs[0] = hs[size]
    hi[0] = hi[size]
    c = 0
    while True:
        a = 2 * c + 1
        if a >= size:
            break
        b = a + 1
        m = b if b < size and hs[b] > hs[a] else a
        if hs[c] >= hs[m]:
            break
        hs[m], hs[c] = hs[c], hs[m]
        hi[m], hi[c] = hi[c], hi[m]
        c = m
    return size


@njit(cache=True, nogil=True, fastmath=_FM)
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
    nc = 0
    nr = 0
    scanned = 0
    for e in entries:
        if e < 0 or e >= n or visited[e]:
            continue
        visited[e] = 1
        scanned += 1
        s = _dot(q, keys[e])
        if nc == cap:
            cap *= 2
            cs2 = np.empty(cap, np.float32)
            ci2 = np.empty(cap, np.int64)
            cs2[:nc] = cs[:nc]
            ci2[:nc] = ci[:nc]
            cs, ci = cs2, ci2
        nc = _push(cs, ci, nc, s, e)
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
            y = nbrs[node, t]
            if visited[y]:
                continue
            visited[y] = 1
            scanned += 1
            s = _dot(q, keys[y])
            if nr < ef or s > -rs[0]:
                if nc == cap:
                    cap *= 2
                    cs2 = np.empty(cap, np.float32)
                    ci2 = np.empty(cap, np.int64)
                    cs2[:nc] = cs[:nc]
                    ci2[:nc] = ci[:nc]
                    cs, ci = cs2, ci2
                nc = _push(cs, ci, nc, s, y)
                nr = _push(rs, ri, nr, -s, y)
                if nr > ef:
                    nr = _pop(rs, ri, nr)
    order = np.argsort(rs[:nr])  # ascending -score = descending score
    k = out_ids.shape[0]
    for j in range(k):
        if j < nr:
            out_ids[j] = ri[order[j]]
            out_scores[j] = -rs[order[j]]
        else:
            out_ids[j] = -1
            out_scores[j] = -np.inf
    return scanned


@njit(cache=True, nogil=True, fastmath=_FM)
def _scan_row(q, keys, n, out_ids, out_scores):
    """Exact top-k of ``q · k`` over the ``n`` keys of a row (a size-k heap); returns ``n``."""
    k = out_ids.shape[0]
    rs = np.empty(k + 1, np.float32)  # max-heap by -score: the worst kept key on top
    ri = np.empty(k + 1, np.int64)
    nr = 0
    for j in range(n):
        s = _dot(q, keys[j])
        if nr < k or s > -rs[0]:
            nr = _push(rs, ri, nr, -s, j)
            if nr > k:
                nr = _pop(rs, ri, nr)
    order = np.argsort(rs[:nr])
    for j in range(k):
        if j < nr:
            out_ids[j] = ri[order[j]]
            out_scores[j] = -rs[order[j]]
        else:
            out_ids[j] = -1
            out_scores[j] = -np.inf
    return n


@njit(cache=True, nogil=True, parallel=True, fastmath=_FM)
def _search_rows(qs, rows, keys, nbrs, deg, entries, n, k, ef, exact_below, out_ids, out_scores, scanned):
    for r in prange(qs.shape[0]):
        g = rows[r]
        m = n[g]
        if k >= m or ef >= m or m <= exact_below:
            scanned[r] = _scan_row(qs[r], keys[g], m, out_ids[r], out_scores[r])
        else:
            scanned[r] = _beam_search(qs[r], keys[g], nbrs[g], deg[g], entries[g], m, ef, out_ids[r], out_scores[r])


#: groups of scores whose maxima give the selection's floor (see :func:`_top_of_scores`)
SELECT_GROUPS = 512


@njit(cache=True, nogil=True, fastmath=True)
def _group_max(s, n, nb, gmax):
    """``gmax[b]`` = the maximum of ``s[b], s[b + nb], s[b + 2 nb], ...`` below ``n``: elementwise maxima of
    contiguous chunks (vectorises; full fast-math lets the max vectorise, the scores are finite)."""
    for b in range(nb):
        gmax[b] = s[b]
    for c in range(nb, n - nb + 1, nb):
        for b in range(nb):
            gmax[b] = max(gmax[b], s[c + b])
    c = (n // nb) * nb
    if c < n:
        for b in range(n - c):
            gmax[b] = max(gmax[b], s[c + b])


@njit(cache=True, nogil=True, fastmath=True)
def _sortable(s, m, out):
    """float32 ``s[:m]`` -> int32 ``out[:m]`` in the same order (a negative float's magnitude bits flipped)."""
    bits = s[:m].view(np.int32)
    for j in range(m):
        b = bits[j]
        out[j] = b ^ ((b >> 31) & np.int32(0x7FFFFFFF))


@njit(cache=True, nogil=True)
def _float_of_key(key):
    """The float32 whose :func:`_sortable` key is ``key`` (the transform is its own inverse)."""
    return np.array([key ^ ((key >> 31) & np.int32(0x7FFFFFFF))], np.int32).view(np.float32)[0]


@njit(cache=True, nogil=True, fastmath=True)
def _count_ge(keys, m, x):
    c = 0
    for j in range(m):
        c += keys[j] >= x
    return c


@njit(cache=True, nogil=True, fastmath=_FM)
def _kth_key(keys, m, k):
    """The ``k``-th largest of the int32 ``keys[:m]`` (``1 <= k <= m``): the largest ``x`` with at least ``k`` keys
    ``>= x``, by bisection on the value: 32 vectorised counting passes, no data-dependent branch per element
    (measured ~3x faster than a quickselect on a few hundred scores, which mispredicts its partition branches)."""
    lo, hi = np.int64(-2147483648), np.int64(2147483647)
    while lo < hi:
        mid = lo + (hi - lo + 1) // 2
        if _count_ge(keys, m, np.int32(mid)) >= k:
            lo = mid
        else:
            hi = mid - 1
    return np.int32(lo)


@njit(cache=True, nogil=True, fastmath=_FM)
def _top_of_scores(s, n, out_ids, out_scores, ordered):
    """Top-k of the first ``n`` (finite) scores ``s`` into ``out_ids`` / ``out_scores`` (``-1`` / ``-inf`` past
    ``n``; descending if ``ordered``, else in no particular order), in time linear in ``n`` whatever the order of
    the scores. The scores are split into ``SELECT_GROUPS`` strided groups; their maxima (one vectorised pass) give
    a floor, the k-th largest group maximum (k groups hold a score at least that high, so every top-k score is
    too); only the groups whose maximum reaches the floor are read again for the scores at or above it (a few
    hundred of 7.5k on real attention scores), among which the k-th largest is found by bisection (ties at it: the
    first met). Measured on real scores, 7.5k keys, top-116: 2.1x faster than blocks of 32 with quickselects."""
    k = out_ids.shape[0]
    kk = min(k, n)
    if kk > 0:
        nb = min(SELECT_GROUPS, n)
        gmax = np.empty(nb, np.float32)
        _group_max(s, n, nb, gmax)
        gkey = np.empty(nb, np.int32)
        _sortable(gmax, nb, gkey)
        floor = -np.inf
        if nb > kk:  # the k-th largest group maximum (a key of a real score: back to its float)
            floor = _float_of_key(_kth_key(gkey, nb, kk))
        cid = np.empty(n, np.int64)
        csc = np.empty(n, np.float32)
        cnt = 0
        for b in range(nb):
            if gmax[b] >= floor:
                for j in range(b, n, nb):
                    if s[j] >= floor:
                        cid[cnt] = j
                        csc[cnt] = s[j]
                        cnt += 1
        ckey = np.empty(cnt, np.int32)
        _sortable(csc, cnt, ckey)
        t = _kth_key(ckey, cnt, kk)
        ties = kk - (_count_ge(ckey, cnt, np.int32(t + 1)) if t < 2147483647 else 0)
        c = 0
        for j in range(cnt):
            if ckey[j] > t or (ckey[j] == t and ties > 0):
                if ckey[j] == t:
                    ties -= 1
                out_ids[c] = cid[j]
                out_scores[c] = csc[j]
                c += 1
        if ordered:
            order = np.argsort(-out_scores[:kk], kind="mergesort")
            top_ids = out_ids[:kk][order]
            top_scores = out_scores[:kk][order]
            out_ids[:kk] = top_ids
            out_scores[:kk] = top_scores
    for j in range(kk, k):
        out_ids[j] = -1
        out_scores[j] = -np.inf


@njit(cache=True, nogil=True, parallel=True, fastmath=_FM)
def _select_rows(scores, n, out_ids, out_scores):
    """Top-k of every query's scores ``(R, M, m)`` over the ``n[r]`` keys of its row (rows in parallel)."""
    for r in prange(scores.shape[0]):
        for g in range(scores.shape[1]):
            _top_of_scores(scores[r, g], n[r], out_ids[r, g], out_scores[r, g], True)


@njit(cache=True, nogil=True, parallel=True, fastmath=_FM)
def _select_rescore_bf16(bits, n, qs, keys, kc, out_ids, out_scores):
    """Top-``k`` of every query's bfloat16 scores, given as their bits ``(R, M, m)`` uint16, over the ``n[r]`` keys
    of its row: the best ``kc >= k`` by the bfloat16 scores (each query's row widened to float32 in a scratch row
    that stays in cache: the bits shifted into the high half), re-scored exactly (``qs`` ``(R, M, D)`` float32
    against ``keys``), the best ``k`` of those, descending, into ``out_ids`` / ``out_scores`` ``(R, M, k)``
    (``-1`` / ``-inf`` past a row's keys). One call for the selection and the re-scoring (rows in parallel)."""
    k = out_ids.shape[2]
    for r in prange(bits.shape[0]):
        wide = np.empty(bits.shape[2], np.uint32)
        row = wide.view(np.float32)
        cand = np.empty(kc, np.int64)
        cand_s = np.empty(kc, np.float32)
        s = np.empty(kc, np.float32)
        for g in range(bits.shape[1]):
            b = bits[r, g]
            for j in range(n[r]):
                wide[j] = np.uint32(b[j]) << np.uint32(16)
            _top_of_scores(row, n[r], cand, cand_s, False)
            for j in range(kc):
                i = cand[j]
                s[j] = _dot(qs[r, g], keys[r, i]) if i >= 0 else -np.inf
            order = np.argsort(-s)
            for j in range(k):
                i = cand[order[j]]
                out_ids[r, g, j] = i
                out_scores[r, g, j] = s[order[j]] if i >= 0 else -np.inf


@njit(cache=True, nogil=True, fastmath=_FM)
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


@njit(cache=True, nogil=True, fastmath=_FM)
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
    nslot = 0
    rs = np.empty((G, ef + 1), np.float32)  # per head: max-heap by -score (worst kept on top)
    ri = np.empty((G, ef + 1), np.int64)
    nr = np.zeros(G, np.int64)
    visited = np.zeros(n, np.uint8)
    sc = np.empty(G, np.float32)
    nc = 0
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
                z = nbrs[node, t]
                if visited[z]:
                    continue
                visited[z] = 1
                scanned += 1
                best = -np.inf
                improves = False
                for g in range(G):
                    sc[g] = _dot(qg[g], keys[z])
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
        best = -np.inf
        for g in range(G):
            sc[g] = _dot(qg[g], keys[y])
            best = max(best, sc[g] * inv[g])
            nr[g] = _push(rs[g], ri[g], nr[g], -sc[g], y)
            if nr[g] > ef:
                nr[g] = _pop(rs[g], ri[g], nr[g])
        ck, ci, cscore, cnode, nc, nslot = _add_candidate(ck, ci, cscore, cnode, nc, nslot, best, sc, y)
    k = out_ids.shape[1]
    for g in range(G):
        order = np.argsort(rs[g, : nr[g]])
        for j in range(k):
            if j < nr[g]:
                out_ids[g, j] = ri[g, order[j]]
                out_scores[g, j] = -rs[g, order[j]]
            else:
                out_ids[g, j] = -1
                out_scores[g, j] = -np.inf
    return scanned


@njit(cache=True, nogil=True, parallel=True, fastmath=_FM)
def _search_groups(qs, rows, keys, nbrs, deg, entries, n, k, ef, exact_below, out_ids, out_scores, scanned):
    for p in prange(qs.shape[0]):
        g = rows[p]
        m = n[g]
        if k >= m or ef >= m or m <= exact_below:
            scanned[p] = m
            for h in range(qs.shape[1]):
                _scan_row(qs[p, h], keys[g], m, out_ids[p, h], out_scores[p, h])
        else:
            scanned[p] = _group_search(qs[p], keys[g], nbrs[g], deg[g], entries[g], m, ef, out_ids[p], out_scores[p])


@njit(cache=True, nogil=True, fastmath=_FM, inline="always")
def _retrieved_max(ids, scores, scale, m):
    """``max(m, scale · score)`` over the retrieved slots of one row (``ids < 0`` = empty slot)."""
    for j in range(ids.shape[0]):
        if ids[j] >= 0 and scale * scores[j] > m:
            m = scale * scores[j]
    return m


@njit(cache=True, nogil=True, fastmath=_FM, inline="always")
def _retrieved_accumulate(ids, scores, values, scale, m, out):
    """Add ``exp(scale · score − m) · v`` of one row's retrieved keys into ``out``; returns the sum of the weights."""
    total = np.float32(0.0)
    for j in range(ids.shape[0]):
        i = ids[j]
        if i < 0:
            continue
        p = np.float32(np.exp(scale * scores[j] - m))
        total += p
        v = values[i]
        for c in range(out.shape[0]):
            out[c] += p * v[c]
    return total


@njit(cache=True, nogil=True, parallel=True, fastmath=_FM)
def _attend_rows(ids, scores, rows, values, scale, out, lse):
    """Softmax over the retrieved keys of each row (logit = scale · q·k, already computed by the search)."""
    for r in prange(ids.shape[0]):
        g = rows[r]
        m = _retrieved_max(ids[r], scores[r], scale, -np.inf)
        for c in range(out.shape[1]):
            out[r, c] = 0.0
        if m == -np.inf:
            lse[r] = -np.inf
            continue
        total = _retrieved_accumulate(ids[r], scores[r], values[g], scale, m, out[r])
        for c in range(out.shape[1]):
            out[r, c] /= total
        lse[r] = m + np.log(total)


@njit(cache=True, nogil=True, parallel=True, fastmath=_FM)
def _attend_union_rows(ids, scores, rows, values, qs, skeys, svalues, svalid, scale, out):
    """One softmax per row over the union of its retrieved host keys (``ids``, their ``q · k`` in ``scores``) and
    the static keys ``skeys[rows[r]]`` (valid where ``svalid``): the LSE merge of the two parts in one pass."""
    T = svalid.shape[1]  # skeys may hold spare slots past T
    for r in prange(ids.shape[0]):
        g = rows[r]
        sl = np.empty(T, np.float32)
        m = -np.inf
        for j in range(T):
            if svalid[g, j]:
                sl[j] = scale * _dot(qs[r], skeys[g, j])
                if sl[j] > m:
                    m = sl[j]
        m = _retrieved_max(ids[r], scores[r], scale, m)
        for c in range(out.shape[1]):
            out[r, c] = 0.0
        if m == -np.inf:
            continue
        total = np.float32(0.0)
        for j in range(T):
            if svalid[g, j]:
                p = np.float32(np.exp(sl[j] - m))
                total += p
                v = svalues[g, j]
                for c in range(out.shape[1]):
                    out[r, c] += p * v[c]
        total += _retrieved_accumulate(ids[r], scores[r], values[g], scale, m, out[r])
        for c in range(out.shape[1]):
            out[r, c] /= total


@njit(cache=True, nogil=True, parallel=True, fastmath=_FM)
def _attend_union_groups(ids, scores, values, qs, skeys, svalues, svalid, scale, out):
    """:func:`_attend_union_rows` for the ``G`` query heads of each row (one query each, GQA): every static key and
    value is read once for the whole group. ``ids`` / ``scores`` ``(R, G, k)``, ``qs`` ``(R, G, D)``, ``out``
    ``(R, G, Dv)``."""
    T = svalid.shape[1]
    G = qs.shape[1]
    for r in prange(qs.shape[0]):
        sl = np.empty((G, T), np.float32)
        m = np.full(G, -np.inf, np.float32)
        for j in range(T):
            if svalid[r, j]:
                kj = skeys[r, j]
                for g in range(G):
                    x = scale * _dot(qs[r, g], kj)
                    sl[g, j] = x
                    if x > m[g]:
                        m[g] = x
        for g in range(G):
            m[g] = _retrieved_max(ids[r, g], scores[r, g], scale, m[g])
            for c in range(out.shape[2]):
                out[r, g, c] = 0.0
        total = np.zeros(G, np.float32)
        for j in range(T):
            if svalid[r, j]:
                vj = svalues[r, j]
                for g in range(G):
                    if m[g] == -np.inf:
                        continue
                    p = np.float32(np.exp(sl[g, j] - m[g]))
                    total[g] += p
                    for c in range(out.shape[2]):
                        out[r, g, c] += p * vj[c]
        for g in range(G):
            if m[g] == -np.inf:
                continue
            total[g] += _retrieved_accumulate(ids[r, g], scores[r, g], values[r], scale, m[g], out[r, g])
            for c in range(out.shape[2]):
                out[r, g, c] /= total[g]


@njit(cache=True, nogil=True, parallel=True, fastmath=_FM)
def _attend_all_rows(qs, keys, values, n, scale, out, lse):
    """Exact softmax attention of the ``M`` queries of each row over its ``n[g]`` keys (one pass over the keys per
    row, online softmax; rows in parallel)."""
    R, M = qs.shape[0], qs.shape[1]
    for g in prange(R):
        m = np.full(M, -np.inf, np.float32)
        total = np.zeros(M, np.float32)
        acc = np.zeros((M, values.shape[2]), np.float32)
        for j in range(n[g]):
            kj = keys[g, j]
            vj = values[g, j]
            for r in range(M):
                s = scale * _dot(qs[g, r], kj)
                if s > m[r]:
                    c = np.float32(np.exp(m[r] - s)) if m[r] > -np.inf else np.float32(0.0)
                    total[r] = total[r] * c + 1.0
                    for d in range(vj.shape[0]):
                        acc[r, d] = acc[r, d] * c + vj[d]
                    m[r] = s
                else:
                    p = np.float32(np.exp(s - m[r]))
                    total[r] += p
                    for d in range(vj.shape[0]):
                        acc[r, d] += p * vj[d]
        for r in range(M):
            if total[r] == 0.0:
                lse[g, r] = -np.inf
                for d in range(values.shape[2]):
                    out[g, r, d] = 0.0
            else:
                lse[g, r] = m[r] + np.log(total[r])
                for d in range(values.shape[2]):
                    out[g, r, d] = acc[r, d] / total[r]


@njit(cache=True, nogil=True)
def _add_edge(nbrs, deg, src, dst, cap):
    d = deg[src]
    if d >= cap or src == dst:
        return False
    for t in range(d):
        if nbrs[src, t] == dst:
            return False
    nbrs[src, d] = dst
    deg[src] = d + 1
    return True


@njit(cache=True, nogil=True)
def _project(keys, qk, kq, n, degree, window, hubs, nbrs, deg):
    """RoarGraph-style projection of the query→key bipartite graph onto the ``n`` keys of one row (module doc).

    Candidates of key ``L[i]`` in a query's top list ``L``: the keys ``L[j]`` with ``|i - j| <= window`` and the
    query's ``hubs`` best keys; every key also gets its nearest query's ``hubs`` best keys. A node keeps the
    ``degree`` candidates shared by the most queries (ties: the earlier rank), selected with a size-``degree``
    heap (no sort of all candidates).
    """
    nq, kb = qk.shape
    h = min(hubs, kb)
    cnt = np.zeros(n + 1, np.int64)
    for q in range(nq):  # count pass: only the ranks that can be candidates are visited
        for i in range(kb):
            x = qk[q, i]
            if x < 0:
                continue
            c = 0
            for j in range(max(0, i - window), min(kb, i + window + 1)):
                if j != i and qk[q, j] >= 0:
                    c += 1
            for j in range(h):
                if abs(i - j) > window and qk[q, j] >= 0:
                    c += 1
            cnt[x + 1] += c
    for x in range(n):
        q = kq[x]
        for j in range(h):
            if qk[q, j] >= 0 and qk[q, j] != x:
                cnt[x + 1] += 1
    ptr = np.cumsum(cnt)
    cid = np.empty(ptr[n], np.int32)
    crank = np.empty(ptr[n], np.int16)
    fill = ptr[:n].copy()
    for q in range(nq):
        for i in range(kb):
            x = qk[q, i]
            if x < 0:
                continue
            f = fill[x]
            for j in range(max(0, i - window), min(kb, i + window + 1)):
                y = qk[q, j]
                if j != i and y >= 0:
                    cid[f] = y
                    crank[f] = j
                    f += 1
            for j in range(h):
                y = qk[q, j]
                if abs(i - j) > window and y >= 0:
                    cid[f] = y
                    crank[f] = j
                    f += 1
            fill[x] = f
    for x in range(n):
        q = kq[x]
        for j in range(h):
            y = qk[q, j]
            if y >= 0 and y != x:
                cid[fill[x]] = y
                crank[fill[x]] = j
                fill[x] += 1
    cap = nbrs.shape[1]
    mark = np.full(n, -1, np.int64)  # unique candidates of node x with their co-occurrence weight
    acc = np.zeros(n, np.float64)
    uid = np.empty(n, np.int64)
    hw = np.empty(degree, np.float64)  # min-heap of the best `degree` weights (weakest on top)
    hid = np.empty(degree, np.int64)
    for x in range(n):
        m = 0
        for t in range(ptr[x], ptr[x + 1]):
            y = cid[t]
            if mark[y] != x:
                mark[y] = x
                acc[y] = 0.0
                uid[m] = y
                m += 1
            acc[y] += 1.0 - crank[t] / (kb + 1.0) * 1e-3  # ties: the better rank
        size = 0
        for t in range(m):
            y = uid[t]
            if y == x:
                continue
            w = acc[y]
            if size < degree:  # push, sift up (min-heap)
                c = size
                hw[c], hid[c] = w, y
                while c > 0:
                    p = (c - 1) >> 1
                    if hw[p] <= hw[c]:
                        break
                    hw[p], hw[c] = hw[c], hw[p]
                    hid[p], hid[c] = hid[c], hid[p]
                    c = p
                size += 1
            elif w > hw[0]:  # replace the weakest, sift down
                hw[0], hid[0] = w, y
                c = 0
                while True:
                    a = 2 * c + 1
                    if a >= size:
                        break
                    b = a + 1
                    s = b if b < size and hw[b] < hw[a] else a
                    if hw[c] <= hw[s]:
                        break
                    hw[s], hw[c] = hw[c], hw[s]
                    hid[s], hid[c] = hid[c], hid[s]
                    c = s
        for t in np.argsort(-hw[:size]):  # strongest first
            _add_edge(nbrs, deg, x, hid[t], degree)
    # reverse edges (into the slack up to max_degree), then an in-edge for every key that has none
    base = deg.copy()
    indeg = np.zeros(n, np.int64)
    for x in range(n):
        for t in range(base[x]):
            y = nbrs[x, t]
            indeg[y] += 1
            _add_edge(nbrs, deg, y, x, cap)
    for x in range(n):
        for t in range(base[x], deg[x]):
            indeg[nbrs[x, t]] += 1
    no_parent = np.full(n, -1, np.int32)  # no edge is protected yet (_connect makes every key reachable after)
    for x in range(n):
        if indeg[x] > 0:
            continue
        q = kq[x]
        for j in range(kb):
            y = qk[q, j]
            if y >= 0 and y != x and _add_edge(nbrs, deg, y, x, cap):
                indeg[x] += 1
                break
        p = qk[q, 0]
        if indeg[x] == 0 and p >= 0 and p != x:  # every candidate is full: re-select the list of the query's best key
            if _prune_insert(keys, nbrs, deg, no_parent, p, x):
                indeg[x] += 1


@njit(cache=True, nogil=True)
def _prune_insert(keys, nbrs, deg, parent, y, x):
    """Add the edge ``y -> x``; when ``y``'s list is full, re-select it from its neighbours and ``x`` by the occlusion
    rule of HNSW / NSG's neighbour selection (inner product as similarity): candidates in order of ``k_y · k_c``, a
    candidate ``c`` is occluded by an already selected ``z`` with ``k_z · k_c > k_y · k_c``. ``x`` and the
    spanning-tree edges (``parent[c] == y``) are always kept; the list is filled back to full, so one edge goes: the
    least similar occluded candidate (else the least similar unprotected one). The dropped key is linked from its
    occluder where that has room (HNSW drops it; the tree edges already keep every key reachable). Returns False
    (nothing changed) when every slot of ``y`` is a tree edge."""
    cap = nbrs.shape[1]
    d = deg[y]
    for t in range(d):
        if nbrs[y, t] == x:
            return True
    if d < cap:
        nbrs[y, d] = x
        deg[y] = d + 1
        return True
    m = d + 1
    cand = np.empty(m, np.int64)
    for t in range(d):
        cand[t] = nbrs[y, t]
    cand[d] = x
    sim = np.empty(m, np.float32)
    for t in range(m):
        sim[t] = _dot(keys[y], keys[cand[t]])
    order = np.argsort(-sim)
    chosen = np.empty(m, np.int64)
    nchosen = 0
    drop = -1  # slot of the candidate to drop, and the selected key that occludes it (-1: none)
    occluder = -1
    fallback = -1  # the least similar unprotected candidate
    for o in range(m):
        t = order[o]
        c = cand[t]
        keep = c == x or parent[c] == y
        by = -1
        if not keep:
            fallback = t
            for u in range(nchosen):
                z = cand[chosen[u]]
                if _dot(keys[z], keys[c]) > sim[t]:
                    by = z
                    break
        if by < 0:
            chosen[nchosen] = t
            nchosen += 1
        else:
            drop, occluder = t, by
    if drop < 0:
        drop = fallback
    if drop < 0:
        return False
    gone = cand[drop]  # never x (always kept): drop < d is a slot of y's list
    nbrs[y, drop] = x
    if occluder >= 0:
        _add_edge(nbrs, deg, occluder, gone, cap)
    return True


@njit(cache=True, nogil=True)
def _attach(keys, nbrs, deg, parent, cands, x, reached):
    """Link ``x`` from a reached key (``reached[y]``, or every key ``< x`` when ``reached`` is empty): the first of
    ``cands`` (``-1`` ends them) that takes the edge (:func:`_prune_insert`), else any reached key that does.
    Records the edge as ``x``'s spanning-tree edge (``parent[x]``) and returns its source (-1: none could)."""
    every = reached.shape[0] == 0
    for j in range(cands.shape[0]):
        y = cands[j]
        if y < 0:
            break
        if y != x and (y < x if every else reached[y] == 1) and _prune_insert(keys, nbrs, deg, parent, y, x):
            parent[x] = y
            return y
    for y in range(x if every else reached.shape[0]):
        if y != x and (every or reached[y] == 1) and _prune_insert(keys, nbrs, deg, parent, y, x):
            parent[x] = y
            return y
    return -1


@njit(cache=True, nogil=True)
def _flood(nbrs, deg, reached, stack, top, parent):
    """Mark every key reachable from the ``top`` keys on ``stack``, recording the edge each was reached by."""
    while top > 0:
        top -= 1
        x = stack[top]
        for t in range(deg[x]):
            y = nbrs[x, t]
            if not reached[y]:
                reached[y] = 1
                parent[y] = x
                stack[top] = y
                top += 1
    return top


@njit(cache=True, nogil=True)
def _connect(keys, nbrs, deg, entries, n, ef):
    """Make every key reachable from the entry points (RoarGraph/NSG connectivity enhancement): a key the entries
    cannot reach is searched for (with its own key as query) and linked from the nearest reachable key found
    (:func:`_attach`). Without a valid entry point, key 0 becomes the first. Returns the spanning tree of the
    result, ``parent`` ``(n,)`` int32 (the edge each key is reached by; -1 for the entry points): edges later
    pruning never drops, so every key stays reachable."""
    parent = np.full(n, -1, np.int32)
    if n == 0:
        return parent
    reached = np.zeros(n, np.uint8)
    stack = np.empty(n, np.int64)
    top = 0
    for e in entries:
        if 0 <= e < n and not reached[e]:
            reached[e] = 1
            stack[top] = e
            top += 1
    if top == 0:
        entries[0] = 0
        reached[0] = 1
        stack[0] = 0
        top = 1
    _flood(nbrs, deg, reached, stack, top, parent)
    ids = np.empty(ef, np.int64)
    sc = np.empty(ef, np.float32)
    for x in range(n):
        if reached[x]:
            continue
        _beam_search(keys[x], keys, nbrs, deg, entries, n, ef, ids, sc)
        if _attach(keys, nbrs, deg, parent, ids, x, reached) < 0:
            raise RuntimeError("attention index: no reachable key can link a new key (every edge is a tree edge)")
        reached[x] = 1
        stack[0] = x
        _flood(nbrs, deg, reached, stack, 1, parent)
    return parent


@njit(cache=True, nogil=True, parallel=True)
def _insert_rows(keys, nbrs, deg, parent, entries, n_old, n_new, degree, ef, failed):
    """Link the keys ``[n_old[g], n_new[g])`` of every row ``g`` into its graph (rows in parallel): out-edges to the
    key's ``degree`` nearest found by a search, reverse edges where those have room, and one reverse edge that is
    always made (:func:`_attach`, pruning a full list): the key's spanning-tree edge, so it stays reachable.
    ``failed[g]`` is set if a key of row ``g`` found no key to link it (impossible: a tree of ``m`` keys has
    ``m - 1`` edges, fewer than their slots)."""
    cap = nbrs.shape[2]
    none = np.empty(0, np.uint8)
    for g in prange(keys.shape[0]):
        ids = np.empty(ef, np.int64)
        sc = np.empty(ef, np.float32)
        for x in range(n_old[g], n_new[g]):
            if x == 0:
                entries[g, 0] = 0
                parent[g, 0] = -1
                continue
            _beam_search(keys[g, x], keys[g], nbrs[g], deg[g], entries[g], x, ef, ids, sc)
            for j in range(min(degree, ef)):
                y = ids[j]
                if y < 0:
                    break
                _add_edge(nbrs[g], deg[g], x, y, degree)
            linked = -1
            for j in range(min(degree, ef)):
                y = ids[j]
                if y < 0:
                    break
                if _add_edge(nbrs[g], deg[g], y, x, cap) and linked < 0:
                    linked = y
            if linked >= 0:
                parent[g, x] = linked
            elif _attach(keys[g], nbrs[g], deg[g], parent[g], ids, x, none) < 0:
                failed[g] = 1


# ------------------------------------------------------------------------------------------ the index


@dataclass
class GraphBuild:
    """The graph build of the rows of an :class:`AttentionIndex` that had keys but no graph, as a job that can run
    in another thread (:meth:`run`; the compiled parts and faiss release the GIL) while the index keeps serving
    the main thread: it reads only the keys that were stored when it was made (views the index never rewrites)
    and writes only its own arrays. :meth:`AttentionIndex.install` puts its graphs into the index."""

    rows: list[int]
    keys: list[np.ndarray]
    queries: list[np.ndarray]
    degree: int
    max_degree: int
    build_top_k: int
    window: int
    hubs: int
    entry_points: int
    graphs: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] | None = None
    seconds: float = 0.0
    knn_seconds: float = 0.0

    def run(self) -> GraphBuild:
        """Build the graph of every row (faiss exact kNN, compiled projection and connection); returns ``self``."""
        import faiss

        t0 = time.perf_counter()
        graphs = []
        for g, (k, q) in enumerate(zip(self.keys, self.queries, strict=True)):
            n = k.shape[0]
            kb = min(self.build_top_k, n)
            t1 = time.perf_counter()
            kindex = faiss.IndexFlatIP(k.shape[1])
            kindex.add(k)
            _, qk = kindex.search(q, kb)  # each prefill query's top keys
            qindex = faiss.IndexFlatIP(q.shape[1])
            qindex.add(q)
            _, kq = qindex.search(k, 1)  # each key's nearest prefill query
            self.knn_seconds += time.perf_counter() - t1
            nbrs = np.zeros((n, self.max_degree), np.int32)
            deg = np.zeros(n, np.int32)
            _project(k, qk.astype(np.int64), kq[:, 0].astype(np.int64), n, self.degree, self.window, self.hubs, nbrs,
                     deg)
            # entry points: half the most frequent pivots (top key of a prefill query), half the pivots of random
            # queries (coverage of the query distribution); then every key is made reachable from them
            E = self.entry_points
            pivots, counts = np.unique(qk[:, 0], return_counts=True)
            chosen = list(pivots[np.argsort(-counts, kind="stable")][: (E + 1) // 2])
            seen = set(chosen)
            for p in qk[np.random.default_rng(self.rows[g]).permutation(qk.shape[0]), 0]:
                if len(chosen) >= E:
                    break
                if p not in seen:
                    chosen.append(p)
                    seen.add(p)
            entries = np.full(E, -1, np.int64)
            entries[: len(chosen)] = chosen
            parent = _connect(k, nbrs, deg, entries, n, 64)
            graphs.append((nbrs, deg, entries, parent))
        self.graphs = graphs
        self.seconds = time.perf_counter() - t0
        return self


def _check_static_slots(static_keys: np.ndarray, static_values: np.ndarray, T: int) -> None:
    """The static part's key / value buffers hold at least the ``T`` slots its validity covers."""
    if static_keys.shape[1] < T or static_values.shape[1] < T:
        raise ValueError(f"static keys {static_keys.shape} / values {static_values.shape} hold fewer than the {T} "
                         "slots of static_valid")


class AttentionIndex:
    """Host K/V store plus one attention-aware graph per row (row = ``b * H_kv + kv_head``).

    Keys are *stored* (:meth:`store`) and *linked* into their row's graph separately: :meth:`build` does both for
    an empty index from prefill queries; :meth:`graph_build` + :meth:`GraphBuild.run` (any thread) +
    :meth:`install` do the same with the expensive part off the calling thread, while the keys stored meanwhile
    wait (unlinked) until :meth:`install` links them; :meth:`insert` stores and links later tokens.

    Parameters
    ----------
    rows : int
        Independent heads (``B * H_kv``).
    dim, dim_v : int
        Key and value head dims.
    degree : int, default 32
        Out-degree of the projected graph (the paper uses ~35); reverse edges may fill up to ``max_degree``.
    max_degree : int, optional
        Edge slots per node (default ``degree + degree // 2``).
    build_top_k : int, default 64
        Exact top keys per prefill query used to build the bipartite graph.
    entry_points : int, default 32
        Search starts from this many keys: half the most frequent top keys of the prefill queries, half the top
        keys of random prefill queries.
    window, hubs : int, default 4, 4
        Projection: a key in a query's top list links to the keys within ``window`` ranks of it and to the
        query's ``hubs`` best keys.
    """

    def __init__(
        self,
        rows: int,
        dim: int,
        dim_v: int,
        *,
        degree: int = 32,
        max_degree: int | None = None,
        build_top_k: int = 64,
        entry_points: int = 32,
        window: int = 4,
        hubs: int = 4,
        capacity: int = 256,
    ):
        for name, val in (("rows", rows), ("dim", dim), ("dim_v", dim_v), ("degree", degree),
                          ("build_top_k", build_top_k), ("entry_points", entry_points)):
            if val < 1:
                raise ValueError(f"{name} ({val}) must be >= 1")
        self.rows, self.dim, self.dim_v = rows, dim, dim_v
        self.degree = degree
        self.max_degree = degree + degree // 2 if max_degree is None else max_degree
        if self.max_degree < degree:
            raise ValueError(f"max_degree ({self.max_degree}) must be >= degree ({degree})")
        self.build_top_k, self.window, self.hubs = build_top_k, window, hubs
        self.n = np.zeros(rows, np.int64)  # keys stored per row
        self.linked = np.zeros(rows, np.int64)  # of which linked into the row's graph (the first `linked`)
        self._alloc(max(1, capacity))
        self.entries = np.full((rows, entry_points), -1, np.int64)
        self._scores = None  # scan_rows' score buffer (a torch tensor), kept between calls
        self._scores_bf16 = None
        self._scan_keys = None  # scan_rows' bfloat16 copy of the keys (torch), made on its first bfloat16 scan

    def _alloc(self, capacity: int) -> None:
        """(Re)allocate the arrays with room for ``capacity`` keys per row. New arrays, never resized in place: a
        :class:`GraphBuild` running in another thread keeps reading its views of the old ones."""
        old = getattr(self, "keys", None)
        keys = np.zeros((self.rows, capacity, self.dim), np.float32)
        values = np.zeros((self.rows, capacity, self.dim_v), np.float32)
        nbrs = np.zeros((self.rows, capacity, self.max_degree), np.int32)
        deg = np.zeros((self.rows, capacity), np.int32)
        parent = np.full((self.rows, capacity), -1, np.int32)
        positions = np.zeros((self.rows, capacity), np.int64)
        if old is not None:
            c = self.capacity
            keys[:, :c], values[:, :c], nbrs[:, :c], deg[:, :c] = self.keys, self.values, self.nbrs, self.deg
            parent[:, :c], positions[:, :c] = self.parent, self.positions
        self.keys, self.values, self.nbrs, self.deg, self.positions = keys, values, nbrs, deg, positions
        self.parent = parent  # per key: the neighbour-list edge of the spanning tree that keeps it reachable
        self.capacity = capacity

    def _reserve(self, needed: int) -> None:
        if needed > self.capacity:
            cap = self.capacity
            while cap < needed:
                cap *= 2
            self._alloc(cap)

    def nbytes(self) -> int:
        """Host bytes held: the K/V store, positions, the graph (capacity included) and the scan's score buffer."""
        scores = sum(t.numel() * t.element_size() for t in (self._scores, self._scores_bf16, self._scan_keys)
                     if t is not None)
        return scores + sum(a.nbytes for a in (self.keys, self.values, self.nbrs, self.deg, self.parent,
                                                self.positions, self.entries))

    def store(self, keys: list[np.ndarray], values: list[np.ndarray], positions: list[np.ndarray]) -> None:
        """Append ``keys[g]`` ``(n_g, D)``, ``values[g]`` ``(n_g, Dv)`` and their token ``positions[g]`` to row
        ``g`` without linking them (:meth:`link`, :meth:`install`)."""
        for name, arr in (("keys", keys), ("values", values), ("positions", positions)):
            if len(arr) != self.rows:
                raise ValueError(f"store got {len(arr)} rows of {name}, the index has rows={self.rows}")
        self._reserve(int(max(self.n[g] + keys[g].shape[0] for g in range(self.rows))))
        for g in range(self.rows):
            a = int(self.n[g])
            b = a + keys[g].shape[0]
            self.keys[g, a:b], self.values[g, a:b], self.positions[g, a:b] = keys[g], values[g], positions[g]
            self.n[g] = b

    def _scan_copy(self):
        """The bfloat16 copy of every row's stored keys, contiguous ``(rows, m', D)`` with ``m'`` the most keys of a
        row rounded up to ``SCAN_COPY_STEP`` (slots past a row's keys are zero): each row extended by the keys stored
        since the last call; the old part is copied only when a row outgrows ``m'`` (a batched matmul over a
        strided slice of a larger buffer takes a ~9x slower path, one matmul per row costs ~10% more, measured)."""
        torch = _torch()
        old = self._scan_keys
        most = int(self.n.max())
        if old is not None and old.shape[1] >= most and (self._scan_n == self.n).all():
            return old
        if old is None or old.shape[1] < most:
            new = torch.zeros((self.rows, -(-most // SCAN_COPY_STEP) * SCAN_COPY_STEP, self.dim), dtype=torch.bfloat16)
            done = np.zeros(self.rows, np.int64)
            if old is not None:
                new[:, : old.shape[1]] = old
                done = self._scan_n
        else:
            new, done = old, self._scan_n
        for r in range(self.rows):
            a, b = int(done[r]), int(self.n[r])
            if b > a:
                new[r, a:b] = torch.from_numpy(self.keys[r, a:b])
        self._scan_keys, self._scan_n = new, self.n.copy()
        return new

    def graph_build(self, queries: list[np.ndarray]) -> GraphBuild:
        """The graph build of every row that holds keys but no graph, from ``queries[g]`` ``(Nq_g, D)`` (the
        prefill queries of the row's query heads). Run it (:meth:`GraphBuild.run`, any thread), then
        :meth:`install` it."""
        if len(queries) != self.rows:
            raise ValueError(f"graph_build got {len(queries)} rows of queries, the index has rows={self.rows}")
        rows = [g for g in range(self.rows) if self.n[g] > 0 and self.linked[g] == 0]
        for g in rows:
            if queries[g].shape[0] == 0:
                raise ValueError(f"row {g} has {self.n[g]} keys but no prefill queries to build its graph from")
        return GraphBuild(
            rows, [self.keys[g, : self.n[g]] for g in rows],
            [np.ascontiguousarray(queries[g], dtype=np.float32) for g in rows],
            self.degree, self.max_degree, self.build_top_k, self.window, self.hubs, self.entries.shape[1],
        )

    def install(self, build: GraphBuild, ef: int = 64) -> float:
        """Put the graphs of a finished :meth:`graph_build` into the index, then link the keys stored since it was
        made (:meth:`link`). Returns the seconds spent linking."""
        if build.graphs is None:
            raise RuntimeError("install() needs a finished GraphBuild: call its run() first")
        for g, k, (nbrs, deg, entries, parent) in zip(build.rows, build.keys, build.graphs, strict=True):
            if self.linked[g] != 0:
                raise RuntimeError(f"row {g} already has a graph; a GraphBuild is installed once")
            n = k.shape[0]
            self.nbrs[g, :n], self.deg[g, :n], self.parent[g, :n], self.entries[g] = nbrs, deg, parent, entries
            self.linked[g] = n
        return self.link(ef)

    def link(self, ef: int = 64) -> float:
        """Link the stored keys ``[linked, n)`` of every row into its graph (each new key is searched with itself
        as the query; its ``degree`` best keys become its out-edges, reverse edges where a node has room).
        Returns the seconds spent."""
        t0 = time.perf_counter()
        if (self.linked < self.n).any():
            failed = np.zeros(self.rows, np.uint8)
            _insert_rows(self.keys, self.nbrs, self.deg, self.parent, self.entries, self.linked.copy(), self.n.copy(),
                         self.degree, max(ef, 1), failed)
            if failed.any():
                raise RuntimeError(f"attention index rows {np.nonzero(failed)[0].tolist()}: a new key found no key to "
                                   "link it from (every edge slot holds a spanning-tree edge)")
            self.linked[:] = self.n
        return time.perf_counter() - t0

    def build(
        self,
        keys: list[np.ndarray],
        values: list[np.ndarray],
        positions: list[np.ndarray],
        queries: list[np.ndarray],
    ) -> float:
        """Fill the empty index and build its graphs in this thread: row ``g`` gets ``keys[g]`` ``(N_g, D)``
        (float32) etc.; its graph is built from ``queries[g]`` ``(Nq_g, D)``. Returns the seconds spent."""
        if int(self.n.max()) != 0:
            raise ValueError("build() fills an empty index; use insert() to add keys later")
        t0 = time.perf_counter()
        self.store(keys, values, positions)
        self.install(self.graph_build(queries).run())
        return time.perf_counter() - t0

    def insert(self, keys: list[np.ndarray], values: list[np.ndarray], positions: list[np.ndarray], ef: int = 64
               ) -> float:
        """Append ``keys[g]`` ``(n_g, D)`` to row ``g`` and link them into its graph; returns the seconds spent."""
        t0 = time.perf_counter()
        self.store(keys, values, positions)
        self.link(ef)
        return time.perf_counter() - t0

    def _check_linked(self, rows: np.ndarray) -> None:
        if (self.linked[rows] < self.n[rows]).any():
            raise RuntimeError("the index holds keys not linked into their graph yet (a graph build is pending): "
                               "install() it (or link()) before searching")

    def search(self, queries: np.ndarray, rows: np.ndarray, k: int, ef: int, exact_below: int = 0
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Approximate top-``k`` keys by ``q · k`` for each query ``(R, D)`` in its row ``rows`` ``(R,)``.

        Returns ``ids`` ``(R, k)`` (``-1`` where a row holds fewer keys), their ``q · k`` ``(R, k)`` float32
        (descending) and the keys scored per query ``(R,)``. A row whose keys number ``<= max(k, ef,
        exact_below)`` is scanned exactly (a sequential scan costs ~10x less per key than a graph walk's random
        reads, so small rows are cheaper to scan).
        """
        if ef < k:
            raise ValueError(f"ef ({ef}) must be >= k ({k}): the search list holds the k results")
        q = np.ascontiguousarray(queries, dtype=np.float32)
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        self._check_linked(rows)
        ids = np.empty((q.shape[0], k), np.int64)
        scores = np.empty((q.shape[0], k), np.float32)
        scanned = np.empty(q.shape[0], np.int64)
        _search_rows(q, rows, self.keys, self.nbrs, self.deg, self.entries, self.n, k, ef, exact_below, ids, scores,
                     scanned)
        return ids, scores, scanned

    def search_grouped(self, queries: np.ndarray, rows: np.ndarray, k: int, ef: int, exact_below: int = 0
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`search` for the ``G`` query heads of one kv head at once (GQA): ``queries`` ``(P, G, D)``, ``rows``
        ``(P,)``; one graph walk per ``p`` scores every visited key against the ``G`` queries. Returns ``ids`` and
        scores ``(P, G, k)`` and the keys scored per walk ``(P,)``."""
        if ef < k:
            raise ValueError(f"ef ({ef}) must be >= k ({k}): the search list holds the k results")
        q = np.ascontiguousarray(queries, dtype=np.float32)
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        self._check_linked(rows)
        P, G = q.shape[:2]
        ids = np.empty((P, G, k), np.int64)
        scores = np.empty((P, G, k), np.float32)
        scanned = np.empty(P, np.int64)
        _search_groups(q, rows, self.keys, self.nbrs, self.deg, self.entries, self.n, k, ef, exact_below, ids,
                       scores, scanned)
        return ids, scores, scanned

    def scan_rows(self, queries: np.ndarray, k: int, bf16_margin: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` keys by ``q · k`` of every row's stored keys (linked or not) for its ``M`` queries:
        ``queries`` ``(rows, M, D)`` -> ``ids`` ``(rows, M, k)`` (``-1`` past a row's keys) and their ``q · k``
        ``(rows, M, k)`` float32, descending. The scores of all rows in one batched matmul (BLAS, torch's threads;
        into a buffer kept between calls) and a compiled selection (``torch.topk`` measured 2-5x slower here): the
        path for rows too small for a graph walk to pay off (a scan streams the keys, a walk reads them at random).
        Queries go in blocks of at most ``SCAN_BLOCK_SCORES`` scores per row.

        ``bf16_margin``: scan a bfloat16 copy of the keys instead (half the bytes: the scan is memory-bound; the
        copy is extended by the keys stored since the last scan), keep the best
        ``k + bf16_margin`` per query and re-score those exactly in float32 for the final ``k`` (returned scores are
        float32 ``q · k``; a key may be missed only if bfloat16 rounding moved it below ``k + bf16_margin``
        others)."""
        torch = _torch()
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 3 or q.shape[0] != self.rows or q.shape[2] != self.dim:
            raise ValueError(f"scan_rows wants queries (rows={self.rows}, M, {self.dim}), got {q.shape}")
        R, M = q.shape[:2]
        ids = np.empty((R, M, k), np.int64)
        scores = np.empty((R, M, k), np.float32)
        m = int(self.n.max())
        if m == 0 or k == 0:
            ids.fill(-1)
            scores.fill(-np.inf)
            return ids, scores
        bf16 = bf16_margin is not None and k + bf16_margin < m  # else scanning every key exactly is as cheap
        if bf16:  # the contiguous copy: its slots past m (zero) are scored too and ignored by the selection
            keys_t = self._scan_copy().transpose(1, 2)
            q_t = torch.from_numpy(q).to(torch.bfloat16)
        else:
            keys_t = torch.from_numpy(self.keys)[:, :m].transpose(1, 2)  # (rows, D, m) view
            q_t = torch.from_numpy(q)
        width = keys_t.shape[2]
        block = max(1, min(M, SCAN_BLOCK_SCORES // width))
        name = "_scores_bf16" if bf16 else "_scores"
        if getattr(self, name) is None or getattr(self, name).numel() < R * block * width:
            setattr(self, name, torch.empty(R * block * width, dtype=q_t.dtype))
        for a in range(0, M, block):
            b = min(M, a + block)
            buf = getattr(self, name)[: R * (b - a) * width].view(R, b - a, width)
            torch.matmul(q_t[:, a:b], keys_t, out=buf)
            if bf16:
                _select_rescore_bf16(buf.view(torch.int16).numpy().view(np.uint16), self.n, q[:, a:b], self.keys,
                                     k + bf16_margin, ids[:, a:b], scores[:, a:b])
            else:
                _select_rows(buf.numpy(), self.n, ids[:, a:b], scores[:, a:b])
        return ids, scores

    def search_exact(self, queries: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Reference: exact top-``k`` by a full scan (numpy), same layout as :meth:`search`."""
        q = np.asarray(queries, dtype=np.float32)
        ids = np.full((q.shape[0], k), -1, np.int64)
        scores = np.full((q.shape[0], k), -np.inf, np.float32)
        for r in range(q.shape[0]):
            g = int(rows[r])
            s = self.keys[g, : self.n[g]] @ q[r]
            top = np.argsort(-s, kind="stable")[:k]
            ids[r, : top.shape[0]], scores[r, : top.shape[0]] = top, s[top]
        return ids, scores

    def attend(self, ids: np.ndarray, scores: np.ndarray, rows: np.ndarray, scale: float
               ) -> tuple[np.ndarray, np.ndarray]:
        """Softmax attention of each query over its retrieved keys: ``(R, Dv)`` outputs and ``(R,)`` log-sum-exp
        (``-inf`` for a row with none). ``scores`` are the ``q · k`` the search returned."""
        out = np.empty((ids.shape[0], self.dim_v), np.float32)
        lse = np.empty(ids.shape[0], np.float32)
        _attend_rows(ids, scores, np.ascontiguousarray(rows, dtype=np.int64), self.values, np.float32(scale), out, lse)
        return out, lse

    def attend_union(self, ids: np.ndarray, scores: np.ndarray, rows: np.ndarray, scale: float,
                     queries: np.ndarray, static_keys: np.ndarray, static_values: np.ndarray,
                     static_valid: np.ndarray) -> np.ndarray:
        """Softmax attention of each query ``(R, D)`` over its retrieved keys together with the static keys of its
        row, ``static_keys[rows[r]]`` ``(rows, >= T, D)`` (slots past ``T`` ignored: a slot buffer with spare slots
        needs no copy) valid where ``static_valid`` ``(rows, T)``: the same result as :meth:`attend` + ``lse_merge``
        with the static part's attention, in one compiled pass (for a static part held in host memory too, i.e. a
        CPU model). Returns ``(R, Dv)``."""
        T = static_valid.shape[1]
        _check_static_slots(static_keys, static_values, T)
        out = np.empty((ids.shape[0], self.dim_v), np.float32)
        c = np.ascontiguousarray  # one compiled signature (a strided view would compile another variant)
        _attend_union_rows(c(ids, dtype=np.int64), c(scores, dtype=np.float32), c(rows, dtype=np.int64), self.values,
                           c(queries, dtype=np.float32), c(static_keys, dtype=np.float32),
                           c(static_values, dtype=np.float32), c(static_valid, dtype=np.bool_), np.float32(scale), out)
        return out

    def attend_union_groups(self, ids: np.ndarray, scores: np.ndarray, scale: float, queries: np.ndarray,
                            static_keys: np.ndarray, static_values: np.ndarray, static_valid: np.ndarray
                            ) -> np.ndarray:
        """:meth:`attend_union` for one query per query head of every row (a decode step), in row-major group
        layout: ``ids`` / ``scores`` ``(rows, G, k)``, ``queries`` ``(rows, G, D)``; each static key and value is
        read once for the ``G`` heads of its row. Returns ``(rows, G, Dv)``."""
        T = static_valid.shape[1]
        if ids.shape[0] != self.rows or queries.shape[:2] != ids.shape[:2]:
            raise ValueError(f"attend_union_groups wants ids {ids.shape} and queries {queries.shape} as (rows="
                             f"{self.rows}, G, ...)")
        _check_static_slots(static_keys, static_values, T)
        out = np.empty((ids.shape[0], ids.shape[1], self.dim_v), np.float32)
        c = np.ascontiguousarray
        _attend_union_groups(c(ids, dtype=np.int64), c(scores, dtype=np.float32), self.values,
                             c(queries, dtype=np.float32), c(static_keys, dtype=np.float32),
                             c(static_values, dtype=np.float32), c(static_valid, dtype=np.bool_), np.float32(scale),
                             out)
        return out

    def attend_all(self, queries: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
        """Exact softmax attention over *every* stored key of a row (linked or not): ``queries`` ``(rows, M, D)``
        (``M`` queries per row) -> outputs ``(rows, M, Dv)`` and log-sum-exp ``(rows, M)`` (``-inf`` and zeros for
        a row without keys). What decoding uses while a graph build is pending."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.shape[0] != self.rows or q.shape[2] != self.dim:
            raise ValueError(f"attend_all wants queries (rows={self.rows}, M, {self.dim}), got {q.shape}")
        out = np.empty((self.rows, q.shape[1], self.dim_v), np.float32)
        lse = np.empty((self.rows, q.shape[1]), np.float32)
        _attend_all_rows(q, self.keys, self.values, self.n, np.float32(scale), out, lse)
        return out, lse
