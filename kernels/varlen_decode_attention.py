"""varlen_decode_attention: the last ``Q`` tokens attend their own (batch, kv head) segment of a packed KV cache.

The cache is one flat buffer per layer (``VarlenLayer``): keys ``(N, D)`` and values ``(N, Dv)`` hold every
``(batch, kv head)`` segment back to back, segment ``s = b * H_kv + h`` at rows ``seg_start[b, h] +
[0, seg_len[b, h])``; rows between segments (growth slack) are never read. Per-head lengths differ (AdaKV), and
no head is padded in memory.

The public op chooses the backend (``"auto"``: Triton on CUDA, PyTorch on CPU); the ``@triton.jit`` code is in
:mod:`kvaccel.kernels.triton.varlen_decode_attention`. The float64 :func:`varlen_decode_attention_reference` is
what the tests compare both against.

PyTorch path (CPU): gather every segment into a transient ``(B, H_kv, L_max, D)`` block with one ``index_select``
of ``start + arange(L_max)`` per K and V, then one 4-D SDPA call (slots past a segment's end masked). Chosen by
measurement while building it (1 thread, loaded 2-core machine, G = 3, D = 64, 0.5-1.5x ``avg`` tokens per head):
a segment softmax over the flat rows (q gathered per key, ``scatter_reduce`` max, ``index_add_`` sums) was 4x
slower; one SDPA call over the whole flat buffer with a block-diagonal mask (no gather, ``B * H_kv`` times the
logits) was as fast at ``B * H_kv = 3`` and 1.2-2.2x slower at 6-12 segments. The gather is the price of packing:
SDPA on an already padded ``(B, H_kv, L_max, D)`` cache (the padded layout, no gather) took 0.55-0.8x the time of
this path; ``benchmarks/varlen_decode.py`` times the op on a real cache next to full attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import resolve_backend

__all__ = ["varlen_decode_attention", "varlen_decode_attention_reference"]


def varlen_decode_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seg_start: Tensor,
    seg_len: Tensor,
    *,
    scale: float,
    max_len: int | None = None,
    backend: str = "auto",
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """varlen_decode_attention: softmax attention of ``Q`` new tokens over their packed per-head KV segment.

    ``out[b, h, i] = softmax_j(scale * q[b, h, i] . k[start + j]) @ v[start + j]`` for ``j < len - Q + 1 + i``,
    with ``start, len = seg_start[b, h // G], seg_len[b, h // G]``: the ``Q`` queries are the segment's last ``Q``
    tokens (causal among themselves; ``Q = 1`` sees the whole segment). GQA: query head ``h`` reads kv head
    ``h // G``, ``G = H_q / H_kv``; K/V are never repeated. Accumulation is float32.

    Parameters
    ----------
    q : Tensor
        ``(B, H_q, Q, D)`` queries, post-RoPE.
    k : Tensor
        ``(N, D)`` packed keys of every segment.
    v : Tensor
        ``(N, Dv)`` packed values, same rows as ``k``.
    seg_start : Tensor
        ``(B, H_kv)`` int64, first row of each segment.
    seg_len : Tensor
        ``(B, H_kv)`` int64, tokens of each segment (``0`` = empty: zero output, ``lse = -inf``).
    scale : float
        Logit scale, used as given.
    max_len : int, optional
        ``seg_len.max()``, when the caller tracks it (saves a device sync). ``None``: computed, and the segments
        are checked to lie inside ``k``.
    backend : str, default ``"auto"``
        ``"auto"`` (Triton when ``q.is_cuda``, else PyTorch), ``"torch"`` or ``"triton"``.
    return_lse : bool, default False
        Also return the natural log-sum-exp of the scaled, masked logits.

    Returns
    -------
    Tensor or tuple of Tensor
        ``out`` ``(B, H_q, Q, Dv)`` in ``q.dtype``; with ``return_lse`` also ``lse`` ``(B, H_q, Q)`` float32.
    """
    _check_inputs(q, k, v, seg_start, seg_len)
    if max_len is None:
        max_len = int(seg_len.max()) if seg_len.numel() else 0
        end = int((seg_start + seg_len).max()) if seg_len.numel() else 0
        if bool((seg_start < 0).any()) or end > k.shape[0]:
            raise ValueError(f"segments must lie inside the {k.shape[0]} rows of k; a segment ends at row {end}")
    if resolve_backend(backend, q) == "triton":
        out, lse = _varlen_decode_attention_triton(q, k, v, seg_start, seg_len, scale)
    else:
        out, lse = _varlen_decode_attention_torch(q, k, v, seg_start, seg_len, scale, max_len, return_lse)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------------------------------------------
# PyTorch path
# --------------------------------------------------------------------------------------------------------------
def _varlen_decode_attention_torch(
    q: Tensor, k: Tensor, v: Tensor, seg_start: Tensor, seg_len: Tensor, scale: float, max_len: int, return_lse: bool
) -> tuple[Tensor, Tensor | None]:
    """_varlen_decode_attention_torch: gather the segments into ``(B, H_kv, L_max, D)``, one SDPA call."""
    B, Hq, Q, D = q.shape
    Hkv = seg_start.shape[1]
    G, Dv, N = Hq // Hkv, v.shape[-1], k.shape[0]
    if max_len == 0 or N == 0:  # every segment empty
        out = q.new_zeros(B, Hq, Q, Dv)
        return out, (q.new_full((B, Hq, Q), float("-inf"), dtype=torch.float32) if return_lse else None)
    qs = q.reshape(B, Hkv, G * Q, D)  # the G*Q query rows of a segment, (g, i) order
    pos = torch.arange(max_len, device=q.device)
    rows = (seg_start[..., None] + pos).clamp_(max=N - 1).view(-1)  # slots past a segment's end are masked
    kp = k.index_select(0, rows).view(B, Hkv, max_len, D)
    vp = v.index_select(0, rows).view(B, Hkv, max_len, Dv)
    if Q == 1:
        mask = (pos < seg_len[..., None]).unsqueeze(2)  # (B, H_kv, 1, L_max)
    else:  # row (g, i) sees the first len - Q + 1 + i keys
        seen = seg_len[..., None] - Q + 1 + torch.arange(Q, device=q.device).repeat(G)  # (B, H_kv, G*Q)
        mask = pos < seen[..., None]

    if not return_lse and q.dtype == k.dtype == v.dtype:
        # One fused SDPA call (4-D: its 3-D entry was ~1.5x slower here); a fully masked row gives zeros.
        out = F.scaled_dot_product_attention(qs, kp, vp, attn_mask=mask, scale=scale)
        return out.view(B, Hq, Q, Dv), None

    s = (qs.float() * scale) @ kp.float().transpose(-1, -2)  # (B, H_kv, G*Q, L_max)
    s.masked_fill_(~mask, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # empty row: subtract 0, not -inf
    p = s.sub_(m).exp_()
    l = p.sum(-1, keepdim=True)
    has_any = l > 0
    out = (p @ vp.float()) / torch.where(has_any, l, torch.ones_like(l))
    out = out.to(q.dtype).view(B, Hq, Q, Dv)
    lse = None
    if return_lse:
        lse = torch.where(has_any, m + torch.log(l), torch.full_like(l, float("-inf"))).reshape(B, Hq, Q)
    return out, lse


def varlen_decode_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, seg_start: Tensor, seg_len: Tensor, *, scale: float
) -> tuple[Tensor, Tensor]:
    """varlen_decode_attention_reference: float64, one (batch, query head, query) at a time, for tests.

    Returns ``out`` ``(B, H_q, Q, Dv)`` and ``lse`` ``(B, H_q, Q)``, both float64.
    """
    _check_inputs(q, k, v, seg_start, seg_len)
    B, Hq, Q, _ = q.shape
    G = Hq // seg_start.shape[1]
    out = torch.zeros(B, Hq, Q, v.shape[-1], dtype=torch.float64, device=q.device)
    lse = torch.full((B, Hq, Q), float("-inf"), dtype=torch.float64, device=q.device)
    for b in range(B):
        for h in range(Hq):
            start, length = int(seg_start[b, h // G]), int(seg_len[b, h // G])
            for i in range(Q):
                n = length - Q + 1 + i  # keys this query sees
                if n <= 0:
                    continue
                logits = scale * (k[start : start + n].double() @ q[b, h, i].double())
                lse[b, h, i] = torch.logsumexp(logits, 0)
                out[b, h, i] = torch.softmax(logits, 0) @ v[start : start + n].double()
    return out, lse


# --------------------------------------------------------------------------------------------------------------
# Triton path (launcher; the kernel is in kernels/triton/varlen_decode_attention.py)
# --------------------------------------------------------------------------------------------------------------
def _varlen_decode_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, seg_start: Tensor, seg_len: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """_varlen_decode_attention_triton: launch ``_varlen_decode_attention_fwd`` on ``(S, cdiv(G * Q, BLOCK_R))``."""
    import triton

    from .triton.varlen_decode_attention import _varlen_decode_attention_fwd

    B, Hq, Q, D = q.shape
    Hkv = seg_start.shape[1]
    G, Dv = Hq // Hkv, v.shape[-1]
    out = torch.empty(B, Hq, Q, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, Q, dtype=torch.float32, device=q.device)
    start = seg_start.contiguous()
    length = seg_len.contiguous()
    # tl.dot needs every dim >= 16; padded query rows / channels are masked.
    BLOCK_R = max(16, min(64, triton.next_power_of_2(G * Q)))
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_DV = max(16, triton.next_power_of_2(Dv))
    BLOCK_N = 64 if max(BLOCK_D, BLOCK_DV) <= 128 else 32
    num_warps = 4 if max(BLOCK_D, BLOCK_DV) <= 128 else 8
    grid = (B * Hkv, triton.cdiv(G * Q, BLOCK_R))
    _varlen_decode_attention_fwd[grid](
        q, k, v, start, length, out, lse,
        float(scale),
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        *lse.stride(),
        H_KV=Hkv,
        GROUP=G,
        NUM_Q=Q,
        HEAD_DIM=D,
        HEAD_DIM_V=Dv,
        BLOCK_R=BLOCK_R,
        BLOCK_D=BLOCK_D,
        BLOCK_DV=BLOCK_DV,
        BLOCK_N=BLOCK_N,
        INPUT_PRECISION="ieee",  # fp32 inputs: exact products like the PyTorch path (decode is memory-bound)
        num_warps=num_warps,
    )
    return out, lse


# --------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------
def _check_inputs(q: Tensor, k: Tensor, v: Tensor, seg_start: Tensor, seg_len: Tensor) -> None:
    if q.dim() != 4:
        raise ValueError(f"q must have shape (B, H_q, Q, D), got {tuple(q.shape)}")
    B, Hq, _, D = q.shape
    if k.dim() != 2 or v.dim() != 2 or k.shape[0] != v.shape[0] or k.shape[1] != D:
        raise ValueError(
            f"k must be (N, {D}) and v (N, Dv) with the same rows, got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    for name, t in (("seg_start", seg_start), ("seg_len", seg_len)):
        if t.dim() != 2 or t.shape[0] != B or t.dtype != torch.int64:
            raise ValueError(f"{name} must be int64 of shape ({B}, H_kv), got {t.dtype} {tuple(t.shape)}")
    Hkv = seg_start.shape[1]
    if seg_len.shape != seg_start.shape:
        raise ValueError(f"seg_len {tuple(seg_len.shape)} and seg_start {tuple(seg_start.shape)} differ")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"num query heads ({Hq}) must be a multiple of num kv heads ({Hkv})")
