"""decode_attention (Triton): one-token attention over a KV cache, GQA-grouped, with an optional narrow segment.

Only the ``@triton.jit`` code lives here; the launcher (grid, block sizes, ``num_warps``) is
:func:`kvaccel.kernels.decode_attention.decode_attention`.

One program handles one ``(batch, kv head)`` pair and ``BLOCK_G`` of the ``G = H_q / H_kv`` query heads
that read it, so every key/value tile is loaded once per group. The program walks the narrow segment
(if ``HAS_NARROW``; its values may be narrow too, accumulated apart and scattered into their channels) and
then the full segment in ``BLOCK_N`` tiles with an online softmax kept in
base 2 (``exp2``), and writes the output and the natural-log ``lse``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .online_softmax import online_softmax_step


@triton.jit
def _decode_attention_fwd_inner(
    acc,
    l_i,
    m_i,
    q,  # (BLOCK_G, BLOCK_D) query tile, already in the key dtype
    k_base,
    v_base,
    valid_base,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    stride_valid_n,
    seq_len,
    qk_scale,  # scale / ln 2: logits come out in base 2
    offs_d,
    mask_d,
    offs_dv,  # value channels of this segment (BLOCK_DV of acc)
    mask_dv,
    HAS_VALID: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """_decode_attention_fwd_inner: fold one KV segment into the running (acc, l_i, m_i) softmax state."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(0, seq_len, BLOCK_N):
        offs_n = start_n + offs_n0
        mask_n = offs_n < seq_len
        # K^T tile (BLOCK_D, BLOCK_N)
        k = tl.load(
            k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
            mask=mask_d[:, None] & mask_n[None, :],
            other=0.0,
        )
        s = tl.dot(q, k, input_precision=INPUT_PRECISION) * qk_scale
        keep = mask_n
        if HAS_VALID:
            flag = tl.load(valid_base + offs_n * stride_valid_n, mask=mask_n, other=0)
            keep = keep & (flag != 0)
        s = tl.where(keep[None, :], s, float("-inf"))

        v = tl.load(
            v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
            mask=mask_n[:, None] & mask_dv[None, :],
            other=0.0,
        )
        acc, l_i, m_i = online_softmax_step(s, v, m_i, l_i, acc, INPUT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _decode_attention_fwd(
    q_ptr,  # (B, H_q, 1, D)
    k_ptr,  # (B, H_kv, T, D)
    v_ptr,  # (B, H_kv, T, Dv)
    valid_ptr,  # (B, H_kv, T) uint8 view of bool (head stride 0 when broadcast)
    kn_ptr,  # (B, H_kv, Tn, Dk)
    cidx_ptr,  # (B, H_kv, Dk) int64
    vn_ptr,  # (B, H_kv, Tn, Dv)
    validn_ptr,  # (B, H_kv, Tn) uint8
    vidx_ptr,  # (B, H_kv, Dvn) int64 output channels of narrow values (NARROW_VALUES)
    out_ptr,  # (B, H_q, 1, Dv)
    lse_ptr,  # (B, H_q, 1) float32
    sm_scale,
    T,
    Tn,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_valid_b, stride_valid_h, stride_valid_n,
    stride_knb, stride_knh, stride_knn, stride_knd,
    stride_cb, stride_ch, stride_cd,
    stride_vnb, stride_vnh, stride_vnn, stride_vnd,
    stride_validn_b, stride_validn_h, stride_validn_n,
    stride_vib, stride_vih, stride_vid,
    stride_ob, stride_oh, stride_od,
    stride_lb, stride_lh,
    H_KV: tl.constexpr,
    GROUP: tl.constexpr,  # G = H_q / H_kv
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    NARROW_DIM: tl.constexpr,
    NARROW_DIM_V: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DVN: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_VALID: tl.constexpr,
    HAS_NARROW: tl.constexpr,
    HAS_VALID_NARROW: tl.constexpr,
    NARROW_VALUES: tl.constexpr,  # narrow values keep Dvn channels: accumulate apart, scatter at the end
    INPUT_PRECISION: tl.constexpr,
):
    """_decode_attention_fwd: grid ``(B * H_kv, cdiv(G, BLOCK_G))``; softmax over [narrow, full] slots."""
    pid_bh = tl.program_id(0)
    pid_g = tl.program_id(1)
    off_b = pid_bh // H_KV
    off_hkv = pid_bh % H_KV

    offs_g = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    mask_g = offs_g < GROUP
    offs_h = off_hkv * GROUP + offs_g  # query heads of this kv head
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_dv = offs_dv < HEAD_DIM_V

    qk_scale = sm_scale * 1.44269504  # 1/ln 2
    q_base = q_ptr + off_b * stride_qb + offs_h[:, None] * stride_qh

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], dtype=tl.float32)

    if HAS_NARROW:
        offs_dk = tl.arange(0, BLOCK_DK)
        mask_dk = offs_dk < NARROW_DIM
        # gather the Dk query channels that the narrow keys kept, once
        cidx = tl.load(
            cidx_ptr + off_b * stride_cb + off_hkv * stride_ch + offs_dk * stride_cd, mask=mask_dk, other=0
        )
        q_n = tl.load(q_base + cidx[None, :] * stride_qd, mask=mask_g[:, None] & mask_dk[None, :], other=0.0)
        q_n = q_n.to(kn_ptr.dtype.element_ty)
        kn_base = kn_ptr + off_b * stride_knb + off_hkv * stride_knh
        vn_base = vn_ptr + off_b * stride_vnb + off_hkv * stride_vnh
        validn_base = validn_ptr + off_b * stride_validn_b + off_hkv * stride_validn_h
        if NARROW_VALUES:
            offs_dvn = tl.arange(0, BLOCK_DVN)
            mask_dvn = offs_dvn < NARROW_DIM_V
            acc_n = tl.zeros([BLOCK_G, BLOCK_DVN], dtype=tl.float32)
            acc_n, l_i, m_i = _decode_attention_fwd_inner(
                acc_n, l_i, m_i, q_n, kn_base, vn_base, validn_base,
                stride_knn, stride_knd, stride_vnn, stride_vnd, stride_validn_n,
                Tn, qk_scale, offs_dk, mask_dk, offs_dvn, mask_dvn,
                HAS_VALID_NARROW, BLOCK_N, INPUT_PRECISION,
            )
            # scatter the Dvn channels into the Dv output channels: acc = acc_n @ onehot(value_idx)
            vidx = tl.load(
                vidx_ptr + off_b * stride_vib + off_hkv * stride_vih + offs_dvn * stride_vid, mask=mask_dvn, other=-1
            )
            onehot = (vidx[:, None] == offs_dv[None, :]).to(tl.float32)
            acc = tl.dot(acc_n, onehot, input_precision=INPUT_PRECISION)
        else:
            acc, l_i, m_i = _decode_attention_fwd_inner(
                acc, l_i, m_i, q_n, kn_base, vn_base, validn_base,
                stride_knn, stride_knd, stride_vnn, stride_vnd, stride_validn_n,
                Tn, qk_scale, offs_dk, mask_dk, offs_dv, mask_dv,
                HAS_VALID_NARROW, BLOCK_N, INPUT_PRECISION,
            )

    q = tl.load(q_base + offs_d[None, :] * stride_qd, mask=mask_g[:, None] & mask_d[None, :], other=0.0)
    q = q.to(k_ptr.dtype.element_ty)
    acc, l_i, m_i = _decode_attention_fwd_inner(
        acc, l_i, m_i, q,
        k_ptr + off_b * stride_kb + off_hkv * stride_kh,
        v_ptr + off_b * stride_vb + off_hkv * stride_vh,
        valid_ptr + off_b * stride_valid_b + off_hkv * stride_valid_h,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_valid_n,
        T, qk_scale, offs_d, mask_d, offs_dv, mask_dv,
        HAS_VALID, BLOCK_N, INPUT_PRECISION,
    )

    # A row with no valid slot: l_i == 0, acc == 0 -> output 0 and lse = -inf.
    has_any = l_i > 0.0
    out = acc / tl.where(has_any, l_i, 1.0)[:, None]
    lse = tl.where(has_any, (m_i + tl.log2(tl.where(has_any, l_i, 1.0))) * 0.6931471805599453, float("-inf"))  # ln 2

    tl.store(
        out_ptr + off_b * stride_ob + offs_h[:, None] * stride_oh + offs_dv[None, :] * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=mask_g[:, None] & mask_dv[None, :],
    )
    tl.store(lse_ptr + off_b * stride_lb + offs_h * stride_lh, lse, mask=mask_g)
