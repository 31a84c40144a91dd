"""block_sparse_attention: causal prefill attention computed only on selected (query block, key block) tiles.

The public op checks inputs and chooses the backend (``"auto"``: Triton on CUDA, PyTorch on CPU); the
``@triton.jit`` code lives in :mod:`kvaccel.kernels.triton.block_sparse_attention`. The float64
:func:`block_sparse_attention_reference` expands the block mask to tokens and is what the tests compare against.

Block layout: queries are cut in blocks of ``block_m`` rows, keys in blocks of ``block_n`` slots (the last
block of each may be ragged). ``block_mask[b, h, i, j]`` says whether query block ``i`` of query head ``h``
reads key block ``j``. Inside a selected tile the mask is token-level causal on *original* positions: with
``key_perm`` (PBS-style permutation of keys within segments) slot ``j`` of ``k``/``v`` holds the key at original
position ``key_perm[b, hkv, j]``, and a query at position ``i`` sees it iff ``key_perm[b, hkv, j] <= i``.

PyTorch path (CPU), design chosen by measurement (``benchmarks/block_sparse_kernel.py``): :func:`plan_block_sparse`
classifies the selected tiles per key block's original positions into *full* (every valid key at or before the
query block's first row: no causal mask), *partial* (straddling the diagonal, or permuted keys) and empty (dropped);
the ``G`` query heads of a kv head are stacked as ``G * block_m`` query rows when they select the same tiles (else one
unit per query head, K/V still not repeated). Work items (unit, query block) sorted by tile count are processed in
chunks of at most ``GATHER_BYTES`` of gathered K/V: the selected key blocks are gathered (``index_select`` into
reused scratch buffers) and attended by PyTorch's fused CPU flash kernel
(``aten._scaled_dot_product_flash_attention_for_cpu``, which also returns the lse), once over the full tiles with a
per-key bias (invalid keys, list padding) and once over the partial tiles with a per-row mask, merged by
``lse = logaddexp(lse_f, lse_p)``. Units selecting every causal tile (no ``key_perm``/``key_valid``) are one causal
fused call, so an all-blocks mask costs what SDPA costs.

Measured at L=8192 on the default model's shapes (B=1, H_q=9, H_kv=3, D=64, fp32), median of 3 interleaved runs on
this 2-core machine while ~5 other jobs ran (load average 10-12), so only the ratios mean anything:

===============  =======  =====================  =================  ====================
mask             density  gather + flash (here)  FlexAttention      gather + bmm/softmax
===============  =======  =====================  =================  ====================
a_shape          0.25     2.96x (1 thread)       2.96x (1 thread)   1.41x (1 thread)
vertical_slash   0.15     3.57x                  4.33x              1.49x
random 10%       0.11     4.66x                  5.58x              0.95x
all blocks       1.00     1.01x                  0.65x              (gathers everything)
===============  =======  =====================  =================  ====================

(speed-up over ``F.scaled_dot_product_attention(is_causal=True)``; the bmm column is from a separate run; a later
interleaved run of this path alone with 32 MB chunks: random 10% 5.2x, vertical_slash 3.6x.)
FlexAttention (``torch.compile(flex_attention)``, ``BlockMask.from_kv_blocks``) is up to 1.2x faster on per-head
or random masks at 1 thread, and clearly faster at 2 threads on the loaded machine (fewer, bigger ops:
vertical_slash 2.9x vs 1.2x), but it is not used: on CPU it refuses ``return_lse`` (inductor: "return_lse is not
supported yet"), its first compile took 25-30 s, every new prompt length recompiles (``dynamic=False``), and it is
0.65x SDPA on all-blocks masks. A plain gather + bmm + softmax is 2-5x slower than the fused kernel.

Threads: the chunks are independent, so with ``w = torch.get_num_threads() > 1`` they run on ``w`` Python worker
threads (:func:`run_parallel`), each running its ops single-threaded, instead of every op splitting over ``w``
OpenMP threads. The OpenMP version ended each of the ~30 ops per chunk in a barrier that waits for the slowest
thread, so on this shared 2-core machine one descheduled thread stalled all: at 2 threads it was ~3x *slower* than
SDPA on a SALE mask of density 0.47 (SDPA itself is one op). Measured on layer 17's real Q/K/V at 8k, load average
6-7, wall time interleaved with SDPA at 2 threads, speed-up over SDPA: SALE mask 0.29-0.38 before, 0.89-1.16 with
workers; A-shape-like 64x64 mask (density 0.45) 0.85-1.0 before, 1.3-1.75 with workers (at 1 thread: 1.1-1.4 and
1.5-1.8). On a loaded machine 2 threads cannot beat 1 by much; the point is that they no longer lose.
Per-call cost at 1 thread (CPU time): the fused kernel costs ~4.3 ns per (query, key) pair on 64-row items (it
splits them in 32-row tiles) vs ~3.6 ns stacked to 192 rows and ~3.4 ns for SDPA, and the gathers are ~13% of
the op, so SALE's per-head masks of 64x32 tiles cost ~1.5x SDPA per computed tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kvaccel.checks import is_int

from . import cpu_ops
from .backend import resolve_backend
from .cpu_ops import cpu_workers, run_parallel

__all__ = [
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "block_sparse_csr",
    "causal_block_count",
    "num_blocks",
    "plan_block_sparse",
    "run_block_sparse",
]

#: Block sizes the kernels accept: the Triton kernel tiles by them, so they must be powers of two >= 16.
ALLOWED_BLOCKS = (16, 32, 64, 128, 256)


def num_blocks(length: int, block: int) -> int:
    return -(-length // block)


def check_block_size(name: str, block: int) -> None:
    if not is_int(block) or block not in ALLOWED_BLOCKS:
        raise ValueError(
            f"{name} ({block!r}) must be one of {ALLOWED_BLOCKS}: the kernel tiles queries and keys by it "
            "(a power of two >= 16)"
        )


def first_query_block(L: int, q_len: int | None, block_m: int) -> int:
    """Index of the query block (of the ``L``-position grid) holding the first of the last ``q_len`` positions."""
    return 0 if q_len is None else (L - q_len) // block_m


def causal_block_mask(L: int, block_m: int, block_n: int, device=None, q_len: int | None = None) -> Tensor:
    """``(nQB, nKB)`` bool: tiles with at least one (query, key) pair on or below the causal diagonal.

    With ``q_len``, only the query blocks holding the last ``q_len`` of the ``L`` positions (a later prompt chunk
    over the cache): rows from :func:`first_query_block` on.
    """
    i0 = first_query_block(L, q_len, block_m)
    qb = torch.arange(i0, num_blocks(L, block_m), device=device)
    qb_last = torch.clamp(qb * block_m + block_m - 1, max=L - 1)
    kb_first = torch.arange(num_blocks(L, block_n), device=device) * block_n
    return kb_first[None, :] <= qb_last[:, None]


def causal_block_count(L: int, block_m: int, block_n: int, q_len: int | None = None) -> int:
    """Number of causal tiles of an ``L``-token prompt, or of its last ``q_len`` positions' query blocks (the
    denominator of ``prefill_density``)."""
    return int(causal_block_mask(L, block_m, block_n, q_len=q_len).sum())


def _check_inputs(q, k, v, block_mask, block_m, block_n, key_perm, key_valid) -> None:
    check_block_size("block_m", block_m)
    check_block_size("block_n", block_n)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, H, L, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, Hq, Lq, D = q.shape
    Bk, Hkv, L, Dk = k.shape
    if (Bk, Dk) != (B, D) or L < Lq or v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"k {tuple(k.shape)} and v {tuple(v.shape)} must be (B={B}, H_kv, L>={Lq}, D={D}|Dv) for q "
            f"{tuple(q.shape)} (the queries are the last {Lq} of the L key positions)"
        )
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device == block_mask.device):
        raise ValueError(
            f"q, k, v and block_mask must share a device and q, k, v a dtype; got q {q.dtype} {q.device}, "
            f"k {k.dtype} {k.device}, v {v.dtype} {v.device}, block_mask on {block_mask.device}"
        )
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    nqb, nkb = num_blocks(L, block_m) - first_query_block(L, Lq, block_m), num_blocks(L, block_n)
    if (
        block_mask.dtype != torch.bool
        or block_mask.dim() != 4
        or block_mask.shape[0] != B
        or block_mask.shape[1] not in (1, Hq)
        or tuple(block_mask.shape[2:]) != (nqb, nkb)
    ):
        raise ValueError(
            f"block_mask must be bool ({B}, {Hq} or 1, {nqb}, {nkb}) for {Lq} queries over L={L} keys, "
            f"block_m={block_m}, block_n={block_n}; got {block_mask.dtype} {tuple(block_mask.shape)}"
        )
    if key_perm is not None and (key_perm.shape != (B, Hkv, L) or key_perm.dtype not in (torch.int32, torch.int64)):
        raise ValueError(
            f"key_perm must be int32/int64 ({B}, {Hkv}, {L}), got {key_perm.dtype} {tuple(key_perm.shape)}"
        )
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
        ``(B, H_q, Lq, D)`` queries, post-RoPE, in original order: the last ``Lq <= L`` positions of the ``L`` keys
        (``Lq < L``: a later prompt chunk over the cached keys, query ``i`` at position ``L - Lq + i``).
    k, v : Tensor
        ``(B, H_kv, L, D)`` / ``(B, H_kv, L, Dv)``, slot order (permuted when ``key_perm`` is given). GQA: query
        head ``h`` reads kv head ``h // (H_q // H_kv)``; K/V are never repeated.
    block_mask : Tensor
        ``(B, H_q | 1, nQB, ceil(L/block_m))`` bool, query blocks on the grid of the ``L`` positions: ``nQB =
        ceil(L/block_m) - (L - Lq) // block_m``, the blocks holding the queries (:func:`causal_block_mask` with
        ``q_len``). Tiles above the diagonal are ignored.
    scale : float
        Logit scale (``1/sqrt(D)`` for the models here).
    block_m, block_n : int
        Query / key block sizes, powers of two in ``ALLOWED_BLOCKS``.
    key_perm : Tensor, optional
        ``(B, H_kv, L)`` int: original position of the key stored in each slot. ``None`` = identity.
    key_valid : Tensor, optional
        ``(B, L)`` bool over original positions; ``False`` keys (padding) are never attended.
    return_lse : bool
        Also return the natural-log log-sum-exp ``(B, H_q, Lq)`` float32 (``-inf`` for rows that see nothing).
    backend : str
        ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns
    -------
    ``out`` ``(B, H_q, Lq, Dv)`` in ``q.dtype`` (zeros for rows that see no key), and ``lse`` if asked.
    """
    _check_inputs(q, k, v, block_mask, block_m, block_n, key_perm, key_valid)
    if resolve_backend(backend, q) == "triton":
        out, lse = _block_sparse_attention_triton(q, k, v, block_mask, scale, block_m, block_n, key_perm, key_valid)
    else:
        out, lse = _block_sparse_attention_torch(q, k, v, block_mask, scale, block_m, block_n, key_perm, key_valid)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------------------------------------------
