"""Compiled CPU kernel of :func:`~kvaccel.kernels.quantized_decode_attention.quantized_decode_attention`
(:func:`_attend`): query rows against KIVI codes (or float8 codes) read in place, never a dequantized copy.

Keys, per key group (:func:`_key_logits`): ``logit[r, t] = Σ_d (q[r,d]·s[d])·code[t,d] + Σ_d q[r,d]·z[d]``, the
scale folded into the query once per ``group`` tokens; 8-bit codes are converted as the dot products read them,
packed ones unpacked once per token for every query row, float8 ones placed in float32 words and the token's scale
applied to the dot product. Values (:func:`_value_sum`): per token and value group
``acc[r, c] += p[r,t]·(code[t,c]·s + z)``. Both loops take ``_TB`` tokens a step (each row's accumulator and query
read once a step). float8 codes (``kv_fp8``): one scale per token (keys: plus one offset per channel, its dot with the
query added to the logits of the tokens stored centred), the bytes decoded by placing their bits in a float32
(:func:`fp8_decoding`).

numba has no float16 / bfloat16 arithmetic: 16-bit scales and zero points are read as their bit patterns (uint16)
through a 65,536-entry float32 table (:func:`scale_table`). Packed codes (``kv_quant.pack_codes``: channel
``j·per + i`` is code ``i`` of byte ``j``) are unpacked into a split layout ``[i][j]`` (one 1-D plane per ``i``, a
literal shift each: loops that vectorise), and the query (keys) and the accumulator (values) are held in the same
layout. Arrays are ``(N = B·H_kv, slots, ...)`` C-contiguous; the kernel reads the first ``ntok`` slots.
"""

from __future__ import annotations

import functools
import threading

import numba
import numpy as np
import torch
from numba import prange

from kvaccel.kernels.attention_index_heap import _FM, _dot
from kvaccel.kernels.attention_index_jit import kernel

__all__ = ["fp8_decoding", "pow2_table", "scale_table", "thread_pool_ok"]


@functools.cache
def scale_table(dtype: torch.dtype) -> np.ndarray:
    """float32 value of every 16-bit pattern of ``dtype`` (float16 / bfloat16), indexed by the pattern as uint16."""
    bits = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16)
    return bits.view(dtype).float().numpy()


#: float8 formats: (torch dtype name, mantissa bits, exponent bias)
_FP8 = {"float8_e4m3fn": (3, 7), "float8_e5m2": (2, 15)}


@functools.cache
def fp8_decoding(dtype: torch.dtype) -> tuple[int, float]:
    """``(shift, ratio)`` that turn a float8 byte ``c`` of ``dtype`` into its value without a table:
    ``float32 from bits((c & 0x7F) << shift | (c & 0x80) << 24) · ratio`` (the exponent and mantissa bits placed in
    float32's, then rebiased; float8's subnormals land on float32's subnormals, which the same ratio scales)."""
    mantissa, bias = _FP8[str(dtype).removeprefix("torch.")]
    return 23 - mantissa, 2.0 ** (127 - bias)


@kernel(fastmath=_FM, inline="always")
def _plane(row, sh, mask, s, z, out):
    """``out[j] = ((row[j] >> sh) & mask) · s + z``: a literal ``sh`` / ``mask`` at every call, and whole 1-D arrays,
    so the loop vectorises."""
    for j in range(row.shape[0]):
        out[j] = np.float32((np.int32(row[j]) >> sh) & mask) * s + z


@kernel(fastmath=_FM, inline="always")
def _unpack(row, bits, s, z, planes, base, step):
    """Codes of the bytes ``row`` times ``s`` plus ``z``: code ``i`` of byte ``j`` at ``planes[base + i·step, j]``."""
    if bits == 4:
        _plane(row, 0, 15, s, z, planes[base])
        _plane(row, 4, 15, s, z, planes[base + step])
    elif bits == 2:
        _plane(row, 0, 3, s, z, planes[base])
        _plane(row, 2, 3, s, z, planes[base + step])
        _plane(row, 4, 3, s, z, planes[base + 2 * step])
        _plane(row, 6, 3, s, z, planes[base + 3 * step])
    else:
        _plane(row, 0, 255, s, z, planes[base])


