"""Prefill methods (stage ``prefill``): how the prompt's attention is computed.

Block-sparse methods only write ``select(q, k, v, scale) -> BlockSelection`` (which tiles to compute); the base
runs the shared :func:`~kvaccel.kernels.block_sparse_attention.block_sparse_attention` kernel, handles padding,
the short-prompt dense fallback and the ``report()`` statistics (density, estimation vs attention time).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvaccel.checks import check_int
from kvaccel.config import Method
from kvaccel.kernels.backend import BACKENDS
from kvaccel.kernels.block_sparse_attention import (
    block_sparse_attention,
    causal_block_count,
    causal_block_mask,
    check_block_size,
    first_query_block,
)

if TYPE_CHECKING:
    from kvaccel.patches.attention import AttentionContext

Tensor = torch.Tensor

#: Clock of the estimate / attention split in ``report()`` (wall time). ``benchmarks/prefill_attention.py --clock cpu``
#: swaps in ``time.process_time`` to time single-threaded runs on a loaded machine.
clock = time.perf_counter


@dataclass
class PrefillMethod(Method):
    """Computes causal attention of a prompt; returns ``(B, q, H_q, D)`` like transformers' backends."""

    stage = "prefill"

    def attention(self, ctx: AttentionContext) -> torch.Tensor:
        raise NotImplementedError

    def extends(self, ctx: AttentionContext) -> bool:
        """Whether :meth:`attention` computes this later prompt chunk (phase ``"extend"``: queries = the last
        positions of the keys). When not, the chunk goes to the decode path (dense) and ``report()`` says so."""
        ctx.state.notes.add(f"prefill: {self.name} computes whole prompts only; later prompt chunks were dense")
        return False


@dataclass
class BlockSelection:
    """Which tiles a block-sparse prefill computes.

    ``mask`` ``(B, H_q | 1, ceil(L/block_m), ceil(L/block_n))`` bool; ``key_perm`` ``(B, H_kv, L)`` (original
    position of the key in each slot) with ``k``/``v`` already permuted the same way, or all three ``None``.
    """

    mask: Tensor
    block_m: int
    block_n: int
    key_perm: Tensor | None = None
    k: Tensor | None = None
    v: Tensor | None = None


