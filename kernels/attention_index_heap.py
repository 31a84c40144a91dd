"""Shared compiled helpers of the attention index (:mod:`kvaccel.kernels.attention_index`): the float32 dot product,
the binary max-heap (push / pop on parallel score and id arrays) its searches and selections keep results in, and the
stable descending sort their results are written out by."""

from __future__ import annotations

import numpy as np

from kvaccel.kernels.attention_index_jit import kernel

#: fast-math without the no-NaN/no-inf assumptions (-inf marks empty slots): lets the dot products vectorise
_FM = {"reassoc", "contract", "nsz", "arcp"}


@kernel(fastmath=_FM, inline="always")
def _dot(a, b):
    s = np.float32(0.0)
    for i in range(a.shape[0]):
        s += a[i] * b[i]
    return s


@kernel(fastmath=_FM)
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


@kernel(fastmath=_FM)
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


@kernel(fastmath=_FM)
def _push_grow(hs, hi, size, s, i):
    """:func:`_push`, first doubling the heap's buffers when they are full. Returns the (possibly new) buffers and
    the new size."""
    if size == hs.shape[0]:
        hs2 = np.empty(2 * size, hs.dtype)
        hi2 = np.empty(2 * size, hi.dtype)
        hs2[:size] = hs[:size]
        hi2[:size] = hi[:size]
        hs, hi = hs2, hi2
    return hs, hi, _push(hs, hi, size, s, i)


#: :func:`_sort_desc` insertion-sorts runs of this many items, then merges them
SORT_RUN = 8


@kernel(fastmath=_FM)
def _sort_desc(ids, scores, m):
    """Sort the first ``m`` (``ids``, ``scores``) pairs by descending score, in place; equal scores keep their order
    (a stable sort: the order of ``np.argsort(-scores[:m], kind="stable")``). Insertion sort of runs of
    ``SORT_RUN``, then bottom-up merges between two scratch rows: a few loops, much cheaper to compile than numba's
    ``np.argsort`` (and no fancy indexing)."""
    for a in range(0, m, SORT_RUN):
        for j in range(a + 1, min(a + SORT_RUN, m)):
            s = scores[j]
            i = ids[j]
            c = j
            while c > a and scores[c - 1] < s:
                scores[c] = scores[c - 1]
                ids[c] = ids[c - 1]
                c -= 1
            scores[c] = s
            ids[c] = i
    if m <= SORT_RUN:
        return
    bs = np.empty((2, m), scores.dtype)
    bi = np.empty((2, m), ids.dtype)
    for c in range(m):
        bs[0, c] = scores[c]
        bi[0, c] = ids[c]
    p = 0
    width = SORT_RUN
    while width < m:  # merge runs [a, mid) and [mid, b) of row p into row 1 - p
        ss, si, ds, di = bs[p], bi[p], bs[1 - p], bi[1 - p]
        for a in range(0, m, 2 * width):
            mid = min(a + width, m)
            b = min(a + 2 * width, m)
            x, y = a, mid
            for c in range(a, b):
                if y >= b or (x < mid and ss[x] >= ss[y]):  # >=: the left run first on ties
                    ds[c] = ss[x]
                    di[c] = si[x]
                    x += 1
                else:
                    ds[c] = ss[y]
                    di[c] = si[y]
                    y += 1
        p = 1 - p
        width *= 2
    for c in range(m):
        scores[c] = bs[p, c]
        ids[c] = bi[p, c]


@kernel(fastmath=_FM)
def _write_results(rs, ri, nr, out_ids, out_scores):
    """The ``nr`` results of a heap keyed by ``-score`` into ``out_ids`` / ``out_scores`` by descending score
    (``-1`` / ``-inf`` past ``nr``; at most ``out_ids.shape[0]``). Overwrites the heap (its scores negated and
    sorted)."""
    for j in range(nr):
        rs[j] = -rs[j]
    _sort_desc(ri, rs, nr)
    for j in range(out_ids.shape[0]):
        if j < nr:
            out_ids[j] = ri[j]
            out_scores[j] = rs[j]
        else:
            out_ids[j] = -1
            out_scores[j] = -np.inf
