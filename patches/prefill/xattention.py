"""XAttention: block importance from antidiagonal sums of strided sub-tiles, blocks kept by cumulative mass."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvaccel.checks import check_int, check_number
from kvaccel.config import register
from kvaccel.kernels.block_sparse_attention import first_query_block, num_blocks

from .base import BlockSelection, BlockSparsePrefill, validate_blocks

Tensor = torch.Tensor

#: Elements of one chunk of strided logits (bounds the estimate's memory: 64 MB in float32).
_CHUNK_ELEMS = 1 << 24


def cumulative_selection(scores: Tensor, valid: Tensor, threshold: float, forced: Tensor | None = None,
                         min_count: int = 0) -> Tensor:
    """Per row of ``scores`` ``(..., N)`` (non-negative): the ``forced`` entries, then the others by descending score
    while the mass of the entries ranked before (the forced ones included) is below ``threshold`` times the row's
    total over ``valid``, and at least ``min_count`` entries (the forced ones included) if the row has them.
    ``threshold >= 1`` keeps every valid entry.

    Returns ``(..., N)`` bool, never outside ``valid``.
    """
    forced = torch.zeros_like(valid) if forced is None else forced & valid
    if threshold >= 1.0:
        return valid.clone()
    s = scores.masked_fill(~valid, 0.0)
    need = threshold * s.sum(-1, keepdim=True)
    sorted_s, order = s.masked_fill(forced | ~valid, -1.0).sort(dim=-1, descending=True)  # the others first
    sorted_s = sorted_s.clamp(min=0.0)
    before = s.masked_fill(~forced, 0.0).sum(-1, keepdim=True) + sorted_s.cumsum(-1) - sorted_s
    keep = before < need
    if min_count:
        keep |= torch.arange(keep.shape[-1], device=keep.device) < min_count - forced.sum(-1, keepdim=True)
    picked = torch.zeros_like(valid).scatter_(-1, order, keep)
    return (picked & valid & ~forced) | forced


def antidiagonal_block_scores(q: Tensor, k: Tensor, scale: float, stride: int, block: int) -> Tensor:
    """XAttention's estimate: ``(B, H_q, nQB, nB)`` block sums of the causal softmax over strided key groups.

    ``q`` ``(B, H_q, Lq, D)`` are the last ``Lq`` of the ``L`` positions of ``k`` ``(B, H_kv, L, D)``; query blocks are
    those holding them on the ``L``-position grid. With ``S = stride``, key group ``j`` is ``concat_t k[jS+t]`` and
    query group ``g`` is ``concat_t q[gS+S-1-t]`` (``t < S``; positions outside the keys / the queries are zeros), so
    their dot product is the antidiagonal sum of the ``S x S`` sub-tile ``(g, j)`` of ``q kᵀ``. Logits are scaled by
    ``scale / S`` and softmaxed over the key groups ``j <= g``; query groups with no query contribute nothing; the
    probabilities are summed over the ``block / S`` groups of each query block and key block. Computed in chunks of
    query blocks over the keys they reach, in float32 (float64 inputs: float64), so the cost is ~``1/S`` of the
    causal ``q kᵀ`` and no ``L x L`` matrix exists.
    """
    B, Hq, Lq, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    G, S, R = Hq // Hkv, stride, block // stride
    n = num_blocks(L, block)
    i0 = first_query_block(L, Lq, block)
    nq = n - i0
    shift = L - Lq - i0 * block  # rows of the first query block before the first query
    dt = torch.promote_types(q.dtype, torch.float32)
    kr = F.pad(k.to(dt), (0, 0, 0, n * block - L)).reshape(B, Hkv, n * R, S * D)
    qp = F.pad(q.to(dt), (0, 0, shift, n * block - L))
    qr = qp.reshape(B, Hq, nq * R, S, D).flip(-2).reshape(B, Hkv, G, nq * R, S * D)
    pos = torch.arange(i0 * block, n * block, S, device=q.device)  # first position of each query group
    has_query = (pos + S - 1 >= L - Lq) & (pos < L)  # (nq * R,)
    out = torch.zeros(B, Hkv, G, nq, n, dtype=dt, device=q.device)
    step = max(1, _CHUNK_ELEMS // max(1, B * Hq * R * n * R))  # query blocks per chunk
    for a in range(0, nq, step):
        b = min(nq, a + step)
        kend = (i0 + b) * R  # key groups the chunk's last block reaches
        s = qr[:, :, :, a * R : b * R] @ kr[:, :, None, :kend].transpose(-1, -2)  # (B, Hkv, G, rows, kend)
        s.mul_(scale / S)
        g = torch.arange((i0 + a) * R, (i0 + b) * R, device=q.device)
        s.masked_fill_(torch.arange(kend, device=q.device)[None, :] > g[:, None], float("-inf"))
        p = torch.softmax(s, dim=-1) * has_query[a * R : b * R, None]
        out[..., a:b, : i0 + b] = p.view(B, Hkv, G, b - a, R, i0 + b, R).sum((-3, -1))
    return out.view(B, Hq, nq, n)


@register
@dataclass
class XAttention(BlockSparsePrefill):
    """XAttention: score blocks by antidiagonal sums of strided sub-tiles, keep each block row up to ``threshold``.

    https://arxiv.org/abs/2503.16428 (XAttention: Block Sparse Attention with Antidiagonal Scoring). The estimate
    (:func:`antidiagonal_block_scores`) sums each ``stride x stride`` sub-tile of ``q kᵀ`` along its antidiagonal,
    scaled by ``1/(√d·stride)``, softmaxed causally over the strided keys and summed into ``block_size`` blocks; it
    costs ~``1/stride`` of ``q kᵀ``. Per query head and query block: block 0 and the diagonal block, then the other
    blocks by descending score while the kept mass is below ``threshold`` times the row's mass (the reference's
    ``find_blocks_chunked``, github.com/mit-han-lab/x-attention ``xattn/src/utils.py``). GQA: each query head scores
    its own row of the kv head it reads (the reference repeats K/V to the query heads).

    As in the reference, the antidiagonal of a diagonal sub-tile also sums pairs above the causal diagonal (the
    estimate only; the kernel is token-level causal); one threshold for every head (the reference can profile one
    per head).

    Chunked prefill: a query block's scores depend on its own queries and the keys only, so a chunk starting on a
    block boundary selects exactly the unchunked prompt's tiles for its rows; a block split by the boundary is scored
    from its rows in the chunk.

    Parameters
    ----------
    threshold : float
        Mass of each block row to keep, in (0, 1]; 1 keeps every causal block. Default 0.9.
    stride : int
        ``S``: sub-tile size of the antidiagonal sums; ``block_size`` must be a multiple. Default 8.
    block_size : int
        Query / key block size (tokens) of the selection and the kernel. Default 128 (the reference's).
    min_length, backend
        See :class:`BlockSparsePrefill` (default ``min_length=1024``).
    """

    name = "xattention"
    threshold: float = 0.9
    stride: int = 8
    block_size: int = 128

    def __post_init__(self):
        super().__post_init__()
        check_number("threshold", self.threshold, 0, 1, low_open=True, why="cumulative mass of a block row")
        validate_blocks(self, block_size=self.block_size)
        check_int("stride", self.stride, 1, self.block_size, why="sub-tile size of the antidiagonal sums")
        if self.block_size % self.stride:
            raise ValueError(f"stride ({self.stride}) must divide block_size ({self.block_size})")

    def select(self, q, k, v, scale, layer_idx) -> BlockSelection:
        L, bs = k.shape[2], self.block_size
        scores = antidiagonal_block_scores(q, k, scale, self.stride, bs)  # (B, Hq, nq, n)
        n = scores.shape[-1]
        i = torch.arange(first_query_block(L, q.shape[2], bs), n, device=q.device)
        j = torch.arange(n, device=q.device)
        valid = j[None, :] <= i[:, None]
        forced = (j[None, :] == 0) | (j[None, :] == i[:, None])
        mask = cumulative_selection(scores, valid.expand_as(scores), float(self.threshold), forced.expand_as(scores))
        return BlockSelection(mask, bs, bs)


__all__ = ["XAttention", "antidiagonal_block_scores", "cumulative_selection"]