@kernel(fastmath=_FM, inline="always")
def _fp8_words(row, shift, word):
    """``word[j]``: float8 byte ``row[j]`` placed in a float32's bits (its value times :func:`fp8_decoding`'s ratio
    when read as float32)."""
    for j in range(row.shape[0]):
        c = np.uint32(row[j])
        word[j] = ((c & np.uint32(0x7F)) << shift) | ((c & np.uint32(0x80)) << np.uint32(24))


@kernel(fastmath=_FM, inline="always")
def _fp8_plane(row, shift, s, word, as_float, out):
    """``out[j]`` = float8 byte ``row[j]`` times ``s`` (``s`` includes :func:`fp8_decoding`'s ratio); ``word`` uint32
    scratch and ``as_float`` its float32 view, at least as long as ``row``."""
    _fp8_words(row, shift, word)
    for j in range(row.shape[0]):
        out[j] = as_float[j] * s


@kernel(fastmath=_FM, inline="always")
def _axpy(a, w, b):
    for j in range(a.shape[0]):
        a[j] += w * b[j]


#: tokens a step of the key and value loops handles at once (each row's accumulator is read and written once per
#: step, and each query row loaded once per step, instead of once per token)
_TB = 4


@kernel(fastmath=_FM, inline="always")
def _axpy4(a, w0, w1, w2, w3, b):
    """``a += w0·b[0] + w1·b[1] + w2·b[2] + w3·b[3]`` (``b`` ``(4, len(a))``)."""
    b0, b1, b2, b3 = b[0], b[1], b[2], b[3]
    for j in range(a.shape[0]):
        a[j] += w0 * b0[j] + w1 * b1[j] + w2 * b2[j] + w3 * b3[j]


@kernel(fastmath=_FM, inline="always")
def _dot4(a, b):
    """``(a · b[0], a · b[1], a · b[2], a · b[3])`` (``b`` ``(4, len(a))``)."""
    b0, b1, b2, b3 = b[0], b[1], b[2], b[3]
    s0 = s1 = s2 = s3 = np.float32(0.0)
    for j in range(a.shape[0]):
        x = a[j]
        s0 += x * b0[j]
        s1 += x * b1[j]
        s2 += x * b2[j]
        s3 += x * b3[j]
    return s0, s1, s2, s3


@kernel(fastmath=_FM, inline="always")
def _dot4_u8(a, c0, c1, c2, c3):
    """``(a · c0, a · c1, a · c2, a · c3)`` of 8-bit codes, converted as they are read (no buffer: the loop
    vectorises)."""
    s0 = s1 = s2 = s3 = np.float32(0.0)
    for j in range(c0.shape[0]):
        x = a[j]
        s0 += x * np.float32(c0[j])
        s1 += x * np.float32(c1[j])
        s2 += x * np.float32(c2[j])
        s3 += x * np.float32(c3[j])
    return s0, s1, s2, s3


@kernel(fastmath=_FM, inline="always")
def _dot4_u4(a, c0, c1, c2, c3):
    """:func:`_dot4` of 4-bit codes unpacked as they are read (no buffer: the loop vectorises); ``a`` in the split
    layout, ``a[j]`` / ``a[nb + j]`` the channels of byte ``j``'s low / high nibble."""
    nb = c0.shape[0]
    s0 = s1 = s2 = s3 = np.float32(0.0)
    for j in range(nb):
        lo, hi = a[j], a[nb + j]
        x0, x1, x2, x3 = np.int32(c0[j]), np.int32(c1[j]), np.int32(c2[j]), np.int32(c3[j])
        s0 += lo * np.float32(x0 & 15) + hi * np.float32(x0 >> 4)
        s1 += lo * np.float32(x1 & 15) + hi * np.float32(x1 >> 4)
        s2 += lo * np.float32(x2 & 15) + hi * np.float32(x2 >> 4)
        s3 += lo * np.float32(x3 & 15) + hi * np.float32(x3 >> 4)
    return s0, s1, s2, s3


