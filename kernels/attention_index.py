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

The compiled parts live in modules of their own: ``attention_index_heap`` (dot product, heap),
``attention_index_search`` (graph walks, per-query exact scan), ``attention_index_scan`` (the batched scan's top-k
selection), ``attention_index_attend`` (attention over retrieved keys) and ``attention_index_graph`` (build, insert,
pruning, :class:`GraphBuild`); this module holds :class:`AttentionIndex`.

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

import numpy as np

from kvaccel.kernels.attention_index_attend import (
    _attend_all_rows,
    _attend_rows,
    _attend_union_groups,
    _attend_union_rows,
)
from kvaccel.kernels.attention_index_graph import GraphBuild, _insert_rows
from kvaccel.kernels.attention_index_scan import _scan_scores, _select_rescore_bf16, _select_rows
from kvaccel.kernels.attention_index_search import _search_groups, _search_rows
from kvaccel.kernels.attention_index_store import QuantizedRows

__all__ = ["SCAN_BLOCK_SCORES", "SCAN_COPY_STEP", "AttentionIndex", "GraphBuild"]


def _torch():
    import torch

    return torch


#: scan_rows computes at most this many scores per row at once (queries in blocks): 64 MiB per row in float32
SCAN_BLOCK_SCORES = 1 << 24

