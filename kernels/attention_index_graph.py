"""Graph build and maintenance of the attention index (:mod:`kvaccel.kernels.attention_index`, whose docstring
describes the method): projection of the prefill query→key bipartite graph onto keys, connectivity enhancement with
a spanning tree, linking of inserted keys, and the occlusion rule that re-selects a full neighbour list; the build
as a :class:`GraphBuild` job that can run in another thread."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from numba import prange

from kvaccel.kernels.attention_index_heap import _dot, _pop, _push
from kvaccel.kernels.attention_index_jit import kernel
from kvaccel.kernels.attention_index_search import _beam_search


@kernel()
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


@kernel()
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
    hw = np.empty(degree, np.float64)  # max-heap of the best `degree` weights, negated (weakest on top)
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
        size = np.int64(0)  # not a literal 0: that would compile the heap helpers again
        for t in range(m):
            y = uid[t]
            if y == x:
                continue
            w = acc[y]
            if size < degree:
                size = _push(hw, hid, size, -w, y)
            elif w > -hw[0]:  # replace the weakest
                size = _push(hw, hid, _pop(hw, hid, size), -w, y)
        for t in np.argsort(hw[:size]):  # strongest first
            _add_edge(nbrs, deg, x, hid[t], degree)
    # reverse edges (into the slack up to max_degree), then an in-edge for every key that has none
    base = deg.copy()
    indeg = np.zeros(n, np.int64)
    for x in range(n):
        for t in range(base[x]):
            y = np.int64(nbrs[x, t])  # int64 like every other key id passed to _add_edge
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


@kernel()
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
    occluder = np.int64(-1)  # not a literal -1: that would compile _add_edge again
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


@kernel()
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


@kernel()
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


@kernel()
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
        _flood(nbrs, deg, reached, stack, np.int64(1), parent)
    return parent


@kernel(parallel=True)
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
