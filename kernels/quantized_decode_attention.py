"""quantized_decode_attention: new tokens attend a KV cache held as KIVI codes plus a full-precision window.

The cache of one layer is ``[quantized part (Tq tokens), window (Tw tokens)]`` on one token axis; the ``Q`` queries
are the last ``Q`` tokens of the window (causal among themselves; ``Q = 1`` for a decode step). The PyTorch path
walks the quantized part in tiles of ``block`` tokens and reads each tile's codes inside the loop (never a
dequantized copy of the cache: per key group ``(q·s) @ codesᵀ + q @ z``, per value group ``(p·s) @ codes + p @ z``,
codes unpacked to float32 by shifts) and merges the tiles with an online softmax;
:func:`quantized_decode_attention_reference` dequantizes everything in float64 and is what the tests compare against.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor

from .backend import check_mask, resolve_backend
from .cpu_ops import single_thread
from .kv_quant import QuantizedKV

__all__ = ["quantized_decode_attention", "quantized_decode_attention_reference"]

#: tokens dequantized at a time by the PyTorch path (rounded down to a multiple of the key group)
DEFAULT_BLOCK = 512


def _check(q: Tensor, quant: QuantizedKV, k: Tensor, v: Tensor, valid: Tensor | None,
           narrow: QuantizedKV | None = None, channel_idx: Tensor | None = None) -> None:
    B, Hq, Q, D = q.shape
    Hkv, Tw = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    if Tw < Q:
        raise ValueError(f"the window holds {Tw} tokens but {Q} queries must be its last tokens")
    for name, part in (("quant", quant), ("narrow", narrow)):
        if part is None:
            continue
        if part.k_codes.shape[:2] != (B, Hkv) or part.v_codes.shape[:2] != (B, Hkv):
            raise ValueError(f"{name} has batch x heads {tuple(part.k_codes.shape[:2])}, the window {(B, Hkv)}")
        check_mask(f"{name}.valid", part.valid, B, Hkv, part.length)
    if (narrow is None) != (channel_idx is None):
        raise ValueError("narrow (ThinK's quantized narrow keys) and channel_idx go together")
    if channel_idx is not None and channel_idx.shape[:2] != (B, Hkv):
        raise ValueError(f"channel_idx must have shape ({B}, {Hkv}, Dk), got {tuple(channel_idx.shape)}")
    check_mask("valid", valid, B, Hkv, Tw)


def quantized_decode_attention(
    q: Tensor,
    quant: QuantizedKV,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    valid: Tensor | None = None,
    block: int = DEFAULT_BLOCK,
    backend: str = "auto",
    return_probs: bool = False,
    narrow: QuantizedKV | None = None,
    channel_idx: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Softmax attention of ``q`` over ``[narrow, dequant(quant), k]`` / ``[.., dequant(quant), v]``;
    ``(B, H_q, Q, Dv)`` in ``q``'s dtype (float32 accumulation). With ``return_probs`` (``Q = 1``) also the float32
    attention probabilities ``(B, H_q, Tn + Tq + Tw)`` (from the tiles' logits kept aside: one row per query head,
    not a copy of the cache).

    Parameters
    ----------
    q : Tensor
        ``(B, H_q, Q, D)`` queries, post-RoPE; they are the last ``Q`` tokens of the window (causal among them).
    quant : QuantizedKV
        The older tokens as codes, scales and zero points (``kvaccel.kernels.kv_quant``), ``H_q % H_kv == 0`` (GQA:
        query head ``h`` reads kv head ``h // (H_q / H_kv)``).
    k, v : Tensor
        ``(B, H_kv, Tw, D)`` / ``(B, H_kv, Tw, Dv)`` the full-precision window (most recent tokens).
    scale : float
        Logit scale.
    valid : Tensor, optional
        ``(B, 1|H_kv, Tw)`` bool validity of the window slots (``quant.valid`` that of the quantized part).
    block : int
        Tokens dequantized per tile (rounded down to a multiple of the key group, at least one group).
    backend : str
        ``"auto"`` (Triton for CUDA tensors when ``Q = 1`` over integer codes without a narrow segment and no
        probabilities are asked for, PyTorch otherwise),
        ``"torch"`` or ``"triton"`` (decode steps only: ``Q = 1``, no ``return_probs``; CPU tensors need
        ``TRITON_INTERPRET=1``).
    return_probs : bool
        Also return the probabilities (``Q`` must be 1), for eviction methods that accumulate them.
    narrow, channel_idx : QuantizedKV, Tensor, optional
        ThinK's oldest tokens, placed first: keys keep only the ``Dk`` channels ``channel_idx`` ``(B, H_kv, Dk)``
        (their logits are ``scale · q[channel_idx] · k``, i.e. attention over keys zero in the pruned channels),
        values full width. PyTorch path only.
    """
    _check(q, quant, k, v, valid, narrow, channel_idx)
    if return_probs and q.shape[2] != 1:
        raise ValueError(f"return_probs needs one query token, got {q.shape[2]}")
    decode_step = q.shape[2] == 1 and not return_probs and narrow is None and quant.k_zero is not None
    chosen = resolve_backend(backend, q)
    if chosen == "triton" and not decode_step:
        if backend == "triton":
            raise ValueError(
                f"backend='triton' computes one query token over integer codes, without probabilities or a narrow "
                f"segment (got {q.shape[2]} queries, return_probs={return_probs}, narrow={narrow is not None}, "
                f"codes {quant.k_codes.dtype}); use backend='torch' or 'auto'"
            )
        chosen = "torch"  # "auto": the documented rule (Triton for decode steps only)
    if chosen == "triton":
        return _quantized_decode_attention_triton(q, quant, k, v, scale, valid)
    B, Hq, Q, D = q.shape
    Hkv, Tw, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = Hq // Hkv
    qg = q.reshape(B, Hkv, G * Q, D).float() * scale
    m = qg.new_full((B, Hkv, G * Q, 1), float("-inf"))
    l_sum = qg.new_zeros(B, Hkv, G * Q, 1)
    acc = qg.new_zeros(B, Hkv, G * Q, Dv)
    kept_logits: list[Tensor] = []

    def merge(logits: Tensor, weighted: Callable[[Tensor], Tensor]) -> None:
        nonlocal m, l_sum, acc
        if return_probs:
            kept_logits.append(logits)
        m_new = torch.maximum(m, logits.amax(-1, keepdim=True))
        m_safe = m_new.masked_fill(torch.isinf(m_new), 0.0)  # a row with nothing valid yet: no NaN from -inf - -inf
        p = torch.exp(logits - m_safe)
        alpha = torch.exp(m - m_safe)
        l_sum = l_sum * alpha + p.sum(-1, keepdim=True)
        acc = acc * alpha + weighted(p)
        m = m_new

    def fold(rows: Tensor, part: QuantizedKV) -> None:  # the part's tiles, one at a time, read from the codes
        Tq, g = part.length, part.key_group
        if not Tq:
            return
        step = max(g, block // g * g)
        for t0 in range(0, Tq, step):
            t1 = min(Tq, t0 + step)
            logits = part.key_logits(rows, t0, t1)
            if part.valid is not None:
                logits = logits.masked_fill(~part.valid[:, :, None, t0:t1], float("-inf"))
            merge(logits, lambda p, t0=t0, t1=t1: part.weighted_values(p, t0, t1))

    # CPU: one intra-op thread for this step's many small ops (waking the other threads per op cost more than the
    # ops on a loaded machine; same results)
    with single_thread() if q.device.type == "cpu" else contextlib.nullcontext():
        if narrow is not None:
            fold(qg.gather(-1, channel_idx[:, :, None, :].expand(B, Hkv, G * Q, channel_idx.shape[-1])), narrow)
        fold(qg, quant)
        logits = qg @ k.float().transpose(-1, -2)
        mask = _window_mask(valid, Q, G, Tw, q.device)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        vf = v.float()
        merge(logits, lambda p: p @ vf)
    denom = l_sum.clamp_min(torch.finfo(torch.float32).tiny)
    out = torch.where(l_sum > 0, acc / denom, 0.0).reshape(B, Hq, Q, Dv).to(q.dtype)
    if not return_probs:
        return out
    m_safe = m.masked_fill(torch.isinf(m), 0.0)
    probs = torch.exp(torch.cat(kept_logits, dim=-1) - m_safe) / denom
    return out, probs.reshape(B, Hq, -1)


def _window_mask(valid: Tensor | None, Q: int, G: int, Tw: int, device) -> Tensor | None:
    """``(B|1, H|1, G·Q, Tw)`` mask of the window: validity and causality among the last ``Q`` slots (rows stacked
    ``G`` query heads x ``Q`` queries)."""
    mask = None if valid is None else valid[:, :, None, :]
    if Q > 1:
        rows_q = torch.arange(Q, device=device).repeat(G)
        causal = torch.arange(Tw, device=device)[None, :] <= (Tw - Q + rows_q)[:, None]
        mask = causal[None, None] if mask is None else mask & causal
    return mask


def quantized_decode_attention_reference(q: Tensor, quant: QuantizedKV, k: Tensor, v: Tensor, *, scale: float,
                                         valid: Tensor | None = None, narrow: QuantizedKV | None = None,
                                         channel_idx: Tensor | None = None) -> Tensor:
    """float64 reference of :func:`quantized_decode_attention`: the whole cache dequantized (narrow keys zero-filled
    in their pruned channels), one softmax."""
    _check(q, quant, k, v, valid, narrow, channel_idx)
    B, Hq, Q, D = q.shape
    Hkv, Tw, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = Hq // Hkv
    keys, vals, valids = [quant.keys(torch.float64), k.double()], [quant.values(torch.float64), v.double()], []
    if narrow is not None:
        kn = narrow.keys(torch.float64)
        idx = channel_idx[:, :, None, :].expand(*kn.shape)
        keys.insert(0, kn.new_zeros(*kn.shape[:3], D).scatter_(-1, idx, kn))
        vals.insert(0, narrow.values(torch.float64))
    for part in ([narrow] if narrow is not None else []) + [quant]:
        valids.append(part.valid if part.valid is not None else
                      torch.ones(B, 1, part.length, dtype=torch.bool, device=q.device))
    valids.append(valid if valid is not None else torch.ones(B, 1, Tw, dtype=torch.bool, device=q.device))
    K, V = torch.cat(keys, dim=2), torch.cat(vals, dim=2)
    logits = q.reshape(B, Hkv, G * Q, D).double() @ K.transpose(-1, -2) * scale
    heads = max(m.shape[1] for m in valids)
    full_valid = torch.cat([m.expand(B, heads, -1) for m in valids], dim=-1)[:, :, None, :]
    win = _window_mask(None, Q, G, Tw, q.device)
    if win is not None:
        full_valid = full_valid & torch.cat([win.new_ones(1, 1, G * Q, K.shape[2] - Tw), win], dim=-1)
    logits = logits.masked_fill(~full_valid, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return (probs @ V).reshape(B, Hq, Q, Dv)


# --------------------------------------------------------------------------------------------------------------
# Triton path (launcher; the kernel is in kernels/triton/quantized_decode_attention.py)
# --------------------------------------------------------------------------------------------------------------
def _quantized_decode_attention_triton(q: Tensor, quant: QuantizedKV, k: Tensor, v: Tensor, scale: float,
                                       valid: Tensor | None) -> Tensor:
    """Launch ``_quantized_decode_attention_fwd`` on grid ``(B * H_kv, cdiv(G, BLOCK_G))``."""
    import triton

    from .triton.quantized_decode_attention import _quantized_decode_attention_fwd

    B, Hq, _, D = q.shape
    Hkv, Tw, Dv = k.shape[1], k.shape[2], v.shape[-1]
    Tq = quant.length
    G = Hq // Hkv
    out = torch.empty(B, Hq, 1, Dv, dtype=q.dtype, device=q.device)
    ones = torch.ones(1, 1, 1, dtype=torch.bool, device=q.device)
    valid_u8 = (valid.expand(B, Hkv, Tw) if valid is not None else ones).view(torch.uint8)
    qvalid_u8 = (quant.valid.expand(B, Hkv, Tq) if quant.valid is not None else ones).view(torch.uint8)
    if quant.k_zero.stride() != quant.k_scale.stride() or quant.v_zero.stride() != quant.v_scale.stride():
        quant = QuantizedKV(quant.bits, quant.k_codes, quant.k_scale.contiguous(), quant.k_zero.contiguous(),
                            quant.v_codes, quant.v_scale.contiguous(), quant.v_zero.contiguous(), quant.valid)
    key_group = quant.key_group or 1
    value_group = Dv // quant.v_scale.shape[-1]
    # tl.dot needs every dim >= 16; padded query heads / channels are masked.
    BLOCK_G = max(16, triton.next_power_of_2(G))
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_DV = max(16, triton.next_power_of_2(Dv))
    BLOCK_N = 64 if max(BLOCK_D, BLOCK_DV) <= 128 else 32
    BLOCK_N = min(BLOCK_N, max(16, triton.next_power_of_2(max(Tq, Tw, 1))))
    num_warps = 4 if max(BLOCK_D, BLOCK_DV) <= 128 else 8
    grid = (B * Hkv, triton.cdiv(G, BLOCK_G))
    _quantized_decode_attention_fwd[grid](
        q, quant.k_codes, quant.k_scale, quant.k_zero, quant.v_codes, quant.v_scale, quant.v_zero, qvalid_u8,
        k, v, valid_u8, out,
        float(scale), Tq, Tw,
        q.stride(0), q.stride(1), q.stride(3),
        *quant.k_codes.stride(), *quant.k_scale.stride(), *quant.v_codes.stride(), *quant.v_scale.stride(),
        *qvalid_u8.stride(), *k.stride(), *v.stride(), *valid_u8.stride(),
        out.stride(0), out.stride(1), out.stride(3),
        H_KV=Hkv, GROUP=G, HEAD_DIM=D, HEAD_DIM_V=Dv, BITS=quant.bits, KEY_GROUP=key_group, VALUE_GROUP=value_group,
        BLOCK_G=BLOCK_G, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, BLOCK_N=BLOCK_N,
        HAS_QVALID=quant.valid is not None, HAS_VALID=valid is not None,
        INPUT_PRECISION="ieee",  # fp32 products like the PyTorch path (decode is memory-bound)
        num_warps=num_warps,
    )
    return out
