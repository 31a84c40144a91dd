"""page_bounds (Triton): Quest's page scores and the attention over the selected pages' slots.

The public ops and the PyTorch paths are in :mod:`kvaccel.kernels.page_bounds`; the launchers here only choose the
grid and block sizes. Both kernels use elementwise products and row sums (no ``tl.dot``): one query row per
program, so no tile is 16 rows tall.
"""

from __future__ import annotations

import torch

import triton
import triton.language as tl


@triton.jit
def _page_scores_fwd(
    q_ptr,  # (B, H_q, D)
    kmin_ptr,  # (B, H_kv, NP, D)
    kmax_ptr,
    count_ptr,  # (B, 1|H_kv, NP) int32 (head stride 0 when broadcast)
    out_ptr,  # (B, H_q, NP) float32
    NP,
    stride_qb, stride_qh, stride_qd,
    stride_mb, stride_mh, stride_mp, stride_md,
    stride_cb, stride_ch, stride_cp,
    stride_ob, stride_oh, stride_op,
    H_Q: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_COUNT: tl.constexpr,
):
    """_page_scores_fwd: grid ``(B * H_q, cdiv(NP, BLOCK_P))``; ``U = Σ_i max(q_i m_i, q_i M_i)``, empty pages -inf."""
    pid_bh = tl.program_id(0)
    pid_p = tl.program_id(1)
    off_b = pid_bh // H_Q
    off_h = pid_bh % H_Q
    off_hkv = off_h // GROUP
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < NP
    q = tl.load(q_ptr + off_b * stride_qb + off_h * stride_qh + offs_d * stride_qd, mask=mask_d, other=0.0)
    q = q.to(tl.float32)
    base = off_b * stride_mb + off_hkv * stride_mh + offs_p[:, None] * stride_mp + offs_d[None, :] * stride_md
    tile = mask_p[:, None] & mask_d[None, :]
    lo = tl.load(kmin_ptr + base, mask=tile, other=0.0).to(tl.float32)
    hi = tl.load(kmax_ptr + base, mask=tile, other=0.0).to(tl.float32)
    s = tl.sum(tl.maximum(q[None, :] * lo, q[None, :] * hi), axis=1)
    if HAS_COUNT:
        c = tl.load(count_ptr + off_b * stride_cb + off_hkv * stride_ch + offs_p * stride_cp, mask=mask_p, other=0)
        s = tl.where(c > 0, s, float("-inf"))
    tl.store(out_ptr + off_b * stride_ob + off_h * stride_oh + offs_p * stride_op, s, mask=mask_p)


def launch_page_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, count: torch.Tensor | None):
    """Grid and block sizes of :func:`_page_scores_fwd`; ``q`` ``(B, H_q, D)``."""
    B, Hq, D = q.shape
    _, Hkv, NP, _ = kmin.shape
    if kmin.stride() != kmax.stride():
        kmin, kmax = kmin.contiguous(), kmax.contiguous()
    out = torch.empty(B, Hq, NP, device=q.device, dtype=torch.float32)
    if NP == 0:
        return out
    c = count if count is not None else out  # not read without HAS_COUNT
    cs = (c.stride(0), c.stride(1) if c.shape[1] > 1 else 0, c.stride(2)) if count is not None else (0, 0, 0)
    BLOCK_P = min(64, triton.next_power_of_2(NP))
    _page_scores_fwd[(B * Hq, triton.cdiv(NP, BLOCK_P))](
        q, kmin, kmax, c, out, NP,
        *q.stride(), *kmin.stride(), *cs, *out.stride(),
        H_Q=Hq, GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_P=BLOCK_P, BLOCK_D=triton.next_power_of_2(D),
        HAS_COUNT=count is not None,
    )
    return out


@triton.jit
def _page_attention_fwd(
    q_ptr,  # (B, H_q, 1, D)
    k_ptr,  # (B, H_kv, T, D)
    v_ptr,  # (B, H_kv, T, Dv)
    slots_ptr,  # (B, H_s, S) int64, H_s = H_q / QUERIES_PER_ROW
    ok_ptr,  # (B, H_s, S) uint8 view of bool
    out_ptr,  # (B, H_q, 1, Dv)
    sm_scale,
    S,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_sb, stride_sh, stride_ss,
    stride_ob, stride_oh, stride_od,
    H_Q: tl.constexpr,
    GROUP: tl.constexpr,
    QUERIES_PER_ROW: tl.constexpr,  # query heads sharing a slot row: 1, or GROUP when a kv head's heads share
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """_page_attention_fwd: grid ``(B * H_q,)``; online softmax (base 2) over the head's ``ok`` slots."""
    pid = tl.program_id(0)
    off_b = pid // H_Q
    off_h = pid % H_Q
    off_hkv = off_h // GROUP
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_dv = offs_dv < HEAD_DIM_V
    q = tl.load(q_ptr + off_b * stride_qb + off_h * stride_qh + offs_d * stride_qd, mask=mask_d, other=0.0)
    q = q.to(tl.float32) * (sm_scale * 1.44269504)  # 1/ln 2: logits in base 2
    k_base = k_ptr + off_b * stride_kb + off_hkv * stride_kh
    v_base = v_ptr + off_b * stride_vb + off_hkv * stride_vh
    s_base = off_b * stride_sb + (off_h // QUERIES_PER_ROW) * stride_sh
    m_i = tl.full([], float("-inf"), tl.float32)
    l_i = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for start in range(0, S, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < S
        slot = tl.load(slots_ptr + s_base + offs_n * stride_ss, mask=mask_n, other=0)
        keep = mask_n & (tl.load(ok_ptr + s_base + offs_n * stride_ss, mask=mask_n, other=0) != 0)
        k = tl.load(k_base + slot[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=keep[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        s = tl.where(keep, tl.sum(k * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing kept yet: keep the state at zero
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe)
        v = tl.load(v_base + slot[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=keep[:, None] & mask_dv[None, :], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)
    tl.store(out_ptr + off_b * stride_ob + off_h * stride_oh + offs_dv * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=mask_dv)


def launch_page_attention(q, k, v, slots, ok, scale: float):
    """Grid and block sizes of :func:`_page_attention_fwd`; full-width segment only (slots index ``k``/``v``)."""
    B, Hq, _, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    S = slots.shape[-1]
    out = torch.empty(B, Hq, 1, Dv, device=q.device, dtype=q.dtype)
    ok8 = ok.contiguous().view(torch.uint8)
    slots = slots.contiguous()
    _page_attention_fwd[(B * Hq,)](
        q, k, v, slots, ok8, out, scale, S,
        q.stride(0), q.stride(1), q.stride(3), *k.stride(), *v.stride(), *slots.stride(),
        out.stride(0), out.stride(1), out.stride(3),
        H_Q=Hq, GROUP=Hq // Hkv, QUERIES_PER_ROW=Hq // slots.shape[1], HEAD_DIM=D, HEAD_DIM_V=Dv, BLOCK_N=64,
        BLOCK_D=triton.next_power_of_2(D), BLOCK_DV=triton.next_power_of_2(Dv),
    )
    return out