def _sync(x: Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


@dataclass
class BlockSparsePrefill(PrefillMethod):
    """Base of the block-sparse prefill methods: a subclass writes ``select()``; the base runs the kernel.

    A prompt fed in chunks (transformers' ``prefill_chunk_size``, or a second forward over the cache) is computed
    chunk by chunk: the queries of a later chunk over every cached key, query blocks on the grid of the prompt's
    positions, so a chunk selects the rows the unchunked prompt selects wherever the selection of a row depends on
    that row and the keys only (each method's docstring says where it does not). A chunk is computed densely, with
    a note in ``report()``, when the cache no longer holds every token in order (evicted, channel-pruned, or a
    per-head layout).
    The diagonal tile of every query block is always computed (each query sees itself, so no row is empty).
    Prompts shorter than ``min_length`` tokens (so far, for a chunk) are prefilled densely, and ``report()`` says so
    in its notes. ``prefill_density`` is the computed tiles over the causal tiles of each sequence's real tokens,
    both counted in the method's :meth:`tile_shape` and summed over sequences, heads and the prompt's chunks: in a
    padded batch every sequence weighs by its own causal tiles, whether it ran sparse or fell back to dense (a query
    block split by a chunk boundary counts once per chunk).

    Parameters
    ----------
    min_length : int
        Prompts with fewer tokens use dense attention (the estimate would cost more than it saves).
    backend : str
        Kernel backend: ``"auto"`` (Triton on CUDA, PyTorch on CPU), ``"torch"`` or ``"triton"``.
    """

    min_length: int = 1024
    backend: str = "auto"

    def __post_init__(self):
        check_int("min_length", self.min_length, 0, why="tokens")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend ({self.backend!r}) must be one of {BACKENDS}")

    def select(self, q: Tensor, k: Tensor, v: Tensor, scale: float, layer_idx: int, *extra: Tensor) -> BlockSelection:
        """Return the tiles to compute for ``q`` ``(B, H_q, Lq, D)`` over ``k``/``v`` ``(B, H_kv, L, D)`` of layer
        ``layer_idx`` (per-layer thresholds or gates are indexed by it); ``extra`` are the :meth:`select_inputs` of
        this sequence. The queries are the last ``Lq`` of the ``L`` positions (``Lq < L``: a later prompt chunk), and
        the mask has the rows of the query blocks holding them (``causal_block_mask(L, ..., q_len=Lq)``)."""
        raise NotImplementedError

    def tile_shape(self) -> tuple[int, int]:
        """``(block_m, block_n)``: the query / key block sizes of the tiles this method selects, the unit of
        ``prefill_density`` (a dense fallback counts its causal tiles in the same unit)."""
        return self.block_size, self.block_size

    def select_inputs(self, ctx: AttentionContext) -> tuple[Tensor, ...]:
        """Extra per-token tensors ``(B, H, Lq | L, ...)`` ``select`` needs beside q/k/v (sliced per sequence like q
        or k, by their length); their cost counts as estimation time. None by default."""
        return ()

    def extend_blocker(self, ctx: AttentionContext) -> str | None:
        """Why this later prompt chunk cannot be computed sparsely (``None``: it can): the keys must be every token
        the layer has seen, in order, with one validity row for all heads."""
        layer = ctx.layer
        if layer is None:  # a cache that is not ours holds every token
            return None
        if layer.length != layer.seen:
            return f"the cache holds {layer.length} of the {layer.seen} tokens seen (evicted before this chunk)"
        if layer.narrow is not None:
            return "key channels were pruned before this chunk"
        if getattr(layer, "attend", None) is not None:
            return f"the cache layer ({type(layer).__name__}) has its own storage layout"
        if layer.valid is not None and layer.valid.shape[1] != 1:
            return "the cache holds per-head token sets"
        return None

    def extends(self, ctx: AttentionContext) -> bool:
        reason = self.extend_blocker(ctx)
        if reason is None:
            return True
        ctx.state.notes.add(f"prefill: {self.name} computed later prompt chunks densely: {reason}")
        stats = ctx.stats
        Lq, L = ctx.query.shape[2], ctx.key.shape[2]
        pad = ctx.pad[:, -L:] if ctx.pad is not None else None
        for b in range(ctx.query.shape[0]):
            keys = L if pad is None else int(pad[b].sum())
            queries = Lq if pad is None else int(pad[b, -Lq:].sum())
            if queries:
                self._count_dense(stats, keys, queries, ctx.query.shape[1])
        stats["prefill_density"] = stats.get("_tiles", 0) / max(1, stats.get("_causal_tiles", 0))
        return False

    def _count_dense(self, stats: dict, L: int, Lq: int, heads: int) -> None:
        """Add the causal tiles of ``Lq`` queries over ``L`` keys, all computed, to both tile counts."""
        n = causal_block_count(L, *self.tile_shape(), q_len=Lq) * heads
        stats["_tiles"] = stats.get("_tiles", 0) + n
        stats["_causal_tiles"] = stats.get("_causal_tiles", 0) + n

    def attention(self, ctx: AttentionContext) -> Tensor:
        from kvaccel.patches.attention import grouped_attention, per_sequence, sdpa_attention_forward

        stats = ctx.stats
        if ctx.phase == "prefill":  # a later chunk (phase "extend") adds to the prompt's statistics
            for key in ("prefill_estimate_s", "prefill_attention_s", "_tiles", "_causal_tiles"):
                stats[key] = 0
        extra: tuple[Tensor, ...] = ()
        if ctx.key.shape[2] >= self.min_length:  # else every sequence is dense
            t0 = clock()
            extra = self.select_inputs(ctx)
            stats["prefill_estimate_s"] += clock() - t0

        def run(q: Tensor, k: Tensor, v: Tensor, *ex: Tensor) -> Tensor:
            Lq, L = q.shape[2], k.shape[2]  # this sequence's real tokens (a padded batch is sliced per sequence)
            if L >= self.min_length:
                return self.sparse_attention(q, k, v, ctx.scaling, ctx.layer_idx, stats, *ex)
            ctx.state.notes.add(
                f"prefill: {self.name} computed prompts shorter than min_length={self.min_length} tokens densely"
            )
            self._count_dense(stats, L, Lq, q.shape[0] * q.shape[1])
            if Lq < L:  # the chunk's queries are the last positions (SDPA's causal mask would align them first)
                return grouped_attention(q, k, v, ctx.scaling)
            return sdpa_attention_forward(ctx.module, q, k, v, None, scaling=ctx.scaling, **ctx.kwargs)[0]

        out = per_sequence(ctx, run, extra)
        stats["prefill_density"] = stats["_tiles"] / max(1, stats["_causal_tiles"])
        return out

    def sparse_attention(
        self, q: Tensor, k: Tensor, v: Tensor, scale: float, layer_idx: int, stats: dict, *extra: Tensor
    ) -> Tensor:
        """Select tiles, run the kernel; adds estimate/attention seconds and tile counts to ``stats``.

        ``q`` ``(B, H_q, Lq, D)`` are the last ``Lq`` of the ``L`` positions of ``k``/``v``. Returns
        ``(B, Lq, H_q, Dv)``.
        """
        B, Hq, Lq, _ = q.shape
        L = k.shape[2]
        _sync(q)
        t0 = clock()
        sel = self.select(q, k, v, scale, layer_idx, *extra)
        causal = causal_block_mask(L, sel.block_m, sel.block_n, device=q.device, q_len=Lq)
        if sel.key_perm is None:
            diag = _diagonal_tiles(L, sel.block_m, sel.block_n, q.device, q_len=Lq)
            mask = (sel.mask | diag) & causal
        else:  # permuted keys: tiles are causal / own-position on original positions, not on slots
            own, reach = _permuted_tiles(sel.key_perm, L, sel.block_m, sel.block_n, Hq, q_len=Lq)
            mask = (sel.mask | own) & reach
        _sync(q)
        t1 = clock()
        ks, vs = (k, v) if sel.key_perm is None else (sel.k, sel.v)
        out = block_sparse_attention(
            q, ks, vs, mask, scale=scale, block_m=sel.block_m, block_n=sel.block_n, key_perm=sel.key_perm,
            backend=self.backend,
        )
        _sync(q)
        t2 = clock()
        stats["prefill_estimate_s"] += t1 - t0
        stats["prefill_attention_s"] += t2 - t1
        stats["_tiles"] += int(mask.expand(B, Hq, -1, -1).sum())
        stats["_causal_tiles"] += int(causal.sum()) * B * Hq
        return out.transpose(1, 2)


def _diagonal_tiles(L: int, block_m: int, block_n: int, device, q_len: int | None = None) -> Tensor:
    """``(nQB, nKB)`` bool: for each query block (those holding the last ``q_len`` positions, default all), the key
    blocks holding its own positions."""
    i0, nqb, nkb = first_query_block(L, q_len, block_m), -(-L // block_m), -(-L // block_n)
    q0 = torch.arange(i0, nqb, device=device) * block_m
    q1 = torch.clamp(q0 + block_m - 1, max=L - 1)
    kb = torch.arange(nkb, device=device)
    return (kb[None, :] >= (q0 // block_n)[:, None]) & (kb[None, :] <= (q1 // block_n)[:, None])


def _permuted_tiles(key_perm: Tensor, L: int, block_m: int, block_n: int, Hq: int,
                    q_len: int | None = None) -> tuple[Tensor, Tensor]:
    """Tile masks ``(B, H_q, nQB, nKB)`` for keys stored in permuted slots (``key_perm`` ``(B, H_kv, L)``), for the
    query blocks holding the last ``q_len`` positions (default all).

    ``own``: the slot blocks holding each query block's own positions (so every query sees itself);
    ``reach``: slot blocks holding at least one key at an original position <= the block's last query. With a
    permutation inside segments, a slot block to the right of the diagonal can hold earlier keys, so the slot-order
    causal mask would wrongly drop it.
    """
    B, Hkv, _ = key_perm.shape
    i0 = first_query_block(L, q_len, block_m)
    nqb, nkb = -(-L // block_m) - i0, -(-L // block_n)
    perm = key_perm.long()
    pad = nkb * block_n - L
    kmin = torch.nn.functional.pad(perm, (0, pad), value=L).view(B, Hkv, nkb, block_n).amin(-1)  # (B, Hkv, nKB)
    q1 = torch.clamp(torch.arange(i0, i0 + nqb, device=perm.device) * block_m + block_m - 1, max=L - 1)
    reach = kmin[:, :, None, :] <= q1[None, None, :, None]
    slot_of = torch.empty_like(perm).scatter_(-1, perm, torch.arange(L, device=perm.device).expand_as(perm))
    own = torch.zeros(B, Hkv, nqb * nkb, dtype=torch.bool, device=perm.device)
    pos = torch.arange(i0 * block_m, L, device=perm.device)  # the positions of the query blocks
    own.scatter_(-1, (pos // block_m - i0) * nkb + slot_of[..., i0 * block_m :] // block_n, True)
    G = Hq // Hkv
    own = own.view(B, Hkv, 1, nqb, nkb).expand(B, Hkv, G, nqb, nkb).reshape(B, Hq, nqb, nkb)
    reach = reach[:, :, None].expand(B, Hkv, G, nqb, nkb).reshape(B, Hq, nqb, nkb)
    return own, reach


def validate_blocks(method: Method, **blocks: int) -> None:
    """``ValueError`` naming the field when a block size is not one the kernel tiles by."""
    for name, value in blocks.items():
        try:
            check_block_size(name, value)
        except ValueError as e:
            raise ValueError(f"{method.name}: {e}") from None