# PyTorch path: gather the selected key blocks, fused CPU flash attention over them
# --------------------------------------------------------------------------------------------------------------
#: Bytes of gathered K and V per chunk of work items (bounds the memory of the PyTorch path).
GATHER_BYTES = 64 << 20


@dataclass
class TilePlan:
    """Work list of the PyTorch path, built once per (mask, key_perm, key_valid) by :func:`plan_block_sparse`.

    A *unit* is one ``(batch, head)`` row of the mask: a kv head (its ``G`` query heads stacked as ``G * block_m``
    query rows) when the ``G`` heads of every kv head select the same tiles, else a query head. An *item* is one
    (unit, query block). Its selected tiles are split into *full* tiles (every valid key is at or before the
    block's first query: only a per-key bias) and *partial* tiles (straddling the diagonal, or permuted keys:
    a per-row causal mask). Tiles with no key visible to the block are dropped. Key blocks are numbered flat
    over ``(B, H_kv, n_k_blocks + 1)``; block ``n_k_blocks`` of each head is an all-invalid dummy that pads
    the tile lists. Items are sorted by tile count so that a chunk pads its lists to a near-equal length.
    Without ``key_perm`` and ``key_valid``, a unit that selects every causal tile is *dense*: it runs as one
    causal fused call (no gather) and its items are left out of ``order``.
    """

    L: int
    block_m: int
    block_n: int
    stacked: bool  # units are kv heads with their G query heads stacked
    units: int  # per batch: H_kv when stacked else H_q
    n_q_blocks: int
    n_k_blocks: int
    order: Tensor  # (n_busy,) ids of the items with at least one tile, most tiles first
    full_idx: Tensor  # (n_items, max_full) flat key-block ids: selected ones ascending, then the dummy
    full_cnt: Tensor  # (n_items,)
    part_idx: Tensor  # (n_items, max_part)
    part_cnt: Tensor  # (n_items,)
    slot_pos: Tensor  # (B * H_kv * (n_k_blocks + 1), block_n) original position per slot; invalid = L
    kb_min: Tensor  # (B * H_kv * (n_k_blocks + 1),) smallest valid position of each key block (L if none)
    dense_units: Tensor  # (n_dense,) flat unit ids (b * units + u) computed as plain causal attention
    kv_of_unit: Tensor  # (B * units,) flat kv head (b * H_kv + h) each unit reads
    q_len: int = -1  # queries: the last q_len of the L positions (-1: all L)


