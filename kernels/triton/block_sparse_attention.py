"""block_sparse_attention (Triton): causal prefill attention over the selected (query block, key block) tiles.

Only the ``@triton.jit`` code lives here; the launcher (CSR tile lists, grid, ``num_warps``) is
:func:`kvaccel.kernels.block_sparse_attention.block_sparse_attention`.

One program handles one ``(batch, query head, query block)``; query blocks sit on the grid of the key positions, so
a later prompt chunk (queries = the last positions, from ``q_pos0``) starts at the block holding its first query. It
loads its ``BLOCK_M`` queries once and walks the key blocks listed for that row in CSR form (``indptr``/``indices``,
built by the launcher from the block mask), reading K/V of its kv head ``h // GROUP`` (GQA: K/V are never repeated;
one program per query head because the heads of a kv head may select different tiles). Each row's list holds its
*full* tiles first (every valid key is at or before the block's first query: only key validity is checked) and then
its *partial* tiles (token-level causal mask on original key positions ``pos[slot] <= query position``). Online
softmax in base 2 (``exp2``); the output and the natural-log ``lse`` are written once. A row that sees no key gets 0
and ``lse = -inf``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .online_softmax import online_softmax_step


@triton.jit
def _block_sparse_attention_fwd_inner(
    acc,
    l_i,
    m_i,
    q,  # (BLOCK_M, BLOCK_D) query tile, already in the key dtype
    k_base,
    v_base,
    pos_base,
    indices_ptr,
    t_start,
    t_end,
    seq_len,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    stride_pn,
    qk_scale,  # scale / ln 2: logits come out in base 2
    offs_m,
    offs_n0,
    offs_d,
    mask_d,
    offs_dv,
    mask_dv,
    CAUSAL: tl.constexpr,  # partial tiles: token-level causal mask; full tiles: key validity only
    HAS_POS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    for t in range(t_start, t_end):
        kb = tl.load(indices_ptr + t)
        offs_n = kb * BLOCK_N + offs_n0
        in_seq = offs_n < seq_len  # ragged last key block
        k = tl.load(
            k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
            mask=mask_d[:, None] & in_seq[None, :],
            other=0.0,
        )
        s = tl.dot(q, k, input_precision=INPUT_PRECISION) * qk_scale
        # original position of each slot; invalid keys carry seq_len, which no query position reaches
        if HAS_POS:
            pos = tl.load(pos_base + offs_n * stride_pn, mask=in_seq, other=seq_len)
        else:
            pos = tl.where(in_seq, offs_n, seq_len)
        if CAUSAL:
            keep = pos[None, :] <= offs_m[:, None]
        else:
            keep = (pos < seq_len)[None, :] & (offs_m >= 0)[:, None]
        s = tl.where(keep, s, float("-inf"))

        v = tl.load(
            v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
            mask=in_seq[:, None] & mask_dv[None, :],
            other=0.0,
        )
        acc, l_i, m_i = online_softmax_step(s, v, m_i, l_i, acc, INPUT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _block_sparse_attention_fwd(
    q_ptr,  # (B, H_q, L, D)
    k_ptr,  # (B, H_kv, L, D), slot order
    v_ptr,  # (B, H_kv, L, Dv)
    pos_ptr,  # (B, H_kv, L) int32 original position per slot, L for invalid keys (HAS_POS)
    indptr_ptr,  # (B * H_q * n_q_blocks + 1,) int32
    nfull_ptr,  # (B * H_q * n_q_blocks,) int32 full tiles at the start of each row's list
    indices_ptr,  # (nnz,) int32 key block ids
    out_ptr,  # (B, H_q, L, Dv)
    lse_ptr,  # (B, H_q, L) float32
    sm_scale,
    seq_len,  # keys (positions 0 .. seq_len - 1)
    n_q_blocks,
    q_pos0,  # position of query row 0: the queries are the last seq_len - q_pos0 positions
    block_pos0,  # position of the first row of query block 0 (a multiple of BLOCK_M, <= q_pos0)
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pb, stride_ph, stride_pn,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    H_Q: tl.constexpr,
    GROUP: tl.constexpr,  # G = H_q / H_kv
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HAS_POS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """_block_sparse_attention_fwd: grid ``(n_q_blocks, B * H_q)``; one query block of one query head."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = pid_bh // H_Q
    off_h = pid_bh % H_Q
    off_hkv = off_h // GROUP

    offs_m = block_pos0 + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query positions
    rows_m = offs_m - q_pos0  # rows of q / out / lse
    mask_m = (offs_m < seq_len) & (rows_m >= 0)  # ragged last block; rows before a chunk's first query
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_dv = offs_dv < HEAD_DIM_V

    qk_scale = sm_scale * 1.44269504  # 1/ln 2
    q = tl.load(
        q_ptr + off_b * stride_qb + off_h * stride_qh + rows_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )
    q = q.to(k_ptr.dtype.element_ty)

    row = pid_bh * n_q_blocks + pid_m
    t_start = tl.load(indptr_ptr + row)
    t_end = tl.load(indptr_ptr + row + 1)
    t_mid = t_start + tl.load(nfull_ptr + row)

    k_base = k_ptr + off_b * stride_kb + off_hkv * stride_kh
    v_base = v_ptr + off_b * stride_vb + off_hkv * stride_vh
    pos_base = pos_ptr + off_b * stride_pb + off_hkv * stride_ph
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    acc, l_i, m_i = _block_sparse_attention_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, pos_base, indices_ptr, t_start, t_mid, seq_len,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_pn, qk_scale,
        offs_m, offs_n0, offs_d, mask_d, offs_dv, mask_dv,
        False, HAS_POS, BLOCK_N, INPUT_PRECISION,
    )
    acc, l_i, m_i = _block_sparse_attention_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, pos_base, indices_ptr, t_mid, t_end, seq_len,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_pn, qk_scale,
        offs_m, offs_n0, offs_d, mask_d, offs_dv, mask_dv,
        True, HAS_POS, BLOCK_N, INPUT_PRECISION,
    )

    # A row with no visible key: l_i == 0, acc == 0 -> output 0 and lse = -inf.
    has_any = l_i > 0.0
    out = acc / tl.where(has_any, l_i, 1.0)[:, None]
    lse = tl.where(has_any, (m_i + tl.log2(tl.where(has_any, l_i, 1.0))) * 0.6931471805599453, float("-inf"))  # ln 2
    tl.store(
        out_ptr + off_b * stride_ob + off_h * stride_oh + rows_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_dv[None, :],
    )
    tl.store(lse_ptr + off_b * stride_lb + off_h * stride_lh + rows_m * stride_lm, lse, mask=mask_m)
