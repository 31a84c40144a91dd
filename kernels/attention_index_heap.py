"""Shared compiled helpers of the attention index (:mod:`kvaccel.kernels.attention_index`): the float32 dot product
and the binary max-heap (push / pop on parallel score and id arrays) its searches and selections keep results in."""

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


@kernel(fastmath=_FM)
def _write_results(rs, ri, nr, out_ids, out_scores):
    """The ``nr`` results of a heap keyed by ``-score`` into ``out_ids`` / ``out_scores`` by descending score
    (``-1`` / ``-inf`` past ``nr``)."""
    order = np.argsort(rs[:nr])  # ascending -score = descending score
    for j in range(out_ids.shape[0]):
        if j < nr:
            out_ids[j] = ri[order[j]]
            out_scores[j] = -rs[order[j]]
        else:
            out_ids[j] = -1
            out_scores[j] = -np.inf
