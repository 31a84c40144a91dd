"""quantized_decode_attention: new tokens attend a KV cache held as KIVI codes plus a full-precision window.

The cache of one layer is ``[quantized part (Tq tokens), window (Tw tokens)]`` on one token axis; the ``Q`` queries
are the last ``Q`` tokens of the window (causal among themselves; ``Q = 1`` for a decode step). None of the paths makes
a dequantized copy of the cache: per key group ``(q·s) @ codesᵀ + q @ z``, per value group ``(p·s) @ codes + p @ z``.

- ``"numba"`` (CPU, the default there): one compiled call per layer (``quantized_decode_attention_numba.py``):
  logits read from the codes, softmax and values over ``[narrow, quantized, window]``; a step past ~0.3M
  multiply-adds is cut into row blocks and token chunks (merged by log-sum-exp) that run on numba's thread pool.
- ``"torch"``: walks the quantized part in tiles of ``block`` tokens (codes unpacked to float32 by shifts inside the
  loop) merged with an online softmax; any device.
- ``"triton"``: one kernel for a decode step over integer codes (CUDA, or the interpreter).

:func:`quantized_decode_attention_reference` dequantizes everything in float64 and is what the tests compare against.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .backend import check_mask, resolve_backend
from .cpu_ops import array_workspace, cpu_workers, run_parallel, single_thread
from .kv_quant import QuantizedKV

__all__ = ["NumbaArrays", "numba_arrays", "numba_decode", "quantized_decode_attention",
           "quantized_decode_attention_reference"]

#: tokens dequantized at a time by the PyTorch path (rounded down to a multiple of the key group)
DEFAULT_BLOCK = 512
BACKENDS = ("auto", "numba", "torch", "triton")


def _check(q: Tensor, quant: QuantizedKV, k: Tensor, v: Tensor, valid: Tensor | None,
           narrow: QuantizedKV | None = None, channel_idx: Tensor | None = None) -> None:
    B, Hq, Q, D = q.shape
    Hkv, Tw = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    if Tw < Q:
        raise ValueError(f"the window holds {Tw} tokens but {Q} queries must be its last tokens")
    for name, part in (("quant", quant), ("narrow", narrow)):
        if part is None:
            continue
        if part.k_codes.shape[:2] != (B, Hkv) or part.v_codes.shape[:2] != (B, Hkv):
            raise ValueError(f"{name} has batch x heads {tuple(part.k_codes.shape[:2])}, the window {(B, Hkv)}")
        check_mask(f"{name}.valid", part.valid, B, Hkv, part.length)
    if (narrow is None) != (channel_idx is None):
        raise ValueError("narrow (ThinK's quantized narrow keys) and channel_idx go together")
    if channel_idx is not None and channel_idx.shape[:2] != (B, Hkv):
        raise ValueError(f"channel_idx must have shape ({B}, {Hkv}, Dk), got {tuple(channel_idx.shape)}")
    check_mask("valid", valid, B, Hkv, Tw)


def quantized_decode_attention(
    q: Tensor,
    quant: QuantizedKV,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    valid: Tensor | None = None,
    block: int = DEFAULT_BLOCK,
    backend: str = "auto",
    return_probs: bool = False,
    narrow: QuantizedKV | None = None,
    channel_idx: Tensor | None = None,
    arrays: tuple | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Softmax attention of ``q`` over ``[narrow, dequant(quant), k]`` / ``[.., dequant(quant), v]``;
    ``(B, H_q, Q, Dv)`` in ``q``'s dtype (float32 accumulation). With ``return_probs`` (``Q = 1``) also the float32
    attention probabilities ``(B, H_q, Tn + Tq + Tw)`` (from the tiles' logits kept aside: one row per query head,
    not a copy of the cache).

    Parameters
    ----------
    q : Tensor
        ``(B, H_q, Q, D)`` queries, post-RoPE; they are the last ``Q`` tokens of the window (causal among them).
    quant : QuantizedKV
        The older tokens as codes, scales and zero points (``kvaccel.kernels.kv_quant``), ``H_q % H_kv == 0`` (GQA:
        query head ``h`` reads kv head ``h // (H_q / H_kv)``).
    k, v : Tensor
        ``(B, H_kv, Tw, D)`` / ``(B, H_kv, Tw, Dv)`` the full-precision window (most recent tokens).
    scale : float
        Logit scale.
    valid : Tensor, optional
        ``(B, 1|H_kv, Tw)`` bool validity of the window slots (``quant.valid`` that of the quantized part).
    block : int
        Tokens dequantized per tile by the ``"torch"`` path (rounded down to a multiple of the key group, at least
        one group).
    backend : str
        ``"auto"``: ``"numba"`` for CPU tensors; for CUDA tensors Triton when ``Q = 1`` over integer codes without a
        narrow segment and no probabilities are asked for, PyTorch otherwise. ``"numba"`` (CPU tensors; every
        option), ``"torch"`` (any device; every option) or ``"triton"`` (decode steps only: ``Q = 1``, no
        ``return_probs``; CPU tensors need ``TRITON_INTERPRET=1``).
    return_probs : bool
        Also return the probabilities (``Q`` must be 1), for eviction methods that accumulate them.
    narrow, channel_idx : QuantizedKV, Tensor, optional
        ThinK's oldest tokens, placed first: keys keep only the ``Dk`` channels ``channel_idx`` ``(B, H_kv, Dk)``
        (their logits are ``scale · q[channel_idx] · k``, i.e. attention over keys zero in the pruned channels),
        values full width. Not on the Triton path.
    arrays : tuple, optional
        :func:`numba_arrays` of ``quant``, ``k``, ``v``, ``valid``, built once by a caller that keeps the same buffers
        across calls (a cache layer: it saves the per-call conversion); read by the numba backend only.
    """
    _check(q, quant, k, v, valid, narrow, channel_idx)
    if return_probs and q.shape[2] != 1:
        raise ValueError(f"return_probs needs one query token, got {q.shape[2]}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "numba" or (backend == "auto" and q.device.type == "cpu"):
        if q.device.type != "cpu":
            raise ValueError(f"backend='numba' runs CPU tensors, got device {q.device}; use backend='auto'")
        return _quantized_decode_attention_numba(q, quant, k, v, scale, valid, return_probs, narrow, channel_idx,
                                                 arrays=arrays)
    decode_step = q.shape[2] == 1 and not return_probs and narrow is None and not quant.fp8
    chosen = resolve_backend(backend, q)
    if chosen == "triton" and not decode_step:
        if backend == "triton":
            raise ValueError(
                f"backend='triton' computes one query token over integer codes, without probabilities or a narrow "
                f"segment (got {q.shape[2]} queries, return_probs={return_probs}, narrow={narrow is not None}, "
                f"codes {quant.k_codes.dtype}); use backend='torch' or 'auto'"
            )
        chosen = "torch"  # "auto": the documented rule (Triton for decode steps only)
    if chosen == "triton":
        return _quantized_decode_attention_triton(q, quant, k, v, scale, valid)
    B, Hq, Q, D = q.shape
    Hkv, Tw, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = Hq // Hkv
    qg = q.reshape(B, Hkv, G * Q, D).float() * scale
    m = qg.new_full((B, Hkv, G * Q, 1), float("-inf"))
    l_sum = qg.new_zeros(B, Hkv, G * Q, 1)
    acc = qg.new_zeros(B, Hkv, G * Q, Dv)
    kept_logits: list[Tensor] = []

    def merge(logits: Tensor, weighted: Callable[[Tensor], Tensor]) -> None:
        nonlocal m, l_sum, acc
        if return_probs:
            kept_logits.append(logits)
        m_new = torch.maximum(m, logits.amax(-1, keepdim=True))
        m_safe = m_new.masked_fill(torch.isinf(m_new), 0.0)  # a row with nothing valid yet: no NaN from -inf - -inf
        p = torch.exp(logits - m_safe)
        alpha = torch.exp(m - m_safe)
        l_sum = l_sum * alpha + p.sum(-1, keepdim=True)
        acc = acc * alpha + weighted(p)
        m = m_new

    def fold(rows: Tensor, part: QuantizedKV) -> None:  # the part's tiles, one at a time, read from the codes
        Tq, g = part.length, part.key_group
        if not Tq:
            return
        step = max(g, block // g * g)
        for t0 in range(0, Tq, step):
            t1 = min(Tq, t0 + step)
            logits = part.key_logits(rows, t0, t1)
            if part.valid is not None:
                logits = logits.masked_fill(~part.valid[:, :, None, t0:t1], float("-inf"))
            merge(logits, lambda p, t0=t0, t1=t1: part.weighted_values(p, t0, t1))

    # CPU: one intra-op thread for this step's many small ops (waking the other threads per op cost more than the
    # ops on a loaded machine; same results)
    with single_thread() if q.device.type == "cpu" else contextlib.nullcontext():
        if narrow is not None:
            fold(qg.gather(-1, channel_idx[:, :, None, :].expand(B, Hkv, G * Q, channel_idx.shape[-1])), narrow)
        fold(qg, quant)
        logits = qg @ k.float().transpose(-1, -2)
        mask = _window_mask(valid, Q, G, Tw, q.device)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        vf = v.float()
        merge(logits, lambda p: p @ vf)
    denom = l_sum.clamp_min(torch.finfo(torch.float32).tiny)
    out = torch.where(l_sum > 0, acc / denom, 0.0).reshape(B, Hq, Q, Dv).to(q.dtype)
    if not return_probs:
        return out
    m_safe = m.masked_fill(torch.isinf(m), 0.0)
    probs = torch.exp(torch.cat(kept_logits, dim=-1) - m_safe) / denom
    return out, probs.reshape(B, Hq, -1)


# --------------------------------------------------------------------------------------------------------------
# numba path (launcher; the kernels are in kernels/quantized_decode_attention_numba.py)
# --------------------------------------------------------------------------------------------------------------
def _slot_buffer(t: Tensor, rows: bool) -> Tensor:
    """``t`` ``(B, H, T)`` or ``(B, H, T, X)`` as the contiguous buffer ``(B, H, slots[, X])`` whose first ``T``
    slots it is (a cache's ``SlotTensor`` view; found from the strides and the storage's size, as inference-mode views
    record no base tensor), without a copy; ``rows``: its heads merged, ``(B·H, slots, X)``. Any other layout is
    copied to a contiguous tensor. The kernels read only the first ``T`` slots."""
    B, H, T = t.shape[:3]
    four = t.dim() == 4
    X = t.shape[3] if four else 1
    s0, s1, s2 = t.stride()[:3]
    slots = s1 // X if X else 0
    if (X and s2 == X and s1 == slots * X and slots >= T and (B == 1 or s0 == H * s1)
            and (not four or X == 1 or t.stride(3) == 1)
            and (t.storage_offset() + B * H * slots * X) * t.element_size() <= t.untyped_storage().nbytes()):
        if rows:
            return t.as_strided((B * H, slots, X), (slots * X, X, 1))
        return t.as_strided((B, H, slots, X) if four else (B, H, slots), (H * s1, s1, X, 1)[: t.dim()])
    t = t.contiguous()
    return t.view(B * H, T, X) if rows else t


def _rows(t: Tensor) -> np.ndarray:
    """``t`` ``(B, H, T, X)`` as a ``(B·H, slots, X)`` array for the kernels (:func:`_slot_buffer`: no copy of a
    cache's buffer). 16-bit floats come as their bit patterns (uint16), float8 codes as bytes."""
    t = _slot_buffer(t, True)
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.view(torch.uint16)
    elif t.is_floating_point() and t.element_size() == 1:  # float8 codes
        t = t.view(torch.uint8)
    return t.numpy()


#: multiply-adds from which the numba path splits a step over numba's thread pool (``thread_pool_ok``: a hand-off
#: of microseconds; a 256-token batch-1 step of the default model, 0.3M, gains a little, a 2k one, 2.4M, ~35%)
_SPLIT_WORK = 1 << 18
#: the same over Python worker threads, where numba has no such pool (a hand-off costs ~0.1 ms: only large steps gain)
_PARALLEL_WORK = 1 << 22


def _mask(m: Tensor | None) -> np.ndarray:
    """A validity mask ``(B, 1|H, T)`` as a bool array ``(B, 1|H, slots)`` (:func:`_slot_buffer`); ``None`` as an empty
    ``(1, 1, 0)`` one."""
    return _NO_MASK if m is None else _slot_buffer(m, False).numpy()


_NO_MASK = np.ones((1, 1, 0), dtype=np.bool_)
_U8, _U16 = np.zeros((1, 0, 1), np.uint8), np.zeros((1, 0, 1), np.uint16)
_NO_SEGMENT = (_U8, _U16, _U16, np.zeros((1, 0, 1, 1), np.uint8), _U16, _U16, _NO_MASK)
_NO_QUERY = np.zeros((1, 1, 0), np.float32)


def _segment(part: QuantizedKV | None) -> tuple:
    """``(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, valid)`` arrays of ``part`` for the kernel (float8: the
    keys' offset ``(N, 1, D)``, zeros when absent; value zero points absent: the scales, unread; value codes as ``(N,
    slots, value groups, bytes per group)``); ``None``: empty arrays."""
    if part is None:
        return _NO_SEGMENT
    ks, vs = _rows(part.k_scale), _rows(part.v_scale)
    if part.k_zero is not None:
        kz = _rows(part.k_zero)
    else:  # float8 without an offset (16-bit zeros); integer codes always have zero points
        kz = np.zeros((ks.shape[0], 1, part.k_codes.shape[-1]), np.uint16)
    vz = vs if part.v_zero is None else _rows(part.v_zero)
    vc = _rows(part.v_codes)
    vc = vc.reshape(*vc.shape[:2], vs.shape[2], vc.shape[2] // vs.shape[2])
    return _rows(part.k_codes), ks, kz, vc, vs, vz, _mask(part.valid)


class NumbaArrays(NamedTuple):
    """What the numba backend reads of one layer (:func:`numba_arrays`): the quantized part's arrays (``_segment``),
    the float32 window's (``None``: converted at each call) and its mask, viewing the layer's buffers; and the code
    format (bits, float8 decoding, the scales' float32 table)."""
    seg: tuple
    k: np.ndarray | None
    v: np.ndarray | None
    valid: np.ndarray
    bits: int
    fp8_shift: int
    fp8_ratio: float
    slut: np.ndarray


def numba_arrays(quant: QuantizedKV, k: Tensor | None, v: Tensor | None, valid: Tensor | None) -> NumbaArrays:
    """The arrays the numba backend reads for ``quant`` and a float32 window ``k`` / ``v`` with its validity ``valid``:
    the buffers the tensors view (:func:`_rows`, :func:`_mask`, no copies), as :func:`quantized_decode_attention`
    takes them (``arrays=``) and :func:`numba_decode` runs them. ``k`` / ``v`` ``None``: converted at each call (a
    16-bit window). Valid while those buffers are the ones the tensors view (their lengths may change)."""
    from . import quantized_decode_attention_numba as nk

    fp8 = nk.fp8_decoding(quant.k_codes.dtype) if quant.fp8 else (0, 1.0)
    return NumbaArrays(_segment(quant), None if k is None else _rows(k), None if v is None else _rows(v),
                       _mask(valid), quant.bits, *fp8, nk.scale_table(quant.k_scale.dtype))


@functools.lru_cache(maxsize=64)  # a decode step's layers share their lengths: one computation per step
def _chunk_bounds(N: int, Tn: int, Tq: int, Tw: int, group: int, workers: int, chunks: int | None) -> np.ndarray:
    """Bounds ``(C + 1,)`` of the ``C`` chunks each row block's token axis ``[narrow (Tn), quantized (Tq), window
    (Tw)]`` is split into: ``chunks``, or the fewest that spread the ``N·C`` units evenly over ``workers`` threads
    (``workers / gcd(N, workers)``: a batch-1 step's 3 KV heads on 2 threads take 2 chunks each), at most one per
    key group of the quantized part. Inner bounds fall on whole key groups of the quantized part, near equal token
    counts."""
    if chunks is None:
        chunks = workers // math.gcd(N, workers)
    chunks = max(1, min(chunks, Tq // group))
    W = Tn + Tq + Tw
    inner = [Tn + min(max(round((W * i / chunks - Tn) / group), 0), Tq // group) * group for i in range(1, chunks)]
    bounds = np.array([0, *inner, W], dtype=np.int64)
    bounds.flags.writeable = False  # shared by the calls that hit the cache
    return bounds


def _quantized_decode_attention_numba(q: Tensor, quant: QuantizedKV, k: Tensor, v: Tensor, scale: float,
                                      valid: Tensor | None, return_probs: bool, narrow: QuantizedKV | None,
                                      channel_idx: Tensor | None, chunks: int | None = None,
                                      arrays: NumbaArrays | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`numba_decode` of the tensors (their arrays built here unless given; a 16-bit window converted to
    float32; ThinK's narrow segment and its queries)."""
    B, Hq, Q, D = q.shape
    Hkv = k.shape[1]
    R = Hq // Hkv * Q
    if narrow is not None and narrow.fp8 != quant.fp8:
        raise ValueError("narrow and quant must hold the same kind of codes (integer or float8)")
    arrays = numba_arrays(quant, None, None, valid) if arrays is None else arrays
    if arrays.k is None:  # the window as float32 arrays (16-bit models: a copy of at most residual + group_size tokens)
        arrays = arrays._replace(k=_rows(k.float()), v=_rows(v.float()))
    nq, nseg = _NO_QUERY, _NO_SEGMENT
    if narrow is not None:
        qg = q.reshape(B, Hkv, R, D).float() * scale
        nq = qg.gather(-1, channel_idx[:, :, None, :].expand(B, Hkv, R, channel_idx.shape[-1]))
        nq, nseg = nq.view(B * Hkv, R, -1).numpy(), _segment(narrow)
    # tokens per key group (both parts share it; 1 for float8 codes, and while nothing is quantized)
    group = next((part.key_group for part in (quant, narrow) if part is not None and part.key_group), 1)
    return numba_decode(q, scale, arrays, quant.length, k.shape[2], group, return_probs,
                        narrow=(nq, nseg, 0 if narrow is None else narrow.length), chunks=chunks)


def numba_decode(q: Tensor, scale: float, arrays: NumbaArrays, Tq: int, Tw: int, group: int, return_probs: bool,
                 *, narrow: tuple | None = None, chunks: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """The compiled kernel (``quantized_decode_attention_numba._attend``) over ``arrays``' first ``Tq`` quantized
    and ``Tw`` window slots (``group`` tokens per key group): logits of ``[narrow, quant, window]`` read from the
    codes, softmax, values; rows with no valid slot give zeros. ``q`` ``(B, H_q, Q, D)`` on the CPU; no checks (a
    caller that keeps its arrays, e.g. a cache layer, calls this directly: no per-step tensors of its buffers).
    Large steps split the ``B·H_kv`` row blocks, and their token axes into chunks (:func:`_chunk_bounds`; ``chunks``
    overrides the count) merged by log-sum-exp, over numba's thread pool (``_attend_split``) or, without an OpenMP /
    TBB one, over :func:`~kvaccel.kernels.cpu_ops.run_parallel`'s worker threads (the kernel releases the GIL)."""
    from . import quantized_decode_attention_numba as nk

    B, Hq, Q, D = q.shape
    N = arrays.seg[0].shape[0]  # B·H_kv
    R, Dv = B * Hq * Q // N, arrays.v.shape[2]
    nq, nseg, Tn = (_NO_QUERY, _NO_SEGMENT, 0) if narrow is None else narrow
    qf = q.reshape(N, R, D).float().contiguous()  # the kernel applies the scale
    W = Tn + Tq + Tw
    pool, work = cpu_workers(q.device), N * R * W * (D + Dv)
    split = pool > 1 and work >= _SPLIT_WORK and nk.thread_pool_ok()  # numba's pool, else Python threads
    workers = pool if split or work >= _PARALLEL_WORK else 1
    bounds = _chunk_bounds(N, Tn, Tq, Tw, group, workers, chunks)
    C = len(bounds) - 1
    # scratch: the chunks' max, sum and weighted values, then the probabilities unless asked for
    NCR = N * C * R
    scratch = array_workspace(NCR * (2 + Dv) + (0 if return_probs else N * R * W), np.float32)
    probs = torch.empty(N, R, W, dtype=torch.float32) if return_probs else None  # handed to the caller: its own
    out = torch.empty(N, R, Dv, dtype=torch.float32)
    args = (qf.numpy(), np.float32(scale), *arrays.seg, Tq, nq, *nseg, Tn, arrays.k, arrays.v, arrays.valid, Tw, Q,
            N // B, arrays.bits, arrays.fp8_shift, arrays.fp8_ratio, group, arrays.slut, nk.pow2_table(), bounds)
    parts = (probs.numpy() if return_probs else scratch[NCR * (2 + Dv):].reshape(N, R, W),
             scratch[:NCR].reshape(N, C, R), scratch[NCR: 2 * NCR].reshape(N, C, R),
             scratch[2 * NCR: NCR * (2 + Dv)].reshape(N, C, R, Dv), out.numpy())
    units = N * C
    if split:  # merges the chunks too
        nk._attend_split(workers, *args, units, return_probs, *parts)
    else:
        tasks = [(*args, units * i // workers, units * (i + 1) // workers, return_probs, *parts)
                 for i in range(workers)]
        run_parallel(nk._attend, [t for t in tasks if t[len(args)] < t[len(args) + 1]], workers)
        if C > 1:
            nk._combine(*parts[1:4], bounds, args[-2], parts[0], return_probs, parts[4])
    out = out.view(B, Hq, Q, Dv)
    out = out if q.dtype == torch.float32 else out.to(q.dtype)
    return (out, probs.view(B, Hq, W)) if return_probs else out


def _window_mask(valid: Tensor | None, Q: int, G: int, Tw: int, device) -> Tensor | None:
    """``(B|1, H|1, G·Q, Tw)`` mask of the window: validity and causality among the last ``Q`` slots (rows stacked
    ``G`` query heads x ``Q`` queries)."""
    mask = None if valid is None else valid[:, :, None, :]
    if Q > 1:
        rows_q = torch.arange(Q, device=device).repeat(G)
        causal = torch.arange(Tw, device=device)[None, :] <= (Tw - Q + rows_q)[:, None]
        mask = causal[None, None] if mask is None else mask & causal
    return mask


def quantized_decode_attention_reference(q: Tensor, quant: QuantizedKV, k: Tensor, v: Tensor, *, scale: float,
                                         valid: Tensor | None = None, narrow: QuantizedKV | None = None,
                                         channel_idx: Tensor | None = None) -> Tensor:
    """float64 reference of :func:`quantized_decode_attention`: the whole cache dequantized (narrow keys zero-filled
    in their pruned channels), one softmax."""
    _check(q, quant, k, v, valid, narrow, channel_idx)
    B, Hq, Q, D = q.shape
    Hkv, Tw, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = Hq // Hkv
    keys, vals, valids = [quant.keys(torch.float64), k.double()], [quant.values(torch.float64), v.double()], []
    if narrow is not None:
        kn = narrow.keys(torch.float64)
        idx = channel_idx[:, :, None, :].expand(*kn.shape)
        keys.insert(0, kn.new_zeros(*kn.shape[:3], D).scatter_(-1, idx, kn))
        vals.insert(0, narrow.values(torch.float64))
    for part in ([narrow] if narrow is not None else []) + [quant]:
        valids.append(part.valid if part.valid is not None else
                      torch.ones(B, 1, part.length, dtype=torch.bool, device=q.device))
    valids.append(valid if valid is not None else torch.ones(B, 1, Tw, dtype=torch.bool, device=q.device))
    K, V = torch.cat(keys, dim=2), torch.cat(vals, dim=2)
    logits = q.reshape(B, Hkv, G * Q, D).double() @ K.transpose(-1, -2) * scale
    heads = max(m.shape[1] for m in valids)
    full_valid = torch.cat([m.expand(B, heads, -1) for m in valids], dim=-1)[:, :, None, :]
    win = _window_mask(None, Q, G, Tw, q.device)
    if win is not None:
        full_valid = full_valid & torch.cat([win.new_ones(1, 1, G * Q, K.shape[2] - Tw), win], dim=-1)
    logits = logits.masked_fill(~full_valid, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return (probs @ V).reshape(B, Hq, Q, Dv)


# --------------------------------------------------------------------------------------------------------------
# Triton path (launcher; the kernel is in kernels/triton/quantized_decode_attention.py)
# --------------------------------------------------------------------------------------------------------------
def _quantized_decode_attention_triton(q: Tensor, quant: QuantizedKV, k: Tensor, v: Tensor, scale: float,
                                       valid: Tensor | None) -> Tensor:
    """Launch ``_quantized_decode_attention_fwd`` on grid ``(B * H_kv, cdiv(G, BLOCK_G))``."""
    import triton

    from .triton.quantized_decode_attention import _quantized_decode_attention_fwd

    B, Hq, _, D = q.shape
    Hkv, Tw, Dv = k.shape[1], k.shape[2], v.shape[-1]
    Tq = quant.length
    G = Hq // Hkv
    out = torch.empty(B, Hq, 1, Dv, dtype=q.dtype, device=q.device)
    ones = torch.ones(1, 1, 1, dtype=torch.bool, device=q.device)
    valid_u8 = (valid.expand(B, Hkv, Tw) if valid is not None else ones).view(torch.uint8)
    qvalid_u8 = (quant.valid.expand(B, Hkv, Tq) if quant.valid is not None else ones).view(torch.uint8)
    if quant.k_zero.stride() != quant.k_scale.stride() or quant.v_zero.stride() != quant.v_scale.stride():
        quant = QuantizedKV(quant.bits, quant.k_codes, quant.k_scale.contiguous(), quant.k_zero.contiguous(),
                            quant.v_codes, quant.v_scale.contiguous(), quant.v_zero.contiguous(), quant.valid)
    key_group = quant.key_group or 1
    value_group = Dv // quant.v_scale.shape[-1]
    # tl.dot needs every dim >= 16; padded query heads / channels are masked.
    BLOCK_G = max(16, triton.next_power_of_2(G))
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_DV = max(16, triton.next_power_of_2(Dv))
    BLOCK_N = 64 if max(BLOCK_D, BLOCK_DV) <= 128 else 32
    BLOCK_N = min(BLOCK_N, max(16, triton.next_power_of_2(max(Tq, Tw, 1))))
    num_warps = 4 if max(BLOCK_D, BLOCK_DV) <= 128 else 8
    grid = (B * Hkv, triton.cdiv(G, BLOCK_G))
    _quantized_decode_attention_fwd[grid](
        q, quant.k_codes, quant.k_scale, quant.k_zero, quant.v_codes, quant.v_scale, quant.v_zero, qvalid_u8,
        k, v, valid_u8, out,
        float(scale), Tq, Tw,
        q.stride(0), q.stride(1), q.stride(3),
        *quant.k_codes.stride(), *quant.k_scale.stride(), *quant.v_codes.stride(), *quant.v_scale.stride(),
        *qvalid_u8.stride(), *k.stride(), *v.stride(), *valid_u8.stride(),
        out.stride(0), out.stride(1), out.stride(3),
        H_KV=Hkv, GROUP=G, HEAD_DIM=D, HEAD_DIM_V=Dv, BITS=quant.bits, KEY_GROUP=key_group, VALUE_GROUP=value_group,
        BLOCK_G=BLOCK_G, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, BLOCK_N=BLOCK_N,
        HAS_QVALID=quant.valid is not None, HAS_VALID=valid is not None,
        INPUT_PRECISION="ieee",  # fp32 products like the PyTorch path (decode is memory-bound)
        num_warps=num_warps,
    )
    return out
