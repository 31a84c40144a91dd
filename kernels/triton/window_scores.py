"""window_attention_scores (Triton): column sums of softmax(q k^T) over an observation window, two passes.

Only the ``@triton.jit`` code lives here; the launcher (grid, block sizes, ``num_warps``) is
:func:`kvaccel.kernels.window_scores.window_attention_scores`.

- ``_window_lse_fwd`` (pass 1), grid ``(cdiv(W, BLOCK_M), B * H_q)``: per query row, the base-2
  log-sum-exp of its masked logits with an online softmax over key tiles.
- ``_window_scores_fwd`` (pass 2), grid ``(cdiv(T, BLOCK_N), B * H_q)``: per key tile, the sum over query
  rows of ``exp2(s - lse)``. Each program owns its output columns, so no atomics and no (W, T) matrix.

Query ``i`` of the window sits at absolute position ``T - W + i``; with ``IS_CAUSAL`` it sees keys
``j <= T - W + i``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _window_lse_fwd(
    q_ptr,  # (B, H_q, W, D)
    k_ptr,  # (B, H_kv, T, D)
    valid_ptr,  # (B, H_kv, T) uint8 view of bool (head stride 0 when broadcast)
    lse_ptr,  # (B, H_q, W) float32 out, base 2; +inf for a row without any valid key
    sm_scale,
    T,
    W,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_valid_b, stride_valid_h, stride_valid_n,
    stride_lb, stride_lh, stride_lm,
    H_Q: tl.constexpr,
    GROUP: tl.constexpr,  # G = H_q / H_kv
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_VALID: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """_window_lse_fwd: pass 1, ``lse2[i] = log2 sum_j 2^(s_ij)`` with ``s = q k^T * scale / ln 2``."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = pid_bh // H_Q
    off_h = pid_bh % H_Q
    off_hkv = off_h // GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < W
    pos_m = T - W + offs_m  # absolute positions of the query rows
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    offs_n0 = tl.arange(0, BLOCK_N)

    qk_scale = sm_scale * 1.44269504  # 1/ln 2
    q = tl.load(
        q_ptr + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )
    q = q.to(k_ptr.dtype.element_ty)
    k_base = k_ptr + off_b * stride_kb + off_hkv * stride_kh
    valid_base = valid_ptr + off_b * stride_valid_b + off_hkv * stride_valid_h

    if IS_CAUSAL:
        hi = tl.minimum(T, T - W + (pid_m + 1) * BLOCK_M)  # last row of this block sees keys < hi
    else:
        hi = T

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        mask_n = offs_n < T
        k = tl.load(
            k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
            mask=mask_d[:, None] & mask_n[None, :],
            other=0.0,
        )
        s = tl.dot(q, k, input_precision=INPUT_PRECISION) * qk_scale
        keep = mask_n[None, :]
        if IS_CAUSAL:
            keep = keep & (offs_n[None, :] <= pos_m[:, None])
        if HAS_VALID:
            flag = tl.load(valid_base + offs_n * stride_valid_n, mask=mask_n, other=0)
            keep = keep & (flag[None, :] != 0)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no -inf - -inf NaN on empty rows
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new

    # +inf for an empty row makes every exp2(s - lse) of pass 2 exactly 0.
    lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("inf"))
    tl.store(lse_ptr + off_b * stride_lb + off_h * stride_lh + offs_m * stride_lm, lse, mask=mask_m)


@triton.jit
def _window_scores_fwd(
    q_ptr,  # (B, H_q, W, D)
    k_ptr,  # (B, H_kv, T, D)
    valid_ptr,  # (B, H_kv, T) uint8
    lse_ptr,  # (B, H_q, W) float32, base 2, from _window_lse_fwd
    out_ptr,  # (B, H_q, T) float32
    sm_scale,
    T,
    W,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_valid_b, stride_valid_h, stride_valid_n,
    stride_lb, stride_lh, stride_lm,
    stride_ob, stride_oh, stride_on,
    H_Q: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_VALID: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """_window_scores_fwd: pass 2, ``out[j] = sum_i 2^(s_ij - lse2[i])`` for one key tile ``j``."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = pid_bh // H_Q
    off_h = pid_bh % H_Q
    off_hkv = off_h // GROUP

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    mask_n = offs_n < T
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    offs_m0 = tl.arange(0, BLOCK_M)

    qk_scale = sm_scale * 1.44269504  # 1/ln 2
    k = tl.load(  # K^T tile (BLOCK_D, BLOCK_N), loaded once
        k_ptr + off_b * stride_kb + off_hkv * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
        mask=mask_d[:, None] & mask_n[None, :],
        other=0.0,
    )
    keep_n = mask_n
    if HAS_VALID:
        flag = tl.load(
            valid_ptr + off_b * stride_valid_b + off_hkv * stride_valid_h + offs_n * stride_valid_n,
            mask=mask_n,
            other=0,
        )
        keep_n = keep_n & (flag != 0)
    q_base = q_ptr + off_b * stride_qb + off_h * stride_qh
    lse_base = lse_ptr + off_b * stride_lb + off_h * stride_lh

    if IS_CAUSAL:
        # rows i < start_n - (T - W) cannot see this tile; start at the BLOCK_M-aligned row below.
        lo = tl.maximum(start_n - (T - W), 0)
        lo = (lo // BLOCK_M) * BLOCK_M
    else:
        lo = 0

    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start_m in range(lo, W, BLOCK_M):
        offs_m = start_m + offs_m0
        mask_m = offs_m < W
        q = tl.load(
            q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
            mask=mask_m[:, None] & mask_d[None, :],
            other=0.0,
        )
        q = q.to(k_ptr.dtype.element_ty)
        lse = tl.load(lse_base + offs_m * stride_lm, mask=mask_m, other=float("inf"))
        s = tl.dot(q, k, input_precision=INPUT_PRECISION) * qk_scale
        keep = mask_m[:, None] & keep_n[None, :]
        if IS_CAUSAL:
            keep = keep & (offs_n[None, :] <= (T - W + offs_m)[:, None])
        p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
        acc += tl.sum(p, 0)

    tl.store(out_ptr + off_b * stride_ob + off_h * stride_oh + offs_n * stride_on, acc, mask=mask_n)
