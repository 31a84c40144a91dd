"""lse_merge: combine two partial softmax attentions over disjoint key sets into the attention over their union.

Used by retrieval attention (RetrievalAttention, https://arxiv.org/abs/2409.10516): the static part (sink +
recent window, on the model's device) and the retrieved part (keys found in host memory) are attended
separately, each returning its output and its log-sum-exp, and merged exactly::

    lse = logaddexp(lse_a, lse_b)
    o   = exp(lse_a - lse) * o_a + exp(lse_b - lse) * o_b

A part with no key has ``lse = -inf`` (its output is ignored, whatever it holds); if both are empty the result
is zeros with ``lse = -inf``. :func:`lse_merge_reference` is the float64 reference the tests compare with.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["lse_merge", "lse_merge_reference"]


def _check(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> None:
    if o_a.shape != o_b.shape:
        raise ValueError(f"o_a {tuple(o_a.shape)} and o_b {tuple(o_b.shape)} must have the same shape")
    if lse_a.shape != o_a.shape[:-1] or lse_b.shape != o_a.shape[:-1]:
        raise ValueError(
            f"lse_a {tuple(lse_a.shape)} and lse_b {tuple(lse_b.shape)} must be the outputs' shape without the "
            f"last (value) axis, {tuple(o_a.shape[:-1])}"
        )
    devices = {t.device for t in (o_a, lse_a, o_b, lse_b)}
    if len(devices) != 1:
        raise ValueError(f"lse_merge inputs must be on one device, got {sorted(map(str, devices))}; move them first")


def lse_merge(
    o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor, *, out: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """lse_merge: attention over the union of two disjoint key sets from the two partial attentions.

    ``lse = logaddexp(lse_a, lse_b)``, ``o = e^{lse_a - lse} o_a + e^{lse_b - lse} o_b``.

    Parameters
    ----------
    o_a, o_b : Tensor
        ``(..., Dv)`` the two partial outputs (each normalised over its own keys), same shape and dtype.
    lse_a, lse_b : Tensor
        ``(...)`` their natural log-sum-exp of the scaled logits; ``-inf`` marks an empty part.
    out : Tensor, optional
        ``(..., Dv)`` in ``o_a.dtype``, written in place and returned.

    Returns
    -------
    tuple of Tensor
        ``o`` ``(..., Dv)`` in ``o_a.dtype`` (computed in float32) and ``lse`` ``(...)`` float32.
    """
    _check(o_a, lse_a, o_b, lse_b)
    la, lb = lse_a.float(), lse_b.float()
    lse = torch.logaddexp(la, lb)
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, torch.zeros_like(lse))
    wa = torch.where(torch.isfinite(la), torch.exp(la - safe), torch.zeros_like(la))
    wb = torch.where(torch.isfinite(lb), torch.exp(lb - safe), torch.zeros_like(lb))
    # a part with lse = -inf may hold anything (even NaN): select instead of multiplying by 0
    pa = torch.where(wa[..., None] > 0, wa[..., None] * o_a.float(), 0.0)
    pb = torch.where(wb[..., None] > 0, wb[..., None] * o_b.float(), 0.0)
    res = pa + pb
    if out is None:
        return res.to(o_a.dtype), lse
    out.copy_(res)
    return out, lse


def lse_merge_reference(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Float64 reference of :func:`lse_merge`: softmax weights of the two parts from their exp-sums."""
    _check(o_a, lse_a, o_b, lse_b)
    la, lb = lse_a.double(), lse_b.double()
    m = torch.maximum(la, lb)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    sa, sb = torch.exp(la - m), torch.exp(lb - m)  # exp(-inf) = 0: an empty part weighs nothing
    total = sa + sb
    lse = torch.where(total > 0, m + torch.log(total), torch.full_like(m, float("-inf")))
    denom = torch.where(total > 0, total, torch.ones_like(total))
    oa = torch.where(sa[..., None] > 0, o_a.double(), 0.0)
    ob = torch.where(sb[..., None] > 0, o_b.double(), 0.0)
    o = (sa[..., None] * oa + sb[..., None] * ob) / denom[..., None]
    return o, lse