@kernel(fastmath=_FM, inline="always")
def _dot2bit(a0, a1, a2, a3, x):
    """``a0·c0 + a1·c1 + a2·c2 + a3·c3`` of the four 2-bit codes ``c_i = (x >> 2i) & 3`` of the byte ``x``."""
    return (a0 * np.float32(x & 3) + a1 * np.float32((x >> 2) & 3) + a2 * np.float32((x >> 4) & 3)
            + a3 * np.float32(x >> 6))


@kernel(fastmath=_FM, inline="always")
def _dot4_u2(a, c0, c1, c2, c3):
    """:func:`_dot4` of 2-bit codes unpacked as they are read; ``a[i·nb + j]`` the channel of code ``i`` of byte
    ``j``."""
    nb = c0.shape[0]
    s0 = s1 = s2 = s3 = np.float32(0.0)
    for j in range(nb):
        a0, a1, a2, a3 = a[j], a[nb + j], a[2 * nb + j], a[3 * nb + j]
        s0 += _dot2bit(a0, a1, a2, a3, np.int32(c0[j]))
        s1 += _dot2bit(a0, a1, a2, a3, np.int32(c1[j]))
        s2 += _dot2bit(a0, a1, a2, a3, np.int32(c2[j]))
        s3 += _dot2bit(a0, a1, a2, a3, np.int32(c3[j]))
    return s0, s1, s2, s3


