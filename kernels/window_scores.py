"""window_attention_scores: attention probabilities summed over an observation window, without an (L, L) matrix.

Eviction methods (SnapKV-style windows, H2O / D2O accumulated column sums over a whole prompt) need
attention *weights*, which SDPA / flash attention never return. This op recomputes them in chunks
(PyTorch) or in two tiled passes (Triton) and returns only the per-key column sums ``(B, H_q, T)``.

The public op chooses the backend (``"auto"``: Triton on CUDA, PyTorch on CPU), the grid, the block
sizes and ``num_warps``; the ``@triton.jit`` code is in :mod:`kvaccel.kernels.triton.window_scores`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvaccel.checks import check_int

from .backend import check_mask, resolve_backend
from .decode_attention import decode_attention_probs

__all__ = ["window_attention_scores", "window_attention_scores_reference"]


def window_attention_scores(
    q: Tensor,
    k: Tensor,
    *,
    scale: float,
    valid: Tensor | None = None,
    causal: bool = True,
    chunk: int = 256,
    backend: str = "auto",
) -> Tensor:
    """window_attention_scores: sum over the last W queries of their softmax attention probabilities per key.

    ``scores[b, h, j] = sum_i softmax_j(scale * q[b, h, i] . k[b, h // G, j] + mask[i, j])``

    Query ``i`` sits at absolute position ``T - W + i``; with ``causal`` it sees keys ``j <= T - W + i``.
    Invalid keys get probability 0; a query row without any visible valid key contributes 0.
    ``W == T`` (every query of a prompt) is the H2O / D2O accumulated attention.

    Parameters
    ----------
    q : Tensor
        ``(B, H_q, W, D)`` the last ``W`` queries of the sequence (observation window), post-RoPE.
    k : Tensor
        ``(B, H_kv, T, D)`` all keys, ``T >= W``, ``H_q % H_kv == 0`` (GQA: no K repeat).
    scale : float
        Logit scale, used as given.
    valid : Tensor, optional
        ``(B, H_kv, T)`` or ``(B, 1, T)`` bool; ``False`` keys get probability 0. ``None`` = all valid.
    causal : bool, default True
        Apply the causal mask described above.
    chunk : int, default 256
        PyTorch path: queries are processed ``chunk`` at a time, so the temporaries are
        ``O(chunk * T)`` per head (never ``W * T``).
    backend : str, default ``"auto"``
        ``"auto"`` (Triton when ``q.is_cuda``, else PyTorch), ``"torch"`` or ``"triton"``.

    Returns
    -------
    Tensor
        ``(B, H_q, T)`` float32.
    """
    _check_inputs(q, k, valid)
    check_int("chunk", chunk, 1)
    if resolve_backend(backend, q) == "triton":
        return _window_scores_triton(q, k, scale, valid, causal)
    return _window_scores_torch(q, k, scale, valid, causal, chunk)


# --------------------------------------------------------------------------------------------------------------
# PyTorch path
# --------------------------------------------------------------------------------------------------------------
def _window_scores_torch(
    q: Tensor, k: Tensor, scale: float, valid: Tensor | None, causal: bool, chunk: int
) -> Tensor:
    """_window_scores_torch: query chunks as ``(B, H_kv, G * c, D)`` rows; causal chunks stop at their last key."""
    B, Hq, W, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    G = Hq // Hkv
    if W == 1:  # a decode step (the query sees every key): one matmul and one softmax, no chunk loop
        return decode_attention_probs(q, k, scale=scale, valid=valid)
    offset = T - W  # absolute position of query 0
    qg = q.reshape(B, Hkv, G, W, D)
    kf = k.float()  # no copy for float32 input
    invalid = None if valid is None else ~valid.unsqueeze(2).unsqueeze(3)  # (B, H_kv|1, 1, 1, T)
    scores = torch.zeros(B, Hkv, G, T, dtype=torch.float32, device=q.device)
    pos_k = torch.arange(T, device=q.device)

    for i0 in range(0, W, chunk):
        i1 = min(W, i0 + chunk)
        c = i1 - i0
        hi = offset + i1 if causal else T  # keys beyond hi are masked for every row of the chunk
        qc = qg[:, :, :, i0:i1].float().mul(scale).reshape(B, Hkv, G * c, D)
        s = (qc @ kf[:, :, :hi].transpose(-1, -2)).view(B, Hkv, G, c, hi)  # the only O(chunk * T) temporary
        if causal:
            pos_q = offset + torch.arange(i0, i1, device=q.device)
            s.masked_fill_(pos_k[:hi] > pos_q[:, None], float("-inf"))
        if invalid is not None:
            s.masked_fill_(invalid[..., :hi], float("-inf"))
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # row without valid key: subtract 0
        p = s.sub_(m).exp_()
        l = p.sum(-1, keepdim=True)
        p.div_(torch.where(l > 0, l, torch.ones_like(l)))
        scores[..., :hi] += p.sum(-2)
        del s, p  # free this chunk's logits before the next matmul allocates its own
    return scores.view(B, Hq, T)


def window_attention_scores_reference(
    q: Tensor,
    k: Tensor,
    *,
    scale: float,
    valid: Tensor | None = None,
    causal: bool = True,
) -> Tensor:
    """window_attention_scores_reference: dead-simple float64 version of :func:`window_attention_scores`.

    ``scores = softmax(scale * q @ repeat_interleave(k)^T + mask).sum(queries)``, full ``(W, T)`` matrix.

    Parameters
    ----------
    q, k, scale, valid, causal
        As in :func:`window_attention_scores`.

    Returns
    -------
    Tensor
        ``(B, H_q, T)`` float64.
    """
    _check_inputs(q, k, valid)
    B, Hq, W = q.shape[:3]
    Hkv, T = k.shape[1], k.shape[2]
    G = Hq // Hkv
    logits = scale * q.double() @ k.double().repeat_interleave(G, dim=1).transpose(-1, -2)  # (B, Hq, W, T)
    keep = torch.ones(B, Hq, W, T, dtype=torch.bool, device=q.device)
    if causal:
        pos_q = torch.arange(T - W, T, device=q.device)
        keep &= torch.arange(T, device=q.device)[None, :] <= pos_q[:, None]
    if valid is not None:
        keep &= valid.expand(B, Hkv, T).repeat_interleave(G, dim=1)[:, :, None, :]
    probs = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1).nan_to_num(0.0)
    return probs.sum(dim=2)


# --------------------------------------------------------------------------------------------------------------
# Triton path (launcher; the kernels are in kernels/triton/window_scores.py)
# --------------------------------------------------------------------------------------------------------------
def _window_scores_triton(q: Tensor, k: Tensor, scale: float, valid: Tensor | None, causal: bool) -> Tensor:
    """_window_scores_triton: pass 1 on ``(cdiv(W, BLOCK_M), B * H_q)``, pass 2 on ``(cdiv(T, BLOCK_N), B * H_q)``."""
    import triton

    from .triton.window_scores import _window_lse_fwd, _window_scores_fwd

    B, Hq, W, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    G = Hq // Hkv
    lse = torch.empty(B, Hq, W, dtype=torch.float32, device=q.device)
    out = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device)
    has_valid = valid is not None
    valid_u8 = (
        valid.expand(B, Hkv, T) if has_valid else torch.ones(1, 1, 1, dtype=torch.bool, device=q.device)
    )
    valid_u8 = valid_u8.view(torch.uint8)

    # tl.dot needs every dim >= 16; padded rows / keys / channels are masked.
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_M = min(64, max(16, triton.next_power_of_2(W)))
    BLOCK_N = 64 if BLOCK_D <= 128 else 32
    num_warps = 4 if BLOCK_D <= 64 else 8
    common = {
        "H_Q": Hq,
        "GROUP": G,
        "HEAD_DIM": D,
        "BLOCK_M": BLOCK_M,
        "BLOCK_N": BLOCK_N,
        "BLOCK_D": BLOCK_D,
        "IS_CAUSAL": bool(causal),
        "HAS_VALID": has_valid,
        "INPUT_PRECISION": "ieee",  # fp32 inputs: exact products, the scores feed top-k decisions
        "num_warps": num_warps,
    }
    strides = (*q.stride(), *k.stride(), *valid_u8.stride(), *lse.stride())
    _window_lse_fwd[(triton.cdiv(W, BLOCK_M), B * Hq)](
        q, k, valid_u8, lse, float(scale), T, W, *strides, **common
    )
    _window_scores_fwd[(triton.cdiv(T, BLOCK_N), B * Hq)](
        q, k, valid_u8, lse, out, float(scale), T, W, *strides, *out.stride(), **common
    )
    return out


# --------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------
def _check_inputs(q: Tensor, k: Tensor, valid: Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-D, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    B, Hq, W, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(
            f"k {tuple(k.shape)} does not match q {tuple(q.shape)}: expected ({B}, H_kv, T, {D})"
        )
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"num query heads ({Hq}) must be a multiple of num kv heads ({Hkv})")
    if W > T:
        raise ValueError(
            f"window W ({W}) must not exceed the number of keys T ({T}): q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}"
        )
    check_mask("valid", valid, B, Hkv, T)
