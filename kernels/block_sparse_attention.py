"""block_sparse_attention: causal prefill attention computed only on selected (query block, key block) tiles.

The public op checks inputs and chooses the backend (``"auto"``: Triton on CUDA, PyTorch on CPU); the
``@triton.jit`` code lives in :mod:`kvaccel.kernels.triton.block_sparse_attention`. The float64
:func:`block_sparse_attention_reference` expands the block mask to tokens and is what the tests compare against.

Block layout: queries are cut in blocks of ``block_m`` rows, keys in blocks of ``block_n`` slots (the last
block of each may be ragged). ``block_mask[b, h, i, j]`` says whether query block ``i`` of query head ``h``
reads key block ``j``. Inside a selected tile the mask is token-level causal on *original* positions: with
``key_perm`` (PBS-style permutation of keys within segments) slot ``j`` of ``k``/``v`` holds the key at original
position ``key_perm[b, hkv, j]``, and a query at position ``i`` sees it iff ``key_perm[b, hkv, j] <= i``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backend import resolve_backend

__all__ = ["block_sparse_attention", "block_sparse_attention_reference", "num_blocks", "causal_block_count"]

#: Block sizes the kernels accept: the Triton kernel tiles by them, so they must be powers of two >= 16.
ALLOWED_BLOCKS = (16, 32, 64, 128, 256)


def num_blocks(length: int, block: int) -> int:
    return -(-length // block)


def check_block_size(name: str, block: int) -> None:
    if isinstance(block, bool) or not isinstance(block, int) or block not in ALLOWED_BLOCKS:
        raise ValueError(
            f"{name} ({block!r}) must be one of {ALLOWED_BLOCKS}: the kernel tiles queries and keys by it "
            "(a power of two >= 16)"
        )


def causal_block_mask(L: int, block_m: int, block_n: int, device=None) -> Tensor:
    """``(nQB, nKB)`` bool: tiles with at least one (query, key) pair on or below the causal diagonal."""
    qb_last = torch.clamp(torch.arange(num_blocks(L, block_m), device=device) * block_m + block_m - 1, max=L - 1)
    kb_first = torch.arange(num_blocks(L, block_n), device=device) * block_n
    return kb_first[None, :] <= qb_last[:, None]


def causal_block_count(L: int, block_m: int, block_n: int) -> int:
    """Number of causal tiles of an ``L``-token prompt (the denominator of ``prefill_density``)."""
    return int(causal_block_mask(L, block_m, block_n).sum())


def _check_inputs(q, k, v, block_mask, block_m, block_n, key_perm, key_valid) -> None:
    check_block_size("block_m", block_m)
    check_block_size("block_n", block_n)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, H, L, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, Hq, L, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    if (Bk, Lk, Dk) != (B, L, D) or v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"k {tuple(k.shape)} and v {tuple(v.shape)} must be (B={B}, H_kv, L={L}, D={D}|Dv) for q {tuple(q.shape)}"
        )
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    nqb, nkb = num_blocks(L, block_m), num_blocks(L, block_n)
    if (
        block_mask.dtype != torch.bool
        or block_mask.dim() != 4
        or block_mask.shape[0] != B
        or block_mask.shape[1] not in (1, Hq)
        or tuple(block_mask.shape[2:]) != (nqb, nkb)
    ):
        raise ValueError(
            f"block_mask must be bool ({B}, {Hq} or 1, {nqb}, {nkb}) for L={L}, block_m={block_m}, "
            f"block_n={block_n}; got {block_mask.dtype} {tuple(block_mask.shape)}"
        )
    if key_perm is not None and (key_perm.shape != (B, Hkv, L) or key_perm.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"key_perm must be int32/int64 ({B}, {Hkv}, {L}), got {key_perm.dtype} {tuple(key_perm.shape)}")
    if key_valid is not None and (key_valid.shape != (B, L) or key_valid.dtype != torch.bool):
        raise ValueError(f"key_valid must be bool ({B}, {L}), got {key_valid.dtype} {tuple(key_valid.shape)}")


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_mask: Tensor,
    *,
    scale: float,
    block_m: int = 64,
    block_n: int = 64,
    key_perm: Tensor | None = None,
    key_valid: Tensor | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """block_sparse_attention: ``softmax(scale * q k^T + M) v`` where ``M`` is ``-inf`` outside the selected tiles,
    above the causal diagonal (on original key positions) and on invalid keys.

    Parameters
    ----------
    q : Tensor
        ``(B, H_q, L, D)`` queries, post-RoPE, in original order.
    k, v : Tensor
        ``(B, H_kv, L, D)`` / ``(B, H_kv, L, Dv)``, slot order (permuted when ``key_perm`` is given). GQA: query
        head ``h`` reads kv head ``h // (H_q // H_kv)``; K/V are never repeated.
    block_mask : Tensor
        ``(B, H_q | 1, ceil(L/block_m), ceil(L/block_n))`` bool. Tiles above the diagonal are ignored.
    scale : float
        Logit scale (``1/sqrt(D)`` for the models here).
    block_m, block_n : int
        Query / key block sizes, powers of two in ``ALLOWED_BLOCKS``.
    key_perm : Tensor, optional
        ``(B, H_kv, L)`` int: original position of the key stored in each slot. ``None`` = identity.
    key_valid : Tensor, optional
        ``(B, L)`` bool over original positions; ``False`` keys (padding) are never attended.
    return_lse : bool
        Also return the natural-log log-sum-exp ``(B, H_q, L)`` float32 (``-inf`` for rows that see nothing).
    backend : str
        ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns
    -------
    ``out`` ``(B, H_q, L, Dv)`` in ``q.dtype`` (zeros for rows that see no key), and ``lse`` if asked.
    """
    _check_inputs(q, k, v, block_mask, block_m, block_n, key_perm, key_valid)
    if resolve_backend(backend, q) == "triton":
        from .triton_launchers import block_sparse_attention_triton  # noqa: F401  (filled in by the Triton path)

        out, lse = block_sparse_attention_triton(q, k, v, block_mask, scale, block_m, block_n, key_perm, key_valid)
    else:
        out, lse = _block_sparse_attention_torch(q, k, v, block_mask, scale, block_m, block_n, key_perm, key_valid)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------------------------------------------
# PyTorch path
# --------------------------------------------------------------------------------------------------------------
def _block_sparse_attention_torch(q, k, v, block_mask, scale, block_m, block_n, key_perm, key_valid):
    """Row-chunked masked attention (placeholder design; see benchmarks/block_sparse_kernel.py)."""
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    out = q.new_zeros(B, Hq, L, v.shape[-1])
    lse = torch.full((B, Hq, L), float("-inf"), dtype=torch.float32, device=q.device)
    kpos = _key_positions(k, key_perm)  # (B, Hkv, L)
    for r0 in range(0, L, block_m):
        r1 = min(L, r0 + block_m)
        i = r0 // block_m
        rows = torch.arange(r0, r1, device=q.device)
        sel = block_mask[:, :, i].expand(B, Hq, -1).repeat_interleave(block_n, dim=-1)[..., :L]  # (B, Hq, L)
        kk, vv = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
        n = L
        s = (q[:, :, r0:r1].float() @ kk.float().transpose(-1, -2)) * scale  # (B, Hq, m, n)
        pos = kpos.repeat_interleave(G, dim=1)
        m = sel[:, :, None, :n] & (pos[:, :, None, :] <= rows[None, None, :, None])
        if key_valid is not None:
            m = m & torch.gather(key_valid[:, None, :].expand(B, Hq, L), 2, pos)[:, :, None, :]
        s = s.masked_fill(~m, float("-inf"))
        l_ = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - l_.unsqueeze(-1)).nan_to_num(0.0)
        out[:, :, r0:r1] = (p @ vv.float()).to(q.dtype)
        lse[:, :, r0:r1] = l_
    return out, lse


def _key_positions(k: Tensor, key_perm: Tensor | None) -> Tensor:
    B, Hkv, L = k.shape[:3]
    if key_perm is None:
        return torch.arange(L, device=k.device).expand(B, Hkv, L)
    return key_perm.long()


def block_sparse_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_mask: Tensor,
    *,
    scale: float,
    block_m: int = 64,
    block_n: int = 64,
    key_perm: Tensor | None = None,
    key_valid: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """block_sparse_attention_reference: float64, K/V repeated to ``H_q``, the block mask expanded to an (L, L) mask.

    Returns ``out`` ``(B, H_q, L, Dv)`` and ``lse`` ``(B, H_q, L)``, both float64; rows that see nothing are 0 / -inf.
    """
    _check_inputs(q, k, v, block_mask, block_m, block_n, key_perm, key_valid)
    B, Hq, L, _ = q.shape
    G = Hq // k.shape[1]
    k64 = k.double().repeat_interleave(G, dim=1)
    v64 = v.double().repeat_interleave(G, dim=1)
    pos = _key_positions(k, key_perm).repeat_interleave(G, dim=1)  # (B, Hq, L) original position per slot
    tile = block_mask.expand(B, Hq, -1, -1)
    tile = tile.repeat_interleave(block_m, dim=2)[:, :, :L].repeat_interleave(block_n, dim=3)[:, :, :, :L]
    rows = torch.arange(L, device=q.device)
    mask = tile & (pos[:, :, None, :] <= rows[None, None, :, None])
    if key_valid is not None:
        mask = mask & torch.gather(key_valid[:, None, :].expand(B, Hq, L), 2, pos)[:, :, None, :]
    logits = scale * torch.einsum("bhid,bhjd->bhij", q.double(), k64)
    logits = logits.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    p = torch.exp(logits - lse.unsqueeze(-1)).nan_to_num(0.0)
    return torch.einsum("bhij,bhjd->bhid", p, v64), lse


def dense_equivalent_flops(L: int, Hq: int, D: int) -> float:
    """FLOPs of causal dense attention (QK^T and PV), for reporting achieved throughput."""
    return 2.0 * 2.0 * Hq * D * L * (L + 1) / 2.0

