"""page_bounds: Quest's per-page key bounds, page scores and the attention over the selected pages.

A page is ``P`` consecutive token slots of a row, starting at the row's ``offset`` (its first real token, so a
left-padded row pages its tokens as it would alone). Per page and channel the keys' min ``m`` and max ``M`` bound
every ``q · k`` of the page: ``q · k <= U = Σ_i max(q_i m_i, q_i M_i) = relu(q) · M + min(q, 0) · m`` (two
matmuls; :func:`page_scores`). The PyTorch paths are vectorised; the float64 ``*_reference`` functions evaluate the
formulas literally and are what the tests compare against; the Triton kernels are in
:mod:`kvaccel.kernels.triton.page_bounds`. A decode step is :func:`append_page_bounds`, :func:`select_top_pages`
(:func:`page_scores` + :func:`select_pages`) and :func:`attend_pages` (:func:`page_slots` + :func:`page_attention`):
on CPU with float32/float64 tensors each is one compiled kernel (:mod:`kvaccel.kernels.page_bounds_numba`: no slot
list, no gathered copy of the pages, no small ops); elsewhere they run as those compositions.

Shapes: keys ``(B, H_kv, N, D)``; bounds ``(B, H_kv, NP, D)`` in the keys' dtype (``2/P`` of the keys' bytes);
``count`` ``(B, 1|H_kv, NP)`` int32 real tokens per page (0 = an empty page, never selected); queries
``(B, H_q, 1, D)`` (GQA: query head ``h`` reads kv head ``h // (H_q / H_kv)``).
"""

from __future__ import annotations

import ctypes
import functools
import math
import warnings
from collections.abc import Sequence
from types import ModuleType

import numpy as np
import torch
from torch import Tensor

from kvaccel.checks import check_int

from .backend import check_mask, resolve_backend
from .cpu_ops import cpu_workers, run_parallel, single_thread

__all__ = [
    "append_page_bounds",
    "attend_pages",
    "num_pages",
    "page_attention",
    "page_attention_reference",
    "page_bounds",
    "page_bounds_reference",
    "page_scores",
    "page_scores_reference",
    "page_slots",
    "select_attend",
    "select_pages",
    "select_top_pages",
]


@functools.cache
def _numba_kernels() -> ModuleType | None:
    """:mod:`kvaccel.kernels.page_bounds_numba`, or ``None`` (with a one-time warning) when numba is missing."""
    try:
        from . import page_bounds_numba
    except ImportError as e:
        warnings.warn(f"kvaccel: quest's compiled CPU kernels need numba ({e}); its CPU path runs as PyTorch ops "
                      "instead (same pages and outputs, slower): pip install numba", RuntimeWarning, stacklevel=3)
        return None
    return page_bounds_numba


def _compiled(backend: str, *tensors: Tensor, others: tuple[Tensor | None, ...] = ()) -> ModuleType | None:
    """The compiled CPU kernels when they serve these tensors (``backend`` resolves to the CPU path, every tensor
    on CPU in float32 or float64), else ``None``. ``others`` (indices, counts, masks) must then be on CPU too: the
    kernels read raw host memory."""
    if resolve_backend(backend, tensors[0]) != "torch" or any(
            t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64) for t in tensors):
        return None
    for t in others:
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"a {tuple(t.shape)} tensor is on {t.device} while q, k and v are on the CPU: pass every "
                             "input on one device")
    return _numba_kernels()


def _np(t: Tensor | None, empty_dims: int = 0) -> np.ndarray:
    """A numpy view of ``t`` (no copy); ``None`` becomes an empty bool array of ``empty_dims`` dimensions."""
    if t is None:
        return np.zeros((1,) * (empty_dims - 1) + (0,), dtype=np.bool_)
    return t.detach().numpy()


_VIEWS: dict[tuple, np.ndarray] = {}  # (address, dtype, shape but slots, strides) -> view of the whole buffer there


