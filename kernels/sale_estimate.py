"""sale_estimate: SALE's low-bit score estimate and Relative-Attention-Score block selection for sparse prefill.

SALE (https://arxiv.org/abs/2505.24179). Per head, Q and K are centred on their sequence mean and quantized to
symmetric ``bits``-bit integers with one scale per token; the estimated logit of query ``i`` and key ``j`` is

    ``ŝ_ij = scale * (s^q_i s^k_j <Q̂_i, K̂_j> + <q̄, k_j - k̄>)``

(integer dot products, scales applied after; ``<q̄, k_j - k̄>`` is the exact term the query centring removed, as in
SageAttention's smoothing). Subtracting ``k̄`` only shifts every logit of a row by ``scale * <q_i, k̄>``, which
softmax ignores; the exact part below uses the same shift, so the ratios are consistent. For every query block of
``block_m`` rows the sink key block(s) and the local window (``local_window`` tokens before the block, plus the
block itself) are computed exactly to get the row max ``m_i`` and sum ``l_i``; every other key gets the Relative
Attention Score ``r_ij = exp(ŝ_ij - m_i) / l_i`` and a key block of ``block_n`` keys is kept when some row of the
query block has ``r_ij > τ_h``. Sink and local blocks are always kept; a head with ``τ_h <= 0`` is dense.

CPU path (``backend="torch"``). CPUs have no INT4 arithmetic. Options measured side by side in one process
(``benchmarks/sale_estimate.py``, ``OMP_NUM_THREADS=1``, B=1, H_q=9, H_kv=3, D=64 — one default-model layer — on
this AVX512-BF16/VNNI CPU without AMX; cost relative to causal SDPA fp32 attention of the same layer at L=4096;
the machine was shared, so the ratios are indicative): the causal ``Q K^T`` alone costs fp32 0.62x, fp16 5.8x (no
fp16 GEMM here), bf16 0.32x, int8 ``torch._int_mm`` on int4 values 0.11-0.23x — but the exact-int path then needs
float passes over the ``(G·chunk, n)`` int32 scores (scales, bias, threshold: ~0.8x in total), while folding
everything into one bfloat16 GEMM needs only one ``amax`` pass (GEMM + amax ~0.23x). So the CPU path runs
``[scale·s^q_i·Q̂_i, 1, 1, -thr_i^hi, -thr_i^lo] · [s^k_j·K̂_j, scale·bias_j^hi, scale·bias_j^lo, 1, 1]`` as a bf16
GEMM (fp32 accumulation) that yields ``ŝ_ij - thr_i`` directly: the int4 values are exact in bf16, the per-token
scale products round at 2^-9 (small next to the INT4 error itself), the large per-row / per-key terms are split in
hi + lo bf16 parts (~2^-17). It differs from the exact-int Triton/reference arithmetic only by that rounding (tests
allow 0.05 in ``log r`` at the threshold). GQA: the 3 query heads of a kv head share K's quantization;
query blocks go ``chunk`` rows at a time (temporaries ``O(G·chunk·L)`` bf16, never ``L x L``); only the estimated
key range ``[sink, i·block_m - local_window)`` is multiplied (a chunk's keys stop at its last block's local window,
so the causal upper half is never computed); the exact sink + local statistics are one fused flash-kernel call per
chunk of query blocks, which returns the row log-sum-exp (``O(L · (sink + local_window + block_m))``). With
``torch.get_num_threads() > 1`` the chunks run on worker threads
(:func:`~kvaccel.kernels.cpu_ops.run_parallel`).

Cost at L=8192 on the default model's real q/k (layers 0, 5, 11, 17, 23, 29; 1 thread, CPU time, interleaved with
SDPA): the whole estimate is 0.44-0.49x SDPA (before these changes ~0.5x; ``benchmarks/prefill_attention.py``,
all layers: 14.65 s of SDPA's 31.2 s); about 55% is the bf16 GEMM, 12% the block max, 12% the row statistics.
Changes that kept the selection identical (every tile, every layer): GEMM width 68 -> 72
(zero columns), one reused GEMM output buffer, the keep test's block max on the bf16 bits as int16 (the sign of the
max is all it needs; ~5x faster than a bf16 max), the row statistics by the fused kernel instead of logits +
``logsumexp``. Measured and rejected: (1) ``torch._int_mm`` on the int4 values is ~4.6x faster than the bf16 GEMM
(1.3 vs 6.4 ms for 768 x 4096 x 64), but the per-token scales, the bias and the threshold then need float passes
over the int32 scores (convert, scale, add, max: ~3 ms), so the estimate was no faster (0.96-1.12x the bf16 path),
and folding them into fewer passes needs a per-query-block Q scale, which changed 3-5% of the tiles; (2) estimating
only every s-th row of a query block: s=2 costs 0.31x SDPA but drops 5-12% of the kept tiles (output error 0.7% ->
1.0-1.7%), s=4 0.25x, 12-25% dropped. So at 1 thread SALE's CPU estimate stays at ~0.45x of dense attention: with
its ~0.47 density the method cannot beat SDPA by much on this CPU; on a GPU the INT4 kernel is the paper's ~11%.
Selection quality on default-model q/k (``--quality``, L=1536, τ=0.008): 98-99% recall of the blocks an exact-score
oracle keeps, 99.9% of tiles identical to the exact-integer INT4 reference.

The Triton kernel (:mod:`kvaccel.kernels.triton.sale_estimate`) keeps the INT4 formulation: int8 tiles of int4
values, ``tl.dot`` accumulated in int32, scales applied after, one program per (query block, head).
:func:`sale_estimate_reference` (float64, full ``L x L`` matrix, for tests at small sizes) defines the result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kvaccel.checks import check_int

from . import cpu_ops
from .backend import resolve_backend
from .block_sparse_attention import causal_block_mask, check_block_size, first_query_block, num_blocks
from .cpu_ops import cpu_workers, run_parallel

__all__ = [
    "sale_quantize",
    "sale_prepare",
    "sale_estimate",
    "sale_block_scores",
    "sale_estimate_reference",
]


def sale_quantize(x: Tensor, bits: int = 4) -> tuple[Tensor, Tensor]:
    """Symmetric per-token quantization: ``x ≈ scale[..., None] * xi`` with ``xi`` in ``[-2^(b-1), 2^(b-1) - 1]``.

    ``x`` ``(..., D)`` float; returns ``xi`` int8 ``(..., D)`` and ``scale`` float32 ``(...)`` (``amax / (2^(b-1)-1)``;
    1 for an all-zero token).
    """
    check_int("bits", bits, 2, 8)
    qmax = 2 ** (bits - 1) - 1
    x = x.float()
    s = x.abs().amax(-1) / qmax
    s = torch.where(s > 0, s, torch.ones_like(s))
    xi = torch.round(x / s.unsqueeze(-1)).clamp_(-qmax - 1, qmax).to(torch.int8)
    return xi, s


def _check(q: Tensor, k: Tensor, block_m: int, block_n: int, sink: int, local_window: int) -> None:
    check_block_size("block_m", block_m)
    check_block_size("block_n", block_n)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-D (B, H, L, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3] or k.shape[2] < q.shape[2]:
        raise ValueError(
            f"k {tuple(k.shape)} must be (B, H_kv, L, D) with L >= {q.shape[2]} for q {tuple(q.shape)} (the queries "
            "are the last positions of the keys)"
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    for name, val in (("sink", sink), ("local_window", local_window)):
        check_int(name, val, 0, why="tokens")


def _local_start_block(nqb: int, block_m: int, block_n: int, local_window: int, device, i0: int = 0) -> Tensor:
    """``(nQB,)`` first key block of the exact local window of query blocks ``i0 ..`` (keys
    ``>= i*block_m - local_window``)."""
    start = torch.clamp(torch.arange(i0, i0 + nqb, device=device) * block_m - local_window, min=0)
    return start // block_n


def _exact_blocks(L: int, block_m: int, block_n: int, sink_blocks: int, local_window: int, device,
                  q_len: int | None = None) -> Tensor:
    """``(nQB, nKB)`` bool: the sink and local key blocks (computed exactly, always kept), causal; with ``q_len``
    the query blocks holding the last ``q_len`` positions only."""
    causal = causal_block_mask(L, block_m, block_n, device=device, q_len=q_len)
    j = torch.arange(causal.shape[1], device=device)[None, :]
    lo = _local_start_block(causal.shape[0], block_m, block_n, local_window, device,
                            first_query_block(L, q_len, block_m))[:, None]
    return ((j < sink_blocks) | (j >= lo)) & causal


def _row_stats(qf: Tensor, kc: Tensor, scale: float, block_m: int, block_n: int, sink_blocks: int,
               local_window: int, chunk: int) -> Tensor:
    """``(B, H_q, Lq)`` float32 ``m_i + log l_i`` of the exact logits ``scale * <q_i, k_j - k̄>`` over the sink and
    local blocks of row ``i``'s query block (causal), gathered per query block (``O(L · window)``). The queries are
    the last ``Lq`` of the ``L`` key positions.

    CPU: the fused flash kernel returns the log-sum-exp of each row over the gathered keys (one call per chunk of
    query blocks: query blocks as the batch, kv heads as the heads, the ``G`` query heads of a kv head stacked, one
    broadcast mask), instead of separate logits, mask and ``logsumexp`` passes; elsewhere logits + ``logsumexp``.
    """
    B, Hq, Lq, D = qf.shape
    Hkv, L = kc.shape[1], kc.shape[2]
    G = Hq // Hkv
    qb0 = first_query_block(L, Lq, block_m)
    shift = L - Lq - qb0 * block_m  # rows of the first query block before the first query
    nqb = num_blocks(L, block_m) - qb0
    dev = qf.device
    sink_end = min(L, sink_blocks * block_n)
    lo = _local_start_block(nqb, block_m, block_n, local_window, dev, qb0) * block_n  # (nQB,) first local key
    q_end = torch.clamp((torch.arange(qb0, qb0 + nqb, device=dev) + 1) * block_m, max=L)
    width = int((q_end - lo).max())  # block_m + local_window when the blocks align
    pos = torch.cat(
        [torch.arange(sink_end, device=dev).expand(nqb, sink_end), lo[:, None] + torch.arange(width, device=dev)], 1
    )  # (nQB, W) key positions
    dup = torch.zeros_like(pos, dtype=torch.bool)
    dup[:, sink_end:] = pos[:, sink_end:] < sink_end  # local keys that are also sink keys
    idx = pos.clamp(max=L - 1)
    rows_all = torch.arange(qb0 * block_m, (qb0 + nqb) * block_m, device=dev).view(nqb, block_m)  # positions
    bad_all = (pos[:, None, :] > rows_all[:, :, None]) | dup[:, None, :]  # (nQB, m, W)
    fused = dev.type == "cpu"
    if fused:  # additive mask (nQB, 1, G*m, W): the same for the G stacked heads and, broadcast, every kv head
        bias_all = torch.zeros(bad_all.shape, dtype=qf.dtype, device=dev).masked_fill_(bad_all, float("-inf"))
        bias_all = bias_all[:, None].expand(nqb, G, block_m, -1).reshape(nqb, 1, G * block_m, -1)
    qpad = F.pad(qf, (0, 0, shift, nqb * block_m - shift - Lq))
    out = torch.empty(B, Hq, nqb * block_m, dtype=torch.float32, device=dev)
    qb_per_chunk = max(1, chunk // block_m)

    def run(i0: int) -> None:
        i1 = min(nqb, i0 + qb_per_chunk)
        r0, r1 = i0 * block_m, i1 * block_m
        nb = i1 - i0
        # (nb, B·H_kv, G·m, D): query blocks as the batch, kv heads as the heads (the mask broadcasts over them)
        qb = qpad[:, :, r0:r1].reshape(B * Hkv, G, nb, block_m, D).permute(2, 0, 1, 3, 4).reshape(nb, B * Hkv,
                                                                                                 G * block_m, D)
        kg = kc[:, :, idx[i0:i1]].reshape(B * Hkv, nb, -1, D).transpose(0, 1)  # (nb, B·H_kv, W, D)
        if fused:
            lse = cpu_ops.flash_cpu(qb, kg, kg, attn_mask=bias_all[i0:i1], scale=scale)[1]  # (nb, B·H_kv, G·m)
        else:
            s = (qb @ kg.transpose(-1, -2)).mul_(scale)
            s.masked_fill_(bad_all[i0:i1, None].repeat(1, 1, G, 1), float("-inf"))
            lse = torch.logsumexp(s, -1)
        out[:, :, r0:r1] = lse.view(nb, B, Hkv, G, block_m).permute(1, 2, 3, 0, 4).reshape(B, Hq, nb * block_m)

    run_parallel(run, [(i0,) for i0 in range(0, nqb, qb_per_chunk)], cpu_workers(dev))
    return out[:, :, shift : shift + Lq]


def sale_prepare(q: Tensor, k: Tensor, *, scale: float, block_m: int = 64, block_n: int = 32, sink: int = 32,
                 local_window: int = 128, bits: int = 4, chunk: int = 256, q_mean: Tensor | None = None
                 ) -> dict[str, Tensor]:
    """The shared first pass: centred, quantized Q and K, the bias ``<q̄, k_j - k̄>`` and the exact row statistics.

    ``q`` ``(B, H_q, Lq, D)`` are the last ``Lq`` of the ``L`` positions of ``k``; ``q_mean`` ``(B, H_q, 1, D)`` is the
    query centre (default: the mean of ``q``). Returns a dict with ``qi`` ``(B, H_q, Lq, D)`` int8, ``sq``
    ``(B, H_q, Lq)``, ``ki`` ``(B, H_kv, L, D)`` int8, ``sk`` ``(B, H_kv, L)``, ``bias`` ``(B, H_q, L)``
    (``<q̄_h, k_j - k̄>``) and ``lse`` ``(B, H_q, Lq)`` (``m_i + log l_i`` of the exact sink + local logits); all
    float32 except the int8 values.
    """
    _check(q, k, block_m, block_n, sink, local_window)
    G = q.shape[1] // k.shape[1]
    qf, kf = q.float(), k.float()
    qm = qf.mean(2, keepdim=True) if q_mean is None else q_mean.float().expand(*q.shape[:2], 1, q.shape[3])
    km = kf.mean(2, keepdim=True)
    kc = kf - km
    qi, sq = sale_quantize(qf - qm, bits)
    ki, sk = sale_quantize(kc, bits)
    bias = (kc.repeat_interleave(G, dim=1) @ qm.transpose(-1, -2)).squeeze(-1)  # (B, Hq, L), O(L·D)
    sink_blocks = num_blocks(sink, block_n)
    lse = _row_stats(qf, kc, scale, block_m, block_n, sink_blocks, local_window, chunk)
    return {"qi": qi, "sq": sq, "ki": ki, "sk": sk, "bias": bias, "lse": lse}


def _as_log_tau(threshold: float | Tensor, Hq: int, device) -> Tensor:
    """``(H_q,)`` float32 ``log τ_h`` (``-inf`` for a dense head, ``τ <= 0``)."""
    tau = torch.as_tensor(threshold, dtype=torch.float64, device=device).flatten()
    if tau.numel() == 1:
        tau = tau.expand(Hq)
    if tau.numel() != Hq:
        raise ValueError(f"threshold must be a float or ({Hq},) per query head, got {tau.numel()} values")
    if bool((tau >= 1).any()) or bool(torch.isnan(tau).any()):
        raise ValueError(f"threshold values must be < 1 (got {tau.tolist()})")
    return torch.where(tau > 0, tau.clamp(min=1e-300).log(), torch.full_like(tau, float("-inf"))).float()


def sale_estimate(
    q: Tensor,
    k: Tensor,
    *,
    scale: float,
    threshold: float | Tensor,
    block_m: int = 64,
    block_n: int = 32,
    sink: int = 32,
    local_window: int = 128,
    bits: int = 4,
    chunk: int = 256,
    backend: str = "auto",
    q_mean: Tensor | None = None,
) -> Tensor:
    """sale_estimate: SALE's block mask, ``keep[b, h, I, J] = J exact  or  max_{i∈I, j∈J} r_ij > τ_h``.

    ``r_ij = exp(ŝ_ij - m_i) / l_i`` (module docstring). Causal tiles only; a head with ``τ_h <= 0`` keeps every
    causal tile.

    Parameters
    ----------
    q : Tensor
        ``(B, H_q, Lq, D)`` queries, post-RoPE: the last ``Lq <= L`` positions of the keys (``Lq < L``: a later
        prompt chunk over the cache; query blocks on the grid of the ``L`` positions, as
        :func:`~kvaccel.kernels.block_sparse_attention.block_sparse_attention` takes them).
    k : Tensor
        ``(B, H_kv, L, D)`` keys (GQA: query head ``h`` reads kv head ``h // G``; K is never repeated).
    scale : float
        Logit scale.
    threshold : float or Tensor
        ``τ`` for every head, or ``(H_q,)`` per head; values ``< 1``, ``<= 0`` = dense head.
    block_m, block_n : int
        Query / key block sizes (paper: 64 / 32).
    sink : int
        Leading tokens computed exactly (rounded up to whole key blocks; paper: one key block).
    local_window : int
        Tokens before each query block computed exactly (rounded down to a key-block start; paper: 128).
    bits : int
        Quantization bits of Q and K (paper: 4).
    chunk : int
        PyTorch path: query rows per step (temporaries ``O(G · chunk · L)``).
    backend : str
        ``"auto"`` (Triton on CUDA, PyTorch on CPU), ``"torch"`` or ``"triton"``.
    q_mean : Tensor, optional
        ``(B, H_q, 1, D)`` query centre; default the mean of ``q`` (a chunked prefill passes the mean of the prompt's
        queries so far, see :class:`~kvaccel.patches.prefill.sale.SALE`).

    Returns
    -------
    ``(B, H_q, nQB, ceil(L/block_n))`` bool, ``nQB`` the query blocks holding the queries (``ceil(L/block_m)``
    for a whole prompt).
    """
    check_int("chunk", chunk, block_m, why="at least block_m")
    B, Hq, Lq, _ = q.shape
    L = k.shape[2]
    log_tau = _as_log_tau(threshold, Hq, q.device)
    causal = causal_block_mask(L, block_m, block_n, device=q.device, q_len=Lq)
    if bool(torch.isinf(log_tau).all()):  # every head dense: nothing to estimate
        _check(q, k, block_m, block_n, sink, local_window)
        return causal.expand(B, Hq, -1, -1).clone()
    prep = sale_prepare(q, k, scale=scale, block_m=block_m, block_n=block_n, sink=sink, local_window=local_window,
                        bits=bits, chunk=chunk, q_mean=q_mean)
    sink_blocks = num_blocks(sink, block_n)
    if resolve_backend(backend, q) == "triton":
        keep = _estimate_triton(prep, scale, log_tau, block_m, block_n, sink_blocks, local_window)
    else:
        keep = _estimate_torch(prep, scale, log_tau, block_m, block_n, sink_blocks, local_window, chunk)
    keep |= _exact_blocks(L, block_m, block_n, sink_blocks, local_window, q.device, q_len=Lq)
    keep |= torch.isinf(log_tau)[None, :, None, None]  # dense heads
    return keep & causal


def sale_block_scores(
    q: Tensor,
    k: Tensor,
    *,
    scale: float,
    block_m: int = 64,
    block_n: int = 32,
    sink: int = 32,
    local_window: int = 128,
    bits: int = 4,
    chunk: int = 256,
) -> Tensor:
    """``(B, H_q, nQB, nKB)`` float32 ``max_{i∈I, j∈J} log r_ij`` of the estimated blocks (PyTorch path).

    Exact (sink / local) blocks are ``+inf``, tiles above the diagonal ``-inf``: ``sale_estimate(threshold=τ)`` equals
    ``scores > log τ``. Used by calibration (one estimate, every candidate ``τ``).
    """
    Lq, L = q.shape[2], k.shape[2]
    prep = sale_prepare(q, k, scale=scale, block_m=block_m, block_n=block_n, sink=sink, local_window=local_window,
                        bits=bits, chunk=chunk)
    sink_blocks = num_blocks(sink, block_n)
    scores = _estimate_torch(prep, scale, None, block_m, block_n, sink_blocks, local_window, chunk)
    scores.masked_fill_(_exact_blocks(L, block_m, block_n, sink_blocks, local_window, q.device, Lq), float("inf"))
    return scores.masked_fill_(~causal_block_mask(L, block_m, block_n, device=q.device, q_len=Lq), float("-inf"))


# --------------------------------------------------------------------------------------------------------------
# PyTorch path
# --------------------------------------------------------------------------------------------------------------
def _split_bf16(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x ≈ hi + lo`` with both bfloat16 (relative error ~2^-17 instead of bf16's 2^-9)."""
    hi = x.to(torch.bfloat16)
    return hi, (x - hi.float()).to(torch.bfloat16)


def _estimate_torch(prep, scale, log_tau, block_m, block_n, sink_blocks, local_window, chunk) -> Tensor:
    """Bool keep mask of the estimated blocks (``log_tau`` given) or their float max ``log r`` (``log_tau=None``).

    One bfloat16 GEMM per (b, kv head, chunk of query rows) gives ``ŝ_ij - thr_i`` directly: the operands are
    augmented with four columns, ``[scale s^q_i Q̂_i, 1, 1, -thr_i^hi, -thr_i^lo] · [s^k_j K̂_j, scale bias_j^hi,
    scale bias_j^lo, 1, 1]`` (fp32 accumulation; the large per-row and per-key terms split in hi + lo bf16 parts so
    they keep ~2^-17 relative precision; the int4 values are exact in bf16, only the per-token scale factors round
    at 2^-9), zero-padded to a multiple of 8 columns (``D + 4 = 68`` runs the oneDNN bf16 GEMM ~1.6x slower than
    72 here). A ragged last query block repeats its last real row. The GEMM writes into one reused
    buffer (fresh multi-MB outputs cost page faults), then one ``amax`` over the 64 rows of each query block and
    one over the 32 keys of each key block reduce it to tiles. Only causal key blocks before the local window are
    multiplied: a chunk's keys stop at the local window of its *last* query block, so at most ``chunk / block_m
    - 1`` blocks per row are computed and discarded (``valid`` below).
    """
    qi, sq, ki, sk, bias, lse = (prep[n] for n in ("qi", "sq", "ki", "sk", "bias", "lse"))
    B, Hq, Lq, D = qi.shape
    Hkv, L = ki.shape[1], ki.shape[2]
    G = Hq // Hkv
    qb0 = first_query_block(L, Lq, block_m)
    shift = L - Lq - qb0 * block_m  # rows of the first query block before the first query
    nqb, nkb = num_blocks(L, block_m) - qb0, num_blocks(L, block_n)
    dev = qi.device
    scores_mode = log_tau is None
    if scores_mode:
        out = torch.full((B, Hq, nqb, nkb), float("-inf"), dtype=torch.float32, device=dev)
        thr = lse
        live = torch.ones(Hq, dtype=torch.bool, device=dev)
    else:
        out = torch.zeros(B, Hq, nqb, nkb, dtype=torch.bool, device=dev)
        live = torch.isfinite(log_tau)  # dense heads (τ <= 0) are not estimated
        thr = lse + torch.where(live, log_tau, torch.zeros_like(log_tau)).view(1, Hq, 1)
    bf = torch.bfloat16
    width = -(-(D + 4) // 8) * 8
    Lp = nqb * block_m
    t_hi, t_lo = _split_bf16(-thr)
    b_hi, b_lo = _split_bf16(scale * bias)
    # rows padded to whole query blocks by repeating the first / last real row (which leaves every block max unchanged:
    # the estimated keys of a block precede its local window, so every row of the block sees all of them)
    rows = (torch.arange(Lp, device=dev) - shift).clamp_(min=0, max=Lq - 1)
    q_aug = torch.zeros(B, Hq, Lp, width, dtype=bf, device=dev)
    q_aug[..., :D] = qi[:, :, rows] * (scale * sq[:, :, rows]).unsqueeze(-1)
    q_aug[..., D : D + 2] = 1
    q_aug[..., D + 2] = t_hi[:, :, rows]
    q_aug[..., D + 3] = t_lo[:, :, rows]
    k_aug = torch.zeros(B, Hq, width, L, dtype=bf, device=dev)
    k_aug[:, :, :D] = (ki * sk.unsqueeze(-1)).repeat_interleave(G, dim=1).transpose(-1, -2)
    k_aug[:, :, D] = b_hi
    k_aug[:, :, D + 1] = b_lo
    k_aug[:, :, D + 2 : D + 4] = 1
    lo_blk = _local_start_block(nqb, block_m, block_n, local_window, dev, qb0)  # estimated: [sink_blocks, lo)
    rows_per = max(block_m, chunk // block_m * block_m)
    lo_list = lo_blk.tolist()
    jk = torch.arange(nkb, device=dev)

    def run(b: int, h: int, r0: int) -> None:
        hs = slice(h * G, (h + 1) * G)
        r1 = min(Lp, r0 + rows_per)
        i0, i1 = r0 // block_m, r1 // block_m
        j0, j1 = sink_blocks, lo_list[i1 - 1]
        c0, c1 = j0 * block_n, min(L, j1 * block_n)
        R, n, nb = r1 - r0, c1 - c0, i1 - i0
        (buf,) = cpu_ops.workspace(dev, [(G * rows_per * nkb * block_n, bf)])  # per worker thread, reused
        x = torch.bmm(q_aug[b, hs, r0:r1], k_aug[b, hs, :, c0:c1], out=buf[: G * R * n].view(G, R, n))
        if scores_mode:
            x = x.view(G, nb, block_m, n).amax(2)  # (G, nb, n): ŝ - thr, max over the block's rows
            fill = float("-inf")
        else:  # only the sign of the max matters: as int16, a bf16 value is > 0 iff it is > 0 as a float (finite
            # values and ±inf: the sign bit makes every negative float a negative int16), and int16 max is ~5x
            # faster than bf16 max here
            x = x.view(torch.int16).view(G, nb, block_m, n).amax(2)
            fill = 0
        if n < (j1 - j0) * block_n:  # ragged last key block
            x = F.pad(x, (0, (j1 - j0) * block_n - n), value=fill)
        blk = x.view(G, nb, j1 - j0, block_n).amax(-1)
        valid = jk[None, j0:j1] < lo_blk[i0:i1, None]  # (nb, nj): block j estimated for query block i
        if scores_mode:
            out[b, hs, i0:i1, j0:j1] = blk.float().masked_fill(~valid, float("-inf"))
        else:
            out[b, hs, i0:i1, j0:j1] = (blk > 0) & valid

    live_kv = live.view(Hkv, G).any(1).tolist()  # a kv head whose query heads are all dense is not estimated
    tasks = [(b, h, r0) for r0 in range(0, Lp, rows_per) for b in range(B) for h in range(Hkv)
             if live_kv[h] and lo_list[min(Lp, r0 + rows_per) // block_m - 1] > sink_blocks]
    run_parallel(run, tasks[::-1], cpu_workers(dev))  # longest rows (last query blocks) first
    return out


def _estimate_triton(prep, scale, log_tau, block_m, block_n, sink_blocks, local_window) -> Tensor:
    """Triton launcher: grid ``(nQB, B · H_q)``; each program writes its estimated key blocks."""
    import triton  # noqa: F401

    from .triton.sale_estimate import _sale_estimate_fwd

    qi, sq, ki, sk, bias, lse = (prep[n] for n in ("qi", "sq", "ki", "sk", "bias", "lse"))
    B, Hq, Lq, D = qi.shape
    Hkv, L = ki.shape[1], ki.shape[2]
    qb0 = first_query_block(L, Lq, block_m)
    nqb, nkb = num_blocks(L, block_m) - qb0, num_blocks(L, block_n)
    thr = (lse + log_tau.view(1, Hq, 1)).contiguous()  # -inf for dense heads: every block passes
    out = torch.zeros(B, Hq, nqb, nkb, dtype=torch.int8, device=qi.device)
    block_d = max(16, 1 << (D - 1).bit_length())
    qi, ki, sq, sk, bias = (t.contiguous() for t in (qi, ki, sq, sk, bias))
    _sale_estimate_fwd[(nqb, B * Hq)](
        qi, ki, sq, sk, bias, thr, out,
        float(scale), L, D, sink_blocks, local_window, L - Lq, qb0 * block_m,
        *qi.stride(), *ki.stride(), *sq.stride(), *sk.stride(), *bias.stride(), *out.stride(),
        H_Q=Hq, GROUP=Hq // Hkv, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
    )
    return out.bool()


# --------------------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------------------
def sale_estimate_reference(
    q: Tensor,
    k: Tensor,
    *,
    scale: float,
    threshold: float | Tensor,
    block_m: int = 64,
    block_n: int = 32,
    sink: int = 32,
    local_window: int = 128,
    bits: int = 4,
    q_mean: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """sale_estimate_reference: float64, full ``(Lq, L)`` matrices, token-level masks expanded from the definition.

    Returns ``(keep, scores)``: the block mask of :func:`sale_estimate` and the float64 block max ``log r_ij`` of the
    estimated blocks (``+inf`` exact, ``-inf`` above the diagonal), to check margins near ``τ``.
    """
    _check(q, k, block_m, block_n, sink, local_window)
    B, Hq, Lq, D = q.shape
    L = k.shape[2]
    G = Hq // k.shape[1]
    log_tau = _as_log_tau(threshold, Hq, q.device).double()
    qd, kd = q.double(), k.double().repeat_interleave(G, dim=1)
    qm = qd.mean(2, keepdim=True) if q_mean is None else q_mean.double().expand(B, Hq, 1, D)
    km = kd.mean(2, keepdim=True)
    qi, sq = sale_quantize(qd - qm, bits)
    ki, sk = sale_quantize(kd - km, bits)
    est = scale * (sq.double()[..., :, None] * sk.double()[..., None, :] * (qi.double() @ ki.double().transpose(-1, -2))
                   + ((kd - km) @ qm.transpose(-1, -2)).transpose(-1, -2))  # (B, Hq, Lq, L)
    exact = scale * qd @ (kd - km).transpose(-1, -2)
    sink_blocks = num_blocks(sink, block_n)
    blocks = _exact_blocks(L, block_m, block_n, sink_blocks, local_window, q.device, Lq)  # (nQB, nKB)
    shift = L - Lq - first_query_block(L, Lq, block_m) * block_m  # rows of the first block before the queries
    tok = blocks.repeat_interleave(block_m, 0)[shift : shift + Lq].repeat_interleave(block_n, 1)[:, :L]  # exact region
    i = torch.arange(L, device=q.device)
    causal = i[None, :] <= i[L - Lq :, None]
    e = exact.masked_fill(~(tok & causal), float("-inf"))
    lse = torch.logsumexp(e, -1, keepdim=True)
    logr = (est - lse).masked_fill(tok | ~causal, float("-inf"))
    nqb, nkb = blocks.shape
    pad = logr.new_full((B, Hq, nqb * block_m, nkb * block_n), float("-inf"))
    pad[:, :, shift : shift + Lq, :L] = logr
    scores = pad.view(B, Hq, nqb, block_m, nkb, block_n).amax((3, 5))
    keep = (scores > log_tau.view(1, Hq, 1, 1)) | blocks | torch.isinf(log_tau).view(1, Hq, 1, 1)
    cb = causal_block_mask(L, block_m, block_n, device=q.device, q_len=Lq)
    keep &= cb
    scores = scores.masked_fill(blocks, float("inf")).masked_fill(~cb, float("-inf"))
    return keep, scores


def expected_density(L: int, block_m: int = 64, block_n: int = 32, sink: int = 32, local_window: int = 128) -> float:
    """Fraction of causal tiles that are exact (the floor of SALE's density at length ``L``)."""
    ex = _exact_blocks(L, block_m, block_n, num_blocks(sink, block_n), local_window, None)
    return float(ex.sum()) / max(1, int(causal_block_mask(L, block_m, block_n).sum()))

