"""quantized_decode_attention (Triton): one-token attention over KIVI codes plus a full-precision window.

Only the ``@triton.jit`` code lives here; the launcher is
:func:`kvaccel.kernels.quantized_decode_attention.quantized_decode_attention`.

One program handles one ``(batch, kv head)`` pair and ``BLOCK_G`` of its query heads. It walks the quantized part in
``BLOCK_N`` tiles: loads the packed bytes of the tile, unpacks the ``BITS``-bit codes (``8 // BITS`` per byte, code
``i`` in bits ``[BITS·i, BITS·(i+1))``), dequantizes them in float32 with the keys' per-channel scale / zero of group
``n // KEY_GROUP`` and the values' per-token scale / zero of channel group ``d // VALUE_GROUP``, and folds the tile into
a base-2 online softmax; then the window, in the model dtype, through the dense decode kernel's inner loop.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .decode_attention import _decode_attention_fwd_inner
from .online_softmax import online_softmax_step


@triton.jit
def _quantized_decode_attention_fwd(
    q_ptr,  # (B, H_q, 1, D)
    kc_ptr,  # (B, H_kv, Tq, D * BITS / 8) uint8
    ks_ptr,  # (B, H_kv, Tq / KEY_GROUP, D)
    kz_ptr,
    vc_ptr,  # (B, H_kv, Tq, Dv * BITS / 8) uint8
    vs_ptr,  # (B, H_kv, Tq, Dv / VALUE_GROUP)
    vz_ptr,
    qvalid_ptr,  # (B, H_kv, Tq) uint8 (head stride 0 when broadcast)
    k_ptr,  # (B, H_kv, Tw, D) window
    v_ptr,  # (B, H_kv, Tw, Dv)
    valid_ptr,  # (B, H_kv, Tw) uint8
    out_ptr,  # (B, H_q, 1, Dv)
    sm_scale,
    Tq,
    Tw,
    stride_qb, stride_qh, stride_qd,
    stride_kcb, stride_kch, stride_kcn, stride_kcd,
    stride_ksb, stride_ksh, stride_ksn, stride_ksd,
    stride_vcb, stride_vch, stride_vcn, stride_vcd,
    stride_vsb, stride_vsh, stride_vsn, stride_vsd,
    stride_qvb, stride_qvh, stride_qvn,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_valid_b, stride_valid_h, stride_valid_n,
    stride_ob, stride_oh, stride_od,
    H_KV: tl.constexpr,
    GROUP: tl.constexpr,  # G = H_q / H_kv
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BITS: tl.constexpr,
    KEY_GROUP: tl.constexpr,  # tokens per key scale
    VALUE_GROUP: tl.constexpr,  # channels per value scale
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_QVALID: tl.constexpr,
    HAS_VALID: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """_quantized_decode_attention_fwd: grid ``(B * H_kv, cdiv(G, BLOCK_G))``; softmax over [quantized, window]."""
    pid_bh = tl.program_id(0)
    pid_g = tl.program_id(1)
    off_b = pid_bh // H_KV
    off_hkv = pid_bh % H_KV
    PER: tl.constexpr = 8 // BITS  # codes per byte
    MASK: tl.constexpr = (1 << BITS) - 1

    offs_g = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    mask_g = offs_g < GROUP
    offs_h = off_hkv * GROUP + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_dv = offs_dv < HEAD_DIM_V

    qk_scale = sm_scale * 1.44269504  # 1/ln 2
    q_base = q_ptr + off_b * stride_qb + offs_h[:, None] * stride_qh
    q = tl.load(q_base + offs_d[None, :] * stride_qd, mask=mask_g[:, None] & mask_d[None, :], other=0.0)
    q32 = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], dtype=tl.float32)

    kc_base = kc_ptr + off_b * stride_kcb + off_hkv * stride_kch
    ks_base = ks_ptr + off_b * stride_ksb + off_hkv * stride_ksh
    kz_base = kz_ptr + off_b * stride_ksb + off_hkv * stride_ksh
    vc_base = vc_ptr + off_b * stride_vcb + off_hkv * stride_vch
    vs_base = vs_ptr + off_b * stride_vsb + off_hkv * stride_vsh
    vz_base = vz_ptr + off_b * stride_vsb + off_hkv * stride_vsh
    qv_base = qvalid_ptr + off_b * stride_qvb + off_hkv * stride_qvh
    k_shift = ((offs_d % PER) * BITS).to(tl.uint8)
    v_shift = ((offs_dv % PER) * BITS).to(tl.uint8)
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(0, Tq, BLOCK_N):
        offs_n = start_n + offs_n0
        mask_n = offs_n < Tq
        kmask = mask_d[:, None] & mask_n[None, :]
        # K^T tile (BLOCK_D, BLOCK_N): codes of channel d are in byte d // PER
        kb = tl.load(kc_base + offs_n[None, :] * stride_kcn + (offs_d // PER)[:, None] * stride_kcd, mask=kmask,
                     other=0)
        kcode = ((kb >> k_shift[:, None]) & MASK).to(tl.float32)
        koff = (offs_n // KEY_GROUP)[None, :] * stride_ksn + offs_d[:, None] * stride_ksd
        ks = tl.load(ks_base + koff, mask=kmask, other=0.0).to(tl.float32)
        kz = tl.load(kz_base + koff, mask=kmask, other=0.0).to(tl.float32)
        s = tl.dot(q32, kz + kcode * ks, input_precision=INPUT_PRECISION) * qk_scale
        keep = mask_n
        if HAS_QVALID:
            flag = tl.load(qv_base + offs_n * stride_qvn, mask=mask_n, other=0)
            keep = keep & (flag != 0)
        s = tl.where(keep[None, :], s, float("-inf"))
        # V tile (BLOCK_N, BLOCK_DV)
        vmask = mask_n[:, None] & mask_dv[None, :]
        vb = tl.load(vc_base + offs_n[:, None] * stride_vcn + (offs_dv // PER)[None, :] * stride_vcd, mask=vmask,
                     other=0)
        vcode = ((vb >> v_shift[None, :]) & MASK).to(tl.float32)
        voff = offs_n[:, None] * stride_vsn + (offs_dv // VALUE_GROUP)[None, :] * stride_vsd
        vs = tl.load(vs_base + voff, mask=vmask, other=0.0).to(tl.float32)
        vz = tl.load(vz_base + voff, mask=vmask, other=0.0).to(tl.float32)
        acc, l_i, m_i = online_softmax_step(s, vz + vcode * vs, m_i, l_i, acc, INPUT_PRECISION)

    acc, l_i, m_i = _decode_attention_fwd_inner(
        acc, l_i, m_i, q.to(k_ptr.dtype.element_ty),
        k_ptr + off_b * stride_kb + off_hkv * stride_kh,
        v_ptr + off_b * stride_vb + off_hkv * stride_vh,
        valid_ptr + off_b * stride_valid_b + off_hkv * stride_valid_h,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_valid_n,
        Tw, qk_scale, offs_d, mask_d, offs_dv, mask_dv,
        HAS_VALID, BLOCK_N, INPUT_PRECISION,
    )

    has_any = l_i > 0.0  # a row with no valid slot: output 0
    out = acc / tl.where(has_any, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + off_b * stride_ob + offs_h[:, None] * stride_oh + offs_dv[None, :] * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=mask_g[:, None] & mask_dv[None, :],
    )