def _np_buffer(t: Tensor) -> np.ndarray:
    """A numpy view of ``t`` ``(B, H, N, ...)`` for the kernels. When ``t`` is the first ``N`` slots of a contiguous
    buffer (a cache layer's keys, the page bounds' spare pages) the view spans all the buffer's slots and is
    C-contiguous (the compiled loops vectorise only over C-contiguous arrays; the kernels are given ``N`` and read only
    the first ``N`` slots, which ``t`` holds). Such views are memoised by address, dtype, strides and shape but ``N``,
    so a buffer that grows by a slot a step is looked up, not rebuilt; a view holds no reference to ``t`` (it is only
    reached through a live tensor with that layout, so its memory is live). Any other tensor: ``t.numpy()``."""
    shape, stride = t.shape, t.stride()
    if t.dim() < 3 or t.requires_grad:
        return t.detach().numpy()
    key = (t.data_ptr(), t.dtype, shape[:2], shape[3:], stride)
    view = _VIEWS.get(key)
    if view is not None and view.shape[2] >= shape[2]:
        return view
    inner = math.prod(shape[3:])
    wide = [*shape[:2], stride[1] // inner if inner else 0, *shape[3:]]
    if t.numel() == 0 or stride[1] % inner or wide[2] < shape[2] or any(
            s != math.prod(wide[i + 1 :]) and n > 1 for i, (s, n) in enumerate(zip(stride, wide, strict=True))):
        return t.detach().numpy()
    size = t.element_size()
    raw = (ctypes.c_char * (math.prod(wide) * size)).from_address(t.data_ptr())
    view = np.ndarray(wide, dtype=_np_dtype(t.dtype), buffer=raw, strides=[s * size for s in stride])
    if len(_VIEWS) >= 4096:
        _VIEWS.clear()
    _VIEWS[key] = view
    return view


@functools.cache
def _np_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


def _host(x: Tensor | Sequence[int]) -> list[int]:
    return x.tolist() if isinstance(x, Tensor) else list(x)


def _on(x: Tensor | Sequence[int], device: torch.device) -> Tensor:
    return x if isinstance(x, Tensor) else torch.tensor(x, dtype=torch.long, device=device)


def _check_pages(pages: Tensor | Sequence[int], last: Tensor | Sequence[int], n_pages: int
                 ) -> tuple[list[int], list[int]]:
    """``pages``/``last`` ``(B,)`` on the host, checked: the compiled kernels index with them unchecked."""
    pg, la = _host(pages), _host(last)
    if len(pg) != len(la) or any(p < 1 for p in pg) or any(not 0 <= j < n_pages for j in la):
        raise ValueError(f"pages ({pg}) must be >= 1 and last ({la}) in [0, {n_pages}) per row")
    return pg, la


def _check_offset(offset: Tensor, B: int, n_tokens: int) -> None:
    ok = offset.shape == (B,) and offset.dtype == torch.long
    if not ok or not all(0 <= o < max(n_tokens, 1) for o in offset.tolist()):
        raise ValueError(f"offset must be a ({B},) int64 tensor of slots in [0, {n_tokens}), got {offset.tolist()}")


def _offsets(B: int, offset: Tensor | None, device: torch.device) -> Tensor:
    if offset is None:
        return torch.zeros(B, dtype=torch.long, device=device)
    if offset.shape != (B,) or offset.dtype != torch.long:
        raise ValueError(f"offset must be a ({B},) int64 tensor (first slot of each row), got "
                         f"{tuple(offset.shape)} {offset.dtype}")
    return offset


def num_pages(n_tokens: int, offset: Tensor, page_size: int) -> int:
    """Pages of the longest row: ``ceil((N - min offset) / P)``."""
    return max(0, math.ceil((n_tokens - int(offset.min())) / page_size)) if offset.numel() else 0


def page_bounds(
    keys: Tensor, page_size: int, valid: Tensor | None = None, offset: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per page and channel, the min and max of the real keys, and the real tokens per page.

    Page ``j`` of row ``b`` holds slots ``offset[b] + j·P ... + P − 1`` (slots at or past ``N`` and invalid ones
    excluded; an empty page's bounds are 0 and its count 0).

    Parameters
    ----------
    keys : Tensor
        ``(B, H_kv, N, D)``.
    page_size : int
        ``P`` tokens per page.
    valid : Tensor, optional
        ``(B, 1|H_kv, N)`` bool; ``None`` = every slot real.
    offset : Tensor, optional
        ``(B,)`` int64 first slot of each row's pages; ``None`` = 0.

    Returns
    -------
    tuple of Tensor
        ``kmin``, ``kmax`` ``(B, H_kv, NP, D)`` in ``keys.dtype`` and ``count`` ``(B, 1|H_kv, NP)`` int32, with
        ``NP = ceil((N − min offset) / P)``.
    """
    check_int("page_size", page_size, 1)
    B, H, N, D = keys.shape
    check_mask("valid", valid, B, H, N)
    offset = _offsets(B, offset, keys.device)
    NP = num_pages(N, offset, page_size)
    slot = offset[:, None] + torch.arange(NP * page_size, device=keys.device)[None, :]  # (B, NP·P)
    inside = slot < N
    slot = slot.clamp(max=max(N - 1, 0))
    ok = inside[:, None, :]  # (B, 1, NP·P)
    if valid is not None:
        ok = ok & valid.gather(-1, slot[:, None, :].expand(B, valid.shape[1], -1))
    count = ok.view(B, ok.shape[1], NP, page_size).sum(-1, dtype=torch.int32)
    if N == 0:
        empty = keys.new_zeros(B, H, 0, D)
        return empty, empty.clone(), count
    g = keys.gather(2, slot[:, None, :, None].expand(B, H, -1, D)).view(B, H, NP, page_size, D)
    okp = ok.view(B, ok.shape[1], NP, page_size, 1)
    big = torch.finfo(keys.dtype).max
    kmin = g.masked_fill(~okp, big).amin(3)
    kmax = g.masked_fill(~okp, -big).amax(3)
    empty = (count == 0)[..., None]
    return kmin.masked_fill(empty, 0), kmax.masked_fill(empty, 0), count


def page_bounds_reference(
    keys: Tensor, page_size: int, valid: Tensor | None = None, offset: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`page_bounds` with Python loops over rows and pages, in float64 (count ``(B, H_kv, NP)``)."""
    B, H, N, D = keys.shape
    offset = _offsets(B, offset, keys.device)
    NP = num_pages(N, offset, page_size)
    kmin = torch.zeros(B, H, NP, D, dtype=torch.float64)
    kmax = torch.zeros(B, H, NP, D, dtype=torch.float64)
    count = torch.zeros(B, H, NP, dtype=torch.int32)
    for b in range(B):
        for h in range(H):
            for j in range(NP):
                s0 = int(offset[b]) + j * page_size
                slots = [s for s in range(s0, min(s0 + page_size, N))
                         if valid is None or bool(valid[b, min(h, valid.shape[1] - 1), s])]
                if slots:
                    kk = keys[b, h, slots].double()
                    kmin[b, h, j], kmax[b, h, j] = kk.amin(0), kk.amax(0)
                    count[b, h, j] = len(slots)
    return kmin, kmax, count


def append_page_bounds(
    kmin: Tensor, kmax: Tensor, count: Tensor, key: Tensor, page: Tensor | Sequence[int], valid: Tensor | None = None,
    real: Tensor | None = None, *, backend: str = "auto",
) -> None:
    """Fold one new token per row into its page, in place: ``key`` ``(B, H_kv, D)`` joins page ``page`` ``(B,)``
    (int64, or a list of ints) of each row; ``valid`` ``(B, 1|H_kv)`` bool (``None`` = real); ``real`` ``(B,)``
    int64, if given, counts each row's real tokens (of kv head 0, like ``count[:, 0]``) and is incremented in place.
    The first real token of a page sets its bounds; a token that is not real changes nothing. ``count`` needs a head
    axis as wide as ``valid``'s."""
    B, H, _, D = kmin.shape
    if valid is not None and valid.shape[1] > count.shape[1]:
        raise ValueError(f"count {tuple(count.shape)} needs as many heads as valid {tuple(valid.shape)}")
    jit = _compiled(backend, kmin, kmax, key, others=(count, valid, real, page if isinstance(page, Tensor) else None))
    if jit is not None and count.dtype == torch.int32:
        r = np.zeros(B, np.int64) if real is None else _np_buffer(real)
        pg = _host(page)
        if len(pg) != B or any(not 0 <= p < kmin.shape[2] for p in pg):
            raise ValueError(f"page ({pg}) must hold a page in [0, {kmin.shape[2]}) per row")
        jit._append_bounds(_np_buffer(kmin), _np_buffer(kmax), _np_buffer(count), r, _np(key), np.array(pg),
                           _np(valid, 2))
        return
    page = _on(page, kmin.device)
    idx = page.view(B, 1, 1, 1).expand(B, H, 1, D)
    cidx = page.view(B, 1, 1).expand(B, count.shape[1], 1)
    c = count.gather(-1, cidx)  # (B, 1|H, 1)
    k = key[:, :, None, :].to(kmin.dtype)
    lo, hi = kmin.gather(2, idx), kmax.gather(2, idx)
    first = (c == 0)[..., None]  # (B, 1|H, 1, 1)
    new_lo = torch.where(first, k, torch.minimum(lo, k))
    new_hi = torch.where(first, k, torch.maximum(hi, k))
    if valid is not None:
        real_new = valid[:, :, None, None]
        new_lo, new_hi = torch.where(real_new, new_lo, lo), torch.where(real_new, new_hi, hi)
        c = c + valid[:, :, None].to(c.dtype)
    else:
        c = c + 1
    kmin.scatter_(2, idx, new_lo)
    kmax.scatter_(2, idx, new_hi)
    count.scatter_(-1, cidx, c)
    if real is not None:
        real += 1 if valid is None else valid[:, 0].to(real.dtype)


def page_scores(
    q: Tensor, kmin: Tensor, kmax: Tensor, count: Tensor | None = None, *, group: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Quest's page score ``U = Σ_i max(q_i m_i, q_i M_i)`` of every query head and page, ``(B, H_q, NP)`` float32;
    pages with ``count == 0`` get ``-inf``. An upper bound of ``q · k`` for every real key of the page (no scale:
    it only ranks pages). ``q`` ``(B, H_q, 1, D)`` or ``(B, H_q, D)``. ``group``: summed over the query heads of
    each kv head, ``(B, H_kv, NP)`` (an upper bound of the group's summed ``q · k``)."""
    if q.dim() == 4:
        q = q[:, :, 0]
    B, Hq, D = q.shape
    _, Hkv, NP, _ = kmin.shape
    if kmax.shape != kmin.shape or kmin.shape[0] != B or kmin.shape[-1] != D or Hq % Hkv:
        raise ValueError(f"q {tuple(q.shape)} and bounds {tuple(kmin.shape)} / {tuple(kmax.shape)} must be "
                         f"(B, H_q, D) and (B, H_kv, NP, D) with H_q a multiple of H_kv")
    if resolve_backend(backend, q) == "triton":
        from .triton.page_bounds import launch_page_scores

        s = launch_page_scores(q, kmin, kmax, count)
        return s.view(B, Hkv, Hq // Hkv, NP).sum(2) if group else s
    G = Hq // Hkv
    qg = q.reshape(B, Hkv, G, D).float()
    s = qg.clamp(min=0) @ kmax.float().transpose(-1, -2) + qg.clamp(max=0) @ kmin.float().transpose(-1, -2)
    if count is not None:
        s.masked_fill_((count == 0)[:, :, None, :], float("-inf"))
    return s.sum(2) if group else s.view(B, Hq, NP)


def page_scores_reference(q: Tensor, kmin: Tensor, kmax: Tensor, count: Tensor | None = None) -> Tensor:
    """:func:`page_scores` as written in the paper, elementwise ``max(q_i m_i, q_i M_i)`` summed, float64."""
    if q.dim() == 4:
        q = q[:, :, 0]
    B, Hq, D = q.shape
    G = Hq // kmin.shape[1]
    m = kmin.double().repeat_interleave(G, dim=1)  # (B, H_q, NP, D)
    M = kmax.double().repeat_interleave(G, dim=1)
    qd = q.double()[:, :, None, :]
    s = torch.maximum(qd * m, qd * M).sum(-1)
    if count is not None:
        c = count if count.shape[1] == 1 else count.repeat_interleave(G, dim=1)
        s = s.masked_fill(c == 0, float("-inf"))
    return s


def select_pages(scores: Tensor, pages: Tensor, last: Tensor) -> tuple[Tensor, Tensor]:
    """Per head, the ``pages[b]`` best pages of row ``b`` by score, page ``last[b]`` always among them.

    ``scores`` ``(B, H_s, NP)`` (per query head or, summed, per kv head; ``-inf`` = empty page, never selected);
    ``pages``, ``last`` ``(B,)`` int64. Returns ``(idx, keep)`` ``(B, H_s, K)`` with ``K = max(pages)``: page
    indices in descending score (the last page first) and whether each is selected (rank ``< pages[b]``, not empty).
    """
    B, Hq, NP = scores.shape
    K = min(int(pages.max()), NP)
    forced = scores.scatter(-1, last.view(B, 1, 1).expand(B, Hq, 1), float("inf"))
    top, idx = forced.topk(K, dim=-1, sorted=True)
    keep = (torch.arange(K, device=scores.device)[None, None, :] < pages.view(B, 1, 1)) & (top > float("-inf"))
    return idx, keep


def select_top_pages(
    q: Tensor, kmin: Tensor, kmax: Tensor, count: Tensor, pages: Tensor | Sequence[int], last: Tensor | Sequence[int],
    *, group: bool = False,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """``select_pages(page_scores(q, kmin, kmax, count, group=group), pages, last)``: per selection row (query head,
    or kv head with ``group``) the ``pages[b]`` best pages of row ``b``, page ``last[b]`` first.

    On CPU (float32/float64) one compiled pass per row: the pages after the first come in no particular order (the
    same set as :func:`select_pages`' up to ties in score). ``q`` ``(B, H_q, 1, D)`` or ``(B, H_q, D)``; bounds
    ``(B, H_kv, NP, D)``; ``count`` ``(B, 1|H_kv, NP)`` int32; ``pages``, ``last`` ``(B,)`` int64 or lists of ints
    (``pages >= 1``, ``last < NP``). Returns ``(idx, keep)`` ``(B, H_s, K)``, ``K = min(max(pages), NP)``."""
    if q.dim() == 4:
        q = q[:, :, 0]
    jit = _compiled(backend, q, kmin, kmax, others=(count, *(t for t in (pages, last) if isinstance(t, Tensor))))
    if jit is None or count.dtype != torch.int32:
        return select_pages(page_scores(q, kmin, kmax, count, group=group, backend=backend), _on(pages, q.device),
                            _on(last, q.device))
    B, Hq, D = q.shape
    _, Hkv, NP, _ = kmin.shape
    if kmax.shape != kmin.shape or kmin.shape[0] != B or kmin.shape[-1] != D or Hq % Hkv:
        raise ValueError(f"q {tuple(q.shape)} and bounds {tuple(kmin.shape)} / {tuple(kmax.shape)} must be "
                         f"(B, H_q, D) and (B, H_kv, NP, D) with H_q a multiple of H_kv")
    Hs = Hkv if group else Hq
    pg, la = _check_pages(pages, last, NP)
    K = min(max(pg), NP)
    idx = torch.empty(B, Hs, K, dtype=torch.long)
    keep = torch.empty(B, Hs, K, dtype=torch.bool)
    args = (_np(q), _np_buffer(kmin), _np_buffer(kmax), _np_buffer(count), group)
    outs = (_np(idx), _np(keep))
    for b in range(B):
        jit._select_pages(*args, b, NP, pg[b], la[b], 0, Hs, *outs)
    return idx, keep


def page_slots(
    idx: Tensor, keep: Tensor, page_size: int, offset: Tensor, n_tokens: int, valid: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Token slots of the selected pages ``idx``/``keep`` ``(B, H_s, K)``: ``(slots, ok)`` ``(B, H_s, K·P)``
    (``H_s`` is ``H_q`` or ``H_kv``), each page's ``P`` slots consecutive and inside ``[0, N)``.

    A page reaching past ``N`` (the partial last page) is read as the window of the last ``P`` slots, its slots
    before the page start marked not ``ok`` (so ``P`` consecutive slots always hold a page: gathered as one block by
    :func:`page_attention` with ``page_size``). ``ok`` is False for an unselected page, a slot outside the page and a
    slot ``valid`` ``(B, 1|H_kv, N)`` marks unreal."""
    B, Hs, K = idx.shape
    start = offset.view(B, 1, 1) + idx * page_size  # (B, H_s, K)
    window = start.clamp(max=n_tokens - page_size).clamp(min=0)
    slot = window[..., None] + torch.arange(page_size, device=idx.device)  # (B, H_s, K, P)
    ok = keep[..., None] & (slot >= start[..., None]) & (slot < n_tokens)
    slot, ok = slot.clamp(max=max(n_tokens - 1, 0)).view(B, Hs, K * page_size), ok.view(B, Hs, K * page_size)
    if valid is not None:
        Hv = valid.shape[1]
        per = valid if Hv == 1 else valid.repeat_interleave(Hs // Hv, dim=1)
        ok &= per.expand(B, Hs if Hv > 1 else 1, n_tokens).expand(B, Hs, n_tokens).gather(-1, slot)
    return slot, ok


def page_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    slots: Tensor,
    ok: Tensor,
    *,
    scale: float,
    k_narrow: Tensor | None = None,
    channel_idx: Tensor | None = None,
    v_narrow: Tensor | None = None,
    value_idx: Tensor | None = None,
    page_size: int | None = None,
    backend: str = "auto",
) -> Tensor:
    """Exact softmax attention of one query per head over the slots selected for it, ``(B, H_q, 1, Dv)`` in
    ``q.dtype``.

    ``slots``/``ok`` ``(B, H_s, S)`` from :func:`page_slots`, with ``H_s = H_q`` (each query head its own slots) or
    ``H_s = H_kv`` (the query heads of a kv head share them): query head ``h`` reads slot row ``h // (H_q / H_s)``
    and kv head ``h // (H_q / H_kv)``; ``out[b, h] = softmax(scale · q[b, h] · K[b, kv, s] for s in the row's
    slots where ok) @ V[b, kv, s]``, float32 accumulation; a head with no ``ok`` slot gives zeros. The slot axis is
    ``[narrow (Tn), full (T)]``: a slot ``s < Tn`` reads ThinK's narrow segment (``q[channel_idx] · k_narrow``,
    values scattered into ``value_idx`` when narrow too), a slot ``s >= Tn`` the full-width ``k``/``v`` at
    ``s − Tn``. Rows are gathered once per slot row (one copy per kv head when shared). ``page_size``: the slots
    come in runs of ``P`` consecutive slots (:func:`page_slots`), so the PyTorch path copies each run as one block of
    keys / values (without a narrow segment).
    """
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    Hs = slots.shape[1]
    if Hq % Hkv or Hs not in (Hq, Hkv) or slots.shape[0] != B or ok.shape != slots.shape:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, slots {tuple(slots.shape)}, ok "
                         f"{tuple(ok.shape)}: H_q must be a multiple of H_kv and slots/ok (B, H_q or H_kv, S)")
    if resolve_backend(backend, q) == "triton":
        if k_narrow is not None:
            raise NotImplementedError("the Triton page attention has no narrow (ThinK) segment; use backend='torch'")
        from .triton.page_bounds import launch_page_attention

        return launch_page_attention(q, k, v, slots, ok, scale)
    out = q.new_empty(B, Hq, 1, v.shape[-1])
    narrow = None if k_narrow is None else (k_narrow, channel_idx, v_narrow, value_idx)
    workers = cpu_workers(q.device)
    step = -(-Hs // workers)  # slot rows per task: one task per worker and batch row
    R = Hq // Hs  # query heads per slot row

    T = k.shape[2]
    blocks = page_size if (page_size is not None and narrow is None and T >= page_size
                           and k.stride(3) == v.stride(3) == 1 and k.stride(2) == D and v.stride(2) == v.shape[3]
                           and slots.shape[-1] % page_size == 0) else None

    def run(b: int, r0: int, r1: int) -> None:
        out[b, r0 * R : r1 * R] = _page_attention_rows(q, k, v, slots, ok, scale, b, r0, r1, narrow, blocks)

    run_parallel(run, [(b, r, min(r + step, Hs)) for b in range(B) for r in range(0, Hs, step)], workers)
    return out


def attend_pages(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    idx: Tensor,
    keep: Tensor,
    *,
    page_size: int,
    offset: Tensor,
    scale: float,
    valid: Tensor | None = None,
    k_narrow: Tensor | None = None,
    channel_idx: Tensor | None = None,
    v_narrow: Tensor | None = None,
    value_idx: Tensor | None = None,
    attended: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """``page_attention(q, k, v, *page_slots(idx, keep, page_size, offset, N, valid), ...)``: exact softmax attention
    of each query head over the real tokens of its selected pages, ``(B, H_q, 1, Dv)`` in ``q.dtype``.

    ``idx``/``keep`` ``(B, H_s, K)`` from :func:`select_top_pages`; ``N`` is the token axis ``[narrow (Tn), full
    (T)]``; ``valid`` ``(B, 1|H_kv, N)``. ``attended`` ``(B, H_s)`` int64, if given, is incremented in place by the
    real tokens each selection row attended. On CPU (float32/float64, no narrow segment) one compiled kernel reads
    the pages' keys and values in place: no slot list and no gathered copy."""
    jit = _compiled(backend, q, k, v, others=(idx, keep, offset, valid, attended)) if k_narrow is None else None
    n_tokens = k.shape[2] + (0 if k_narrow is None else k_narrow.shape[2])
    if jit is None:
        slots, ok = page_slots(idx, keep, page_size, offset, n_tokens, valid)
        if attended is not None:
            attended += ok.sum(-1)
        return page_attention(q, k, v, slots, ok, scale=scale, k_narrow=k_narrow, channel_idx=channel_idx,
                              v_narrow=v_narrow, value_idx=value_idx, page_size=page_size, backend=backend)
    B, Hq, _, D = q.shape
    Hkv, Hs = k.shape[1], idx.shape[1]
    if Hq % Hkv or Hs not in (Hq, Hkv) or idx.shape[0] != B or keep.shape != idx.shape:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, idx {tuple(idx.shape)}, keep "
                         f"{tuple(keep.shape)}: H_q must be a multiple of H_kv and idx/keep (B, H_q or H_kv, K)")
    check_mask("valid", valid, B, Hkv, n_tokens)
    _check_offset(offset, B, n_tokens)
    start = offset.view(B, 1, 1) + idx * page_size
    if bool((keep & ((idx < 0) | (start >= n_tokens))).any()):
        raise ValueError(f"idx holds a selected page outside the {n_tokens} tokens (pages start at offset + idx * "
                         f"{page_size})")
    out = torch.empty(B, Hq, 1, v.shape[-1], dtype=torch.float32)
    args = (_np(q[:, :, 0]), _np_buffer(k), _np_buffer(v), _np(idx), _np(keep), _np_buffer(offset), n_tokens,
            page_size, _np(valid, 3) if valid is None else _np_buffer(valid), float(scale))
    o = _np(out[:, :, 0])
    seen = np.zeros((B, Hs), np.int64) if attended is None else _np_buffer(attended)
    workers = cpu_workers(q.device)
    step = -(-Hs // workers)  # selection rows per task: one task per worker and batch row
    run_parallel(lambda b, r0, r1: jit._attend_pages(*args, b, r0, r1, o, seen),
                 [(b, r, min(r + step, Hs)) for b in range(B) for r in range(0, Hs, step)], workers)
    return out.to(q.dtype)


def select_attend(
    q: Tensor,
    kmin: Tensor,
    kmax: Tensor,
    count: Tensor,
    pages: Tensor | Sequence[int],
    last: Tensor | Sequence[int],
    k: Tensor,
    v: Tensor,
    *,
    page_size: int,
    offset: Tensor,
    scale: float,
    valid: Tensor | None = None,
    group: bool = False,
    k_narrow: Tensor | None = None,
    channel_idx: Tensor | None = None,
    v_narrow: Tensor | None = None,
    value_idx: Tensor | None = None,
    attended: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """A Quest step: ``attend_pages(q, k, v, *select_top_pages(q, kmin, kmax, count, pages, last, group=group), ...)``,
    ``(B, H_q, 1, Dv)`` in ``q.dtype``. On CPU (float32/float64, no narrow segment) one compiled pass per selection
    row, the selection held in scratch; elsewhere the two ops."""
    jit = (_compiled(backend, q, kmin, kmax, k, v, others=(count, offset, valid, attended)) if k_narrow is None
           else None)
    if jit is None or count.dtype != torch.int32:
        with single_thread():  # small ops: waking idle OpenMP threads would cost more than the work
            idx, keep = select_top_pages(q, kmin, kmax, count, pages, last, group=group, backend=backend)
        return attend_pages(q, k, v, idx, keep, page_size=page_size, offset=offset, scale=scale, valid=valid,
                            k_narrow=k_narrow, channel_idx=channel_idx, v_narrow=v_narrow, value_idx=value_idx,
                            attended=attended, backend=backend)
    B, Hq, _, D = q.shape
    Hkv, NP = kmin.shape[1], kmin.shape[2]
    if (kmax.shape != kmin.shape or kmin.shape[0] != B or kmin.shape[-1] != D or Hq % Hkv
            or k.shape[:2] != kmin.shape[:2] or k.shape[-1] != D):
        raise ValueError(f"q {tuple(q.shape)}, bounds {tuple(kmin.shape)} / {tuple(kmax.shape)} and k "
                         f"{tuple(k.shape)} must be (B, H_q, 1, D), (B, H_kv, NP, D) and (B, H_kv, T, D) with H_q a "
                         "multiple of H_kv")
    n_tokens = k.shape[2]
    check_mask("valid", valid, B, Hkv, n_tokens)
    pg, la = _check_pages(pages, last, NP)
    _check_offset(offset, B, n_tokens)
    Hs = Hkv if group else Hq
    out = torch.empty(B, Hq, 1, v.shape[-1], dtype=torch.float32)
    args = (_np(q[:, :, 0]), _np_buffer(kmin), _np_buffer(kmax), _np_buffer(count), group, NP, np.array(pg),
            np.array(la), _np_buffer(k), _np_buffer(v), _np_buffer(offset), n_tokens, page_size,
            _np(valid, 3) if valid is None else _np_buffer(valid), float(scale))
    o = _np(out[:, :, 0])
    seen = np.zeros((B, Hs), np.int64) if attended is None else _np_buffer(attended)
    workers = cpu_workers(q.device)
    step = -(-Hs // workers)  # selection rows per task: one task per worker and batch row
    run_parallel(lambda b, r0, r1: jit._select_attend(*args, b, r0, r1, o, seen),
                 [(b, r, min(r + step, Hs)) for b in range(B) for r in range(0, Hs, step)], workers)
    return out.to(q.dtype)


def _blocks(t: Tensor, kvh: Tensor, starts: Tensor, P: int) -> Tensor:
    """``t`` ``(H, T, F)`` (token rows contiguous) at ``P`` consecutive tokens from each of ``starts`` ``(rows, K)``
    of head ``kvh`` ``(rows, 1)``: ``(rows, K·P, F)`` float32, one block copy per page (overlapping windows view)."""
    H, T, F = t.shape
    windows = t.as_strided((H, T - P + 1, P * F), (t.stride(0), F, 1))
    return windows[kvh, starts].view(starts.shape[0], -1, F).float()


def _page_attention_rows(q, k, v, slots, ok, scale, b, r0, r1, narrow, blocks=None) -> Tensor:
    """Page attention of slot rows ``r0 ... r1 − 1`` of batch row ``b``: ``(rows · R, 1, Dv)``; ``blocks``: the
    page size when slots come in runs of consecutive slots (copied as blocks)."""
    Hq, Hkv, Hs = q.shape[1], k.shape[1], slots.shape[1]
    R = Hq // Hs
    qs = (q[b, r0 * R : r1 * R, 0].float() * scale).view(r1 - r0, R, -1)  # (rows, R, D)
    s = slots[b, r0:r1]  # (rows, S)
    kvh = (torch.arange(r0, r1, device=q.device) * Hkv // Hs)[:, None]  # kv head of each slot row
    Tn = 0 if narrow is None else narrow[0].shape[2]
    if blocks is not None:
        starts = s[:, ::blocks]
        kg, vg = _blocks(k[b], kvh, starts, blocks), _blocks(v[b], kvh, starts, blocks)
    else:
        sf = (s - Tn).clamp(min=0)
        kg, vg = k[b][kvh, sf].float(), v[b][kvh, sf].float()  # (rows, S, D), (rows, S, Dv)
    logits = torch.bmm(qs, kg.transpose(1, 2))  # (rows, R, S)
    if narrow is not None:
        kn, cidx, vn, vidx = narrow
        inn = (s < Tn)[:, None, :]
        sn = s.clamp(max=max(Tn - 1, 0))
        qn = qs.gather(-1, cidx[b][kvh[:, 0]][:, None, :].expand(-1, R, -1))  # (rows, R, Dk)
        ln = torch.bmm(qn, kn[b][kvh, sn].float().transpose(1, 2))
        logits = torch.where(inn, ln, logits)
        vng = vn[b][kvh, sn].float()
        if vidx is not None:  # narrow values: zero-filled outside their kept channels
            dense = vg.new_zeros(vg.shape)
            vng = dense.scatter_(-1, vidx[b][kvh[:, 0]][:, None, :].expand(-1, vng.shape[1], -1), vng)
        vg = torch.where(inn.transpose(1, 2), vng, vg)
    logits = logits.masked_fill_(~ok[b, r0:r1, None, :], float("-inf"))
    m = logits.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = (logits - m).exp_()
    denom = p.sum(-1, keepdim=True)
    o = torch.bmm(p, vg) / torch.where(denom > 0, denom, torch.ones_like(denom))  # (rows, R, Dv)
    return o.to(q.dtype).view(-1, 1, o.shape[-1])


def page_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, slots: Tensor, ok: Tensor, *, scale: float,
    k_narrow: Tensor | None = None, channel_idx: Tensor | None = None, v_narrow: Tensor | None = None,
    value_idx: Tensor | None = None,
) -> Tensor:
    """:func:`page_attention` in float64 with loops: each head's keys zero-filled to full width, then dense softmax
    over its slot row's ``ok`` slots (``(B, H_q, 1, Dv)`` float64)."""
    B, Hq, _, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G = Hq // Hkv
    if k_narrow is not None:  # the [narrow, full] axis at full width, pruned channels zero
        Tn, Dk = k_narrow.shape[2], k_narrow.shape[3]
        kn = torch.zeros(B, Hkv, Tn, D, dtype=torch.float64)
        kn.scatter_(-1, channel_idx[:, :, None, :].expand(B, Hkv, Tn, Dk), k_narrow.double())
        vn = v_narrow.double()
        if value_idx is not None:
            vn = torch.zeros(B, Hkv, Tn, Dv, dtype=torch.float64).scatter_(
                -1, value_idx[:, :, None, :].expand(B, Hkv, Tn, value_idx.shape[-1]), v_narrow.double())
        k = torch.cat([kn, k.double()], 2)
        v = torch.cat([vn, v.double()], 2)
    out = torch.zeros(B, Hq, 1, Dv, dtype=torch.float64)
    R = Hq // slots.shape[1]  # query heads per slot row
    for b in range(B):
        for h in range(Hq):
            sel = slots[b, h // R][ok[b, h // R]]
            if sel.numel() == 0:
                continue
            kk, vv = k[b, h // G, sel].double(), v[b, h // G, sel].double()
            p = torch.softmax(kk @ q[b, h, 0].double() * scale, -1)
            out[b, h, 0] = p @ vv
    return out
