"""sale_estimate (Triton): SALE's INT4 score estimate and Relative-Attention-Score block test, one pass.

Only the ``@triton.jit`` code lives here; the launcher (grid, block sizes) and the exact row statistics are in
:func:`kvaccel.kernels.sale_estimate.sale_estimate`. https://arxiv.org/abs/2505.24179

``_sale_estimate_fwd``, grid ``(nQB, B * H_q)`` (query blocks on the grid of the key positions; a later prompt chunk
starts at the block holding its first query): query block ``i`` of head ``h`` walks the key blocks
``[SINK_BLOCKS, (i·BLOCK_M - local_window) // BLOCK_N)`` (those outside the exact sink and local window), computes
``<Q̂_i, K̂_j>`` as an int8 x int8 ``tl.dot`` accumulated in int32 (Q̂, K̂ hold int4 values in ``[-8, 7]``), applies
the per-token scales and the query-centring bias after, ``ŝ_ij = scale (s^q_i s^k_j <Q̂_i, K̂_j> + bias_j)``, and
keeps the block when ``ŝ_ij > thr_i = m_i + log l_i + log τ_h`` for some row (``r_ij > τ_h`` in the log domain).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _sale_estimate_fwd(
    qi_ptr,  # (B, H_q, L, D) int8
    ki_ptr,  # (B, H_kv, L, D) int8
    sq_ptr,  # (B, H_q, L) float32 query scales
    sk_ptr,  # (B, H_kv, L) float32 key scales
    bias_ptr,  # (B, H_q, L) float32 <q̄_h, k_j - k̄> over the keys
    thr_ptr,  # (B, H_q, Lq) float32 m_i + log l_i + log τ_h, same strides as sq
    out_ptr,  # (B, H_q, nQB, nKB) int8 keep flags (written for the estimated blocks only)
    sm_scale,
    L,
    D,
    SINK_BLOCKS,
    LOCAL_WINDOW,
    q_pos0,  # position of query row 0: the queries are the last L - q_pos0 positions
    block_pos0,  # position of the first row of query block 0 (a multiple of BLOCK_M, <= q_pos0)
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_sqb, stride_sqh, stride_sqm,
    stride_skb, stride_skh, stride_skn,
    stride_bb, stride_bh, stride_bn,
    stride_ob, stride_oh, stride_om, stride_on,
    H_Q: tl.constexpr,
    GROUP: tl.constexpr,  # G = H_q / H_kv
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """_sale_estimate_fwd: keep flags of one query block's estimated key blocks."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = pid_bh // H_Q
    off_h = pid_bh % H_Q
    off_hkv = off_h // GROUP

    block_start = block_pos0 + pid_m * BLOCK_M  # position of the block's first row
    rows = block_start + tl.arange(0, BLOCK_M) - q_pos0  # rows of qi / sq / thr
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = (rows >= 0) & (rows < L - q_pos0)  # a chunk's first block starts before its first query
    q_ptrs = qi_ptr + off_b * stride_qb + off_h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0)  # (BLOCK_M, BLOCK_D) int8
    row_base = off_b * stride_sqb + off_h * stride_sqh + rows * stride_sqm
    sq = tl.load(sq_ptr + row_base, mask=row_ok, other=1.0)
    # padded rows get thr = +inf: they never keep a block
    thr = tl.load(thr_ptr + row_base, mask=row_ok, other=float("inf"))
    t_row = thr / (sm_scale * sq)  # the test divided by scale * s^q_i > 0
    inv_sq = 1.0 / sq

    local_start = tl.maximum(block_start - LOCAL_WINDOW, 0)
    j_end = local_start // BLOCK_N
    out_base = out_ptr + off_b * stride_ob + off_h * stride_oh + pid_m * stride_om
    k_base = ki_ptr + off_b * stride_kb + off_hkv * stride_kh
    sk_base = sk_ptr + off_b * stride_skb + off_hkv * stride_skh
    bias_base = bias_ptr + off_b * stride_bb + off_h * stride_bh
    for j in range(SINK_BLOCKS, j_end):
        offs_n = j * BLOCK_N + tl.arange(0, BLOCK_N)  # all < local_start <= L: no key mask needed
        k = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                    mask=offs_d[:, None] < D, other=0)  # (BLOCK_D, BLOCK_N) int8
        acc = tl.dot(q, k, out_dtype=tl.int32)  # exact integer dot products
        sk = tl.load(sk_base + offs_n * stride_skn)
        bias = tl.load(bias_base + offs_n * stride_bn)
        x = acc.to(tl.float32) * sk[None, :] + inv_sq[:, None] * bias[None, :] - t_row[:, None]
        keep = tl.max(tl.max(x, axis=1), axis=0) > 0
        tl.store(out_base + j * stride_on, keep.to(tl.int8))