def _slot_positions(B: int, Hkv: int, L: int, key_perm: Tensor | None, key_valid: Tensor | None, dev) -> Tensor:
    """``(B, H_kv, L)`` int64 original position of every key slot; invalid keys get ``L``, which no query reaches."""
    pos = torch.arange(L, device=dev).expand(B, Hkv, L) if key_perm is None else key_perm.long()
    if key_valid is not None:
        pos = torch.where(torch.gather(key_valid[:, None, :].expand(B, Hkv, L), 2, pos), pos, L)
    return pos


def _tile_classes(slot_pos: Tensor, L: int, block_m: int, q_len: int) -> tuple[Tensor, Tensor]:
    """Tile classes ``nonempty``, ``full`` ``(B, H_kv, nqb, nkb)`` from ``slot_pos`` ``(B, H_kv, nkb, block_n)``, for
    the query blocks holding the last ``q_len`` positions.

    A tile is non-empty when some valid key in it is at or before the block's last query, full when every valid
    key is at or before its first query (then no query of the block needs a causal mask).
    """
    i0 = first_query_block(L, q_len, block_m)
    kb_min = slot_pos.amin(-1)
    kb_max = torch.where(slot_pos < L, slot_pos, -1).amax(-1)  # largest valid position (-1 if none)
    q_first = torch.arange(i0, num_blocks(L, block_m), device=slot_pos.device) * block_m
    q_last = torch.clamp(q_first + block_m - 1, max=L - 1)
    nonempty = kb_min[:, :, None, :] <= q_last[:, None]
    return nonempty, nonempty & (kb_max[:, :, None, :] <= q_first[:, None])


