"""Vertical-slash (MInference): per head, the key columns and diagonals the last queries attend to most."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvaccel.checks import check_int
from kvaccel.config import register, resolve_budget, validate_budget
from kvaccel.kernels.block_sparse_attention import first_query_block, num_blocks

from .base import BlockSelection, BlockSparsePrefill, validate_blocks

Tensor = torch.Tensor

# MInference's vertical_and_slash_kernel (minference/modules/minference_forward.py): sizes are clamped to
# min(L, max(size, 30)) / min(L, max(size, 50)); the first 30 columns and the 100 most recent diagonals are
# always kept (their scores are set to +inf before the top-k).
_MIN_VERTICAL, _MIN_SLASH = 30, 50
_FORCED_COLUMNS, _FORCED_DIAGONALS = 30, 100
#: fp32 elements of one chunk of last-query attention rows (bounds the estimate's memory: 64 MB).
_CHUNK_ELEMS = 1 << 24


def last_query_attention(q: Tensor, k: Tensor, scale: float, last_q: int) -> Tensor:
    """Exact causal attention probabilities of the last ``last_q`` queries: ``(B, H_q, last_q, L)`` float32 (float64
    for float64 inputs).

    ``q`` ``(B, H_q, Lq, D)`` are the last ``Lq`` of the ``L`` positions of ``k`` (``Lq >= last_q``). GQA without
    repeating K: the ``G`` query heads of a kv head are stacked along rows.
    """
    B, Hq, Lq, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    G = Hq // Hkv
    ar = torch.arange(last_q, device=q.device)
    above = ar[None, :] > ar[:, None]  # (last_q, last_q): keys after the query among the last ones
    dt = torch.promote_types(q.dtype, torch.float32)
    qg = q[:, :, Lq - last_q :].reshape(B, Hkv, G * last_q, D).to(dt)
    step = max(1, _CHUNK_ELEMS // max(1, B * G * last_q * L))
    out = []
    for h0 in range(0, Hkv, step):  # chunks of kv heads, not a loop per head (one chunk at 8k)
        s = (qg[:, h0 : h0 + step] @ k[:, h0 : h0 + step].to(dt).transpose(-1, -2)).mul_(scale)
        s = s.view(B, -1, G, last_q, L)
        s[..., L - last_q :].masked_fill_(above, float("-inf"))
        out.append(torch.softmax(s, dim=-1).view(B, -1, last_q, L))
    return torch.cat(out, dim=1) if len(out) > 1 else out[0]


def diagonal_sums(p: Tensor) -> Tensor:
    """``p`` ``(..., Q, L)`` attention of the last ``Q`` positions -> ``(..., L)``: sum along offset ``d = i - j``.

    Offset 0 is the main diagonal (each query's own key); offsets above the main diagonal are not summed.
    """
    Q, L = p.shape[-2:]
    pos = torch.arange(L - Q, L, device=p.device)
    j = pos[:, None] - torch.arange(L, device=p.device)[None, :]  # (Q, L) key index of offset d in row r
    vals = p.gather(-1, j.clamp(min=0).expand(*p.shape[:-2], Q, L))
    return vals.masked_fill(j < 0, 0.0).sum(-2)


def slash_tiles(chosen: Tensor, L: int, block: int) -> Tensor:
    """``chosen`` ``(..., L)`` bool over diagonal offsets -> ``(..., nB, nB)`` bool: tiles any chosen diagonal crosses.

    Tile ``(i, j)`` holds offsets ``d`` in ``[q0_i - k1_j, q1_i - k0_j]``; a prefix count over offsets answers
    "is any chosen offset in that range" for all tiles at once.
    """
    n = num_blocks(L, block)
    first = torch.arange(n, device=chosen.device) * block
    last = torch.clamp(first + block - 1, max=L - 1)
    lo = torch.clamp(first[:, None] - last[None, :], min=0)  # (n, n)
    hi = torch.clamp(last[:, None] - first[None, :], max=L - 1)
    count = torch.nn.functional.pad(chosen.to(torch.int32).cumsum(-1), (1, 0))  # count[d] = #chosen offsets < d
    idx_hi = (hi + 1).clamp(min=0).flatten()
    idx_lo = lo.clamp(max=L).flatten()
    hits = count[..., idx_hi] - count[..., idx_lo]
    return ((hits > 0) & (hi >= lo).flatten()).view(*chosen.shape[:-1], n, n)


@register
@dataclass
class VerticalSlash(BlockSparsePrefill):
    """Vertical-slash: keep the key columns and diagonals the last 64 queries attend to most (per head).

    https://arxiv.org/abs/2407.02490 (MInference). From the exact causal attention ``A`` of the last ``last_q``
    queries: vertical score ``v_j = Σ_r A[r, j]``, slash score ``s_d = Σ_r A[r, i_r - d]``; keep the top
    ``vertical_size`` columns (the first 30 always) and top ``slash_size`` diagonals (the 100 most recent always),
    each size clamped to ``min(L, max(size, 30 | 50))`` as MInference does. One pattern for every head; MInference
    instead assigns each head a searched pattern and sizes offline.

    Block approximation: MInference's kernel gathers vertical columns at token granularity (slashes it already
    widens to 64-key ranges). Ours is block-sparse, so a column selects its whole key block for every query block at
    or after it, and a diagonal selects, for each query block, the key blocks it crosses. The tiles computed are a
    superset of MInference's pattern (exact attention inside them): fidelity is at least MInference's, density is
    higher (measured in ``report(model)['prefill_density']``). On SmolLM2-135M (4k-token prose, 9 of 30 layers) the
    defaults compute 35% of the causal tiles (22-61% per layer) at output relative error 0.087 (a_shape: 48%, 0.078).

    Chunked prefill: the pattern of a chunk comes from the last ``last_q`` queries *of that chunk* over every key so
    far, sized for the prompt so far (MInference estimates from the last queries of each forward). The last chunk
    therefore selects exactly what the unchunked prompt selects for its rows; an earlier chunk selects from its own
    last queries, which have not seen the rest of the prompt.

    Parameters
    ----------
    vertical_size : int or float
        Columns kept: an int is a count, a float in (0, 1] a fraction of the prompt. MInference's Llama-3-8B-262k
        config gives most heads ``1000`` columns and ``6096`` diagonals — sized for 128k-token prompts, i.e.
        0.8% / 4.7% of 131072. Default ``0.02`` (82 columns at 4k, 164 at 8k): columns cost a whole key block each.
    slash_size : int or float
        Diagonals kept, same convention. Default ``0.05`` (205 at 4k, 410 at 8k, ~MInference's 4.7% fraction).
    last_q : int
        Queries whose attention is estimated exactly (MInference: 64).
    block_size : int
        Query and key block size of the kernel (tokens). Default 64 (MInference's kernel block).
    min_length, backend
        See :class:`BlockSparsePrefill`. MInference applies the pattern to any prompt longer than one token; we
        keep the base default (1024): below it the forced columns and recent diagonals already cover most tiles.
    """

    name = "vertical_slash"
    vertical_size: int | float = 0.02
    slash_size: int | float = 0.05
    last_q: int = 64
    block_size: int = 64

    def __post_init__(self):
        super().__post_init__()
        validate_budget(self.vertical_size, "vertical_size")
        validate_budget(self.slash_size, "slash_size")
        check_int("last_q", self.last_q, 1, why="queries whose attention is estimated")
        validate_blocks(self, block_size=self.block_size)

    def sizes(self, L: int) -> tuple[int, int]:
        """Columns and diagonals kept for an ``L``-token prompt (MInference's clamps applied)."""
        vs = min(L, max(resolve_budget(self.vertical_size, L), _MIN_VERTICAL))
        ss = min(L, max(resolve_budget(self.slash_size, L), _MIN_SLASH))
        return vs, ss

    def select(self, q, k, v, scale, layer_idx) -> BlockSelection:
        p = last_query_attention(q, k, scale, min(self.last_q, q.shape[2]))  # (B, Hq, last_q, L) fp32
        i0 = first_query_block(k.shape[2], q.shape[2], self.block_size)  # a chunk's first query block
        return BlockSelection(self.pattern(p)[:, :, i0:], self.block_size, self.block_size)

    def pattern(self, p: Tensor) -> Tensor:
        """Tiles ``(B, H_q, nB, nB)`` from the last queries' attention ``p`` ``(B, H_q, Q, L)``."""
        B, Hq, Q, L = p.shape
        bs = self.block_size
        vs, ss = self.sizes(L)
        big = float(Q + 1)  # above any sum of Q probabilities: forced entries rank first, in order
        vertical = p.sum(-2)
        nf = min(_FORCED_COLUMNS, L)
        vertical[..., :nf] = big + torch.arange(nf, 0, -1, device=p.device, dtype=vertical.dtype)
        slash = diagonal_sums(p)
        nd = min(_FORCED_DIAGONALS, L)
        slash[..., :nd] = big + torch.arange(nd, 0, -1, device=p.device, dtype=slash.dtype)
        cols = vertical.topk(vs, dim=-1).indices
        vmask = torch.zeros(B, Hq, num_blocks(L, bs), dtype=torch.bool, device=p.device)
        vmask.scatter_(-1, cols // bs, True)
        diag = torch.zeros(B, Hq, L, dtype=torch.bool, device=p.device)
        diag.scatter_(-1, slash.topk(ss, dim=-1).indices, True)
        return slash_tiles(diag, L, bs) | vmask[:, :, None, :]
