"""KVzip: score every prompt token by how much the model attends to it while *reconstructing* the prompt."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvaccel.cache import cache_kwarg, compact_slots
from kvaccel.checks import check_int, check_ratio
from kvaccel.config import register, resolve_budget, validate_budget
from kvaccel.kernels.cpu_ops import cpu_workers, run_parallel
from kvaccel.varlen_cache import VarlenLayer, check_varlen_stages

from .base import EvictionMethod
from .expected_attention import ExpectedAttention

Tensor = torch.Tensor

#: ``allocation`` values
ALLOCATIONS = ("global", "layer")
#: reconstruction queries per task of the scoring (with their ``G`` heads: ``(G * rows, keys)`` fp32 logits per task)
ROW_BLOCK = 64


def reconstruction_max_attention(query: Tensor, keys: Tensor, scale: float, scored: slice, n_sink: int,
                                 include_own: bool = False) -> Tensor:
    """``(B, H_kv, len(scored))``: per key of ``keys[:, :, scored]``, the max over the ``Q`` reconstruction queries
    and the ``G`` query heads of its kv head of the softmax attention probability.

    ``query`` ``(B, H_q, Q, D)`` are the last ``Q`` tokens of ``keys`` ``(B, H_kv, T, D)`` (causal among
    themselves). As kvpress' KVzipPress, the softmax runs over the first ``n_sink`` keys, the ``scored`` keys and
    the ``Q`` reconstruction keys (not over other chunks of the prompt). GQA without repeating K/V; fp32 inside.
    ``include_own``: also return the scores of the queries' own ``Q`` keys, ``(B, H_kv, len(scored) + Q)``.

    No probability is materialised: per block of ``ROW_BLOCK`` queries, the logits' row log-sum-exp ``lse_i`` comes
    first, then ``max_i p_ij = exp(max_i (s_ij - lse_i))`` is one subtraction and one max over the same logits.
    The blocks are independent tasks (:func:`~kvaccel.kernels.cpu_ops.run_parallel`: on CPU, single-threaded ops
    on worker threads), each writing its own partial max.
    """
    B, Hq, Q, D = query.shape
    Hkv, T = keys.shape[1], keys.shape[2]
    G, N, dev = Hq // Hkv, B * Hkv, keys.device
    ctx = torch.cat([keys[:, :, :n_sink], keys[:, :, scored]], dim=2).float().reshape(N, -1, D)
    S = min(n_sink, T)
    C = ctx.shape[1] - S
    rec = keys[:, :, T - Q :].float().reshape(N, Q, D)
    q = query.float().reshape(N, G, Q, D)
    starts = range(0, Q, ROW_BLOCK)
    best = torch.empty(len(starts), N, C + Q if include_own else C, device=dev)
    if include_own:
        best[..., C:] = float("-inf")  # a block's rows see no key after its last row

    def run(i: int, r0: int) -> None:
        r1 = min(Q, r0 + ROW_BLOCK)
        qb = q[:, :, r0:r1].reshape(N, G * (r1 - r0), D)
        s = torch.bmm(qb, ctx.transpose(1, 2)).mul_(scale)  # (N, G·r, S + C)
        own = torch.bmm(qb, rec[:, :r1].transpose(1, 2)).mul_(scale).view(N, G, r1 - r0, r1)
        future = torch.arange(r1, device=dev) > torch.arange(r0, r1, device=dev)[:, None]
        own = own.masked_fill_(future, float("-inf")).view(N, G * (r1 - r0), r1)
        lse = torch.logaddexp(torch.logsumexp(s, -1), torch.logsumexp(own, -1)).unsqueeze(-1)
        torch.amax(s[:, :, S:].sub_(lse), dim=1, out=best[i, :, :C])
        if include_own:
            torch.amax(own.sub_(lse), dim=1, out=best[i, :, C : C + r1])

    run_parallel(run, list(enumerate(starts)), cpu_workers(dev))
    return best.amax(0).exp_().view(B, Hkv, -1)


def normalise_heads(scores: Tensor, sink: Tensor) -> Tensor:
    """Scores ``(B, H, N)`` divided by their sum over each head's non-sink tokens (sinks excluded, kept apart)."""
    s = scores.float().masked_fill(sink, 0.0)
    return s / s.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


