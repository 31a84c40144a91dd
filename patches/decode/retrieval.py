"""RetrievalAttention: the cache beyond sink + recent window lives in host memory; each step attends the keys
an attention-aware index retrieves, merged exactly with the device part by log-sum-exp."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvaccel.config import register
from kvaccel.kernels.decode_attention import decode_attention
from kvaccel.kernels.lse_merge import lse_merge

from .base import DecodeMethod

if TYPE_CHECKING:
    from kvaccel.cache import KVAccelLayer
    from kvaccel.kernels.attention_index import AttentionIndex
    from kvaccel.patches.attention import AttentionContext

Tensor = torch.Tensor

#: attribute of a ``KVAccelLayer`` holding this method's per-layer state
STATE_ATTR = "_kvaccel_retrieval"

STAT_KEYS = (
    "retrieval_host_tokens", "retrieval_host_bytes", "retrieval_device_bytes", "retrieval_build_s",
    "retrieval_insert_s", "retrieval_search_s", "retrieval_host_attention_s", "retrieval_device_attention_s",
    "retrieval_merge_s", "retrieval_scanned_fraction", "retrieval_recall", "retrieval_steps",
)


class RetrievalLayerState:
    """What retrieval keeps for one cache layer: the host index and running statistics."""

    def __init__(self, index: AttentionIndex, batch: int, kv_heads: int):
        self.index = index
        self.batch, self.kv_heads = batch, kv_heads
        self.build_s = self.insert_s = 0.0
        self.search_s = self.host_s = self.device_s = self.merge_s = 0.0
        self.scanned_sum = 0.0
        self.recall_sum = 0.0
        self.rows_measured = 0
        self.recall_rows = 0
        self.steps = 0


@register
@dataclass
class Retrieval(DecodeMethod):
    """RetrievalAttention: sink + recent window on the device, the rest in host memory, top-k keys retrieved per step.

    Paper: https://arxiv.org/abs/2409.10516. Per query head, attention = the static part (``sink`` first + ``window``
    last tokens, on the model's device, exact) merged with the attention over the ``top_k`` keys retrieved from host
    memory through an attention-aware graph index (:mod:`kvaccel.kernels.attention_index`, built from the prefill
    queries after prefill): ``lse = logaddexp(lse_r, lse_f)``, ``o = e^{lse_r−lse} o_r + e^{lse_f−lse} o_f``. Exact
    when ``top_k`` covers every offloaded key. New tokens join the window; once ``spill_every`` tokens have slid
    out of it they move to host memory and are inserted into the graph (each linked to its nearest keys). The
    paper's 128 + 512 static tokens at 128K contexts are kept as the defaults for our 8k model (a 4k prompt offloads
    84% of its tokens).

    Parameters
    ----------
    top_k : int, default 100
        Keys retrieved per query head and step (the paper's 100).
    sink, window : int, default 128, 512
        Static tokens kept on the device: the first ``sink`` and the last ``window`` (the paper's numbers).
    ef : int, default 128
        Search list size of the graph search (``>= top_k``; larger = higher recall, more keys scanned).
    degree : int, default 32
        Out-degree of the projected graph (the paper uses ~35).
    build_top_k : int, default 64
        Exact top keys per prefill query used to build the graph.
    build_queries : int, default 4096
        Prefill queries per kv head used for the graph (a uniform sample of the group's heads and positions).
    spill_every : int, default 64
        Tokens that slide out of the window wait on the device until this many can move to host together.
    exact_below : int, default 2048
        A (batch, kv head) row holding at most this many host keys is scanned exactly instead of searched (a
        sequential scan costs ~10x less per key than a graph walk's random reads; short prompts get exact top-k).
    group_search : bool, default True
        GQA: one graph walk per kv head scores each visited key against all its query heads (each head keeps its
        own top-k); False runs one walk per query head, as the paper.
    measure_recall : bool, default False
        Also run the exact search every step and report ``retrieval_recall`` (slow: a full scan).

    ``retrieval_scanned_fraction`` in ``report()`` is keys read per graph walk / keys held (a walk serves one query
    head, or a kv head's group with ``group_search``), averaged over walks and steps.
    """

    name = "retrieval"
    requires = {"faiss": "faiss-cpu>=1.8", "numba": "numba>=0.60"}

    top_k: int = 100
    sink: int = 128
    window: int = 512
    ef: int = 128
    degree: int = 32
    build_top_k: int = 64
    build_queries: int = 4096
    spill_every: int = 64
    exact_below: int = 2048
    group_search: bool = True
    measure_recall: bool = False

    def __post_init__(self):
        for field, low, high in (("top_k", 1, None), ("sink", 0, None), ("window", 1, None), ("degree", 2, 256),
                                 ("build_top_k", 2, 1024), ("build_queries", 1, None), ("spill_every", 1, None),
                                 ("exact_below", 0, None)):
            val = getattr(self, field)
            if isinstance(val, bool) or not isinstance(val, int) or val < low or (high is not None and val > high):
                rng = f">= {low}" if high is None else f"in [{low}, {high}]"
                raise ValueError(f"{field} must be an int {rng}, got {val!r}")
        if not isinstance(self.ef, int) or self.ef < self.top_k:
            raise ValueError(f"ef ({self.ef!r}) must be an int >= top_k ({self.top_k}): the search list holds the "
                             "results; raise ef or lower top_k")

    # ------------------------------------------------------------------ prefill: move the middle to host memory
    def after_prefill(self, ctx: AttentionContext) -> None:
        """After a prompt (or a later prompt chunk): keep sink + window on the device, the rest goes to the index."""
        layer = self._layer(ctx)
        if ctx.phase == "prefill" or getattr(layer, STATE_ATTR, None) is None:
            self._new_state(ctx, layer)
        _widen(layer)
        self._spill(ctx, layer, queries=ctx.query, min_spill=1)

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
        t0 = time.perf_counter()
        o_f, lse_f = _device_attention(q, k, v, ctx.scaling, layer.valid)
        t1 = time.perf_counter()
        st.device_s += t1 - t0
        index = st.index
        if int(index.n.max()) == 0:
            out = o_f
        else:
            G = Hq // st.kv_heads
            most = int(index.n.max())  # no row holds more: larger k / ef only allocate empty result slots
            top_k, ef = min(self.top_k, most), min(self.ef, most)
            qs = q.detach().float().cpu().numpy().reshape(B * Hq * Q, D)
            head_row = (np.arange(B)[:, None] * st.kv_heads + np.arange(Hq)[None, :] // G).reshape(-1)
            rows = np.repeat(head_row, Q)
            if self.group_search:  # one walk per (b, kv head, query): (P, G, D) -> ids back in (b, h_q, query) order
                qg = qs.reshape(B, st.kv_heads, G, Q, D).transpose(0, 1, 3, 2, 4).reshape(-1, G, D)
                walk_rows = np.repeat(np.arange(B * st.kv_heads), Q)
                ids, scores, scanned = index.search_grouped(qg, walk_rows, top_k, ef, self.exact_below)
                ids, scores = (a.reshape(B, st.kv_heads, Q, G, -1).transpose(0, 1, 3, 2, 4).reshape(B * Hq * Q, -1)
                               for a in (ids, scores))
            else:
                walk_rows = rows
                ids, scores, scanned = index.search(qs, rows, top_k, ef, self.exact_below)
            t2 = time.perf_counter()
            o_r, lse_r = index.attend(ids, scores, rows, ctx.scaling)
            t3 = time.perf_counter()
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
            o_r = torch.from_numpy(o_r).to(device=q.device).view(B, Hq, Q, -1)
            lse_r = torch.from_numpy(lse_r).to(device=q.device).view(B, Hq, Q)
            t4 = time.perf_counter()
            out, _ = lse_merge(o_f, lse_f, o_r.to(o_f.dtype), lse_r)
            st.search_s += t2 - t1
            st.host_s += t3 - t2
            st.merge_s += time.perf_counter() - t4
        st.steps += 1
        if ctx.phase == "decode":
            self._spill(ctx, layer, queries=None, min_spill=self.spill_every)
        self._record(ctx, layer, st)
        return out.transpose(1, 2).to(q.dtype)

    # ------------------------------------------------------------------ internals
    def _layer(self, ctx: AttentionContext) -> KVAccelLayer:
        if ctx.layer is None:
            raise RuntimeError("retrieval needs a KVAccelCache (generate() creates one on a patched model)")
        return ctx.layer

    def _new_state(self, ctx: AttentionContext, layer: KVAccelLayer) -> None:
        from kvaccel.kernels.attention_index import AttentionIndex

        B, Hkv = layer.keys.shape[:2]
        index = AttentionIndex(
            B * Hkv, layer.keys.shape[-1], layer.values.shape[-1], degree=self.degree, build_top_k=self.build_top_k
        )
        setattr(layer, STATE_ATTR, RetrievalLayerState(index, B, Hkv))

    def _spill(self, ctx: AttentionContext, layer: KVAccelLayer, queries: Tensor | None, min_spill: int) -> None:
        """Move the slots between the sink and the window to the host index (build it first if it is empty)."""
        st: RetrievalLayerState = getattr(layer, STATE_ATTR)
        T = layer.keys.shape[2]
        sink = min(self.sink, T)
        end = T - self.window
        if end - sink < min_spill:
            return
        B, Hkv = st.batch, st.kv_heads
        keys = layer.keys[:, :, sink:end].detach().float().cpu().numpy()
        values = layer.values[:, :, sink:end].detach().float().cpu().numpy()
        valid = None if layer.valid is None else layer.valid[:, :, sink:end].expand(B, Hkv, -1).cpu().numpy()
        first_pos = layer.seen - T  # arrival positions (exact unless an eviction method dropped tokens before)
        pos = np.arange(first_pos + sink, first_pos + end)
        ks, vs, ps = [], [], []
        for b in range(B):
            for h in range(Hkv):
                sel = slice(None) if valid is None else valid[b, h]
                ks.append(keys[b, h][sel])
                vs.append(values[b, h][sel])
                ps.append(pos[sel])
        index = st.index
        if int(index.n.max()) == 0 and queries is not None:
            st.build_s += index.build(ks, vs, ps, self._build_queries(ctx, queries, B, Hkv))
        else:
            st.insert_s += index.insert(ks, vs, ps, ef=max(self.degree, 32))
        keep = torch.cat([torch.arange(sink, device=layer.keys.device), torch.arange(end, T, device=layer.keys.device)])
        layer.keep(keep.view(1, 1, -1).expand(B, 1, -1))

    def _build_queries(self, ctx: AttentionContext, queries: Tensor, B: int, Hkv: int) -> list[np.ndarray]:
        """Per row, a uniform sample of ``build_queries`` prefill queries of the row's query heads (real tokens)."""
        _, Hq, L, D = queries.shape
        G = Hq // Hkv
        q = queries.detach().float().cpu().numpy()
        real = None if ctx.pad is None else ctx.pad[:, -L:].cpu().numpy()
        rng = np.random.default_rng(ctx.layer_idx)
        out = []
        for b in range(B):
            pos = np.arange(L) if real is None else np.nonzero(real[b])[0]
            for h in range(Hkv):
                qb = q[b, h * G : (h + 1) * G][:, pos].reshape(-1, D)
                if qb.shape[0] > self.build_queries:
                    qb = qb[np.sort(rng.choice(qb.shape[0], self.build_queries, replace=False))]
                out.append(qb)
        return out

    def _record(self, ctx: AttentionContext, layer: KVAccelLayer, st: RetrievalLayerState) -> None:
        s = ctx.stats
        s["retrieval_host_tokens"] = int(st.index.n.sum())
        s["retrieval_host_bytes"] = st.index.nbytes()
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
