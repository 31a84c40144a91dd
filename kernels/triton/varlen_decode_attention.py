"""varlen_decode_attention (Triton): the last ``Q`` tokens attend their own packed (batch, kv head) KV segment.

Only the ``@triton.jit`` code lives here; the launcher (grid, block sizes, ``num_warps``) is
:func:`kvaccel.kernels.varlen_decode_attention.varlen_decode_attention`.

One program handles one segment ``s = b * H_kv + h`` (rows ``seg_start[s] + [0, seg_len[s])`` of the flat K/V)
and ``BLOCK_R`` of its ``G * Q`` query rows (the ``G`` query heads of the kv head times the ``Q`` new tokens,
stacked), so every key/value tile is loaded once per group. It walks the segment in ``BLOCK_N`` tiles with an
online softmax in base 2 (``exp2``); row ``(g, i)`` sees the first ``seg_len - Q + 1 + i`` keys (causal among
the new tokens). Writes the output and the natural-log ``lse``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .online_softmax import online_softmax_step


@triton.jit
def _varlen_decode_attention_fwd(
    q_ptr,  # (B, H_q, Q, D)
    k_ptr,  # (N, D)
    v_ptr,  # (N, Dv)
    start_ptr,  # (B, H_kv) int64
    len_ptr,  # (B, H_kv) int64
    out_ptr,  # (B, H_q, Q, Dv)
    lse_ptr,  # (B, H_q, Q) float32
    sm_scale,
    stride_qb, stride_qh, stride_qq, stride_qd,
    stride_kn, stride_kd,
    stride_vn, stride_vd,
    stride_ob, stride_oh, stride_oq, stride_od,
    stride_lb, stride_lh, stride_lq,
    H_KV: tl.constexpr,
    GROUP: tl.constexpr,  # G = H_q / H_kv
    NUM_Q: tl.constexpr,  # Q new tokens per sequence
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """_varlen_decode_attention_fwd: grid ``(B * H_kv, cdiv(G * Q, BLOCK_R))``."""
    pid_s = tl.program_id(0)
    pid_r = tl.program_id(1)
    off_b = pid_s // H_KV
    off_hkv = pid_s % H_KV
    seg_start = tl.load(start_ptr + pid_s)  # (B, H_kv) contiguous: segment s at offset s
    seg_len = tl.load(len_ptr + pid_s)

    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < GROUP * NUM_Q
    offs_g = offs_r // NUM_Q
    offs_i = offs_r % NUM_Q
    offs_h = off_hkv * GROUP + offs_g  # query head of each row
    limit = seg_len - NUM_Q + 1 + offs_i  # keys row (g, i) sees
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_dv = offs_dv < HEAD_DIM_V

    q = tl.load(
        q_ptr + off_b * stride_qb + offs_h[:, None] * stride_qh + offs_i[:, None] * stride_qq
        + offs_d[None, :] * stride_qd,
        mask=mask_r[:, None] & mask_d[None, :],
        other=0.0,
    )
    q = q.to(k_ptr.dtype.element_ty)
    qk_scale = sm_scale * 1.44269504  # 1/ln 2: logits in base 2

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(0, seg_len, BLOCK_N):
        offs_n = start_n + offs_n0
        mask_n = offs_n < seg_len
        rows = seg_start + offs_n
        # K^T tile (BLOCK_D, BLOCK_N)
        k = tl.load(
            k_ptr + rows[None, :] * stride_kn + offs_d[:, None] * stride_kd,
            mask=mask_d[:, None] & mask_n[None, :],
            other=0.0,
        )
        s = tl.dot(q, k, input_precision=INPUT_PRECISION) * qk_scale
        keep = mask_n[None, :] & (offs_n[None, :] < limit[:, None])
        s = tl.where(keep, s, float("-inf"))

        v = tl.load(
            v_ptr + rows[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
            mask=mask_n[:, None] & mask_dv[None, :],
            other=0.0,
        )
        acc, l_i, m_i = online_softmax_step(s, v, m_i, l_i, acc, INPUT_PRECISION)

    # A row with no key (empty segment, or a query before the segment's first token): output 0, lse = -inf.
    has_any = l_i > 0.0
    out = acc / tl.where(has_any, l_i, 1.0)[:, None]
    lse = tl.where(has_any, (m_i + tl.log2(tl.where(has_any, l_i, 1.0))) * 0.6931471805599453, float("-inf"))  # ln 2

    tl.store(
        out_ptr + off_b * stride_ob + offs_h[:, None] * stride_oh + offs_i[:, None] * stride_oq
        + offs_dv[None, :] * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=mask_r[:, None] & mask_dv[None, :],
    )
    tl.store(lse_ptr + off_b * stride_lb + offs_h * stride_lh + offs_i * stride_lq, lse, mask=mask_r)
