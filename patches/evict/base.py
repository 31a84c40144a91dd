"""Eviction base classes: ``EvictionMethod`` (general ``compress``) and ``ScoredEviction`` (write one ``score``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvaccel.config import Method, resolve_budget, validate_budget

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


@dataclass
class ScoredEviction(EvictionMethod):
    """Keep the ``capacity`` highest-scoring tokens per head; a subclass writes ``score`` only.

    Parameters
    ----------
    budget : int | float
        Tokens kept per head (int >= 1) or a fraction of the prompt (float in (0, 1]). The cache is compressed
        to this size after the prompt and kept at it during decoding.
    """

    budget: int | float = 0.25

    def __post_init__(self):
        validate_budget(self.budget)

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
        if ctx.layer.length > cap:
            self.compress(ctx, cap)

    def after_decode(self, ctx: AttentionContext) -> None:
        cap = self.capacity(ctx)
        if ctx.layer.length > cap:
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
        keep_top(layer, scores, capacity)


def keep_top(layer, scores: torch.Tensor, capacity: int) -> None:
    """Keep the ``capacity`` highest-scoring real tokens of ``layer`` per head, in order."""
    scores = scores.float().masked_fill(~layer.token_valid(), float("-inf"))
    layer.keep(scores.topk(capacity, dim=-1).indices.sort(dim=-1).values)
