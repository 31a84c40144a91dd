"""decode_attention: one query token per sequence against a (ragged, GQA, optionally channel-pruned) KV cache.

The public op chooses the backend (``"auto"``: Triton on CUDA, PyTorch on CPU), the grid, the block
sizes and ``num_warps``; the ``@triton.jit`` code is in :mod:`kvaccel.kernels.triton.decode_attention`.
The PyTorch path is plain and is also what the tests compare against, next to the float64
:func:`decode_attention_reference`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import check_mask, resolve_backend

__all__ = ["decode_attention", "decode_attention_probs", "decode_attention_reference"]


def decode_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    valid: Tensor | None = None,
    k_narrow: Tensor | None = None,
    channel_idx: Tensor | None = None,
    v_narrow: Tensor | None = None,
    valid_narrow: Tensor | None = None,
    value_idx: Tensor | None = None,
    backend: str = "auto",
    return_lse: bool = False,
    out: Tensor | None = None,
    return_probs: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """decode_attention: softmax attention of one query token over [narrow segment, full segment] of a KV cache.

    ``out = softmax([scale * q[channel_idx] . k_narrow, scale * q . k] masked by valid) @ [v_narrow, v]``

    With ``value_idx`` the narrow segment's values are narrow too (ThinK's value-channel extension): its slots
    contribute only to the output channels ``value_idx``, i.e. attention over values zero-filled elsewhere.

    Query head ``h`` reads kv head ``h // (H_q // H_kv)`` (GQA); K/V are never repeated. Invalid slots get
    logit ``-inf``; a row with no valid slot returns zeros and ``lse = -inf``. Accumulation is float32.

    Parameters
    ----------
    q : Tensor
        ``(B, H_q, 1, D)`` the query token, post-RoPE.
    k : Tensor
        ``(B, H_kv, T, D)`` cached keys; ``H_q % H_kv == 0``.
    v : Tensor
        ``(B, H_kv, T, Dv)`` cached values.
    scale : float
        Logit scale, used as given (callers pass ``1/sqrt(D)`` of the full head dim, also for the narrow
        segment).
    valid : Tensor, optional
        ``(B, H_kv, T)`` or ``(B, 1, T)`` bool; ``False`` marks padding / evicted slots. ``None`` = all valid.
    k_narrow : Tensor, optional
        ``(B, H_kv, Tn, Dk)`` second segment whose keys keep only ``Dk <= D`` channels (ThinK).
    channel_idx : Tensor, optional
        ``(B, H_kv, Dk)`` int64: the query channels matching ``k_narrow``'s channels.
    v_narrow : Tensor, optional
        ``(B, H_kv, Tn, Dv)`` values of the narrow segment, or ``(B, H_kv, Tn, Dvn)`` with ``value_idx``.
    valid_narrow : Tensor, optional
        ``(B, H_kv, Tn)`` or ``(B, 1, Tn)`` bool for the narrow segment; ``None`` = all valid.
    value_idx : Tensor, optional
        ``(B, H_kv, Dvn)`` int64, distinct per head: the output channels of ``v_narrow``'s ``Dvn`` channels.
    backend : str, default ``"auto"``
        ``"auto"`` (Triton when ``q.is_cuda``, else PyTorch), ``"torch"`` or ``"triton"``.
    return_lse : bool, default False
        Also return the natural log-sum-exp of the scaled, masked logits.
    out : Tensor, optional
        ``(B, H_q, 1, Dv)`` in ``q.dtype``, written in place and returned.
    return_probs : bool, default False
        Also return the attention probabilities ``(B, H_q, Tn + T)`` float32 (``[narrow, full]`` slots, zero on
        invalid ones): what an H2O-style scorer accumulates, without a second pass over the keys. PyTorch path only
        (not with ``return_lse``).

    Returns
    -------
    Tensor or tuple of Tensor
        ``out`` ``(B, H_q, 1, Dv)`` in ``q.dtype``; with ``return_lse`` also ``lse`` ``(B, H_q, 1)`` float32; with
        ``return_probs`` also ``probs``.
    """
    _check_inputs(q, k, v, valid, k_narrow, channel_idx, v_narrow, valid_narrow, out, value_idx)
    if return_probs:
        if return_lse or resolve_backend(backend, q) == "triton":
            raise NotImplementedError("return_probs is computed by the PyTorch path, without return_lse")
        probs: list[Tensor] = []
        res, _ = _decode_attention_torch(
            q, k, v, scale, valid, k_narrow, channel_idx, v_narrow, valid_narrow, value_idx, False, probs
        )
        return (res if out is None else out.copy_(res)), probs[0]
    if resolve_backend(backend, q) == "triton":
        res, lse = _decode_attention_triton(
            q, k, v, scale, valid, k_narrow, channel_idx, v_narrow, valid_narrow, value_idx, out
        )
    else:
        res, lse = _decode_attention_torch(
            q, k, v, scale, valid, k_narrow, channel_idx, v_narrow, valid_narrow, value_idx, return_lse
        )
        if out is not None:
            res = out.copy_(res)
    return (res, lse) if return_lse else res


# --------------------------------------------------------------------------------------------------------------
# PyTorch path
# --------------------------------------------------------------------------------------------------------------
def _decode_attention_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    valid: Tensor | None,
    k_narrow: Tensor | None,
    channel_idx: Tensor | None,
    v_narrow: Tensor | None,
    valid_narrow: Tensor | None,
    value_idx: Tensor | None,
    return_lse: bool,
    probs: list | None = None,
) -> tuple[Tensor, Tensor | None]:
    """_decode_attention_torch: GQA as ``(B, H_kv, G, D)`` query rows against ``(B, H_kv, T, D)`` keys.

    ``probs``: a list to which the normalised probabilities ``(B, H_q, Tn + T)`` float32 are appended."""
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    Dv = v.shape[-1]
    G = Hq // Hkv
    qg = q.reshape(B, Hkv, G, D)  # the G query heads of a kv head become G "query rows": no K/V repeat

    if k_narrow is None and not return_lse and probs is None and q.dtype == k.dtype == v.dtype:
        # Fastest on CPU (fused kernel, float32 accumulation, a fully masked row gives 0 in torch >= 2.5).
        mask = None if valid is None else valid.unsqueeze(2)  # (B, H_kv|1, 1, T)
        res = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
        return res.reshape(B, Hq, 1, Dv), None

    s = _decode_logits(qg.float() * scale, k, valid, k_narrow, channel_idx, valid_narrow)
    Tn = 0 if k_narrow is None else k_narrow.shape[2]
    if s.shape[-1] == 0:
        m = s.new_full((B, Hkv, G, 1), float("-inf"))
    else:
        m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all-invalid row: subtract 0, not -inf
    p = s.sub_(m).exp_()
    l = p.sum(-1, keepdim=True)
    acc = p[..., Tn:] @ v.float()
    if k_narrow is not None:
        acc_n = p[..., :Tn] @ v_narrow.float()
        if value_idx is None:
            acc += acc_n
        else:  # narrow values: their contribution lands in the channels they kept
            acc.scatter_add_(-1, value_idx.unsqueeze(2).expand(B, Hkv, G, value_idx.shape[-1]), acc_n)
    has_any = l > 0
    denom = torch.where(has_any, l, torch.ones_like(l))
    if probs is not None:
        probs.append((p / denom).view(B, Hq, -1))
    res = (acc / denom).to(q.dtype).reshape(B, Hq, 1, Dv)
    lse = None
    if return_lse:
        lse = torch.where(has_any, m + torch.log(l), torch.full_like(l, float("-inf"))).reshape(B, Hq, 1)
    return res, lse


def _decode_logits(
    qf: Tensor, k: Tensor, valid: Tensor | None, k_narrow: Tensor | None, channel_idx: Tensor | None,
    valid_narrow: Tensor | None,
) -> Tensor:
    """Masked logits ``(B, H_kv, G, Tn + T)`` float32 of the scaled query rows ``qf`` ``(B, H_kv, G, D)`` over
    ``[narrow, full]`` keys (narrow logits are ``q[channel_idx] · K_narrow``; invalid slots ``-inf``)."""
    s = qf @ k.float().transpose(-1, -2)  # (B, H_kv, G, T)
    if valid is not None:
        s.masked_fill_(~valid.unsqueeze(2), float("-inf"))
    if k_narrow is None:
        return s
    B, Hkv, G, _ = qf.shape
    qn = torch.gather(qf, -1, channel_idx.unsqueeze(2).expand(B, Hkv, G, k_narrow.shape[3]))  # (B, H_kv, G, Dk)
    s_n = qn @ k_narrow.float().transpose(-1, -2)  # (B, H_kv, G, Tn)
    if valid_narrow is not None:
        s_n.masked_fill_(~valid_narrow.unsqueeze(2), float("-inf"))
    return torch.cat([s_n, s], dim=-1)  # logits are small (G rows); the values are never concatenated


def decode_attention_probs(
    q: Tensor,
    k: Tensor,
    *,
    scale: float,
    valid: Tensor | None = None,
    k_narrow: Tensor | None = None,
    channel_idx: Tensor | None = None,
    valid_narrow: Tensor | None = None,
) -> Tensor:
    """Attention probabilities of one decode query over ``[narrow keys, full-width keys]``, ``(B, H_q, Tn + T)`` fp32
    (zero on invalid slots), without computing the output: what an H2O-style scorer accumulates when the attention
    itself did not return them (``decode_attention(return_probs=True)``). Narrow logits are
    ``q[channel_idx] · K_narrow``, i.e. the keys zero-filled in their pruned channels, never built."""
    B, Hq, W, D = q.shape
    if W != 1:
        raise ValueError(f"decode_attention_probs takes one query per head, got {W}")
    Hkv = k.shape[1]
    qf = q.float().mul(scale).reshape(B, Hkv, Hq // Hkv, D)
    s = _decode_logits(qf, k, valid, k_narrow, channel_idx, valid_narrow)
    return torch.softmax(s, dim=-1).nan_to_num_(0.0).view(B, Hq, -1)  # a row without valid key: 0


def decode_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    valid: Tensor | None = None,
    k_narrow: Tensor | None = None,
    channel_idx: Tensor | None = None,
    v_narrow: Tensor | None = None,
    valid_narrow: Tensor | None = None,
    value_idx: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """decode_attention_reference: dead-simple float64 version of :func:`decode_attention` for tests.

    ``out = softmax(concat(scale * q[channel_idx] . k_narrow, scale * q . k)) @ concat(v_narrow, v)``

    K/V are explicitly ``repeat_interleave``-d to ``H_q`` heads; the segments are concatenated; narrow values
    (``value_idx``) are zero-filled to full width first.

    Parameters
    ----------
    q, k, v, scale, valid, k_narrow, channel_idx, v_narrow, valid_narrow, value_idx
        As in :func:`decode_attention`.

    Returns
    -------
    tuple of Tensor
        ``out`` ``(B, H_q, 1, Dv)`` and ``lse`` ``(B, H_q, 1)``, both float64.
    """
    _check_inputs(q, k, v, valid, k_narrow, channel_idx, v_narrow, valid_narrow, None, value_idx)
    B, Hq = q.shape[:2]
    Hkv, T = k.shape[1], k.shape[2]
    G = Hq // Hkv
    q64 = q.double()[:, :, 0]  # (B, Hq, D)
    k64 = k.double().repeat_interleave(G, dim=1)
    v64 = v.double().repeat_interleave(G, dim=1)
    vm = (
        torch.ones(B, Hq, T, dtype=torch.bool, device=q.device)
        if valid is None
        else valid.expand(B, Hkv, T).repeat_interleave(G, 1)
    )
    logits = scale * torch.einsum("bhd,bhtd->bht", q64, k64)
    if k_narrow is not None:
        Tn = k_narrow.shape[2]
        idx = channel_idx.repeat_interleave(G, dim=1)  # (B, Hq, Dk)
        qn = torch.gather(q64, -1, idx)
        kn = k_narrow.double().repeat_interleave(G, dim=1)
        logits = torch.cat([scale * torch.einsum("bhd,bhtd->bht", qn, kn), logits], dim=-1)
        vn64 = v_narrow.double()
        if value_idx is not None:
            vn64 = torch.zeros(B, Hkv, Tn, v.shape[-1], dtype=torch.float64, device=q.device).scatter_(
                -1, value_idx[:, :, None, :].expand(B, Hkv, Tn, value_idx.shape[-1]), vn64
            )
        v64 = torch.cat([vn64.repeat_interleave(G, dim=1), v64], dim=2)
        vmn = (
            torch.ones(B, Hq, Tn, dtype=torch.bool, device=q.device)
            if valid_narrow is None
            else valid_narrow.expand(B, Hkv, Tn).repeat_interleave(G, 1)
        )
        vm = torch.cat([vmn, vm], dim=-1)
    logits = logits.masked_fill(~vm, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # -inf for an all-invalid row
    p = torch.exp(logits - lse.unsqueeze(-1)).nan_to_num(0.0)
    out = torch.einsum("bht,bhtd->bhd", p, v64)
    return out.unsqueeze(2), lse.unsqueeze(2)


# --------------------------------------------------------------------------------------------------------------
# Triton path (launcher; the kernel is in kernels/triton/decode_attention.py)
# --------------------------------------------------------------------------------------------------------------
def _decode_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    valid: Tensor | None,
    k_narrow: Tensor | None,
    channel_idx: Tensor | None,
    v_narrow: Tensor | None,
    valid_narrow: Tensor | None,
    value_idx: Tensor | None,
    out: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """_decode_attention_triton: launch ``_decode_attention_fwd`` on grid ``(B * H_kv, cdiv(G, BLOCK_G))``."""
    import triton

    from .triton.decode_attention import _decode_attention_fwd

    B, Hq, _, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    Dv = v.shape[-1]
    G = Hq // Hkv
    if out is None:
        out = torch.empty(B, Hq, 1, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, 1, dtype=torch.float32, device=q.device)

    has_valid = valid is not None
    valid_u8 = (
        valid.expand(B, Hkv, T) if has_valid else torch.ones(1, 1, 1, dtype=torch.bool, device=q.device)
    )
    valid_u8 = valid_u8.view(torch.uint8)
    has_narrow = k_narrow is not None
    if has_narrow:
        Tn, Dk = k_narrow.shape[2], k_narrow.shape[3]
        has_valid_n = valid_narrow is not None
        validn_u8 = valid_narrow.expand(B, Hkv, Tn) if has_valid_n else valid_u8
        validn_u8 = validn_u8.view(torch.uint8)
        kn, cidx, vn = k_narrow, channel_idx, v_narrow
    else:  # dummies: never dereferenced when HAS_NARROW is False
        Tn, Dk, has_valid_n = 0, 1, False
        kn, vn, validn_u8 = k, v, valid_u8
        cidx = torch.zeros(1, 1, 1, dtype=torch.int64, device=q.device)
    narrow_values = value_idx is not None
    vidx = value_idx if narrow_values else cidx  # dummy when the narrow values are full width
    Dvn = vn.shape[-1]

    # tl.dot needs every dim >= 16; padded query heads / channels are masked.
    BLOCK_G = max(16, triton.next_power_of_2(G))
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_DV = max(16, triton.next_power_of_2(Dv))
    BLOCK_DK = max(16, triton.next_power_of_2(Dk))
    BLOCK_DVN = max(16, triton.next_power_of_2(Dvn)) if narrow_values else BLOCK_DV
    BLOCK_N = 64 if max(BLOCK_D, BLOCK_DV) <= 128 else 32
    BLOCK_N = min(BLOCK_N, max(16, triton.next_power_of_2(max(T, Tn, 1))))
    num_warps = 4 if max(BLOCK_D, BLOCK_DV) <= 128 else 8
    grid = (B * Hkv, triton.cdiv(G, BLOCK_G))

    _decode_attention_fwd[grid](
        q,
        k,
        v,
        valid_u8,
        kn,
        cidx,
        vn,
        validn_u8,
        vidx,
        out,
        lse,
        float(scale),
        T,
        Tn,
        q.stride(0),
        q.stride(1),
        q.stride(3),
        *k.stride(),
        *v.stride(),
        *valid_u8.stride(),
        *kn.stride(),
        *cidx.stride(),
        *vn.stride(),
        *validn_u8.stride(),
        *vidx.stride(),
        out.stride(0),
        out.stride(1),
        out.stride(3),
        lse.stride(0),
        lse.stride(1),
        H_KV=Hkv,
        GROUP=G,
        HEAD_DIM=D,
        HEAD_DIM_V=Dv,
        NARROW_DIM=Dk,
        NARROW_DIM_V=Dvn,
        BLOCK_G=BLOCK_G,
        BLOCK_D=BLOCK_D,
        BLOCK_DV=BLOCK_DV,
        BLOCK_DK=BLOCK_DK,
        BLOCK_DVN=BLOCK_DVN,
        BLOCK_N=BLOCK_N,
        HAS_VALID=has_valid,
        HAS_NARROW=has_narrow,
        HAS_VALID_NARROW=has_valid_n,
        NARROW_VALUES=narrow_values,
        INPUT_PRECISION="ieee",  # fp32 inputs: exact products like the PyTorch path (decode is memory-bound)
        num_warps=num_warps,
    )
    return out, lse


# --------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------
def _check_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    valid: Tensor | None,
    k_narrow: Tensor | None,
    channel_idx: Tensor | None,
    v_narrow: Tensor | None,
    valid_narrow: Tensor | None,
    out: Tensor | None,
    value_idx: Tensor | None = None,
) -> None:
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"q must have shape (B, H_q, 1, D), got {tuple(q.shape)}")
    if k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"k and v must be 4-D (B, H_kv, T, D), got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    B, Hq, _, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(
            f"k {tuple(k.shape)} does not match q {tuple(q.shape)}: expected ({B}, H_kv, T, {D})"
        )
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"num query heads ({Hq}) must be a multiple of num kv heads ({Hkv})")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v {tuple(v.shape)} does not match k {tuple(k.shape)} in (B, H_kv, T)")
    Dv = v.shape[3]
    check_mask("valid", valid, B, Hkv, T)
    narrow = (k_narrow, channel_idx, v_narrow)
    if any(t is not None for t in narrow) and any(t is None for t in narrow):
        raise ValueError("k_narrow, channel_idx and v_narrow must be given together")
    if k_narrow is None:
        if valid_narrow is not None or value_idx is not None:
            raise ValueError("valid_narrow / value_idx given without k_narrow")
    else:
        if k_narrow.dim() != 4 or k_narrow.shape[:2] != (B, Hkv) or k_narrow.shape[3] > D:
            raise ValueError(
                f"k_narrow must have shape ({B}, {Hkv}, Tn, Dk <= {D}), got {tuple(k_narrow.shape)}"
            )
        Tn, Dk = k_narrow.shape[2], k_narrow.shape[3]
        if tuple(channel_idx.shape) != (B, Hkv, Dk) or channel_idx.dtype != torch.int64:
            raise ValueError(
                f"channel_idx must be int64 of shape ({B}, {Hkv}, {Dk}), got {channel_idx.dtype} "
                f"{tuple(channel_idx.shape)}"
            )
        if value_idx is None:
            if tuple(v_narrow.shape) != (B, Hkv, Tn, Dv):
                raise ValueError(
                    f"v_narrow must have shape ({B}, {Hkv}, {Tn}, {Dv}), got {tuple(v_narrow.shape)}"
                )
        else:
            Dvn = value_idx.shape[-1]
            if value_idx.dim() != 3 or value_idx.shape[:2] != (B, Hkv) or Dvn > Dv or value_idx.dtype != torch.int64:
                raise ValueError(
                    f"value_idx must be int64 of shape ({B}, {Hkv}, Dvn <= {Dv}), got {value_idx.dtype} "
                    f"{tuple(value_idx.shape)}"
                )
            if tuple(v_narrow.shape) != (B, Hkv, Tn, Dvn):
                raise ValueError(
                    f"with value_idx, v_narrow must have shape ({B}, {Hkv}, {Tn}, {Dvn}), got {tuple(v_narrow.shape)}"
                )
        check_mask("valid_narrow", valid_narrow, B, Hkv, Tn)
    if out is not None and (
        tuple(out.shape) != (B, Hq, 1, Dv) or out.dtype != q.dtype or out.device != q.device
    ):
        raise ValueError(
            f"out must be {q.dtype} of shape ({B}, {Hq}, 1, {Dv}) on {q.device}, got {out.dtype} "
            f"{tuple(out.shape)} on {out.device}"
        )
