"""RetrievalAttention: the cache beyond sink + recent window lives in host memory; each step attends the keys
an attention-aware index retrieves, merged exactly with the device part by log-sum-exp."""

from __future__ import annotations

import functools
import queue
import threading
import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvaccel.cache import compact_slots
from kvaccel.checks import check_int, check_number
from kvaccel.config import register
from kvaccel.kernels.decode_attention import decode_attention
from kvaccel.kernels.lse_merge import lse_merge
from kvaccel.models import head_size, text_config

from .base import DecodeMethod

if TYPE_CHECKING:
    from kvaccel.cache import KVAccelCache, KVAccelLayer
    from kvaccel.kernels.attention_index import AttentionIndex, GraphBuild
    from kvaccel.patches.attention import AttentionContext

Tensor = torch.Tensor

#: attribute of a ``KVAccelLayer`` holding this method's per-layer state
STATE_ATTR = "_kvaccel_retrieval"


#: candidates beyond top_k kept by the bfloat16 scan for the float32 re-scoring (measured: the float32 exact top-100
#: recovered on every query of the captured keys at 16, 99.5% at 0)
BF16_MARGIN = 16


@functools.cache
def _fast_bf16() -> bool:
    """oneDNN has a native bfloat16 matmul on this CPU (AVX512-BF16 / AMX): otherwise bfloat16 is emulated, slower."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


#: torch's thread count when retrieval first ran, before numba's OpenMP pool started (starting it sets the
#: process-wide OpenMP thread count, hence torch's, to NUMBA_NUM_THREADS: measured 1 -> 2 with OMP_NUM_THREADS=1)
_TORCH_THREADS: list[int] = []


def _match_threads() -> None:
    """Compiled (numba) parallel kernels use as many threads as torch (``torch.get_num_threads()``, e.g.
    ``OMP_NUM_THREADS``) in the calling thread, and starting numba's pool does not change torch's: a per-step kernel
    of ~1 ms that waits on a second thread the OS has not scheduled costs ~8 ms on a loaded machine (measured)."""
    import numba

    if not _TORCH_THREADS:
        _TORCH_THREADS.append(torch.get_num_threads())
        numba.get_num_threads()  # starts the pool
        torch.set_num_threads(_TORCH_THREADS[0])
    want = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if getattr(_THREAD_SET, "n", None) != want:  # numba's setting is per calling thread
        numba.set_num_threads(want)
        _THREAD_SET.n = want


_THREAD_SET = threading.local()


class _GraphBuilder:
    """One daemon thread running graph builds in submission order (layer order: the first layers, attended first
    at every step, get their index first). The compiled build and faiss release the GIL, so decoding goes on in
    the calling thread. A build whose layer state was dropped (its cache is gone) before it started is skipped."""

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, job: GraphBuild | _CompileJob, owner: object | None) -> Future:
        """Queue ``job`` (its ``run()``); skipped if ``owner`` (when given) is gone by the time it would start."""
        future: Future = Future()
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="kvaccel-retrieval-build", daemon=True)
                self._thread.start()
        self._queue.put((future, job, None if owner is None else weakref.ref(owner)))
        return future

    def _run(self) -> None:
        _match_threads()
        while True:
            future, job, owner = self._queue.get()
            if (owner is not None and owner() is None) or not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(job.run())
            except BaseException as exc:  # re-raised in the decoding thread by future.result()
                future.set_exception(exc)
            del future, job


_BUILDER = _GraphBuilder()


@dataclass(frozen=True)
class _CompileJob:
    """:func:`~kvaccel.kernels.attention_index.compile_kernels` of some decode paths, as a job of ``_BUILDER``."""

    paths: tuple[str, ...]
    scan_bf16: bool
    fused: bool
    group_search: bool
    bits: int | None = None

    def run(self) -> float:
        from kvaccel.kernels.attention_index import compile_kernels

        return compile_kernels(self.paths, scan_bf16=self.scan_bf16, fused=self.fused, group_search=self.group_search,
                               bits=self.bits)


_COMPILES: dict[_CompileJob, Future] = {}  # every compile job submitted in this process (each runs once)
_COMPILES_LOCK = threading.Lock()


def _compile_ahead(job: _CompileJob) -> Future:
    """Run ``job`` on the builder thread unless it was already submitted: the kernels a decode path needs compile
    (or load from the on-disk cache) while the prompt is prefilled, instead of inside the first decode step; a decode
    step needing a kernel still compiling waits for it (numba's compiler lock), then runs it."""
    with _COMPILES_LOCK:
        future = _COMPILES.get(job)
        if future is None:
            future = _COMPILES[job] = _BUILDER.submit(job, None)
    return future


def _raise_failed_compile() -> None:
    """Re-raise the error of a background compile that failed (once: a later :func:`_compile_ahead` retries it)."""
    with _COMPILES_LOCK:
        failed = [job for job, future in _COMPILES.items() if future.done() and future.exception() is not None]
        if failed:
            _COMPILES.pop(failed[0]).result()


class RetrievalLayerState:
    """What retrieval keeps for one cache layer: the host index and running statistics."""

    def __init__(self, index: AttentionIndex, batch: int, kv_heads: int):
        self.index = index
        self.batch, self.kv_heads = batch, kv_heads
        self.build_s = self.build_knn_s = self.insert_s = 0.0
        self.pending: Future | None = None  # the graph build running in the background, until installed
        self.graph = False  # the graphs are installed (searched from then on)
        self.build_queries: list[np.ndarray] | None = None  # per row: the prefill queries kept for the graph build
        self.steps_before_index = 0  # attention calls served exactly over the host keys while the build ran
        self.exact_steps = self.graph_steps = 0  # attention calls served by the exact scan / the graph search
        self.rows: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = {}  # (B, Hq, Q) -> row maps
        self.all_valid = np.ones((0, 0), np.bool_)  # static part without padding: every slot valid
        self.slot_views: dict[str, tuple[tuple, np.ndarray]] = {}  # name -> (buffer key, numpy view of its slots)
        self.search_s = self.host_s = self.device_s = self.merge_s = 0.0
        self.scanned_sum = 0.0
        self.recall_sum = 0.0
        self.rows_measured = 0
        self.recall_rows = 0
        self.steps = 0

    def slot_rows(self, name: str, t: Tensor) -> np.ndarray:
        """:func:`_slot_rows` of the static ``t``, the view kept while ``t`` stays in the same slot buffer (its
        slots past ``T`` are ignored, so a new token in the buffer needs no new view)."""
        key = (t.data_ptr(), t.shape[:2], t.shape[3], t.stride())
        hit = self.slot_views.get(name)
        if hit is not None and hit[0] == key and hit[1].shape[1] >= t.shape[2]:
            return hit[1]
        rows, is_view = _slot_rows(t, with_flag=True)
        if is_view:
            self.slot_views[name] = (key, rows)
        return rows


@register
@dataclass
class Retrieval(DecodeMethod):
    """RetrievalAttention: sink + recent window on the device, the rest in host memory, top-k keys retrieved per step.

    Paper: https://arxiv.org/abs/2409.10516. Per query head, attention = the static part (``sink`` first + ``window``
    last tokens, on the model's device, exact) merged with the attention over the ``top_k`` keys retrieved from host
    memory through an attention-aware graph index (:mod:`kvaccel.kernels.attention_index`, built from the prefill
    queries after prefill, in a background thread while the first steps attend exactly, ``background_build``; a
    layer whose host part holds at most ``exact_below`` keys per row is searched exactly instead, without a graph):
    ``lse = logaddexp(lse_r, lse_f)``, ``o = e^{lse_r−lse} o_r + e^{lse_f−lse} o_f``. Exact when ``top_k`` covers
    every offloaded key. New tokens join the window; once ``spill_every`` tokens have slid
    out of it they move to host memory and are inserted into the graph (each linked to its nearest keys). The
    paper's 128 + 512 static tokens at 128K contexts are kept as the defaults for our 8k model (a 4k prompt offloads
    84% of its tokens).

    Parameters
    ----------
    top_k : int, default 100
        Keys retrieved per query head and step (the paper's 100).
    sink, window : int, default 128, 512
        Static tokens kept on the device: the first ``sink`` and the last ``window`` (the paper's numbers), per row
        (a left-padded row's sink is its first real tokens; each row spills on its own schedule, as it would alone,
        so with the exact scan a padded batch decodes each sequence as alone; the switch to the graph and ``ef``
        follow the batch's largest row).
    ef : int, default 128
        Search list size of the graph search (``>= top_k``; larger = higher recall, more keys scanned), at least:
        the search list grows with the host part as ``ef_per_key`` x the keys of the largest row.
    ef_per_key : float, default 1/256
        The search list scales with the keys held (recall at a fixed ``ef`` falls as the cache grows): ``max(ef,
        ef_per_key * host keys)``, i.e. 128 up to 32k host keys, 512 at 128k. 0 keeps ``ef`` fixed. Recall and speed
        at 32k / 128k: ``docs/results.md`` (section "Retrieval attention").
    degree : int, default 32
        Out-degree of the projected graph (the paper uses ~35).
    build_top_k : int, default 64
        Exact top keys per prefill query used to build the graph.
    build_queries : int, default 8192
        At most this many prefill queries per kv head build its graph (a uniform sample of the group's heads and
        positions).
    build_query_ratio : float, default 0.125
        Prefill queries per host key used for the graph (at least 1024, at most ``build_queries``). The exact kNN
        costs queries x keys, so the build grows with the square of the context; recall rises with the queries
        (``benchmarks/retrieval_index.py``).
    spill_every : int, default 64
        Tokens that slide out of the window wait on the device until this many can move to host together.
    exact_below : int, default 16384
        Crossover between exact search and the graph. While every (batch, kv head) row of a layer holds at most this
        many host keys, the layer's top-k is exact: one batched matmul of all its queries over all its host keys
        (a scan streams the keys, memory-bound) and a linear-time compiled selection; no graph exists (no build
        work). The spill that takes a row past it builds the layer's graph from prefill queries kept for that (in
        the background, ``background_build``), searched from then on. The default is where the scan stops being
        cheaper than a walk on this CPU (``benchmarks/retrieval_scan.py``; ``docs/results.md``, "Exact scan vs graph
        walk"). ``report()`` notes which path ran (``retrieval_exact_steps`` / ``retrieval_graph_steps`` per layer).
    scan_precision : {"auto", "float32", "bfloat16"}, default "auto"
        The exact scan reads a bfloat16 copy of the host keys (half the bytes) and re-scores the best ``top_k +
        16`` per head in float32 (the returned set and its logits are float32). "auto": bfloat16 where oneDNN
        has a native bfloat16 matmul (AVX512-BF16 / AMX), else float32 (bfloat16 would be emulated: slower).
    group_search : bool, default True
        GQA: one graph walk per kv head scores each visited key against all its query heads (each head keeps its
        own top-k); False runs one walk per query head, as the paper.
    measure_recall : bool, default False
        Also run the exact search every step and report ``retrieval_recall`` (slow: a full scan).

    background_build : bool, default True
        Build the graph in a background thread (one for all layers, in layer order) while decoding goes on: until a
        layer's graph is installed, its steps attend *exactly* over every host key (a compiled scan, same output as
        full attention); the first step after the build finished installs it and searches from then on. False
        builds during prefill, in the calling thread.

    host_fused : bool, default True
        On a CPU model (float32, one query per step) the static part is in host memory as well: it is attended
        together with the retrieved keys in one compiled pass (one softmax over their union, equal to the LSE merge
        of the two parts; time counted as host attention). False always runs device attention + ``lse_merge``.

    Stacked with a quantized storage method (``retrieval+kv_int8``, ``retrieval+kv_int4``), the host store holds
    codes instead of float32 (:mod:`kvaccel.kernels.attention_index_store`: per token, ``group_size`` channels a
    scale, around a per-row channel offset): the search, the exact scan and the attention read the codes, so the
    retrieved logits are those of the dequantized keys; the device part (``sink`` + ``window``) stays in the model
    dtype, as KIVI's full-precision window. ``retrieval_host_kv_bytes`` counts the store.

    The compiled kernels run on as many threads as torch (``torch.get_num_threads()``): a per-step kernel waiting
    on a second thread of a loaded machine costs ~8x more (measured); numba's thread pool start, which resets the
    process' OpenMP thread count (torch's too) to NUMBA_NUM_THREADS, is undone once. They are compiled ahead, on the
    build thread: those of the first decode steps from ``patch()`` on (overlapping the prefill), the graph's when a
    build starts; compiled code is cached on disk per user (:mod:`kvaccel.kernels.attention_index_jit`), so a later
    process loads it. Cold and warm figures: ``docs/results.md`` ("Cold start").

    ``retrieval_scanned_fraction`` in ``report()`` is keys read per graph walk / keys held (a walk serves one query
    head, or a kv head's group with ``group_search``; 1 for an exact scan), averaged over walks and steps;
    ``retrieval_build_s`` the graph build's seconds (of which ``retrieval_build_knn_s`` faiss' exact kNN),
    ``retrieval_steps_before_index`` the attention calls served exactly while it ran and ``retrieval_index_ready``
    whether no build is outstanding (a layer still below ``exact_below`` has none). :func:`wait_for_index` blocks
    until every layer's graph is installed.
    """

    name = "retrieval"
    requires = {"faiss": "faiss-cpu>=1.8", "numba": "numba>=0.60"}

    top_k: int = 100
    sink: int = 128
    window: int = 512
    ef: int = 128
    ef_per_key: float = 1 / 256
    degree: int = 32
    build_top_k: int = 64
    build_queries: int = 8192
    build_query_ratio: float = 0.125
    spill_every: int = 64
    exact_below: int = 16384
    group_search: bool = True
    measure_recall: bool = False
    background_build: bool = True
    host_fused: bool = True
    scan_precision: str = "auto"

    def __post_init__(self):
        for field, low, high in (("top_k", 1, None), ("sink", 0, None), ("window", 1, None), ("degree", 2, 256),
                                 ("build_top_k", 2, 1024), ("build_queries", 1, None), ("spill_every", 1, None),
                                 ("exact_below", 0, None)):
            val = getattr(self, field)
            check_int(field, val, low, high)
        check_number("build_query_ratio", self.build_query_ratio, 0, 64, low_open=True)
        check_number("ef_per_key", self.ef_per_key, 0, 1)
        if self.scan_precision not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"scan_precision must be 'auto', 'float32' or 'bfloat16', got {self.scan_precision!r}")
        if not isinstance(self.ef, int) or self.ef < self.top_k:
            raise ValueError(f"ef ({self.ef!r}) must be an int >= top_k ({self.top_k}): the search list holds the "
                             "results; raise ef or lower top_k")

    #: ``(bits, group_size)`` of the host store's codes when a quantized storage method is stacked on this method
    #: (taken from it by :meth:`check_stages` at ``patch()`` time); ``None``: float32
    host_codes = None

    def check_stages(self, stages: dict) -> None:
        """Take the host store's code format from a quantized storage method stacked on this one."""
        storage = stages.get("storage")
        self.host_codes = None if storage is None else storage.host_codes()
        if self.host_codes is not None and self.scan_precision == "bfloat16":
            raise ValueError(f"retrieval: scan_precision='bfloat16' scans a bfloat16 copy of float32 host keys, but "
                             f"{storage.name} stores them as codes (scanned as they are); use scan_precision='auto'")

    def bind(self, model) -> None:
        """At patch time: start compiling the kernels of the first decode steps (:meth:`_compile_ahead`) on the
        builder thread, so they are ready (or loaded from the on-disk cache) by the end of the prefill. With a
        quantized host store, check its layout for the model's head size first."""
        if self.host_codes is not None:
            from kvaccel.kernels.attention_index_store import check_layout  # numba: an optional dependency

            check_layout(head_size(text_config(model)), *self.host_codes)
        self._compile_ahead(self._first_paths(), model.device, model.dtype)

    def _first_paths(self) -> tuple[str, ...]:
        """The decode path of a layer's first steps: the exact scan, or with ``exact_below=0`` the graph."""
        return ("exact",) if self.exact_below > 0 else ("graph",)

    def _compile_ahead(self, paths: tuple[str, ...], device: torch.device, dtype: torch.dtype) -> None:
        """Compile the kernels of ``paths`` for a model on ``device`` in ``dtype`` in the background (once per
        process); a failed compile is raised by the next :meth:`attention`."""
        fused = self.host_fused and torch.device(device).type == "cpu" and dtype == torch.float32
        bits = None if self.host_codes is None else self.host_codes[0]
        _compile_ahead(_CompileJob(paths, self._scan_bf16 and bits is None, fused, self.group_search, bits))

    # ------------------------------------------------------------------ prefill: move the middle to host memory
    def after_prefill(self, ctx: AttentionContext) -> None:
        """After a prompt (or a later prompt chunk): keep sink + window on the device, the rest goes to the index."""
        layer = self._layer(ctx)
        if ctx.phase == "prefill" or getattr(layer, STATE_ATTR, None) is None:
            self._new_state(ctx, layer)
            self._compile_ahead(self._first_paths(), layer.keys.device, layer.keys.dtype)  # not patched by patch()
        _widen(layer)
        st: RetrievalLayerState = getattr(layer, STATE_ATTR)
        if not st.graph and st.pending is None:  # queries for the graph build (now or once exact_below is crossed)
            self._keep_build_queries(ctx, st, layer)
        _match_threads()
        self._spill(ctx, layer, min_spill=1)

    # ------------------------------------------------------------------ decode
    def attention(self, ctx: AttentionContext) -> Tensor:
        layer = self._layer(ctx)
        st: RetrievalLayerState | None = getattr(layer, STATE_ATTR, None)
        if st is None:
            raise RuntimeError(
                f"retrieval: layer {ctx.layer_idx} decodes without a prefilled retrieval state; prefill the prompt "
                "through the patched model first (a fresh KVAccelCache for every new prompt)"
            )
        q, k, v = ctx.query, ctx.key, ctx.value
        B, Hq, Q, D = q.shape
        if B != st.batch:
            raise ValueError(
                f"retrieval: the batch changed from {st.batch} to {B} after prefill (beam search / batch reordering "
                "is not supported by retrieval; use greedy or sampling)"
            )
        _match_threads()
        _raise_failed_compile()
        if st.pending is not None and st.pending.done():
            _install(st)
        index = st.index
        most = int(index.n.max())  # no row holds more: larger k / ef only allocate empty result slots
        # a CPU model holds the static part in host memory too: one compiled pass over static + retrieved keys
        fused = (self.host_fused and Q == 1 and q.device.type == "cpu" and k.dtype == v.dtype == torch.float32
                 and st.pending is None and most > 0)
        t0 = time.perf_counter()
        if not fused:
            o_f, lse_f = _device_attention(q, k, v, ctx.scaling, layer.valid)
        t1 = time.perf_counter()
        st.device_s += t1 - t0
        G = Hq // st.kv_heads
        if most == 0:
            out = o_f
        elif st.pending is not None:  # graph not ready: exact attention over every host key
            qg = q.detach().float().cpu().numpy().reshape(B * st.kv_heads, G * Q, D)
            o_r, lse_r = index.attend_all(qg, ctx.scaling)
            t2 = time.perf_counter()
            o_r = torch.from_numpy(o_r).to(device=q.device).view(B, Hq, Q, -1)
            lse_r = torch.from_numpy(lse_r).to(device=q.device).view(B, Hq, Q)
            out, _ = lse_merge(o_f, lse_f, o_r.to(o_f.dtype), lse_r)
            st.host_s += t2 - t1
            st.merge_s += time.perf_counter() - t2
            st.steps_before_index += 1
            ctx.state.notes.add("retrieval: steps while a layer's graph was building attended exactly over every "
                                "host key")
        else:
            top_k = min(self.top_k, most)
            qs = q.detach().float().cpu().numpy().reshape(B * Hq * Q, D)  # (b, h_q, query) order
            rows, walk_rows = self._rows(st, B, Hq, Q)
            if not st.graph or most <= self.exact_below:  # exact top-k: one batched scan of all rows
                ids, scores = index.scan_rows(qs.reshape(B * st.kv_heads, G * Q, D), top_k,
                                              BF16_MARGIN if self._scan_bf16 and not index.quantized else None)
                ids, scores = ids.reshape(B * Hq * Q, -1), scores.reshape(B * Hq * Q, -1)
                scanned = None  # every key of every row
                st.exact_steps += 1
                ctx.state.notes.add(self._exact_note())
            elif self.group_search:  # one walk per (b, kv head, query): (P, G, D) -> ids back in (b, h_q, q) order
                ef = self._ef(most)
                qg = qs.reshape(B, st.kv_heads, G, Q, D).transpose(0, 1, 3, 2, 4).reshape(-1, G, D)
                ids, scores, scanned = index.search_grouped(qg, walk_rows, top_k, ef, self.exact_below)
                ids, scores = (a.reshape(B, st.kv_heads, Q, G, -1).transpose(0, 1, 3, 2, 4).reshape(B * Hq * Q, -1)
                               for a in (ids, scores))
                st.graph_steps += 1
            else:
                walk_rows = rows
                ids, scores, scanned = index.search(qs, rows, top_k, self._ef(most), self.exact_below)
                st.graph_steps += 1
            t2 = time.perf_counter()
            if fused:
                R, T = B * st.kv_heads, k.shape[2]
                valid = layer.valid
                if valid is None:
                    if st.all_valid.shape != (R, T):
                        st.all_valid = np.ones((R, T), np.bool_)
                    svalid = st.all_valid
                else:
                    svalid = valid.expand(B, st.kv_heads, T).reshape(R, T).numpy()
                o = index.attend_union_groups(ids.reshape(R, G, -1), scores.reshape(R, G, -1), ctx.scaling,
                                              qs.reshape(R, G, D), st.slot_rows("k", k), st.slot_rows("v", v), svalid)
                out = torch.from_numpy(o).view(B, Hq, Q, -1)
            else:
                o_r, lse_r = index.attend(ids, scores, rows, ctx.scaling)
            t3 = time.perf_counter()
            if scanned is None:
                rows_held = int(np.count_nonzero(index.n))
                st.scanned_sum += rows_held
                st.rows_measured += rows_held
            else:
                held = index.n[walk_rows]
                has = held > 0
                st.scanned_sum += float((scanned[has] / held[has]).sum())
                st.rows_measured += int(has.sum())
            if self.measure_recall:
                exact, _ = index.search_exact(qs, rows, top_k)
                for r in np.nonzero(index.n[rows] > 0)[0]:
                    want = exact[r][exact[r] >= 0]
                    st.recall_sum += len(np.intersect1d(ids[r], want)) / len(want)
                    st.recall_rows += 1
            t4 = time.perf_counter()
            if not fused:
                o_r = torch.from_numpy(o_r).to(device=q.device).view(B, Hq, Q, -1)
                lse_r = torch.from_numpy(lse_r).to(device=q.device).view(B, Hq, Q)
                out, _ = lse_merge(o_f, lse_f, o_r.to(o_f.dtype), lse_r)
            st.search_s += t2 - t1
            st.host_s += t3 - t2
            st.merge_s += time.perf_counter() - t4
        st.steps += 1
        if ctx.phase == "decode":
            self._spill(ctx, layer, min_spill=self.spill_every)
        return out.transpose(1, 2).to(q.dtype)

    # ------------------------------------------------------------------ internals
    def _ef(self, most: int) -> int:
        """The graph search's list size for a layer whose largest row holds ``most`` host keys."""
        return min(max(self.ef, int(self.ef_per_key * most)), most)

    def _exact_note(self) -> str:
        note = getattr(self, "_note", None)
        if note is None:
            if self.host_codes is not None:
                precision = f"scan of the {self.host_codes[0]}-bit codes"
            else:
                precision = "bfloat16 scan + float32 re-scoring" if self._scan_bf16 else "float32 scan"
            note = self._note = (f"retrieval: layers holding <= exact_below={self.exact_below} host keys per row are "
                                 f"searched exactly ({precision}; no graph built)")
        return note

    @property
    def _scan_bf16(self) -> bool:
        if self.scan_precision == "auto":
            return _fast_bf16()
        return self.scan_precision == "bfloat16"

    def _layer(self, ctx: AttentionContext) -> KVAccelLayer:
        if ctx.layer is None:
            raise RuntimeError("retrieval needs a KVAccelCache (generate() creates one on a patched model)")
        return ctx.layer

    def _new_state(self, ctx: AttentionContext, layer: KVAccelLayer) -> None:
        from kvaccel.kernels.attention_index import AttentionIndex

        B, Hkv = layer.keys.shape[:2]
        bits, group = self.host_codes or (None, 64)
        index = AttentionIndex(
            B * Hkv, layer.keys.shape[-1], layer.values.shape[-1], degree=self.degree, build_top_k=self.build_top_k,
            bits=bits, group=group,
        )
        setattr(layer, STATE_ATTR, RetrievalLayerState(index, B, Hkv))

    def _rows(self, st: RetrievalLayerState, B: int, Hq: int, Q: int) -> tuple[np.ndarray, np.ndarray]:
        """Index row of every (b, query head, query) and of every (b, kv head, query) walk (cached per shape)."""
        key = (B, Hq, Q)
        if key not in st.rows:
            G = Hq // st.kv_heads
            head_row = (np.arange(B)[:, None] * st.kv_heads + np.arange(Hq)[None, :] // G).reshape(-1)
            st.rows[key] = (np.repeat(head_row, Q), np.repeat(np.arange(B * st.kv_heads), Q))
        return st.rows[key]

    def _middle(self, layer: KVAccelLayer) -> tuple[Tensor, Tensor]:
        """Per row ``(B, 1|H_kv, T)``: the slots to move to host memory (real tokens after the row's first ``sink``
        real ones, before the last ``window`` slots) and every slot's rank among the row's real tokens. A left-padded
        row's sink starts at its first real token, not at its first slot."""
        T = layer.keys.shape[2]
        slot = torch.arange(T, device=layer.keys.device)
        if layer.valid is None:
            rank = slot.view(1, 1, T)
            return ((rank >= self.sink) & (rank < T - self.window)).expand(layer.keys.shape[0], 1, T), rank
        rank = layer.valid.cumsum(-1) - 1
        return layer.valid & (rank >= self.sink) & (slot < T - self.window), rank

    def _spill(self, ctx: AttentionContext, layer: KVAccelLayer, min_spill: int) -> None:
        """Move each row's middle (:meth:`_middle`) to host memory once it holds ``min_spill`` tokens: linked into the
        graph when there is one, else stored (scanned exactly); the graph is built once a row holds more than
        ``exact_below`` keys. Rows spill on their own schedule (a padded row as it would alone); the device keeps
        each row's real tokens right-aligned (left padding first), so the last ``window`` slots stay its window."""
        st: RetrievalLayerState = getattr(layer, STATE_ATTR)
        B, Hkv = st.batch, st.kv_heads
        middle, rank = self._middle(layer)
        middle = middle & (middle.sum(-1, keepdim=True) >= min_spill)
        if not bool(middle.any()):
            return
        t0 = time.perf_counter()
        T = layer.keys.shape[2]
        used = torch.nonzero(middle.any(0).any(0))[:, 0]
        lo, hi = int(used[0]), int(used[-1]) + 1
        keys = layer.keys[:, :, lo:hi].detach().float().cpu().numpy()
        values = layer.values[:, :, lo:hi].detach().float().cpu().numpy()
        take = middle[:, :, lo:hi].expand(B, Hkv, -1).cpu().numpy()
        # sequence position of a token: the row's real tokens before it (its sink and host keys, then its rank)
        pos = rank[:, :, lo:hi].expand(B, Hkv, -1).cpu().numpy() + st.index.n.reshape(B, Hkv, 1)
        ks, vs, ps = [], [], []
        for b in range(B):
            for h in range(Hkv):
                sel = take[b, h]
                ks.append(keys[b, h][sel])
                vs.append(values[b, h][sel])
                ps.append(pos[b, h][sel])
        index = st.index
        if st.graph:
            index.insert(ks, vs, ps, ef=max(self.degree, 32))
        else:  # no graph (yet, or still building): stored; linked when a graph is installed
            index.store(ks, vs, ps)
            if st.pending is None and int(index.n.max()) > self.exact_below:
                self._compile_ahead(("graph",), layer.keys.device, layer.keys.dtype)  # ahead of the build, same thread
                self._start_build(st)
        if layer.valid is None:  # no padding: every row spills the same slots
            slot = torch.arange(T, device=layer.keys.device)
            layer.keep(torch.cat([slot[:lo], slot[hi:]]).view(1, 1, -1).expand(B, 1, -1))
        else:  # per row: its kept slots right-aligned, left padding (invalid) before them
            kept = layer.valid & ~middle
            pos_kept, _ = compact_slots(kept)
            count = kept.sum(-1, keepdim=True)
            j = torch.arange(pos_kept.shape[-1], device=kept.device) - (pos_kept.shape[-1] - count)
            layer.keep(pos_kept.gather(-1, j.clamp(min=0)), slot_valid=j >= 0)
        st.insert_s += time.perf_counter() - t0

    def _start_build(self, st: RetrievalLayerState) -> None:
        """Build the graphs of the rows holding keys from the kept prefill queries: in the background thread
        (``background_build``; exact attention over the host keys until installed) or here."""
        if st.build_queries is None:
            raise RuntimeError("retrieval: no prefill queries were kept to build the graph from (the layer was not "
                               "prefilled through the patched model)")
        job = st.index.graph_build(st.build_queries)
        st.build_queries = None
        if self.background_build:
            st.pending = _BUILDER.submit(job, st)
        else:
            st.pending = Future()
            st.pending.set_result(job.run())
            _install(st)

    def _keep_build_queries(self, ctx: AttentionContext, st: RetrievalLayerState, layer: KVAccelLayer) -> None:
        """Per row, a uniform sample of this prompt pass's queries of the row's query heads (real tokens), added to
        those kept from earlier passes: ``build_query_ratio`` per key the row will hold when its graph is built
        (now, or once it holds more than ``exact_below``), at least 1024, at most ``build_queries``."""
        queries = ctx.query
        B, Hkv = st.batch, st.kv_heads
        _, Hq, L, D = queries.shape
        G = Hq // Hkv
        q = queries.detach().float().cpu().numpy()
        real = None if ctx.pad is None else ctx.pad[:, -L:].cpu().numpy()
        rng = np.random.default_rng(ctx.layer_idx)
        spill = self._middle(layer)[0].sum(-1).expand(B, Hkv).reshape(-1).cpu().numpy()
        held = np.maximum(st.index.n + spill, self.exact_below + 1)
        kept = st.build_queries
        out = []
        for b in range(B):
            pos = np.arange(L) if real is None else np.nonzero(real[b])[0]
            for h in range(Hkv):
                r = b * Hkv + h
                qb = q[b, h * G : (h + 1) * G][:, pos].reshape(-1, D)
                if kept is not None:
                    qb = np.concatenate([kept[r], qb])
                want = min(self.build_queries, max(1024, int(self.build_query_ratio * held[r])))
                if qb.shape[0] > want:
                    qb = qb[np.sort(rng.choice(qb.shape[0], want, replace=False))]
                out.append(np.ascontiguousarray(qb))
        st.build_queries = out

    def report_stats(self, cache: KVAccelCache, layer_stats: list[dict]) -> None:
        """The ``retrieval_*`` statistics of every layer, read from its state when :func:`kvaccel.report` runs (not
        at every step: bytes and sums cost ~0.1 ms per layer-step, measured)."""
        for layer, stats in zip(cache.layers, layer_stats, strict=False):
            st = getattr(layer, STATE_ATTR, None)
            if st is not None:
                self._record(stats, layer, st)

    @staticmethod
    def _record(s: dict, layer: KVAccelLayer, st: RetrievalLayerState) -> None:
        s["retrieval_host_tokens"] = int(st.index.n.sum())
        s["retrieval_host_bytes"] = st.index.nbytes() + sum(q.nbytes for q in st.build_queries or ())  # + kept
        s["retrieval_host_kv_bytes"] = st.index.keys.nbytes + st.index.values.nbytes  # the store (capacity included)
        s["retrieval_device_bytes"] = layer.nbytes()
        s["retrieval_build_s"] = st.build_s
        s["retrieval_insert_s"] = st.insert_s
        s["retrieval_search_s"] = st.search_s
        s["retrieval_host_attention_s"] = st.host_s
        s["retrieval_device_attention_s"] = st.device_s
        s["retrieval_merge_s"] = st.merge_s
        s["retrieval_steps"] = st.steps
        s["retrieval_scanned_fraction"] = st.scanned_sum / st.rows_measured if st.rows_measured else None
        s["retrieval_recall"] = st.recall_sum / st.recall_rows if st.recall_rows else None
        s["retrieval_build_knn_s"] = st.build_knn_s
        s["retrieval_steps_before_index"] = st.steps_before_index
        s["retrieval_index_ready"] = st.pending is None
        s["retrieval_exact_steps"] = st.exact_steps
        s["retrieval_graph_steps"] = st.graph_steps


def _install(st: RetrievalLayerState) -> None:
    """Put a finished background graph build into the layer's index (re-raising its error, if it failed) and link
    the keys that were offloaded while it ran."""
    build = st.pending.result()
    st.pending = None
    st.graph = True
    st.build_s += build.seconds
    st.build_knn_s += build.knn_seconds
    st.insert_s += st.index.install(build)


def wait_for_index(cache: KVAccelCache) -> float:
    """Block until the graph build of every retrieval layer of ``cache`` has finished, and install it (the next
    steps search the index). Returns the seconds waited."""
    t0 = time.perf_counter()
    for layer in cache.layers:
        st = getattr(layer, STATE_ATTR, None)
        if st is not None and st.pending is not None:
            st.pending.result()
            _install(st)
    return time.perf_counter() - t0


def _slot_rows(t: Tensor, with_flag: bool = False):
    """A CPU float32 ``(B, H, T, D)`` tensor as a C-contiguous ``(B * H, C, D)`` array of ``C >= T`` slots per head:
    without a copy when ``t`` is the first ``T`` slots of a ``(B, H, C, D)`` buffer (the cache's slot buffers; the
    slots past ``T`` are spare), else a contiguous copy (``C = T``). ``with_flag``: also whether it is a view."""
    B, H, T, D = t.shape
    sb, sh, st, sd = t.stride()
    if sd == 1 and st == D and sh % D == 0 and sh >= T * D and (B == 1 or sb == H * sh):
        C = sh // D
        if t.storage_offset() + B * H * sh <= t.untyped_storage().nbytes() // t.element_size():
            rows = torch.as_strided(t.detach(), (B * H, C, D), (sh, D, 1)).numpy()
            return (rows, True) if with_flag else rows
    rows = t.detach().reshape(B * H, T, D).contiguous().numpy()
    return (rows, False) if with_flag else rows


def _widen(layer: KVAccelLayer) -> None:
    """Give a ThinK narrow segment back full width (pruned channels zero: same logits) so one store holds all."""
    if layer.narrow is None:
        return
    keys, valid = layer.dense_keys()
    values = torch.cat([layer.narrow.dense_values(layer.values.shape[-1]), layer.values], dim=2)
    layer.keys, layer.values, layer.narrow = keys.contiguous(), values.contiguous(), None
    layer.valid = None if valid is None or bool(valid.all()) else valid.contiguous()


def _device_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """Attention over the static part ``(B, H_q, Q, Dv)`` and its log-sum-exp ``(B, H_q, Q)`` float32.

    One query: the decode kernel. Several (a later prompt chunk): causal among the last ``Q`` slots, GQA stacked.
    """
    B, Hq, Q, D = q.shape
    if Q == 1:
        o, lse = decode_attention(q, k, v, scale=scale, valid=valid, return_lse=True)
        return o, lse
    Hkv, T = k.shape[1], k.shape[2]
    G = Hq // Hkv
    logits = torch.matmul(q.reshape(B, Hkv, G * Q, D).float(), k.transpose(-1, -2).float()) * scale
    rows = torch.arange(Q, device=q.device).repeat(G)
    mask = torch.arange(T, device=q.device)[None, :] <= (T - Q + rows)[:, None]
    mask = mask[None, None] if valid is None else mask[None, None] & valid[:, :, None, :]
    logits = logits.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    o = torch.matmul(probs, v.float()).reshape(B, Hq, Q, -1)
    return o.to(q.dtype), lse.reshape(B, Hq, Q)
