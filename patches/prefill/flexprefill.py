"""FlexPrefill: per head, a query-aware block-sparse pattern or a vertical-slash one, each sized by cumulative mass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kvaccel.checks import check_int, check_number
from kvaccel.config import register
from kvaccel.kernels.block_sparse_attention import num_blocks

from .base import BlockSelection, BlockSparsePrefill, validate_blocks
from .minference import Estimates
from .vertical_slash import diagonal_sums, slash_tiles
from .xattention import cumulative_selection

Tensor = torch.Tensor


class FlexEstimate(NamedTuple):
    """What FlexPrefill's choice and sizes read, per sequence and query head (float32; float64 for float64 inputs).

    ``vertical`` ``(B, H_q, nB)``: column means of the last queries' attention, summed per key block; ``slash``
    ``(B, H_q, nB)``: diagonal means, summed per block of ``block`` offsets (block 0: offsets ``0 .. block-1``, the
    most recent); ``pooled`` ``(B, H_q, nB)``: ``softmax(mean(q_last) · avgpool(K)ᵀ · scale)``; ``distance``
    ``(B, H_q)``: ``sqrt(JS(pooled, vertical))``; ``blocks`` ``(B, H_q, nQB, nB)``: the causal row softmax of
    ``avgpool(Q) avgpool(K)ᵀ · scale`` for the query blocks holding the queries.
    """

    vertical: Tensor
    slash: Tensor
    pooled: Tensor
    distance: Tensor
    blocks: Tensor


def block_sum(x: Tensor, block: int) -> Tensor:
    """``x`` ``(..., L)`` summed over consecutive blocks of ``block`` entries (the last one ragged): ``(..., nB)``."""
    L = x.shape[-1]
    n = num_blocks(L, block)
    return F.pad(x, (0, n * block - L)).unflatten(-1, (n, block)).sum(-1)


def js_distance(p: Tensor, q: Tensor) -> Tensor:
    """``sqrt(JS(p, q))`` over the last dim, in float64, with ``0 · log 0 = 0`` (``xlogy``: a zero probability never
    gives NaN, as FlexPrefill's ``p·log(p/m)`` does), clamped at 0 before the root."""
    p, q = p.double(), q.double()
    m = (p + q) / 2  # m >= p/2 > 0 wherever p > 0: no log of 0 is ever weighted
    js = 0.5 * (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(-1) + 0.5 * (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(-1)
    return js.clamp(min=0.0).sqrt()


@register
@dataclass
class FlexPrefill(BlockSparsePrefill):
    """FlexPrefill: per head, query-aware blocks or vertical-slash, each the fewest reaching attention mass ``gamma``.

    https://arxiv.org/abs/2502.20766 (FlexPrefill: A Context-Aware Sparse Attention Mechanism). From the exact causal
    attention ``Â`` of the last ``block_size`` queries: vertical scores (column means, summed per key block) and slash
    scores (diagonal means, summed per block of offsets). Per query head, ``D = sqrt(JS(softmax(mean(q̂) avgpool(K)ᵀ ·
    scale), vertical))``; ``D < tau`` makes a *query-aware* head: of ``softmax(avgpool(Q) avgpool(K)ᵀ · scale)``
    (causal per block row), flattened over the rows and normalised, the fewest blocks reaching ``gamma``, plus
    ``min_budget`` tokens of vertical and of slash blocks. Otherwise a *vertical-slash* head: the fewest key blocks
    and the fewest offset blocks each reaching ``gamma`` of their mass (first key block and most recent offsets first),
    at least ``min_budget`` tokens of each. A key block is computed for every query block at or after it; an offset
    block for every tile its diagonals cross.

    Differences from the reference (github.com/bytedance/FlexPrefill ``flex_prefill/ops/flex_prefill_attention.py``):
    it counts the tokens covering ``gamma`` and converts them to blocks with a hard-coded ``// 128``, then takes that
    many blocks by summed score (which need not reach ``gamma``); we count blocks directly. It maps an offset block
    ``s`` to the single tile ``(i, i - s)``, about half of the band; we compute every tile the band crosses. Its
    ``p·log(p/m)`` gives NaN on a zero probability and a NaN head silently becomes vertical-slash; we use ``0 · log 0 =
    0`` and raise on a non-finite distance.

    Chunked prefill: the estimate uses the last ``block_size`` queries *of the chunk* over every key so far, and a
    query-aware head normalises over the chunk's block rows. A last chunk (at least ``block_size`` queries, starting
    on a block boundary) therefore makes the unchunked choice per head and selects the unchunked rows for its
    vertical-slash heads; its query-aware heads select among the chunk's rows only.

    Parameters
    ----------
    gamma : float
        Attention mass each pattern must cover, in (0, 1]; 1 computes every causal tile. Default 0.9.
    tau : float
        Heads with ``D < tau`` are query-aware, in [0, 1] (``D <= sqrt(ln 2) ≈ 0.83``; 0: every head vertical-slash).
        Default 0.1.
    min_budget : int
        Tokens of vertical and of slash blocks every head keeps at least (rounded up to blocks). Default 512: the
        reference's 1024 is sized for 128k-token prompts (at 8k it alone keeps about half of the tiles).
    block_size : int
        Query / key block size of the estimate and the kernel; also the number of estimating queries. Default 128.
    min_length, backend
        See :class:`BlockSparsePrefill` (default ``min_length=1024``).
    """

    name = "flexprefill"
    gamma: float = 0.9
    tau: float = 0.1
    min_budget: int = 512
    block_size: int = 128

    def __post_init__(self):
        super().__post_init__()
        check_number("gamma", self.gamma, 0, 1, low_open=True, why="attention mass each pattern covers")
        check_number("tau", self.tau, 0, 1, why="Jensen-Shannon distance below which a head is query-aware")
        check_int("min_budget", self.min_budget, 0, why="tokens of vertical and of slash blocks kept at least")
        validate_blocks(self, block_size=self.block_size)

    def estimate(self, q: Tensor, k: Tensor, scale: float) -> FlexEstimate:
        """The estimate of ``q`` ``(B, H_q, Lq, D)``, the last ``Lq`` of the ``L`` positions of ``k``."""
        B, Hq, Lq, D = q.shape
        Hkv = k.shape[1]
        G, bs = Hq // Hkv, self.block_size
        nl = min(bs, Lq)
        est = Estimates(q, k, scale, bs, nl)
        p = est.last  # (B, Hq, nl, L)
        vertical = block_sum(p.mean(-2), bs)
        slash = block_sum(diagonal_sums(p) / nl, bs)
        kbar = est.kbar.to(p.dtype)  # (B, Hkv, n, D)
        qlast = q[:, :, Lq - nl :].to(p.dtype).mean(-2)  # (B, Hq, D)
        pooled = torch.softmax((qlast.view(B, Hkv, G, D) @ kbar.transpose(-1, -2)).view(B, Hq, -1) * scale, dim=-1)
        distance = js_distance(pooled, vertical)
        if not torch.isfinite(distance).all():
            raise RuntimeError(f"flexprefill: non-finite Jensen-Shannon distance per head {distance.tolist()} "
                               "(non-finite queries or keys?)")
        blocks = torch.softmax(est.pooled.to(p.dtype) * scale, dim=-1)  # causal rows of the query blocks held
        return FlexEstimate(vertical, slash, pooled, distance, blocks)

    def pattern(self, est: FlexEstimate, L: int) -> Tensor:
        """Tiles ``(B, H_q, nQB, nB)`` of the query blocks of ``est.blocks`` over ``L`` keys."""
        B, Hq, nq, n = est.blocks.shape
        bs, gamma = self.block_size, float(self.gamma)
        least = -(-self.min_budget // bs)
        every = torch.ones(B, Hq, n, dtype=torch.bool, device=est.blocks.device)
        first = torch.zeros_like(every)
        first[..., 0] = True  # first key block / most recent offset block ranked first

        def vertical_slash(threshold: float) -> Tensor:
            cols = cumulative_selection(est.vertical, every, threshold, first, least)
            offs = cumulative_selection(est.slash, every, threshold, first, least)
            diags = offs.repeat_interleave(bs, dim=-1)[..., :L]  # (B, Hq, L) offsets of the chosen blocks
            return slash_tiles(diags, L, bs)[:, :, n - nq :] | cols[:, :, None, :]

        causal = torch.arange(n, device=every.device)[None, :] <= torch.arange(n - nq, n, device=every.device)[:, None]
        flat = cumulative_selection(est.blocks.flatten(2), causal.flatten().expand(B, Hq, -1), gamma)
        query_aware = flat.view(B, Hq, nq, n) | vertical_slash(0.0)
        return torch.where((est.distance < self.tau)[..., None, None], query_aware, vertical_slash(gamma))

    def select(self, q, k, v, scale, layer_idx) -> BlockSelection:
        return BlockSelection(self.pattern(self.estimate(q, k, scale), k.shape[2]), self.block_size, self.block_size)


__all__ = ["FlexEstimate", "FlexPrefill", "block_sum", "js_distance"]