#: scan_rows' bfloat16 key copy grows in steps of this many keys per row (a regrowth copies it)
SCAN_COPY_STEP = 1024


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
    bits : int, optional
        Store keys and values as ``bits``-bit codes (8, 4 or 2; :class:`~kvaccel.kernels.attention_index_store.
        QuantizedRows`) instead of float32: every score, search and attention reads the decoded codes, so the
        scores are ``q · k̂`` of the dequantized keys. The graph edits (build, linking) run on a float32 copy of the
        rows made for the call.
    group : int, default 64
        Channels per scale of a quantized token (must divide ``dim`` and ``dim_v``).
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
        bits: int | None = None,
        group: int = 64,
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
        self.bits, self.group = bits, group
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
        if self.bits is None:
            keys = np.zeros((self.rows, capacity, self.dim), np.float32)
            values = np.zeros((self.rows, capacity, self.dim_v), np.float32)
        elif old is None:
            keys = QuantizedRows(self.rows, capacity, self.dim, self.bits, self.group)
            values = QuantizedRows(self.rows, capacity, self.dim_v, self.bits, self.group)
        else:
            keys, values = self.keys.grown(capacity), self.values.grown(capacity)
        nbrs = np.zeros((self.rows, capacity, self.max_degree), np.int32)
        deg = np.zeros((self.rows, capacity), np.int32)
        parent = np.full((self.rows, capacity), -1, np.int32)
        positions = np.zeros((self.rows, capacity), np.int64)
        if old is not None:
            c = self.capacity
            if self.bits is None:
                keys[:, :c], values[:, :c] = self.keys, self.values
            nbrs[:, :c], deg[:, :c] = self.nbrs, self.deg
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

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    def _keys_arg(self):
        """The keys as the compiled kernels take them (:mod:`~kvaccel.kernels.attention_index_store`)."""
        return self.keys.kernel_arg() if self.quantized else self.keys

    def _values_arg(self):
        return self.values.kernel_arg() if self.quantized else self.values

    def float_keys(self, g: int, a: int, b: int) -> np.ndarray:
        """Keys ``[a, b)`` of row ``g`` as float32 (a view of a float32 store, decoded from a quantized one)."""
        return self.keys.dequantize(g, a, b) if self.quantized else self.keys[g, a:b]

    def nbytes(self) -> int:
        """Host bytes held: the K/V store (codes, scales and offsets when quantized), positions, the graph (capacity
        included) and the scan's score buffer."""
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
            if self.quantized:
                self.keys.put(g, a, keys[g])
                self.values.put(g, a, values[g])
            else:
                self.keys[g, a:b], self.values[g, a:b] = keys[g], values[g]
            self.positions[g, a:b] = positions[g]
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
            rows, [self.float_keys(g, 0, self.n[g]) for g in rows],
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
            keys = self.keys.dequantize_rows(self.n) if self.quantized else self.keys
            _insert_rows(keys, self.nbrs, self.deg, self.parent, self.entries, self.linked.copy(), self.n.copy(),
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
        _search_rows(q, rows, self._keys_arg(), self.nbrs, self.deg, self.entries, self.n, k, ef, exact_below, ids,
                     scores, scanned)
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
        _search_groups(q, rows, self._keys_arg(), self.nbrs, self.deg, self.entries, self.n, k, ef, exact_below, ids,
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
        others; a row of at most ``k + bf16_margin`` keys has every key re-scored: exact)."""
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
        bf16 = bf16_margin is not None  # also for rows of few keys: one selection kernel to compile, not two
        if self.quantized:  # scores from the codes, a tile of keys decoded at a time (compiled, rows in parallel)
            if bf16:
                raise ValueError("scan_rows: a quantized store is scanned from its codes; bf16_margin (a bfloat16 "
                                 "copy of float32 keys) does not apply: pass None")
            keys_t, q_t, width, dtype = None, None, m, torch.float32
        elif bf16:  # the contiguous copy: its slots past m (zero) are scored too and ignored by the selection
            keys_t = self._scan_copy().transpose(1, 2)
            q_t = torch.from_numpy(q).to(torch.bfloat16)
            width, dtype = keys_t.shape[2], torch.bfloat16
        else:
            keys_t = torch.from_numpy(self.keys)[:, :m].transpose(1, 2)  # (rows, D, m) view
            q_t = torch.from_numpy(q)
            width, dtype = m, torch.float32
        block = max(1, min(M, SCAN_BLOCK_SCORES // width))
        name = "_scores_bf16" if bf16 else "_scores"
        if getattr(self, name) is None or getattr(self, name).numel() < R * block * width:
            setattr(self, name, torch.empty(R * block * width, dtype=dtype))
        for a in range(0, M, block):
            b = min(M, a + block)
            buf = getattr(self, name)[: R * (b - a) * width].view(R, b - a, width)
            if self.quantized:
                _scan_scores(np.ascontiguousarray(q[:, a:b]), self._keys_arg(), self.n, buf.numpy())
            else:
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
            s = self.float_keys(g, 0, int(self.n[g])) @ q[r]
            top = np.argsort(-s, kind="stable")[:k]
            ids[r, : top.shape[0]], scores[r, : top.shape[0]] = top, s[top]
        return ids, scores

    def attend(self, ids: np.ndarray, scores: np.ndarray, rows: np.ndarray, scale: float
               ) -> tuple[np.ndarray, np.ndarray]:
        """Softmax attention of each query over its retrieved keys: ``(R, Dv)`` outputs and ``(R,)`` log-sum-exp
        (``-inf`` for a row with none). ``scores`` are the ``q · k`` the search returned."""
        out = np.empty((ids.shape[0], self.dim_v), np.float32)
        lse = np.empty(ids.shape[0], np.float32)
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        _attend_rows(ids, scores, rows, self._values_arg(), np.float32(scale), out, lse)
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
        _attend_union_rows(c(ids, dtype=np.int64), c(scores, dtype=np.float32), c(rows, dtype=np.int64),
                           self._values_arg(), c(queries, dtype=np.float32), c(static_keys, dtype=np.float32),
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
        _attend_union_groups(c(ids, dtype=np.int64), c(scores, dtype=np.float32), self._values_arg(),
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
        _attend_all_rows(q, self._keys_arg(), self._values_arg(), self.n, np.float32(scale), out, lse)
        return out, lse


#: what :func:`compile_kernels` compiles: the exact path (scan + attention), the graph path (build, link, walks,
#: exact attention while a build is pending)
KERNEL_PATHS = ("exact", "graph")


def compile_kernels(paths: tuple[str, ...] = KERNEL_PATHS, *, scan_bf16: bool = True, fused: bool = True,
                    group_search: bool = True, bits: int | None = None) -> float:
    """Compile (or load from the on-disk cache, :mod:`~kvaccel.kernels.attention_index_jit`) the kernels a decode step
    of retrieval runs, by running them on a tiny index: the arguments have the types of the real calls (the public
    methods make them), so the real calls find every kernel compiled. ``paths``: ``"exact"`` (:meth:`scan_rows`
    with ``scan_bf16`` the bfloat16 scan + float32 re-scoring, else the float32 scan; then :meth:`attend_union_groups`
    if ``fused`` else :meth:`attend`) and/or
    ``"graph"`` (the build, :meth:`link`, :meth:`attend_all`, then :meth:`search_grouped` if ``group_search`` else
    :meth:`search`, and the attention as for ``exact``); ``bits``: for a store of ``bits``-bit codes (the scan of the
    codes instead of ``scan_bf16``'s). Safe in any thread (numba compiles under its own lock; a
    real call of a kernel being compiled waits for it). Returns the seconds spent."""
    unknown = set(paths) - set(KERNEL_PATHS)
    if unknown:
        raise ValueError(f"compile_kernels: unknown paths {sorted(unknown)}; choose from {KERNEL_PATHS}")
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    rows, G, D, n, k = 2, 2, 8, 48, 4
    keys = [rng.standard_normal((n, D), dtype=np.float32) for _ in range(rows)]
    values = [rng.standard_normal((n, D), dtype=np.float32) for _ in range(rows)]
    positions = [np.arange(n, dtype=np.int64) for _ in range(rows)]
    queries = rng.standard_normal((rows, G, D), dtype=np.float32)
    index = AttentionIndex(rows, D, D, degree=4, build_top_k=8, entry_points=4, bits=bits, group=D)
    index.store(keys, values, positions)
    head_rows = np.repeat(np.arange(rows, dtype=np.int64), G)
    static = rng.standard_normal((rows, 4, D), dtype=np.float32)

    def attention(ids: np.ndarray, scores: np.ndarray) -> None:
        if fused:
            index.attend_union_groups(ids.reshape(rows, G, -1), scores.reshape(rows, G, -1), 0.5, queries, static,
                                      static, np.ones((rows, 4), np.bool_))
        else:
            index.attend(ids.reshape(rows * G, -1), scores.reshape(rows * G, -1), head_rows, 0.5)

    if "exact" in paths:
        attention(*index.scan_rows(queries, k, k if scan_bf16 and bits is None else None))
    if "graph" in paths:
        index.attend_all(queries, 0.5)
        index.install(index.graph_build([q.reshape(-1, D).repeat(8, 0) for q in queries]).run())
        index.insert(keys, values, positions)
        if group_search:
            ids, scores, _ = index.search_grouped(queries, np.arange(rows, dtype=np.int64), k, k)
        else:
            ids, scores, _ = index.search(queries.reshape(-1, D), head_rows, k, k)
        attention(ids, scores)
    return time.perf_counter() - t0