@kernel(fastmath=_FM, inline="always")
def _key_logits(q, codes, kscale, kzero, slut, bits, fp8_shift, fp8_ratio, group, t0, t1, out, col0):
    """``out[r, col0 + t]`` = ``q[r] · key[t]`` for ``t0 <= t < t1`` (whole key groups) of one row block: q ``(R, D)``,
    codes ``(slots, bytes)``; integer codes with per-channel scale and zero per key group ``(groups, D)``, or float8
    codes (``fp8_shift > 0``) with a scale per token ``(slots, 1)`` and one offset per channel ``kzero`` ``(1, D)``,
    added where the scale is positive (``kv_quant.quantize_fp8_keys``)."""
    R, D = q.shape
    nb = codes.shape[1]
    bias = np.empty(R, np.float32)  # q · z (integer codes: of a key group; float8: q · offset)
    zf = np.empty(D, np.float32)
    if fp8_shift:  # the bits placed in float32 words (:func:`fp8_decoding`), the token's scale applied to the dots
        for d in range(D):
            zf[d] = slut[kzero[0, d]]
        for r in range(R):
            bias[r] = _dot(q[r], zf)
        words = np.empty((_TB, nb), np.uint32)
        as_float = words.view(np.float32)
        zero = np.float32(0.0)
        for t in range(t0, t1 - _TB + 1, _TB):
            for k in range(_TB):
                _fp8_words(codes[t + k], fp8_shift, words[k])
            s0, s1, s2, s3 = (slut[kscale[t, 0]] * fp8_ratio, slut[kscale[t + 1, 0]] * fp8_ratio,
                              slut[kscale[t + 2, 0]] * fp8_ratio, slut[kscale[t + 3, 0]] * fp8_ratio)
            for r in range(R):  # a negative scale: the token is stored without the offset
                d0, d1, d2, d3 = _dot4(q[r], as_float)
                b = bias[r]
                out[r, col0 + t] = (b if s0 > 0 else zero) + d0 * abs(s0)
                out[r, col0 + t + 1] = (b if s1 > 0 else zero) + d1 * abs(s1)
                out[r, col0 + t + 2] = (b if s2 > 0 else zero) + d2 * abs(s2)
                out[r, col0 + t + 3] = (b if s3 > 0 else zero) + d3 * abs(s3)
        for t in range(t1 - (t1 - t0) % _TB, t1):
            _fp8_words(codes[t], fp8_shift, words[0])
            s0 = slut[kscale[t, 0]] * fp8_ratio
            for r in range(R):
                out[r, col0 + t] = (bias[r] if s0 > 0 else zero) + _dot(q[r], as_float[0]) * abs(s0)
        return
    per = 8 // bits
    buf = np.empty((_TB, per * nb), np.float32)  # _TB tokens' codes, each in the split layout
    planes = buf.reshape(_TB * per, nb)
    qsplit = np.zeros((R, per * nb), np.float32)  # q in the split layout (pad channels stay zero)
    for i in range(per):
        for j in range(nb):
            if j * per + i < D:
                for r in range(R):
                    qsplit[r, i * nb + j] = q[r, j * per + i]
    qs = np.empty((R, per * nb), np.float32)  # q·s of a key group
    ssplit = np.zeros(per * nb, np.float32)
    for gi in range(t0 // group, t1 // group):
        srow, zrow = kscale[gi], kzero[gi]
        for i in range(per):
            for j in range(nb):
                if j * per + i < D:
                    ssplit[i * nb + j] = slut[srow[j * per + i]]
        for d in range(D):
            zf[d] = slut[zrow[d]]
        for r in range(R):
            bias[r] = _dot(q[r], zf)
            for a in range(per * nb):
                qs[r, a] = qsplit[r, a] * ssplit[a]
        g0, g1 = gi * group, gi * group + group
        for t in range(g0, g1 - _TB + 1, _TB):
            for r in range(R):  # codes converted as the dots read them (no buffer; ~17% faster than unpacking once)
                if bits == 8:
                    s0, s1, s2, s3 = _dot4_u8(qs[r], codes[t], codes[t + 1], codes[t + 2], codes[t + 3])
                elif bits == 4:
                    s0, s1, s2, s3 = _dot4_u4(qs[r], codes[t], codes[t + 1], codes[t + 2], codes[t + 3])
                else:
                    s0, s1, s2, s3 = _dot4_u2(qs[r], codes[t], codes[t + 1], codes[t + 2], codes[t + 3])
                b = bias[r]
                out[r, col0 + t] = b + s0
                out[r, col0 + t + 1] = b + s1
                out[r, col0 + t + 2] = b + s2
                out[r, col0 + t + 3] = b + s3
        for t in range(g1 - group % _TB, g1):
            _unpack(codes[t], bits, np.float32(1.0), np.float32(0.0), planes, 0, 1)
            for r in range(R):
                out[r, col0 + t] = bias[r] + _dot(qs[r], buf[0])


@kernel(fastmath=_FM, inline="always")
def _value_sum(p, codes, vscale, vzero, slut, bits, fp8_shift, fp8_ratio, t0, t1, col0, acc):
    """``acc[r] += Σ_t p[r, col0 + t]·(code[t]·s + z)`` (split layout) for ``t0 <= t < t1`` of one row block, ``_TB``
    tokens at a time (a step whose weights are all zero, i.e. masked slots or underflowed weights, is skipped):
    codes ``(slots, groups, bytes per group)``, vscale / vzero ``(slots, groups)`` per token (float8: no zero
    points)."""
    R = p.shape[0]
    ngv, bpg = codes.shape[1], codes.shape[2]
    per = 1 if fp8_shift else 8 // bits
    buf = np.empty((_TB, acc.shape[1]), np.float32)  # _TB tokens' values, each in the split layout
    planes = buf.reshape(_TB * per * ngv, bpg)  # plane i of group g of token k: row (k·per + i)·ngv + g
    word = np.empty(bpg, np.uint32)
    as_float = word.view(np.float32)
    for t in range(t0, t1, _TB):
        n = min(_TB, t1 - t)
        live = False
        for r in range(R):
            for k in range(n):
                live |= p[r, col0 + t + k] != 0.0
        if not live:
            continue
        for k in range(_TB):
            tk = t + k
            if k >= n:  # past t1: zero values (and weights)
                buf[k] = 0.0
                continue
            for g in range(ngv):  # codes times their group's scale, plus its zero point
                s = slut[vscale[tk, g]]
                if fp8_shift:
                    _fp8_plane(codes[tk, g], fp8_shift, s * fp8_ratio, word, as_float, planes[k * ngv + g])
                else:
                    _unpack(codes[tk, g], bits, s, slut[vzero[tk, g]], planes, k * per * ngv + g, ngv)
        for r in range(R):
            pr = p[r]
            c = col0 + t
            _axpy4(acc[r], pr[c], pr[c + 1] if n > 1 else np.float32(0.0), pr[c + 2] if n > 2 else np.float32(0.0),
                   pr[c + 3] if n > 3 else np.float32(0.0), buf)


@kernel(fastmath=_FM, inline="always")
def _exp2_split(x):
    """``(k, 2^f)`` with ``2^k · 2^f = exp(x)``: ``k = round(x·log2 e)`` (float32) and ``2^f`` by Cephes' exp2f
    polynomial on ``|f| <= 1/2`` (relative error ~2e-7)."""
    y = x * np.float32(1.4426950408889634)  # log2(e)
    k = np.floor(y + np.float32(0.5))
    f = y - k
    px = np.float32(1.535336188319500e-4)
    px = px * f + np.float32(1.339887440266574e-3)
    px = px * f + np.float32(9.618437357674640e-3)
    px = px * f + np.float32(5.550332471162809e-2)
    px = px * f + np.float32(2.402264791363012e-1)
    px = px * f + np.float32(6.931472028550421e-1)
    return k, np.float32(1.0) + px * f


@kernel(fastmath=_FM, inline="always")
def _exp_nonpositive(x, pow2):
    """``exp(x)`` for ``x <= 0`` (``-inf`` -> 0) in float32 without a libm call (numba has no vector math library
    here): :func:`_exp2_split`, ``2^k`` from the table ``pow2[k + 126]`` (``k >= -126``; smaller results flush to
    0)."""
    k, e = _exp2_split(x)
    ki = np.int32(max(k, np.float32(-127.0))) + 126
    return e * pow2[max(ki, 0)] if k >= np.float32(-126.0) else np.float32(0.0)


@kernel(fastmath=_FM, inline="always")
def _exp_shifted(row, m, bits):
    """``row[t] = exp(row[t] - m)`` in place (``row[t] <= m``; ``-inf`` -> 0), returning their sum: the values of
    :func:`_exp_nonpositive`, in two loops that vectorise (no table: ``2^k`` is written as float32 bits into the
    uint32 scratch ``bits``, at least as long as ``row``; 3-5x faster over a 2k-token row)."""
    scale = bits.view(np.float32)
    for t in range(row.shape[0]):
        k, e = _exp2_split(max(row[t] - m, np.float32(-127.0 / 1.4426950408889634)))  # below: k = -127, i.e. 0
        row[t] = e
        b = np.int32(k) + np.int32(127)  # 2^k's biased exponent; 0 when k <= -127 (flushed to 0)
        bits[t] = np.uint32(b << 23) if b > 0 else np.uint32(0)
    total = np.float32(0.0)
    for t in range(row.shape[0]):
        x = row[t] * scale[t]
        row[t] = x
        total += x
    return total


@functools.cache
def pow2_table() -> np.ndarray:
    """``2^k`` for ``k = -126 .. 0`` (float32), indexed by ``k + 126``."""
    return np.ldexp(np.float32(1.0), np.arange(-126, 1)).astype(np.float32)


@kernel(fastmath=_FM, inline="always")
def _combine_block(n, part_m, part_l, part_acc, bounds, pow2, probs, rescale, out):
    """``out[n]`` from the chunks' partials of row block ``n`` (log-sum-exp merge: chunk ``c`` weighs
    ``exp(m_c - m) / Σ_c exp(m_c - m)·l_c``); with ``rescale``, also the chunks' ``probs[n]`` (unnormalised
    ``exp(logit - m_c)``) times that weight. A row with nothing valid gives zeros."""
    C, R = part_acc.shape[1], part_acc.shape[2]
    neg = np.float32(-np.inf)
    for r in range(R):
        o = out[n, r]
        o[:] = 0.0
        m = neg
        for c in range(C):
            m = max(m, part_m[n, c, r])
        if m == neg:  # nothing valid: every chunk left zeros in probs
            continue
        total = np.float32(0.0)
        for c in range(C):
            if part_m[n, c, r] != neg:
                total += _exp_nonpositive(part_m[n, c, r] - m, pow2) * part_l[n, c, r]
        inv = np.float32(1.0) / total
        for c in range(C):
            if part_m[n, c, r] == neg:
                continue
            w = _exp_nonpositive(part_m[n, c, r] - m, pow2) * inv
            _axpy(o, w, part_acc[n, c, r])
            if rescale:
                row = probs[n, r]
                for t in range(bounds[c], bounds[c + 1]):
                    row[t] *= w


@kernel(fastmath=_FM)
def _combine(part_m, part_l, part_acc, bounds, pow2, probs, rescale, out):
    """:func:`_combine_block` for every row block (after every chunk of :func:`_attend` is done)."""
    for n in range(out.shape[0]):
        _combine_block(n, part_m, part_l, part_acc, bounds, pow2, probs, rescale, out)


@kernel(fastmath=_FM)
def _attend(q, scale, kc, ks, kz, vc, vs, vz, qvalid, ntok,
            nq, nkc, nks, nkz, nvc, nvs, nvz, nvalid, nlen,
            kw, vw, wvalid, tw, nqueries, H, bits, fp8_shift, fp8_ratio, group, slut, pow2, bounds, u0, u1,
            want_probs, probs, part_m, part_l, part_acc, out):
    """Attention of the rows ``q[n]·scale`` (``q[n]`` ``(R, D)`` float32) over ``[narrow, quantized, window]``, split
    into units ``u0 <= u < u1``: unit ``u`` is row block ``n = u // C`` over the chunk ``[bounds[c], bounds[c + 1])``
    (``c = u % C``, ``C = len(bounds) - 1``) of that token axis (flash-decoding: chunks of one row block run on
    different threads; chunk bounds inside a quantized part fall on whole key groups).

    Quantized part: ``kc`` codes ``(N, slots, bytes)``, ``vc`` ``(N, slots, value groups, bytes per group)``, ``ks``
    / ``kz`` / ``vs`` / ``vz`` scales and zero points (uint16 bit patterns, read through ``slut``), its first ``ntok``
    slots; float8 codes when ``fp8_shift > 0`` (:func:`fp8_decoding`). Narrow part (ThinK, ``nlen`` slots, 0 when
    absent): the same with keys of fewer channels, attended by ``nq`` ``(N, R, Dk)`` (scale applied); its values are
    full width, stored like the quantized part's. Window: float32 ``kw`` / ``vw`` ``(N, slots, D)``, its first ``tw``
    slots; the last ``nqueries`` are the queries (rows ``g·Q + i``, causal among them). Validity masks
    ``(B, 1|H, slots)`` bool (a ``(1, 1, 0)`` array: all valid), ``N = B·H``.

    A unit writes its chunk's running max ``part_m[n, c]`` ``(R,)``, sum of exponentials ``part_l[n, c]``, weighted
    values ``part_acc[n, c]`` ``(R, Dv)`` and the unnormalised ``exp(logit - max)`` in ``probs[n, :, chunk]``; with
    one chunk (``C = 1``) it also merges them (:func:`_combine_block`): ``out[n]`` ``(R, Dv)`` and, with
    ``want_probs``, the probabilities ``probs[n]`` ``(R, nlen + ntok + tw)``; with more, :func:`_combine` does that
    once every unit is done. Units are independent: threads may run disjoint ranges.
    """
    C = bounds.shape[0] - 1
    R = q.shape[1]
    Dv = out.shape[2]
    per = 1 if fp8_shift else 8 // bits
    neg = np.float32(-np.inf)
    bpg = vc.shape[3]
    nbv = vc.shape[2] * bpg
    acc = np.empty((R, nbv * per), np.float32)  # values in the split layout
    qn = np.empty((R, q.shape[2]), np.float32)  # the row block's queries times the scale
    wq = nlen + ntok  # the window's first slot on the token axis
    ebits = np.empty(probs.shape[2], np.uint32)  # _exp_shifted's scratch
    for u in range(u0, u1):
        n, c = u // C, u % C
        b, h = n // H, n % H
        a, e = bounds[c], bounds[c + 1]
        pn = probs[n]
        n0, n1 = min(a, nlen), min(e, nlen)  # this chunk's slots of each part
        q0, q1 = min(max(a - nlen, 0), ntok), min(max(e - nlen, 0), ntok)
        w0, w1 = min(max(a - wq, 0), tw), min(max(e - wq, 0), tw)
        if n1 > n0:
            _key_logits(nq[n], nkc[n], nks[n], nkz[n], slut, bits, fp8_shift, fp8_ratio, group, n0, n1, pn, 0)
        for r in range(R):
            for d in range(qn.shape[1]):
                qn[r, d] = q[n, r, d] * scale
        if q1 > q0:
            _key_logits(qn, kc[n], ks[n], kz[n], slut, bits, fp8_shift, fp8_ratio, group, q0, q1, pn, nlen)
        for r in range(R):
            for t in range(w0, w1):
                pn[r, wq + t] = _dot(qn[r], kw[n, t])
        for valid, off, s0, s1 in ((nvalid, 0, n0, n1), (qvalid, nlen, q0, q1), (wvalid, wq, w0, w1)):
            if valid.shape[2]:
                vrow = valid[b, h if valid.shape[1] > 1 else 0]
                for t in range(s0, s1):
                    if not vrow[t]:
                        for r in range(R):
                            pn[r, off + t] = neg
        for r in range(R):  # this chunk's softmax terms
            row = pn[r]
            for t in range(max(w0, tw - nqueries + 1 + r % nqueries), w1):  # causal among the queries
                row[wq + t] = neg
            m = neg
            for t in range(a, e):
                m = max(m, row[t])
            part_m[n, c, r] = m
            if m == neg:  # nothing valid in this chunk: zeros
                row[a:e] = 0.0
                part_l[n, c, r] = 0.0
                continue
            part_l[n, c, r] = _exp_shifted(row[a:e], m, ebits)
        acc[:] = 0.0
        if n1 > n0:
            _value_sum(pn, nvc[n], nvs[n], nvz[n], slut, bits, fp8_shift, fp8_ratio, n0, n1, 0, acc)
        if q1 > q0:
            _value_sum(pn, vc[n], vs[n], vz[n], slut, bits, fp8_shift, fp8_ratio, q0, q1, nlen, acc)
        for r in range(R):
            o = part_acc[n, c, r]
            for d in range(Dv):
                j = d // per
                o[d] = acc[r, (d - j * per) * nbv + j]
            for t in range(w0, w1):
                _axpy(o, pn[r, wq + t], vw[n, t])
        if C == 1:
            _combine_block(n, part_m, part_l, part_acc, bounds, pow2, probs, want_probs, out)



@kernel(parallel=True)
def _attend_split(workers, q, scale, kc, ks, kz, vc, vs, vz, qvalid, ntok,
                  nq, nkc, nks, nkz, nvc, nvs, nvz, nvalid, nlen,
                  kw, vw, wvalid, tw, nqueries, H, bits, fp8_shift, fp8_ratio, group, slut, pow2, bounds, units,
                  want_probs, probs, part_m, part_l, part_acc, out):
    """:func:`_attend`'s units ``0 <= u < units`` split into ``workers`` even ranges run on numba's thread pool (its
    OpenMP or TBB layer: a hand-off of microseconds, where Python threads' costs ~0.1 ms), then, with more than one
    chunk, :func:`_combine` (on the calling thread). Its first compile costs about as much again as :func:`_attend`'s
    (numba optimizes the callee again inside it; both are cached on disk)."""
    for w in prange(workers):
        _attend(q, scale, kc, ks, kz, vc, vs, vz, qvalid, ntok, nq, nkc, nks, nkz, nvc, nvs, nvz, nvalid, nlen,
                kw, vw, wvalid, tw, nqueries, H, bits, fp8_shift, fp8_ratio, group, slut, pow2, bounds,
                units * w // workers, units * (w + 1) // workers, want_probs, probs, part_m, part_l, part_acc, out)
    if bounds.shape[0] > 2:
        _combine(part_m, part_l, part_acc, bounds, pow2, probs, want_probs, out)


@kernel(parallel=True)
def _probe(x):
    for i in prange(x.shape[0]):
        x[i] = i


_PROBE = threading.Lock()


@functools.cache
def thread_pool_ok() -> bool:
    """Whether numba's parallel kernels run on its OpenMP or TBB threading layer, which several Python threads may
    enter at once and which hands work over in microseconds (:func:`_attend_split`); its fallback, the workqueue
    layer, is neither (the launcher then splits over Python threads). Found once, by running a tiny parallel kernel,
    which starts numba's pool."""
    with _PROBE:
        _probe(np.zeros(2, np.int64))
        return numba.threading_layer() in ("omp", "tbb")