@register
@dataclass
class KVzip(EvictionMethod):
    """KVzip: query-agnostic eviction scored by context reconstruction, budgets allocated across layers and heads.

    https://arxiv.org/abs/2505.23416 (as kvpress' ``KVzipPress``): after the prompt ``x`` is prefilled, the model is
    fed ``prompt + "\\n" + x`` (``prompt`` = "Repeat the previous context exactly.") over the prompt's cache, in
    chunks of ``chunk_size`` prompt tokens; a cached token's score is the max, over the reconstruction queries and
    the query heads of its kv head, of its softmax attention probability (softmax over the first ``n_sink`` tokens,
    the chunk and the reconstruction tokens). The reconstruction tokens are then dropped from the cache and the
    prompt is evicted at once: ``allocation="global"`` (the paper's and kvpress' default) keeps the
    ``budget · L · H_kv · layers`` highest scores over every layer and kv head of a sequence (layers and heads end up
    with different lengths), ``"layer"`` keeps ``budget · L · H_kv`` per layer over its heads. Every (layer, head)
    keeps its first ``n_sink`` tokens. The layers are stored packed per head (``VarlenLayer``, bytes = budget).
    Cost: a second forward over ~the prompt's length plus the scoring (``benchmarks/kvzip_prefill.py`` times it
    against a dense prefill).

    kvaccel's option ``expected_weight=a`` (``a`` in [0, 1]) mixes the reconstruction score ``z`` with the
    probabilities ``p`` of ``expected_attention(future_positions="mixture", observation_weight=0.2)`` (the attention
    future queries are expected to pay, plus what the prompt's last 32 queries paid; ``p`` sums to 1 per head):
    ``s = ((1 - a) z / Σz + a p) · ‖v‖``, and the allocation runs on ``s`` normalised per head (so heads and layers
    compete on shares of their own mass). ``a = 0`` (default) is KVzip as published (raw ``z``, no ``‖v‖``).

    kvaccel's option ``observation_window=N`` adds the prompt's own last ``N`` queries to the reconstruction
    queries: ``z_j = max(z_j, max over those queries and the group of their prefill attention to j)`` (causal
    softmax over the prompt). Reconstruction asks "which tokens are needed to say the context again"; the last
    queries add "which tokens the text being written now reads" (SnapKV's observation window, as a max so it stays
    on KVzip's raw scale and its global allocation still compares heads and layers). ``0`` (default) = KVzip.

    Prompt-time only: the prompt is compressed once, after the first forward; tokens fed later (a question, decoded
    tokens) are kept (as the paper and kvpress; ``report()`` notes it). Limits, each a clear error: ``input_ids``
    (not ``inputs_embeds``), no padding, and no channel (``think``) or decode (``retrieval``) method alongside (the
    packed layout). When the budget covers the prompt nothing runs (tokens identical to full attention).

    Recommended (kvpress' KL protocol, ``benchmarks/peers/README.md``): ``kvzip(observation_window=128)``, 0.62x /
    0.51x the KL of kvpress' KVzipPress at compression 0.5 / 0.75 (window chosen on 4 tuning windows).

    Parameters
    ----------
    budget : int | float
        Tokens kept per head on average (int) or fraction of the prompt (float in (0, 1]). Default 0.25.
    n_sink : int
        First tokens every (layer, head) keeps. Default 4.
    allocation : str
        ``"global"`` (default) or ``"layer"``.
    chunk_size : int
        Prompt tokens reconstructed per forward. Default 2048 (kvpress').
    expected_weight : float
        Weight of the expected-attention score, in [0, 1]. Default 0 (KVzip).
    observation_window : int
        Last prompt queries whose attention joins the reconstruction max. Default 0 (KVzip).
    prompt_ids : tuple[int, ...] | None
        Token ids of ``"\\n\\nRepeat the previous context exactly." + "\\n"``; ``None`` (default): built with the
        model's tokenizer (``AutoTokenizer`` from the model's local path) when patched.
    """

    name = "kvzip"
    budget: int | float = 0.25
    n_sink: int = 4
    allocation: str = "global"
    chunk_size: int = 2048
    expected_weight: float = 0.0
    observation_window: int = 0
    prompt_ids: tuple[int, ...] | None = None

    PROMPT = "\n\nRepeat the previous context exactly."
    NEXT_CHUNK_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"
    #: previous chunk's last tokens given to a later chunk's prompt (kvpress: 8)
    OVERLAP = 8

    def __post_init__(self):
        validate_budget(self.budget)
        check_int("n_sink", self.n_sink, 0)
        check_int("chunk_size", self.chunk_size, 1)
        check_ratio("expected_weight", self.expected_weight)
        check_int("observation_window", self.observation_window, 0)
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation ({self.allocation!r}) must be one of {ALLOCATIONS}")
        if self.prompt_ids is not None:
            ids = self.prompt_ids
            if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
                raise TypeError(f"prompt_ids ({ids!r}) must be a sequence of token ids")
            ids = tuple(ids)
            if len(ids) < 2 or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
                raise ValueError(
                    f"prompt_ids ({ids!r}) must hold >= 2 non-negative token ids: the reconstruction instruction "
                    "followed by a newline"
                )
            self.prompt_ids = ids
        object.__setattr__(self, "_expected", None)
        object.__setattr__(self, "_prompts", None)  # (first chunk ids, next-chunk ids, "\n" ids)
        object.__setattr__(self, "_pending", {})  # layer index -> {"expected", "window", "layer"} of the prefill
        object.__setattr__(self, "_busy", False)

    # ------------------------------------------------------------------ patch()-time
    def check_stages(self, stages: dict) -> None:
        check_varlen_stages("kvzip", stages, "drop '{other}' or use a per-token eviction method with it")

    def bind(self, model) -> None:
        if self.expected_weight > 0:
            ea = ExpectedAttention(budget=1.0, future_positions="mixture", observation_weight=0.2, n_sink=self.n_sink)
            ea.bind(model)
            object.__setattr__(self, "_expected", ea)
        object.__setattr__(self, "_prompts", self._prompt_token_ids(model))

    def _prompt_token_ids(self, model) -> tuple[list[int], list[int], list[int]]:
        if self.prompt_ids is not None:
            return list(self.prompt_ids[:-1]), list(self.prompt_ids[:-1]), list(self.prompt_ids[-1:])
        path = getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "")
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as err:  # noqa: BLE001 - any failure means the same thing to the user
            raise ValueError(
                f"kvzip builds its reconstruction prompt with the model's tokenizer and could not load one from "
                f"{path!r} ({type(err).__name__}: {err}); pass kvzip(prompt_ids=...) with the token ids of "
                f"{self.PROMPT!r} followed by the id(s) of a newline"
            ) from None

        def enc(text: str) -> list[int]:
            return tok.encode(text, add_special_tokens=False)

        return enc(self.PROMPT), enc(self.NEXT_CHUNK_PROMPT), enc("\n")

    # ------------------------------------------------------------------ inside the prefill forward
    def after_prefill(self, ctx) -> None:
        if self._busy:  # a reconstruction forward: score the chunk's prompt tokens
            self._score_chunk(ctx)
            return
        if ctx.phase != "prefill":  # compressed once, at the first forward: later tokens stay, as decoded ones
            ctx.state.notes.add("kvzip: tokens fed after the first forward (e.g. a question) are kept uncompressed")
            return
        if ctx.pad is not None:
            raise NotImplementedError(
                "kvzip does not support padded batches yet (the reconstruction prompt would sit after the padding); "
                "run the sequences one by one or as a batch of equal lengths"
            )
        cap = resolve_budget(self.budget, ctx.layer.length)
        ctx.record_capacity(cap)
        if cap >= ctx.layer.length:
            return
        extra = window = None
        if self._expected is not None:
            extra = self._expected.score(ctx).float()  # sinks carry KEEP_SCORE; replaced at allocation
        n = min(self.observation_window, ctx.layer.length)
        if n:  # the prompt's last n queries: their own max attention over the whole prompt (causal)
            L = ctx.layer.length
            window = reconstruction_max_attention(ctx.query[:, :, L - n :], ctx.key, ctx.scaling, slice(0, L - n), 0,
                                                  include_own=True)
        self._pending[ctx.layer_idx] = {"expected": extra, "window": window, "layer": ctx.layer}

    # ------------------------------------------------------------------ after the prefill forward
    def after_forward(self, model, cache, input_ids: Tensor | None) -> None:
        """Called by ``patch()``'s forward wrapper after every forward: run the reconstruction and evict."""
        if self._busy or not self._pending:
            return
        pending, self._pending = self._pending, {}
        if len(pending) != len(cache.layers):
            raise RuntimeError(f"kvzip expected every layer of the prefill to be pending, got {sorted(pending)}")
        if input_ids is None:
            raise ValueError("kvzip reconstructs the prompt from its token ids: call the model with input_ids")
        L = input_ids.shape[1]
        first, later, newline = self._prompts
        dev = input_ids.device
        scores = [torch.zeros(input_ids.shape[0], cache.layers[i].keys.shape[1], L, device=dev)
                  for i in range(len(cache.layers))]
        object.__setattr__(self, "_scores", scores)
        object.__setattr__(self, "_busy", True)
        try:
            for c0 in range(0, L, self.chunk_size):
                c1 = min(L, c0 + self.chunk_size)
                head = first if c0 == 0 else later
                prefix = torch.tensor(head, dtype=input_ids.dtype, device=dev).expand(input_ids.shape[0], -1)
                parts = [prefix]
                if c0 > 0:
                    parts.append(input_ids[:, max(0, c0 - self.OVERLAP) : c0])
                parts += [torch.tensor(newline, dtype=input_ids.dtype, device=dev).expand(input_ids.shape[0], -1),
                          input_ids[:, c0:c1]]
                ids = torch.cat(parts, dim=1)
                object.__setattr__(self, "_chunk", slice(c0, c1))
                pos = torch.arange(L, L + ids.shape[1], device=dev)[None].expand(ids.shape[0], -1)
                with torch.no_grad():
                    model(input_ids=ids, position_ids=pos, use_cache=True, **{cache_kwarg(model): cache})
                for layer in cache.layers:
                    layer.drop_tail(L)
        finally:
            object.__setattr__(self, "_busy", False)
        self._evict(cache, pending, scores, L)

    def _score_chunk(self, ctx) -> None:
        ch = self._chunk
        n_sink = min(self.n_sink, ch.start)
        best = reconstruction_max_attention(ctx.query, ctx.key, ctx.scaling, ch, n_sink)
        self._scores[ctx.layer_idx][..., ch] = best

    def _evict(self, cache, pending: dict, scores: list[Tensor], L: int) -> None:
        masks = allocate(self._mixed_scores(pending, scores, L), resolve_budget(self.budget, L), self.allocation)
        for i, mask in enumerate(masks):
            layer = pending[i]["layer"]
            idx, slot_valid = compact_slots(mask, min_width=1)
            cache.layers[i] = VarlenLayer.from_selection(layer, idx, slot_valid)

    def _mixed_scores(self, pending: dict, scores: list[Tensor], L: int) -> list[Tensor]:
        """Per layer ``(B, H_kv, L)``: the score the allocation ranks (``inf`` on the sinks)."""
        sink = torch.arange(L, device=scores[0].device) < self.n_sink
        mixed = []
        for i, z in enumerate(scores):
            if pending[i]["window"] is not None:
                z = torch.maximum(z, pending[i]["window"])
            s = z
            e = pending[i]["expected"]
            if e is not None:
                a = self.expected_weight
                vnorm = pending[i]["layer"].values.float().norm(dim=-1)
                s = normalise_heads((1 - a) * normalise_heads(z, sink) * vnorm + a * e.masked_fill(sink, 0.0), sink)
            mixed.append(s.masked_fill(sink, float("inf")))
        return mixed


def allocate(mixed: list[Tensor], cap: int, allocation: str) -> list[Tensor]:
    """Keep masks ``(B, H_kv, L)`` per layer: the ``cap · H_kv · layers`` highest of ``mixed`` over every layer and
    head of a sequence (``"global"``), or the ``cap · H_kv`` highest of each layer (``"layer"``)."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation ({allocation!r}) must be one of {ALLOCATIONS}")
    B, L = mixed[0].shape[0], mixed[0].shape[-1]
    if allocation == "layer":
        return [_top_mask(s.reshape(B, -1), cap * s.shape[1]).view_as(s) for s in mixed]
    flat = torch.cat([s.reshape(B, -1) for s in mixed], dim=1)  # (B, layers * H * L)
    keep = _top_mask(flat, cap * sum(s.shape[1] for s in mixed))
    masks = keep.split([s.shape[1] * L for s in mixed], dim=1)
    return [m.view(B, s.shape[1], L) for m, s in zip(masks, mixed, strict=True)]


def _top_mask(scores: Tensor, k: int) -> Tensor:
    """``(B, N)`` bool: the ``k`` highest scores of each row."""
    k = min(k, scores.shape[1])
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(k, dim=1).indices, True)