def plan_block_sparse(
    block_mask: Tensor,
    L: int,
    num_heads: int,
    num_kv_heads: int,
    *,
    block_m: int = 64,
    block_n: int = 64,
    key_perm: Tensor | None = None,
    key_valid: Tensor | None = None,
    fuse_dense: bool = True,
    q_len: int | None = None,
) -> TilePlan:
    """Classify the selected tiles (empty / full / partial) and build the sorted work list of the PyTorch path.

    ``L`` keys; the queries are the last ``q_len`` positions (default all ``L``), ``block_mask`` on their blocks."""
    B = block_mask.shape[0]
    dev = block_mask.device
    Hkv, G = num_kv_heads, num_heads // num_kv_heads
    q_len = L if q_len is None else q_len
    nqb, nkb = num_blocks(L, block_m) - first_query_block(L, q_len, block_m), num_blocks(L, block_n)
    pos = _slot_positions(B, Hkv, L, key_perm, key_valid, dev)
    slot_pos = F.pad(pos, (0, (nkb + 1) * block_n - L), value=L).view(B, Hkv, nkb + 1, block_n)
    kb_min = slot_pos.amin(-1)  # (B, Hkv, nkb + 1)
    nonempty, full = _tile_classes(slot_pos[:, :, :nkb], L, block_m, q_len)

    mask = block_mask
    stacked = mask.shape[1] == 1 or G == 1
    if not stacked:  # the G query heads of a kv head may still all select the same tiles
        grouped = mask.reshape(B, Hkv, G, nqb, nkb)
        stacked = bool((grouped == grouped[:, :, :1]).all())
        mask = grouped[:, :, 0] if stacked else mask
    units = Hkv if stacked else num_heads
    if not stacked:  # per query head: the tile classes of its kv head
        nonempty, full = nonempty.repeat_interleave(G, 1), full.repeat_interleave(G, 1)
    sel = mask.expand(B, units, nqb, nkb) & nonempty
    if fuse_dense and key_perm is None and key_valid is None:
        dense = (sel | ~nonempty).flatten(2).all(-1).flatten()
    else:
        dense = torch.zeros(B * units, dtype=torch.bool, device=dev)
    # flat id of block 0 of each item's kv head
    kv_of_unit = torch.arange(B * units, device=dev) // units * Hkv + torch.arange(units, device=dev).repeat(B) // (
        units // Hkv
    )
    base = (kv_of_unit * (nkb + 1)).repeat_interleave(nqb)[:, None]  # (n_items, 1)

    def tile_list(x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.reshape(-1, nkb)
        cnt = x.sum(-1)
        width = int(cnt.max()) if cnt.numel() else 0
        # selected block ids first, ascending (stable sort of the 0/1 flags, descending); then the dummy block
        idx = torch.sort(x.to(torch.int8), dim=-1, descending=True, stable=True).indices[:, :width]
        idx = torch.where(torch.arange(width, device=dev) < cnt[:, None], idx, nkb)
        return base + idx, cnt

    full_idx, full_cnt = tile_list(sel & full)
    part_idx, part_cnt = tile_list(sel & ~full)
    total = (full_cnt + part_cnt).masked_fill(dense.repeat_interleave(nqb), 0)
    order = torch.sort(total, descending=True, stable=True).indices
    order = order[: int((total > 0).sum())]  # items with no tile keep out 0 / lse -inf
    return TilePlan(
        L, block_m, block_n, stacked, units, nqb, nkb, order, full_idx, full_cnt, part_idx, part_cnt,
        slot_pos.reshape(-1, block_n), kb_min.reshape(-1), dense.nonzero().flatten(), kv_of_unit, q_len,
    )


def run_block_sparse(
    plan: TilePlan, q: Tensor, k: Tensor, v: Tensor, *, scale: float, return_lse: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """Run the PyTorch path with a :func:`plan_block_sparse` plan (plan once, run many: e.g. threshold calibration
    over the same tiles). Same result as :func:`block_sparse_attention` with the mask, ``key_perm`` and ``key_valid``
    the plan was built from; ``k``/``v`` in the same slot order."""
    B, Hq, Lq, _ = q.shape
    L = plan.L
    Hkv = k.shape[1] if k.dim() == 4 else -1
    units_ok = plan.units == (Hkv if plan.stacked else Hq) and plan.kv_of_unit.numel() == B * plan.units
    if q.dim() != 4 or Lq != plan.q_len or not units_ok or k.shape[:3] != (B, Hkv, L) or v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match the plan ({plan.q_len} queries "
            f"over L={L} keys, {plan.units} {'kv' if plan.stacked else 'query'} heads per batch row, "
            f"{plan.kv_of_unit.numel()} in all)"
        )
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device == plan.order.device):
        raise ValueError(f"q, k, v and the plan must share a device and q, k, v a dtype, got {q.dtype} on {q.device}")
    out, lse = _block_sparse_attention_torch(q, k, v, None, scale, plan.block_m, plan.block_n, None, None, plan=plan)
    return (out, lse) if return_lse else out


def _block_sparse_attention_torch(q, k, v, block_mask, scale, block_m, block_n, key_perm, key_valid, plan=None):
    """Gather + fused attention: per chunk of work items, gather the selected K/V blocks and run the CPU flash kernel.

    Full tiles need only a per-key bias (invalid keys, padding entries); partial tiles a per-row causal mask on
    original positions. The two parts run as two fused calls merged by log-sum-exp:
    ``lse = logaddexp(lse_f, lse_p)``, ``o = e^(lse_f - lse) o_f + e^(lse_p - lse) o_p``.
    """
    B, Hq, Lq, D = q.shape
    Hkv, L, Dv_out = k.shape[1], k.shape[2], v.shape[-1]
    G = Hq // Hkv
    if plan is None:
        plan = plan_block_sparse(
            block_mask, L, Hq, Hkv, block_m=block_m, block_n=block_n, key_perm=key_perm, key_valid=key_valid,
            fuse_dense=q.device.type == "cpu", q_len=Lq,  # elsewhere the matmul fallback would hold (L, L) logits
        )
    nqb, nkb, U = plan.n_q_blocks, plan.n_k_blocks, plan.units
    Gs = G if plan.stacked else 1  # query heads stacked per unit
    R = Gs * block_m  # query rows per item
    dev, dt = q.device, q.dtype
    neg_inf = float("-inf")
    i0 = first_query_block(L, Lq, block_m)
    shift = L - Lq - i0 * block_m  # rows of the first query block before the first query (a chunk's start)
    if plan.dense_units.numel() == B * U and D == Dv_out:  # every unit selects every causal tile: no gather
        ku, vu = k.reshape(B * Hkv, 1, L, D), v.reshape(B * Hkv, 1, L, D)
        if not plan.stacked:
            ku, vu = ku.index_select(0, plan.kv_of_unit), vu.index_select(0, plan.kv_of_unit)
        out, lse = _causal_flash(q.reshape(B * U, Gs, Lq, D), ku, vu, scale)
        return out.reshape(B, Hq, Lq, D), lse.reshape(B, Hq, Lq)
    # The fused kernel needs one head size: zero channels leave q.k unchanged and add output columns we drop.
    D = max(D, Dv_out)

    # Queries as items (B * U * nqb, R, D), rows = (stacked head, row in block); K/V as flat blocks with one dummy
    # block per head: (B * H_kv * (nkb + 1), block_n, D).
    qp = F.pad(q, (0, D - q.shape[-1], shift, nqb * block_m - shift - Lq))
    qi = qp.view(B, U, Gs, nqb, block_m, D).transpose(2, 3).reshape(-1, R, D)
    kb = F.pad(k, (0, D - k.shape[-1], 0, (nkb + 1) * block_n - L)).view(-1, block_n, D)
    vb = F.pad(v, (0, D - Dv_out, 0, (nkb + 1) * block_n - L)).view(-1, block_n, D)
    key_bias = torch.zeros(plan.slot_pos.shape, dtype=dt, device=dev).masked_fill_(plan.slot_pos >= L, neg_inf)
    n_items = qi.shape[0]
    q_first = (i0 + torch.arange(n_items, device=dev) % nqb) * block_m
    row_pos = q_first[:, None] + torch.arange(block_m, device=dev).repeat(Gs)  # (n_items, R)

    out = torch.zeros(n_items, R, D, dtype=dt, device=dev)
    lse = torch.full((n_items, R), neg_inf, dtype=torch.float32, device=dev)
    max_full, max_part = plan.full_idx.shape[1], plan.part_idx.shape[1]
    workers = cpu_workers(dev)
    chunk = max(1, GATHER_BYTES // workers // max(1, (max_full + max_part) * block_n * 2 * D * q.element_size()))
    if workers > 1:  # enough chunks to balance the workers (items are sorted by tile count, largest first)
        chunk = min(chunk, -(-plan.order.numel() // (4 * workers)))
    chunk = max(1, min(chunk, plan.order.numel()))
    width = max(max_full, max_part) * block_n
    ws_parts = [
        (chunk * R * D, dt),
        (chunk * width * D, dt),
        (chunk * width * D, dt),
        (chunk * max(max_full * block_n, R * max_part * block_n), dt),
        (chunk * max_part * block_n, plan.slot_pos.dtype),
        (chunk * R * max_part * block_n, torch.bool),
    ]

    def take(src: Tensor, idx: Tensor, ws: Tensor) -> Tensor:
        return torch.index_select(src, 0, idx, out=ws[: idx.numel() * src[0].numel()].view(-1, *src.shape[1:]))

    # per chunk: longest full / partial lists, shortest full list (one host sync for all chunks)
    n_chunks = -(-plan.order.numel() // chunk)
    counts = torch.stack([plan.full_cnt[plan.order], plan.part_cnt[plan.order]])
    counts = F.pad(counts, (0, n_chunks * chunk - counts.shape[1]), value=-1).view(2, n_chunks, chunk)
    chunk_stats = torch.cat([counts.amax(-1), counts[0].masked_fill(counts[0] < 0, 1 << 30).amin(-1)[None]]).T

    def run_chunk(c: int, n_full: int, n_part: int, min_full: int) -> None:
        # Workspaces reused by every chunk (and every call, see cpu_ops.workspace), one set per worker thread: fresh
        # large tensors cost page faults that dominate a gather on CPU.
        ws_q, ws_k, ws_v, ws_bias, ws_pos, ws_hide = cpu_ops.workspace(dev, ws_parts)
        ids = plan.order[c * chunk : (c + 1) * chunk]
        n = ids.numel()
        qrows = take(qi, ids, ws_q).unsqueeze(1)  # (n, 1, R, D)
        o_f = o_p = l_f = l_p = None
        if n_full:
            idx = plan.full_idx.index_select(0, ids)[:, :n_full].reshape(-1)
            kv_len = n_full * block_n
            o_f, l_f = _flash(
                qrows,
                take(kb, idx, ws_k).view(n, 1, kv_len, D),
                take(vb, idx, ws_v).view(n, 1, kv_len, D),
                attn_mask=take(key_bias, idx, ws_bias).view(n, 1, 1, kv_len),
                scale=scale,
            )
            o_f, l_f = o_f[:, 0], l_f[:, 0]
            if min_full == 0:  # the fused kernel returns lse 0 for a row with no key: no full tile -> -inf
                l_f = torch.where(plan.full_cnt[ids, None] > 0, l_f, neg_inf)
        if n_part:
            idx = plan.part_idx.index_select(0, ids)[:, :n_part].reshape(-1)
            kv_len = n_part * block_n
            rpos = row_pos.index_select(0, ids)  # (n, R)
            kpos = take(plan.slot_pos, idx, ws_pos).view(n, 1, kv_len)
            hide = torch.gt(kpos, rpos[:, :, None], out=ws_hide[: n * R * kv_len].view(n, R, kv_len))
            bias = ws_bias[: n * R * kv_len].view(n, 1, R, kv_len).zero_()
            bias.masked_fill_(hide.unsqueeze(1), neg_inf)  # causal on original positions (+ invalid keys)
            o_p, l_p = _flash(
                qrows,
                take(kb, idx, ws_k).view(n, 1, kv_len, D),
                take(vb, idx, ws_v).view(n, 1, kv_len, D),
                attn_mask=bias,
                scale=scale,
            )
            kmin = plan.kb_min.index_select(0, idx).view(n, n_part).amin(-1, keepdim=True)  # (n, 1)
            o_p, l_p = o_p[:, 0], torch.where(kmin <= rpos, l_p[:, 0], neg_inf)  # rows that see no key: -inf
        if o_p is None:
            o, l = o_f, l_f
        elif o_f is None:
            o, l = o_p, l_p
        else:
            o, l = _merge(o_f, l_f, o_p, l_p)
        out.index_copy_(0, ids, o)  # chunks own disjoint items: workers never write the same rows
        lse.index_copy_(0, ids, l)

    run_parallel(run_chunk, [(c, *st) for c, st in enumerate(chunk_stats.tolist())], workers)

    rows = slice(shift, shift + Lq)
    out = out.view(B, U, nqb, Gs, block_m, D).transpose(2, 3).reshape(B * U, Gs, nqb * block_m, D)[:, :, rows]
    lse = lse.view(B, U, nqb, Gs, block_m).transpose(2, 3).reshape(B * U, Gs, nqb * block_m)[:, :, rows]
    if plan.dense_units.numel():  # every causal tile selected: one causal fused call, no gather
        du = plan.dense_units
        kv = plan.kv_of_unit.index_select(0, du)
        o_d, l_d = _causal_flash(
            qp[:, :, rows].reshape(B * U, Gs, Lq, D).index_select(0, du),
            kb.view(B * Hkv, -1, D)[:, :L].index_select(0, kv).unsqueeze(1),
            vb.view(B * Hkv, -1, D)[:, :L].index_select(0, kv).unsqueeze(1),
            scale,
        )
        out = out.index_copy(0, du, o_d)
        lse = lse.index_copy(0, du, l_d)
    return out.reshape(B, Hq, Lq, D)[..., :Dv_out], lse.reshape(B, Hq, Lq)


def _merge(o_a: Tensor, l_a: Tensor, o_b: Tensor, l_b: Tensor) -> tuple[Tensor, Tensor]:
    """Attention over two disjoint key sets merged by log-sum-exp: ``lse = logaddexp(l_a, l_b)``,
    ``o = e^(l_a - lse) o_a + e^(l_b - lse) o_b`` (a row that sees nothing keeps lse ``-inf`` and output 0)."""
    l = torch.logaddexp(l_a, l_b)
    l_safe = torch.where(torch.isfinite(l), l, 0.0)  # a row that sees nothing: weights exp(-inf) = 0
    w_a, w_b = torch.exp(l_a - l_safe).unsqueeze(-1), torch.exp(l_b - l_safe).unsqueeze(-1)
    if o_a.dtype == torch.float32:
        return o_a * w_a + o_b * w_b, l
    return (o_a.float() * w_a + o_b.float() * w_b).to(o_a.dtype), l


def _causal_flash(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Causal fused attention of the last ``Lq`` of ``L`` positions: ``q`` ``(N, H, Lq, D)``, ``k``/``v``
    ``(N, 1|H, L, D)``. With ``Lq < L`` the earlier keys are seen by every query (one call, no mask) and the last
    ``Lq`` causally (a square causal call), merged by log-sum-exp."""
    Lq, L = q.shape[2], k.shape[2]
    if Lq == L:
        return _flash(q, k, v, is_causal=True, scale=scale)
    o_c, l_c = _flash(q, k[:, :, L - Lq :], v[:, :, L - Lq :], is_causal=True, scale=scale)
    o_p, l_p = _flash(q, k[:, :, : L - Lq], v[:, :, : L - Lq], scale=scale)
    return _merge(o_p, l_p, o_c, l_c)


def _attend_matmul(q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Tensor | None = None, scale: float, is_causal=False):
    """``(out, lse)`` like ``cpu_ops.flash_cpu`` with ``(N, H, R, D)`` inputs, by matmul + softmax in float32 (non-CPU
    devices of the PyTorch path). A row with no key gets out 0 and lse -inf."""
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if is_causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    if attn_mask is not None:
        s = s + attn_mask.float()
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    out = (p @ v.float()) / torch.where(l > 0, l, 1.0)
    return out.to(q.dtype), (m + torch.log(l)).squeeze(-1)


def _flash(q: Tensor, k: Tensor, v: Tensor, **kw) -> tuple[Tensor, Tensor]:
    """Fused attention returning ``(out, lse)``: the CPU flash kernel (float32 accumulation), else matmul."""
    if q.device.type == "cpu":
        return cpu_ops.flash_cpu(q, k, v, **kw)
    return _attend_matmul(q, k, v, **kw)


# --------------------------------------------------------------------------------------------------------------
# Triton path (launcher; the kernel is in kernels/triton/block_sparse_attention.py)
# --------------------------------------------------------------------------------------------------------------
def block_sparse_csr(
    block_mask: Tensor,
    L: int,
    num_heads: int,
    num_kv_heads: int,
    *,
    block_m: int = 64,
    block_n: int = 64,
    key_perm: Tensor | None = None,
    key_valid: Tensor | None = None,
    q_len: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """CSR tile lists of the Triton kernel: one row per ``(b, query head, query block)`` (the blocks holding the last
    ``q_len`` of the ``L`` positions; default all).

    Returns ``indptr`` ``(rows + 1,)``, ``nfull`` ``(rows,)`` and ``indices`` ``(nnz,)`` (int32). A row lists its
    full tiles (ascending), then its partial ones; tiles where no valid key is visible to the block are dropped.
    """
    B = block_mask.shape[0]
    G = num_heads // num_kv_heads
    q_len = L if q_len is None else q_len
    nqb, nkb = num_blocks(L, block_m) - first_query_block(L, q_len, block_m), num_blocks(L, block_n)
    pos = _slot_positions(B, num_kv_heads, L, key_perm, key_valid, block_mask.device)
    slot_pos = F.pad(pos, (0, nkb * block_n - L), value=L).view(B, num_kv_heads, nkb, block_n)
    nonempty, full = _tile_classes(slot_pos, L, block_m, q_len)
    sel = block_mask.expand(B, num_heads, nqb, nkb) & nonempty.repeat_interleave(G, 1)
    rank = sel.to(torch.int8) + (sel & full.repeat_interleave(G, 1)).to(torch.int8)  # 2 full, 1 partial, 0 none
    rank = rank.reshape(-1, nkb)
    cnt = (rank > 0).sum(-1)
    order = torch.sort(rank, dim=-1, descending=True, stable=True).indices
    indices = order[torch.arange(nkb, device=order.device) < cnt[:, None]]  # row-major: rows stay in order
    indptr = F.pad(torch.cumsum(cnt, 0), (1, 0))
    nfull = (rank == 2).sum(-1)
    return indptr.to(torch.int32), nfull.to(torch.int32), indices.to(torch.int32)


def _block_sparse_attention_triton(q, k, v, block_mask, scale, block_m, block_n, key_perm, key_valid):
    """_block_sparse_attention_triton: launch ``_block_sparse_attention_fwd`` on grid ``(n_q_blocks, B * H_q)``."""
    import triton

    from .triton.block_sparse_attention import _block_sparse_attention_fwd

    B, Hq, Lq, D = q.shape
    Hkv, L, Dv = k.shape[1], k.shape[2], v.shape[-1]
    nqb = block_mask.shape[2]
    indptr, nfull, indices = block_sparse_csr(
        block_mask, L, Hq, Hkv, block_m=block_m, block_n=block_n, key_perm=key_perm, key_valid=key_valid, q_len=Lq
    )
    has_pos = key_perm is not None or key_valid is not None
    pos = (
        _slot_positions(B, Hkv, L, key_perm, key_valid, q.device).to(torch.int32)
        if has_pos
        else torch.zeros(1, 1, 1, dtype=torch.int32, device=q.device)  # dummy: never read when HAS_POS is False
    )
    out = torch.empty(B, Hq, Lq, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, Lq, dtype=torch.float32, device=q.device)
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_DV = max(16, triton.next_power_of_2(Dv))
    num_warps = 4 if block_m * max(BLOCK_D, BLOCK_DV) <= 64 * 128 else 8
    _block_sparse_attention_fwd[(nqb, B * Hq)](
        q, k, v, pos, indptr, nfull, indices, out, lse,
        float(scale), L, nqb, L - Lq, first_query_block(L, Lq, block_m) * block_m,
        *q.stride(), *k.stride(), *v.stride(), *pos.stride(), *out.stride(), *lse.stride(),
        H_Q=Hq,
        GROUP=Hq // Hkv,
        HEAD_DIM=D,
        HEAD_DIM_V=Dv,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=BLOCK_D,
        BLOCK_DV=BLOCK_DV,
        HAS_POS=has_pos,
        INPUT_PRECISION="ieee",  # fp32: exact products like the reference (bf16 dots ignore it)
        num_warps=num_warps,
    )
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
    B, Hq, Lq, _ = q.shape
    L = k.shape[2]
    G = Hq // k.shape[1]
    k64 = k.double().repeat_interleave(G, dim=1)
    v64 = v.double().repeat_interleave(G, dim=1)
    pos = _key_positions(k, key_perm).repeat_interleave(G, dim=1)  # (B, Hq, L) original position per slot
    shift = L - Lq - first_query_block(L, Lq, block_m) * block_m  # rows of the first block before the queries
    tile = block_mask.expand(B, Hq, -1, -1)
    tile = tile.repeat_interleave(block_m, dim=2)[:, :, shift : shift + Lq]
    tile = tile.repeat_interleave(block_n, dim=3)[:, :, :, :L]
    rows = torch.arange(L - Lq, L, device=q.device)  # query positions
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

