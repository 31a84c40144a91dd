"""Quest: query-aware page selection at decode time; nothing is evicted, each step reads only its top pages."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvaccel.checks import check_int, check_number, is_int
from kvaccel.config import register
from kvaccel.kernels.backend import BACKENDS
from kvaccel.kernels.cpu_ops import single_thread
from kvaccel.kernels.page_bounds import append_page_bounds, page_bounds, select_attend

from .base import DecodeMethod

if TYPE_CHECKING:
    from kvaccel.cache import KVAccelCache, KVAccelLayer
    from kvaccel.patches.attention import AttentionContext

Tensor = torch.Tensor

#: attribute of a ``KVAccelLayer`` holding Quest's per-layer page metadata
STATE_ATTR = "_kvaccel_quest"


class QuestLayerState:
    """Page bounds of one cache layer over its token axis ``[narrow, full]``, grown as decode appends tokens.

    ``kmin``/``kmax`` ``(B, H_kv, capacity, D)`` and ``count`` ``(B, 1|H_kv, capacity)`` are buffers with spare
    pages; the first ``pages`` are in use. Row ``b``'s pages start at slot ``offset[b]`` (its first real token);
    ``real`` ``(B,)`` counts its real tokens (kept up to date by :meth:`append`, never recounted)."""

    def __init__(self, layer: KVAccelLayer, page_size: int, backend: str = "auto"):
        keys, valid = layer.dense_keys()  # narrow keys zero-filled in their pruned channels: same q · k
        B, _, N, _ = keys.shape
        if valid is None:
            offset = torch.zeros(B, dtype=torch.long, device=keys.device)
        else:
            real = valid.any(1)  # (B, N)
            offset = torch.where(real.any(-1), real.to(torch.int8).argmax(-1), 0)
        kmin, kmax, count = page_bounds(keys, page_size, valid, offset)
        self.page_size = page_size
        self.backend = backend
        self.offset = offset
        self.offsets = offset.tolist()  # the same on the host: page arithmetic without device ops
        self.real = count[:, 0].sum(-1, dtype=torch.long)
        self.pages = kmin.shape[2]
        self.kmin, self.kmax, self.count = (self._spare(t) for t in (kmin, kmax, count))
        self.n = N  # tokens covered
        self.batch = B
        self.k_slot = getattr(layer, "_k", None)  # the full segment's storage: replaced by keep / batch reorder
        self.narrow = layer.narrow
        self.sparse_steps = self.dense_steps = 0
        self.attended: Tensor | None = None  # (B, H_s) tokens attended per selection row, summed over sparse steps

    @staticmethod
    def _spare(t: Tensor, pages: int = 0) -> Tensor:
        n = t.shape[2]
        buf = t.new_zeros(*t.shape[:2], max(n + pages, n + max(16, n // 8)), *t.shape[3:])
        buf[:, :, :n] = t
        return buf

    def current(self, layer: KVAccelLayer) -> bool:
        """The layer holds what the metadata covers, plus tokens appended since (no eviction, reorder, pruning)."""
        return (getattr(layer, "_k", None) is self.k_slot and layer.narrow is self.narrow
                and layer.length >= self.n and layer.keys.shape[0] == self.batch)

    def append(self, layer: KVAccelLayer) -> None:
        """Fold the tokens appended since the last call (full segment, in order) into their pages."""
        Tn = layer.length - layer.keys.shape[2]
        valid = layer.valid
        P = self.page_size
        while self.n < layer.length:
            t = self.n
            pages = [max(0, (t - o) // P) for o in self.offsets]
            need = max(pages) + 1
            if need > self.kmin.shape[2]:
                self.kmin, self.kmax, self.count = (self._spare(x[:, :, : self.pages], need - self.pages)
                                                    for x in (self.kmin, self.kmax, self.count))
            new_valid = None if valid is None else valid[:, :, t - Tn]
            if new_valid is not None and new_valid.shape[1] > self.count.shape[1]:
                self.count = self.count.expand(-1, new_valid.shape[1], -1).contiguous()
            append_page_bounds(self.kmin, self.kmax, self.count, layer.keys[:, :, t - Tn], pages, new_valid,
                               self.real, backend=self.backend)
            self.pages = max(self.pages, need)
            self.n += 1

    def plan(self, budget: int | float) -> tuple[list[int], list[int], bool]:
        """This step's pages per row: ``(pages, last, covered)``, the pages to select (the budget rounded up to whole
        pages, at least one, at most the row's), the row's newest page, and whether every row's budget covers all its
        pages. A float budget is a fraction of the row's real tokens."""
        P = self.page_size
        total = [(self.n - o + P - 1) // P for o in self.offsets]
        if is_int(budget):
            want = [math.ceil(budget / P)] * len(total)
        else:
            want = [max(1, math.ceil(r * budget / P)) for r in self.real.tolist()]
        covered = all(w >= t for w, t in zip(want, total, strict=True))
        return [min(w, t) for w, t in zip(want, total, strict=True)], [t - 1 for t in total], covered

    def nbytes(self) -> int:
        """Bytes of the page metadata in use (min and max per page and channel, and the page counts)."""
        per = self.kmin[:, :, :1]
        return 2 * per.numel() * per.element_size() * self.pages + self.count[:, :, : self.pages].numel() * 4


@register
@dataclass
class Quest(DecodeMethod):
    """Quest: per page of the cache, key min/max bound each query's scores; attend exactly to the top pages.

    Paper: https://arxiv.org/abs/2406.10774 (reference: mit-han-lab/Quest ``evaluation/quest_attention.py``). Per page
    of ``page_size`` tokens and per channel the cache keeps the keys' min ``m`` and max ``M`` (built after the prompt,
    updated as decode appends tokens; a row's pages start at its first real token, so a left-padded row pages as
    alone). Each step, per query head, page score ``U = Σ_i max(q_i m_i, q_i M_i)`` (an upper bound of ``q · k`` over
    the page), the ``ceil(budget / page_size)`` top pages are selected (the page of the newest token always among
    them) and attention is the exact softmax over their tokens. The first ``dense_layers`` layers decode densely, as
    the paper. Nothing is evicted: the metadata adds ``2 / page_size`` of the keys' bytes (``quest_metadata_bytes``
    in ``report()``). Prefill is whatever the prefill stage does. When the budget covers every page of every row the
    step is stock dense attention (same tokens as unpatched decoding).

    GQA (``gqa``): ``"head"`` (default, the reference's): each query head selects its own pages (the reference's kv
    head loads their union), so the query heads of one kv head may attend different tokens; ``"group"``: the query
    heads of a kv head share one selection by their summed scores ``Σ_g U_g`` (an upper bound of ``Σ_g q_g · k``),
    so each kv head's tokens are gathered once (``H_q / H_kv`` times fewer bytes read per step).

    Composes with any prefill method and with ``think`` (narrow keys are bounded with their pruned channels at zero,
    i.e. exactly the logits ThinK computes); an eviction method (other than ``full``) or a storage method is refused.
    A forward of several tokens after decoding started attends densely (noted in ``report()``).

    Parameters
    ----------
    page_size : int, default 16
        Tokens per page (the paper's 16).
    budget : int or float, default 1024
        Tokens attended per query head and step: an int is a token count, a float in (0, 1] a fraction of the
        row's real tokens held at that step; rounded up to whole pages (at least one: the newest token's).
    dense_layers : int, default 2
        The first layers decode densely (the paper skips Quest on its first two layers).
    gqa : {"head", "group"}, default "head"
        Pages selected per query head, or per kv head for its group (above).
    backend : {"auto", "torch", "triton"}, default "auto"
        Kernels of :mod:`kvaccel.kernels.page_bounds`: Triton on CUDA; on CPU (``"torch"``) compiled kernels that
        select and attend each head's pages in one pass over the cache in place (float32/float64 caches without a
        ThinK narrow segment), PyTorch ops otherwise.
    """

    name = "quest"

    page_size: int = 16
    budget: int | float = 1024
    dense_layers: int = 2
    gqa: str = "head"
    backend: str = "auto"

    def __post_init__(self):
        check_int("page_size", self.page_size, 1)
        if is_int(self.budget):
            check_int("budget", self.budget, 1, why="tokens attended per step; a float in (0, 1] is a fraction")
        else:
            check_number("budget", self.budget, 0, 1, low_open=True,
                         why="a fraction of the cache; an int is a token count")
        check_int("dense_layers", self.dense_layers, 0)
        if self.gqa not in ("head", "group"):
            raise ValueError(f"gqa ({self.gqa!r}) must be 'head' (pages per query head) or 'group' (per kv head)")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend ({self.backend!r}) must be one of {BACKENDS}")

    def check_stages(self, stages: dict) -> None:
        """Quest bounds pages of the whole cache: refuse eviction (tokens leave pages; H2O-style scorers also need
        the attention of every token) and storage methods (keys no longer in the model's dtype)."""
        evict = stages.get("evict")
        if evict is not None and evict.name != "full":
            raise ValueError(
                f"'quest' cannot be combined with the eviction method '{evict.name}': quest selects pages of the "
                "whole (unevicted) cache each step; drop the eviction method, or use it with decode=dense"
            )
        storage = stages.get("storage")
        if storage is not None:
            raise ValueError(f"'quest' cannot be combined with the storage method '{storage.name}' yet: its page "
                             "bounds and gathered attention read keys stored in the model's dtype")

    def bind(self, model) -> None:
        layers = model.config.get_text_config(decoder=True).num_hidden_layers
        if self.dense_layers >= layers:
            raise ValueError(f"quest: dense_layers ({self.dense_layers}) >= the model's {layers} layers, so no layer "
                             f"would select pages; use dense_layers < {layers} (the paper: 2)")

    # ------------------------------------------------------------------ prompt: build the page bounds
    def after_prefill(self, ctx: AttentionContext) -> None:
        """After the prompt (or a later prompt chunk), once eviction/channel methods ran: build the page bounds."""
        if ctx.layer is not None and ctx.layer_idx >= self.dense_layers:
            setattr(ctx.layer, STATE_ATTR, QuestLayerState(ctx.layer, self.page_size, self.backend))

    # ------------------------------------------------------------------ decode
    def attention(self, ctx: AttentionContext) -> Tensor:
        from kvaccel.patches.attention import dense_decode

        layer = ctx.layer
        if layer is None:
            raise RuntimeError("quest needs a KVAccelCache (generate() creates one on a patched model)")
        Q = ctx.query.shape[2]
        if ctx.layer_idx < self.dense_layers:
            return dense_decode(ctx)
        if Q > 1:  # a prompt chunk (Quest's prefill is dense) or several tokens at once after decoding started
            if ctx.phase == "decode":
                ctx.state.notes.add("quest: a forward of several tokens after decoding started attended densely "
                                    "(page selection serves one query per step)")
            return dense_decode(ctx)
        st: QuestLayerState | None = getattr(layer, STATE_ATTR, None)
        if st is None:
            raise RuntimeError(f"quest: layer {ctx.layer_idx} decodes without page bounds; prefill the prompt "
                               "through the patched model first (a fresh KVAccelCache for every new prompt)")
        with single_thread():  # small ops: waking idle OpenMP threads would cost more than the work (cpu_ops)
            if st.current(layer):
                st.append(layer)
            else:  # the cache was reordered (beam search) or replaced: bounds rebuilt from what it holds
                st = QuestLayerState(layer, self.page_size, self.backend)
                setattr(layer, STATE_ATTR, st)
            pages, last, covered = st.plan(self.budget)
        if covered:
            st.dense_steps += 1
            return dense_decode(ctx)
        nar = layer.narrow
        valid = None if layer.valid is None and nar is None else layer.token_valid()
        nk = {} if nar is None else dict(k_narrow=nar.keys, channel_idx=nar.channel_idx, v_narrow=nar.values,
                                         value_idx=nar.value_idx)
        group = self.gqa == "group"
        rows = (st.batch, st.kmin.shape[1] if group else ctx.query.shape[1])
        if st.attended is None or st.attended.shape != rows:
            st.attended = torch.zeros(rows, dtype=torch.long, device=st.kmin.device)
        backend = "torch" if nar is not None and self.backend == "auto" else self.backend
        out = select_attend(ctx.query, st.kmin[:, :, : st.pages], st.kmax[:, :, : st.pages],
                            st.count[:, :, : st.pages], pages, last, layer.keys, layer.values, page_size=self.page_size,
                            offset=st.offset, scale=ctx.scaling, valid=valid, group=group, attended=st.attended,
                            backend=backend, **nk)
        st.sparse_steps += 1
        return out.transpose(1, 2)

    def report_stats(self, cache: KVAccelCache, layer_stats: list[dict]) -> None:
        """Per layer: ``quest_metadata_bytes`` (page bounds held), ``quest_sparse_steps`` / ``quest_dense_steps``
        (steps that selected pages / whose budget covered the cache) and ``quest_attended_tokens`` (tokens attended
        per query head, averaged over sparse steps); dense layers report ``None``."""
        for layer, stats in zip(cache.layers, layer_stats, strict=False):
            st: QuestLayerState | None = getattr(layer, STATE_ATTR, None)
            stats["quest_metadata_bytes"] = None if st is None else st.nbytes()
            stats["quest_sparse_steps"] = None if st is None else st.sparse_steps
            stats["quest_dense_steps"] = None if st is None else st.dense_steps
            stats["quest_attended_tokens"] = (float(st.attended.double().mean()) / st.sparse_steps) if st is not None \
                and st.sparse_steps else None
