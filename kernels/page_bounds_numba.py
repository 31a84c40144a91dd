"""Compiled CPU kernels of :mod:`kvaccel.kernels.page_bounds`: Quest's page selection and the attention over the
selected pages, reading the cache's keys and values in place (no gathered copy of the pages).

:func:`_select_pages` scores every page of a row for its query heads (``U = Σ_i max(q_i m_i, q_i M_i)``, summed over
a kv head's query heads for a shared selection) and keeps the ``want`` best (the newest page always, empty pages
never): one pass over the page bounds instead of two matmuls, a mask, a scatter and a top-k.
:func:`_attend_pages` is an online softmax, one page at a time, over the selected pages' real tokens; the query heads
that share a selection read each key and value row once.

Arrays are numpy views of the tensors (float32 or float64), batch first. Kernels are serial and release the GIL:
the caller spreads (batch row, head range) tasks over :func:`~kvaccel.kernels.cpu_ops.run_parallel`'s workers.
"""

from __future__ import annotations

import numpy as np

from kvaccel.kernels.attention_index_heap import _FM, _pop, _push
from kvaccel.kernels.attention_index_jit import kernel


@kernel(fastmath=_FM)
def _select_row(q, kmin, kmax, count, group, b, r, pages, want, last, hs, qp, qn, idx, keep):
    """Selection row ``r`` of batch row ``b`` (a kv head with ``group``, else a query head): ``idx[:want]`` the
    ``want`` best of the first ``pages`` pages (page ``last`` first, the others in no particular order), ``keep``
    False past them and for empty pages (``count == 0``). The best are kept in a heap keyed by ``-score`` (its top
    the worst kept); ``hs`` ``(≥want,)`` float32, ``qp``/``qn`` ``(R, D)``: scratch."""
    Hq, D = q.shape[1], q.shape[2]
    G = Hq // kmin.shape[1]
    R = G if group else 1  # query heads scored together
    kvh = r if group else r // G
    h0 = r * R
    for g in range(R):
        for d in range(D):
            x = q[b, h0 + g, d]
            qp[g, d] = max(x, 0.0)  # U = relu(q) · M + min(q, 0) · m
            qn[g, d] = min(x, 0.0)
    cr = 0 if count.shape[1] == 1 else kvh
    n = min(want, pages)
    size = 0
    for j in range(pages):
        s = np.float32(0.0)
        for g in range(R):
            for d in range(D):
                s += qp[g, d] * kmax[b, kvh, j, d] + qn[g, d] * kmin[b, kvh, j, d]
        key = -s if count[b, cr, j] > 0 else np.float32(np.inf)
        if j == last:
            key = np.float32(-np.inf)  # the newest page always
        if size < n:
            size = _push(hs, idx, size, key, j)
        elif key < hs[0]:
            size = _push(hs, idx, _pop(hs, idx, size), key, j)
    for i in range(n):  # the newest page (the heap's smallest key) to the front
        if idx[i] == last:
            idx[i] = idx[0]
            hs[i] = hs[0]
            idx[0] = last
            break
    keep[0] = True
    for i in range(1, n):
        keep[i] = hs[i] < np.inf
    for i in range(n, idx.shape[0]):
        idx[i] = last
        keep[i] = False


@kernel(fastmath=_FM)
def _attend_row(q, k, v, idx, keep, offset, n, page_size, valid, scale, b, r, Hs, qs, logit, acc, m, den, pmax, out):
    """``out[b, h]`` for the query heads ``h`` of selection row ``r`` (of ``Hs``): online softmax, one page at a time,
    over the real tokens of the pages ``idx`` where ``keep``; returns the real tokens attended. ``qs`` ... ``pmax``:
    scratch ``(R, D)``, ``(R, P)``, ``(R, Dv)``, ``(R,)`` x3."""
    Hq, D = q.shape[1], q.shape[2]
    Hkv, Dv = k.shape[1], v.shape[3]
    R = Hq // Hs
    P = page_size
    has_valid = valid.shape[2] > 0
    kvh = r * Hkv // Hs
    vr = 0 if valid.shape[1] == 1 else kvh
    for g in range(R):
        for d in range(D):
            qs[g, d] = q[b, r * R + g, d] * scale
    acc[:] = 0.0
    m[:] = -np.inf
    den[:] = 0.0
    seen = 0
    for j in range(idx.shape[0]):
        if not keep[j]:
            continue
        s0 = offset[b] + idx[j] * P
        s1 = min(s0 + P, n)
        pmax[:] = -np.inf
        for t in range(s0, s1):
            real = (not has_valid) or valid[b, vr, t]
            if real:
                seen += 1
            for g in range(R):
                x = np.float32(-np.inf)
                if real:
                    x = np.float32(0.0)
                    for d in range(D):
                        x += qs[g, d] * k[b, kvh, t, d]
                logit[g, t - s0] = x
                pmax[g] = max(pmax[g], x)
        for g in range(R):
            if pmax[g] > m[g]:  # rescale what the earlier pages added
                alpha = np.float32(np.exp(m[g] - pmax[g]))
                den[g] *= alpha
                for c in range(Dv):
                    acc[g, c] *= alpha
                m[g] = pmax[g]
        for t in range(s0, s1):
            for g in range(R):
                x = logit[g, t - s0]
                if x == -np.inf:
                    continue
                p = np.float32(np.exp(x - m[g]))
                den[g] += p
                for c in range(Dv):
                    acc[g, c] += p * v[b, kvh, t, c]
    for g in range(R):
        inv = np.float32(1.0) / den[g] if den[g] > 0 else np.float32(0.0)
        for c in range(Dv):
            out[b, r * R + g, c] = acc[g, c] * inv
    return seen


