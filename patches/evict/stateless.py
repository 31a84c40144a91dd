"""Stateless scorers: the score is a function of what the layer holds now (and the current query), no running state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvaccel.config import resolve_budget, validate_budget

from .base import ScoredEviction, eviction_due


@dataclass
class StatelessScorer(ScoredEviction):
    """Prompt-time top-``budget`` by ``score``; while decoding, optionally bounded by ``decode_budget``.

    The base of TOVA, KNorm and KeyDiff: ``score`` reads only the layer's held tokens (and this forward's query), so
    the same rule serves the prompt, a later prompt chunk and a decode-time eviction; nothing is stored per token.
    ``decode_budget=None`` (kvpress: prune once at the prompt) lets the cache grow while decoding; a budget cuts the
    cache back to ``decode_budget`` tokens whenever it fills ``decode_budget + slack`` slots (see
    ``ScoredEviction.slack``).

    Parameters
    ----------
    decode_budget : int | float | None
        ``None`` (default): no eviction while decoding. Int tokens / float fraction of the prompt: bound the cache
        while decoding.
    """

    decode_budget: int | float | None = None
    #: True for scorers that read every key channel (a key's norm or direction): they cannot score keys whose
    #: channels ThinK pruned, so they refuse a channels method when they would rescore after it (decode budget)
    needs_full_keys: ClassVar[bool] = False

    def __post_init__(self):
        super().__post_init__()
        if self.decode_budget is not None:
            validate_budget(self.decode_budget, "decode_budget")

    def check_stages(self, stages: dict) -> None:
        super().check_stages(stages)
        if self.needs_full_keys and self.decode_budget is not None and "channels" in stages:
            raise ValueError(
                f"'{self.name}' scores keys by all their channels and '{stages['channels'].name}' prunes key channels "
                f"of the kept tokens, so decode-time eviction could not rescore them: drop decode_budget (prompt-time "
                f"eviction runs before the channel pruning) or drop '{stages['channels'].name}'"
            )

    def full_width_keys(self, layer) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(keys, valid)`` of every held token at full width; ``NotImplementedError`` after ThinK pruned channels."""
        if layer.narrow is not None:
            raise NotImplementedError(
                f"{self.name} scores a key by all its channels, but this layer holds keys whose channels a channels "
                "method pruned (a later prompt chunk after the first was compressed): feed the prompt in one forward, "
                f"or use {self.name} without a channels method"
            )
        return layer.keys, layer.valid

    def decode_capacity(self, ctx) -> int | None:
        """Tokens kept per head while decoding in this layer, ``None`` = unbounded."""
        return None if self.decode_budget is None else resolve_budget(self.decode_budget, ctx.layer.prompt_len)

    def after_prefill(self, ctx) -> None:
        cap = self.capacity(ctx)
        ctx.record_capacity(cap)
        if self.decode_budget is not None:
            ctx.layer.reserve = self.decode_slack(self.decode_capacity(ctx))
        if ctx.layer.length > cap:
            self.compress(ctx, cap)

    def after_decode(self, ctx) -> None:
        cap = self.decode_capacity(ctx)
        if cap is not None and eviction_due(ctx.layer, cap, self.decode_slack(cap)):
            self.compress(ctx, cap)
