"""Eviction base classes: ``EvictionMethod`` (general ``compress``) and ``ScoredEviction`` (write one ``score``)."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from kvaccel.checks import check_int
from kvaccel.config import Method, resolve_budget, validate_budget
from kvaccel.kernels.cpu_ops import single_thread
from kvaccel.rope import RopeShift

if TYPE_CHECKING:
    from kvaccel.patches.attention import AttentionContext


@dataclass
class EvictionMethod(Method):
    """Decides which tokens stay in the cache. Called after attention of every forward of every layer."""

    stage = "evict"

    def after_prefill(self, ctx: AttentionContext) -> None:
        """After the prompt (or a prompt chunk) was attended: compress the layer."""

    def after_decode(self, ctx: AttentionContext) -> None:
        """After one decode step: keep the cache bounded."""

    def wants_decode_probs(self) -> bool:
        """True when ``after_decode`` accumulates the step's attention probabilities: the decode path then computes
        them with the attention (``ctx.decode_probs``) instead of a second pass over the keys."""
        return False


@dataclass
class ScoredEviction(EvictionMethod):
    """Keep the ``capacity`` highest-scoring tokens per head; a subclass writes ``score`` only.

    Parameters
    ----------
    budget : int | float
        Tokens kept per head (int >= 1) or a fraction of the prompt (float in (0, 1]). The cache is compressed
        to this size after the prompt and kept at it during decoding.
    chunk : int
        Span-preserving selection (ChunkKV, https://arxiv.org/abs/2502.00299): ``0``/``1`` = per-token top-k
        (default); ``N >= 2`` = keep whole chunks of ``N`` contiguous tokens, see ``keep_top``.
    span_rule : str
        With ``chunk >= 2``: ``"grid"`` (default) = fixed chunks (``chunk_select``); ``"sliding"`` = the best
        ``chunk``-wide windows wherever they start (``spans.sliding_span_select``), so a span that straddles a grid
        boundary is not kept in part.
    rerotate : bool
        Key re-rotation (``kvaccel.rope``): cache slot ``s`` is kept at RoPE position ``s``, so positions stay
        below the cache size and generation can run past the model's context window (StreamingLLM §3.2).
        ``False`` (default): keys keep their true positions.
    slack : int | None
        Decode-time batching: the cache layer has ``capacity + slack`` slots; new tokens fill the spare slots in
        place and, when they are full, one eviction cuts the layer back to ``capacity`` tokens (so an eviction
        costs one gather every ``slack`` steps, not every step, and the cache never holds more than
        ``capacity + slack`` slots, which ``report()`` counts). ``1`` = evict at every step (the papers' loop);
        ``None`` (default) = ``max(1, capacity // 32)``, at most ~3% above the budget.
    """

    budget: int | float = 0.25
    chunk: int = 1
    slack: int | None = None
    rerotate: bool = False
    span_rule: str = "grid"
    #: False for scorers that depend on true positions (they refuse ``rerotate=True``)
    supports_rerotate: ClassVar[bool] = True

    def __post_init__(self):
        validate_budget(self.budget)
        check_int("chunk", self.chunk, 0, why="0 or 1 = per-token selection")
        check_slack(self.slack)
        if self.span_rule not in SPAN_RULES:
            raise ValueError(f"span_rule ({self.span_rule!r}) must be one of {SPAN_RULES}")
        if not isinstance(self.rerotate, bool):
            raise ValueError(f"rerotate ({self.rerotate!r}) must be True or False")
        self.rope_shift = None  # set by bind() when rerotate

    def check_stages(self, stages: dict) -> None:
        """Key re-rotation moves full-width keys of the device cache only: refuse channel pruning and decode
        methods beside it (called by ``patch()`` before anything is installed)."""
        if not self.rerotate:
            return
        for stage in ("channels", "decode"):
            if stage in stages:
                raise ValueError(
                    f"'{self.name}(rerotate=True)' cannot be combined with '{stages[stage].name}': key re-rotation "
                    f"moves full-width keys in the device cache only; drop rerotate or {stage}"
                )

    def bind(self, model) -> None:
        if self.rerotate:
            if not self.supports_rerotate:
                raise ValueError(f"{self.name} scores tokens by their true positions and cannot use rerotate=True")
            self.rope_shift = RopeShift.from_model(model)

    def spec(self) -> str:
        """As ``Method.spec``, without ``chunk`` / ``slack`` / ``rerotate`` / ``span_rule`` at their defaults (spec
        strings stay short)."""
        args = ",".join(
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if (f.name, getattr(self, f.name)) not in (("slack", None), ("rerotate", False), ("span_rule", "grid"))
            and not (f.name == "chunk" and self.chunk <= 1)
        )
        return f"{self.name}({args})"

    def decode_slack(self, capacity: int) -> int:
        """Spare slots above ``capacity`` while decoding (see ``slack``)."""
        return decode_slack(capacity, self.slack)

    def score(self, ctx: AttentionContext) -> torch.Tensor:
        """``(B, H_kv | 1, N)`` scores of the layer's ``N = layer.length`` tokens (``[narrow, full]`` axis when
        ThinK pruned channels), higher = keep. Invalid slots are masked by the base."""
        raise NotImplementedError

    def capacity(self, ctx: AttentionContext) -> int:
        """Tokens kept per head in this layer (per-layer schedules override this)."""
        return resolve_budget(self.budget, ctx.layer.prompt_len)

    def after_prefill(self, ctx: AttentionContext) -> None:
        cap = self.capacity(ctx)
        ctx.record_capacity(cap)
        ctx.layer.reserve = self.decode_slack(cap)
        if ctx.layer.length > cap:
            self.compress(ctx, cap)

    def after_decode(self, ctx: AttentionContext) -> None:
        cap = self.capacity(ctx)
        if eviction_due(ctx.layer, cap, self.decode_slack(cap)):
            self.compress(ctx, cap)

    def compress(self, ctx: AttentionContext, capacity: int) -> None:
        layer = ctx.layer
        scores = self.score(ctx)
        if scores.shape[-1] != layer.length:
            raise NotImplementedError(
                f"{self.name} scored {scores.shape[-1]} tokens but layer {ctx.layer_idx} holds {layer.length} "
                "(narrow + full-width): this method cannot yet evict after channel pruning during decode; "
                "use it without a channels method, or with decode eviction off"
            )
        self.keep(layer, scores, capacity)

    def keep(self, layer, scores: torch.Tensor, capacity: int) -> None:
        """Keep ``capacity`` tokens per head of ``layer`` by ``scores`` with this method's ``chunk`` / ``span_rule``."""
        keep_top(layer, scores, capacity, self.chunk, self.span_rule)


#: ``span_rule`` values
SPAN_RULES = ("grid", "sliding")


def check_slack(slack) -> None:
    """Raise ``ValueError`` unless ``slack`` is ``None`` or an int >= 1."""
    if slack is not None:
        check_int("slack", slack, 1, why="or None for automatic; 1 = evict at every step")


def decode_slack(capacity: int, slack: int | None) -> int:
    """Spare slots above a decode ``capacity``: ``slack``, or ``max(1, capacity // 32)`` when ``None``."""
    return max(1, capacity // 32) if slack is None else slack


def one_thread(enabled: bool = True) -> contextlib.AbstractContextManager:
    """Run the block with one intra-op CPU thread in the calling thread, its count restored after (``enabled=False``:
    unchanged); other Python threads and torch's process-wide default are untouched (:func:`cpu_ops.single_thread`).

    For a decode step's small scoring work (a few thousand logits per layer): each parallel region (a matmul, a
    softmax, a vectorised log) must wake the other threads, which costs more than the work, up to a scheduler time
    slice on a loaded machine. Results are the same (each op's elements are computed alike).
    """
    return single_thread() if enabled else contextlib.nullcontext()


def eviction_due(layer, capacity: int, slack: int) -> bool:
    """True when a decoding layer filled its ``capacity + slack`` slots (and holds more than ``capacity``); slots the
    storage padded (``pad_slots``) do not count."""
    n = layer.length - layer.pad_slots
    return n > capacity and n >= capacity + slack


#: score of tokens a scorer always keeps (sinks, observation / recent windows); chunked selection keeps them apart
KEEP_SCORE = torch.finfo(torch.float32).max


def keep_top(layer, scores: torch.Tensor, capacity: int, chunk: int = 1, span_rule: str = "grid") -> None:
    """Keep the ``capacity`` highest-scoring real tokens of ``layer`` per head, in order (``chunk >= 2``:
    ``chunk_select``, or ``sliding_span_select`` with ``span_rule="sliding"``)."""
    scores = scores.float().masked_fill(~layer.token_valid(), float("-inf"))
    if chunk >= 2 and span_rule == "sliding":
        from .spans import sliding_span_select  # spans imports KEEP_SCORE from here

        idx = sliding_span_select(scores, capacity, chunk)
    elif chunk >= 2:
        idx = chunk_select(scores, capacity, chunk)
    else:
        idx = scores.topk(capacity, dim=-1).indices
    layer.keep(idx.sort(dim=-1).values)


def chunk_select(scores: torch.Tensor, capacity: int, chunk: int) -> torch.Tensor:
    """Span-preserving (ChunkKV-style) selection: ``(B, H, capacity)`` token indices (unsorted).

    https://arxiv.org/abs/2502.00299 — the rule, per sequence and head, on ``scores`` ``(B, H|1, N)`` (``-inf`` =
    not a token):

    1. Tokens scored ``KEEP_SCORE`` (the scorer's sinks / observation or recent window) are kept first, outside
       any chunk.
    2. The other real tokens form chunks of ``chunk`` consecutive tokens by their rank among the real tokens held
       (``rank // chunk``: at the prompt these are contiguous positions; a chunk cut by a kept window or by the end
       of the prompt is smaller). A chunk's score is the sum of its tokens' scores.
    3. Whole chunks are kept in decreasing chunk score while they fit in the rest of the budget; the remainder
       (fewer than one chunk) is filled with the best tokens of the next chunk in that order, so exactly
       ``capacity`` tokens are kept (bytes = budget).
    """
    N = scores.shape[-1]
    valid = scores > float("-inf")
    forced = scores >= KEEP_SCORE
    free = valid & ~forced
    rank = free.cumsum(-1) - 1
    cid = torch.where(free, rank // chunk, 0)
    n_chunks = (N + chunk - 1) // chunk
    csum = scores.new_zeros(*scores.shape[:-1], n_chunks).scatter_add_(-1, cid, torch.where(free, scores, 0.0))
    # chunk order: 0 = best chunk; forced tokens sort before every chunk, non-tokens after
    order = csum.argsort(dim=-1, descending=True, stable=True)
    crank = torch.empty_like(order).scatter_(-1, order, torch.arange(n_chunks, device=scores.device).expand_as(order))
    key = torch.where(free, crank.gather(-1, cid).to(scores.dtype), float(n_chunks))
    key = torch.where(forced, -1.0, key)
    # lexicographic (chunk rank ascending, token score descending): sort by score, then stable-sort by chunk rank
    by_score = scores.argsort(dim=-1, descending=True, stable=True)
    by_chunk = key.gather(-1, by_score).argsort(dim=-1, stable=True)
    return by_score.gather(-1, by_chunk)[..., :capacity]
