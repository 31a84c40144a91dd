"""Attention over retrieved keys (:mod:`kvaccel.kernels.attention_index`): softmax over each query's retrieved host
keys (their ``q · k`` already computed by the search), fused with the static (device) part in one pass, and exact
attention over every stored key of a row (online softmax) while a graph build is pending."""

from __future__ import annotations

import numpy as np
from numba import prange

from kvaccel.kernels.attention_index_heap import _FM, _dot
from kvaccel.kernels.attention_index_jit import kernel
from kvaccel.kernels.attention_index_store import row_of, row_vector


@kernel(fastmath=_FM)
def _retrieved_max(ids, scores, scale, m):
    """``max(m, scale · score)`` over the retrieved slots of one row (``ids < 0`` = empty slot)."""
    for j in range(ids.shape[0]):
        if ids[j] >= 0 and scale * scores[j] > m:
            m = scale * scores[j]
    return m


@kernel(fastmath=_FM)
def _retrieved_accumulate(ids, scores, values, scale, m, out):
    """Add ``exp(scale · score − m) · v`` of one row's retrieved keys into ``out``; returns the sum of the weights."""
    total = np.float32(0.0)
    vb = np.empty(out.shape[0], np.float32)  # a quantized value, decoded
    for j in range(ids.shape[0]):
        i = ids[j]
        if i < 0:
            continue
        p = np.float32(np.exp(scale * scores[j] - m))
        total += p
        v = row_vector(values, i, vb)
        for c in range(out.shape[0]):
            out[c] += p * v[c]
    return total


@kernel(parallel=True, fastmath=_FM)
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
        total = _retrieved_accumulate(ids[r], scores[r], row_of(values, g), scale, m, out[r])
        for c in range(out.shape[1]):
            out[r, c] /= total
        lse[r] = m + np.log(total)


@kernel(parallel=True, fastmath=_FM)
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
        total += _retrieved_accumulate(ids[r], scores[r], row_of(values, g), scale, m, out[r])
        for c in range(out.shape[1]):
            out[r, c] /= total


@kernel(fastmath=_FM)
def _attend_union_group(ids, scores, values, qs, skeys, svalues, svalid, scale, out):
    """One row of :func:`_attend_union_groups`: ``ids`` / ``scores`` ``(G, k)``, ``values`` ``(capacity, Dv)``,
    ``qs`` ``(G, D)``, static ``skeys`` / ``svalues`` ``(>= T, D)`` valid where ``svalid`` ``(T,)``, ``out``
    ``(G, Dv)``."""
    T = svalid.shape[0]
    G = qs.shape[0]
    sl = np.empty((G, T), np.float32)
    m = np.full(G, -np.inf, np.float32)
    for j in range(T):
        if svalid[j]:
            kj = skeys[j]
            for g in range(G):
                x = scale * _dot(qs[g], kj)
                sl[g, j] = x
                if x > m[g]:
                    m[g] = x
    for g in range(G):
        m[g] = _retrieved_max(ids[g], scores[g], scale, m[g])
        for c in range(out.shape[1]):
            out[g, c] = 0.0
    total = np.zeros(G, np.float32)
    for j in range(T):
        if svalid[j]:
            vj = svalues[j]
            for g in range(G):
                if m[g] == -np.inf:
                    continue
                p = np.float32(np.exp(sl[g, j] - m[g]))
                total[g] += p
                for c in range(out.shape[1]):
                    out[g, c] += p * vj[c]
    for g in range(G):
        if m[g] == -np.inf:
            continue
        total[g] += _retrieved_accumulate(ids[g], scores[g], values, scale, m[g], out[g])
        for c in range(out.shape[1]):
            out[g, c] /= total[g]


@kernel(parallel=True, fastmath=_FM)
def _attend_union_groups(ids, scores, values, qs, skeys, svalues, svalid, scale, out):
    """:func:`_attend_union_rows` for the ``G`` query heads of each row (one query each, GQA): every static key and
    value is read once for the whole group. ``ids`` / ``scores`` ``(R, G, k)``, ``qs`` ``(R, G, D)``, ``out``
    ``(R, G, Dv)``. Rows in parallel, one call of :func:`_attend_union_group` each."""
    for r in prange(qs.shape[0]):
        _attend_union_group(ids[r], scores[r], row_of(values, r), qs[r], skeys[r], svalues[r], svalid[r], scale, out[r])


@kernel(parallel=True, fastmath=_FM)
def _attend_all_rows(qs, keys, values, n, scale, out, lse):
    """Exact softmax attention of the ``M`` queries of each row over its ``n[g]`` keys (one pass over the keys per
    row, online softmax; rows in parallel)."""
    R, M = qs.shape[0], qs.shape[1]
    for g in prange(R):
        m = np.full(M, -np.inf, np.float32)
        total = np.zeros(M, np.float32)
        acc = np.zeros((M, out.shape[2]), np.float32)
        krow, vrow = row_of(keys, g), row_of(values, g)
        kb = np.empty(qs.shape[2], np.float32)  # quantized tokens, decoded
        vb = np.empty(out.shape[2], np.float32)
        for j in range(n[g]):
            kj = row_vector(krow, j, kb)
            vj = row_vector(vrow, j, vb)
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
                for d in range(out.shape[2]):
                    out[g, r, d] = 0.0
            else:
                lse[g, r] = m[r] + np.log(total[r])
                for d in range(out.shape[2]):
                    out[g, r, d] = acc[r, d] / total[r]
