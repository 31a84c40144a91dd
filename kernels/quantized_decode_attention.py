"""quantized_decode_attention: new tokens attend a KV cache held as KIVI codes plus a full-precision window.

The cache of one layer is ``[quantized part (Tq tokens), window (Tw tokens)]`` on one token axis; the ``Q`` queries
are the last ``Q`` tokens of the window (causal among themselves; ``Q = 1`` for a decode step). The PyTorch path
walks the quantized part in tiles of ``block`` tokens, dequantizes each tile to float32 inside the loop (never the
whole cache) and merges the tiles with an online softmax; :func:`quantized_decode_attention_reference` dequantizes
everything in float64 and is what the tests compare against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backend import check_mask, resolve_backend
from .kv_quant import QuantizedKV

__all__ = ["quantized_decode_attention", "quantized_decode_attention_reference"]

#: tokens dequantized at a time by the PyTorch path (rounded down to a multiple of the key group)
DEFAULT_BLOCK = 512


def _check(q: Tensor, quant: QuantizedKV, k: Tensor, v: Tensor, valid: Tensor | None) -> None:
    B, Hq, Q, D = q.shape
    Hkv, Tw = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    if Tw < Q:
        raise ValueError(f"the window holds {Tw} tokens but {Q} queries must be its last tokens")
    if quant.k_codes.shape[:2] != (B, Hkv) or quant.v_codes.shape[:2] != (B, Hkv):
        raise ValueError(f"quantized part has batch x heads {tuple(quant.k_codes.shape[:2])}, window {(B, Hkv)}")
    check_mask("valid", valid, B, Hkv, Tw)
    check_mask("quant.valid", quant.valid, B, Hkv, quant.length)


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
) -> Tensor | tuple[Tensor, Tensor]:
    """Softmax attention of ``q`` over ``[dequant(quant), k]`` / ``[dequant(quant), v]``; ``(B, H_q, Q, Dv)`` in
    ``q``'s dtype (float32 accumulation). With ``return_probs`` (``Q = 1``) also the float32 attention
    probabilities ``(B, H_q, Tq + Tw)`` (from the tiles' logits kept aside: one row per query head, not a copy of
    the cache).

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
        ``"auto"`` / ``"torch"``; the Triton kernel is not written yet (``"triton"`` raises).
    return_probs : bool
        Also return the probabilities (``Q`` must be 1), for eviction methods that accumulate them.
    """
    _check(q, quant, k, v, valid)
    if return_probs and q.shape[2] != 1:
        raise ValueError(f"return_probs needs one query token, got {q.shape[2]}")
    if resolve_backend(backend, q) == "triton":
        raise NotImplementedError(
            "quantized_decode_attention has no Triton kernel yet; use backend='torch' (CPU tensors)"
        )
    B, Hq, Q, D = q.shape
    Hkv, Tw, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = Hq // Hkv
    qg = q.reshape(B, Hkv, G * Q, D).float() * scale
    m = qg.new_full((B, Hkv, G * Q, 1), float("-inf"))
    l_sum = qg.new_zeros(B, Hkv, G * Q, 1)
    acc = qg.new_zeros(B, Hkv, G * Q, Dv)
    kept_logits: list[Tensor] = []

    def merge(logits: Tensor, vals: Tensor) -> None:
        nonlocal m, l_sum, acc
        if return_probs:
            kept_logits.append(logits)
        m_new = torch.maximum(m, logits.amax(-1, keepdim=True))
        m_safe = m_new.masked_fill(torch.isinf(m_new), 0.0)  # a row with nothing valid yet: no NaN from -inf - -inf
        p = torch.exp(logits - m_safe)
        alpha = torch.exp(m - m_safe)
        l_sum = l_sum * alpha + p.sum(-1, keepdim=True)
        acc = acc * alpha + p @ vals
        m = m_new

    Tq, g = quant.length, quant.key_group
    if Tq:
        step = max(g, block // g * g)
        for t0 in range(0, Tq, step):
            t1 = min(Tq, t0 + step)
            logits = qg @ quant.keys(torch.float32, t0, t1).transpose(-1, -2)
            if quant.valid is not None:
                logits = logits.masked_fill(~quant.valid[:, :, None, t0:t1], float("-inf"))
            merge(logits, quant.values(torch.float32, t0, t1))
    logits = qg @ k.float().transpose(-1, -2)
    mask = _window_mask(valid, Q, G, Tw, q.device)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    merge(logits, v.float())
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
                                         valid: Tensor | None = None) -> Tensor:
    """float64 reference of :func:`quantized_decode_attention`: the whole cache dequantized, one softmax."""
    _check(q, quant, k, v, valid)
    B, Hq, Q, D = q.shape
    Hkv, Tw, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = Hq // Hkv
    K = torch.cat([quant.keys(torch.float64), k.double()], dim=2)
    V = torch.cat([quant.values(torch.float64), v.double()], dim=2)
    logits = q.reshape(B, Hkv, G * Q, D).double() @ K.transpose(-1, -2) * scale
    qv = quant.valid if quant.valid is not None else torch.ones(B, 1, quant.length, dtype=torch.bool, device=q.device)
    wv = valid if valid is not None else torch.ones(B, 1, Tw, dtype=torch.bool, device=q.device)
    heads = max(qv.shape[1], wv.shape[1])
    full_valid = torch.cat([qv.expand(B, heads, -1), wv.expand(B, heads, -1)], dim=-1)[:, :, None, :]
    win = _window_mask(None, Q, G, Tw, q.device)
    if win is not None:
        full_valid = full_valid & torch.cat([win.new_ones(1, 1, G * Q, quant.length), win], dim=-1)
    logits = logits.masked_fill(~full_valid, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return (probs @ V).reshape(B, Hq, Q, Dv)