@kernel(fastmath=_FM, inline="always")
def _attend_scratch(R, D, Dv, page_size):
    """The scratch :func:`_attend_row` works in for ``R`` query rows: ``qs, logit, acc, m, den, pmax``."""
    return (np.empty((R, D), np.float32), np.empty((R, page_size), np.float32), np.empty((R, Dv), np.float32),
            np.empty(R, np.float32), np.empty(R, np.float32), np.empty(R, np.float32))


@kernel(fastmath=_FM)
def _select_pages(q, kmin, kmax, count, group, b, pages, want, last, r0, r1, idx, keep):
    """:func:`_select_row` for rows ``r0 ... r1 − 1`` of batch row ``b`` into ``idx``/``keep`` ``(B, H_s, K)``.

    q ``(B, H_q, D)``; kmin / kmax ``(B, H_kv, ≥pages, D)``; count ``(B, 1|H_kv, ≥pages)``."""
    R = q.shape[1] // kmin.shape[1] if group else 1
    hs = np.empty(idx.shape[2], np.float32)
    qp = np.empty((R, q.shape[2]), np.float32)
    qn = np.empty((R, q.shape[2]), np.float32)
    for r in range(r0, r1):
        _select_row(q, kmin, kmax, count, group, b, r, pages, want, last, hs, qp, qn, idx[b, r], keep[b, r])


@kernel(fastmath=_FM)
def _attend_pages(q, k, v, idx, keep, offset, n, page_size, valid, scale, b, r0, r1, out, seen):
    """:func:`_attend_row` for rows ``r0 ... r1 − 1`` of batch row ``b``; ``seen[b, r]`` ``(B, H_s)`` int64 is
    incremented by the real tokens row ``r`` attended.

    q ``(B, H_q, D)``; k ``(B, H_kv, ≥n, D)``, v ``(B, H_kv, ≥n, Dv)``; idx / keep ``(B, H_s, K)`` (``H_s`` = ``H_q``
    or ``H_kv``: query head ``h`` reads row ``h // (H_q / H_s)``); valid ``(B, 1|H_kv, ≥n)`` bool or ``(1, 1, 0)``
    (every slot real); out ``(B, H_q, Dv)`` float32 (a head with no real token gets zeros)."""
    Hs = idx.shape[1]
    R = q.shape[1] // Hs
    qs, logit, acc, m, den, pmax = _attend_scratch(R, q.shape[2], v.shape[3], page_size)
    for r in range(r0, r1):
        seen[b, r] += _attend_row(q, k, v, idx[b, r], keep[b, r], offset, n, page_size, valid, scale, b, r, Hs, qs,
                                  logit, acc, m, den, pmax, out)


@kernel(fastmath=_FM)
def _select_attend(q, kmin, kmax, count, group, pages, want, last, k, v, offset, n, page_size, valid, scale, b,
                   r0, r1, out, seen):
    """:func:`_select_row` then :func:`_attend_row` for rows ``r0 ... r1 − 1`` of batch row ``b`` (``want``,
    ``last`` ``(B,)``): a Quest step's selection and attention in one pass, the selection in scratch."""
    Hs = kmin.shape[1] if group else q.shape[1]
    R = q.shape[1] // Hs
    D = q.shape[2]
    K = min(want[b], pages)
    idx = np.empty(K, np.int64)
    keep = np.empty(K, np.bool_)
    hs = np.empty(K, np.float32)
    qp = np.empty((R, D), np.float32)
    qn = np.empty((R, D), np.float32)
    qs, logit, acc, m, den, pmax = _attend_scratch(R, D, v.shape[3], page_size)
    for r in range(r0, r1):
        _select_row(q, kmin, kmax, count, group, b, r, pages, want[b], last[b], hs, qp, qn, idx, keep)
        seen[b, r] += _attend_row(q, k, v, idx, keep, offset, n, page_size, valid, scale, b, r, Hs, qs, logit, acc,
                                  m, den, pmax, out)


@kernel(fastmath=_FM)
def _append_bounds(kmin, kmax, count, real, key, page, valid):
    """Fold one new token per row into its page in place: ``key[b]`` ``(H_kv, D)`` joins page ``page[b]``; ``valid``
    ``(B, 1|H_kv)`` bool or ``(B, 0)`` (every token real); ``real[b]`` counts the row's real tokens (of kv head 0, as
    ``count[:, 0]``)."""
    B, H, _, D = kmin.shape
    Hc = count.shape[1]
    Hv = valid.shape[1]
    for b in range(B):
        p = page[b]
        for h in range(H):
            if Hv > 0 and not valid[b, 0 if Hv == 1 else h]:
                continue
            c = count[b, 0 if Hc == 1 else h, p]
            for d in range(D):
                x = key[b, h, d]
                if c == 0:
                    kmin[b, h, p, d] = x
                    kmax[b, h, p, d] = x
                else:
                    kmin[b, h, p, d] = min(kmin[b, h, p, d], x)
                    kmax[b, h, p, d] = max(kmax[b, h, p, d], x)
            if Hc > 1:
                count[b, h, p] += 1
        if Hv == 0 or valid[b, 0]:
            if Hc == 1:
                count[b, 0, p] += 1
            real[b] += 1
