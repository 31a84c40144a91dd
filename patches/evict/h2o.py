"""H2O: heavy hitters (accumulated attention column sums) + a recent window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvaccel.checks import check_ratio
from kvaccel.config import register
from kvaccel.kernels.decode_attention import decode_attention_probs
from kvaccel.kernels.window_scores import window_attention_scores

from .base import ScoredEviction

STATE = "h2o"
_KEEP = torch.finfo(torch.float32).max  # score of tokens that are always kept


def group_mean(scores: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``(B, H_q, T)`` -> ``(B, H_kv, T)``: mean over the ``G = H_q / H_kv`` query heads of each kv head."""
    B, Hq, T = scores.shape
    return scores.view(B, num_kv_heads, Hq // num_kv_heads, T).mean(2)


def held_attention_probs(layer, query: torch.Tensor, scale: float) -> torch.Tensor:
    """``(B, H_q, N)`` attention probabilities of ``query``'s rows summed, over every token ``layer`` holds (the
    ``[narrow, full]`` axis). A decode query over a ThinK-pruned layer reads the narrow keys directly (no zero-filled
    copy of them per step)."""
    nar = layer.narrow
    if query.shape[2] == 1 and nar is not None:
        return decode_attention_probs(
            query, layer.keys, scale=scale, valid=layer.valid, k_narrow=nar.keys, channel_idx=nar.channel_idx,
            valid_narrow=nar.valid,
        )
    keys, valid = layer.dense_keys()
    return window_attention_scores(query, keys, scale=scale, valid=valid)


def step_attention_probs(ctx) -> torch.Tensor:
    """``(B, H_q, N)`` attention probabilities of this forward's queries over the layer's held tokens: the decode
    attention's own (``ctx.decode_probs``) when it computed them, else one pass of :func:`held_attention_probs`."""
    probs = getattr(ctx, "decode_probs", None)
    return probs if probs is not None else held_attention_probs(ctx.layer, ctx.query, ctx.scaling)


def recent_mask(valid: torch.Tensor, n: int) -> torch.Tensor:
    """``(B, 1|H, T)`` bool: the last ``n`` real tokens of each row (padding slots are skipped)."""
    from_end = valid.flip(-1).cumsum(-1).flip(-1)  # real tokens at or after each slot
    return valid & (from_end <= n)


def recent_count(ratio: float, capacity: int) -> int:
    """Tokens of the recent window for a ``capacity``-token cache (``round(ratio * capacity)``)."""
    return min(capacity, int(round(ratio * capacity)))


@register
@dataclass
class H2O(ScoredEviction):
    """H2O: keep the heavy hitters (largest accumulated attention) and the most recent tokens.

    https://arxiv.org/abs/2306.14048 — ``score_j = sum_{i >= j} softmax_j(q_i . k / sqrt(d))`` accumulated over
    every query seen (the whole prompt at prefill, each new token at decode) and averaged over the ``G`` query
    heads of a kv head; kept = ``round(recent_ratio * budget)`` most recent tokens + the top remaining by score.
    The running score lives in ``layer.token_state["h2o"]`` ``(B, H_kv, T)`` float32 and moves with its token;
    evicted tokens lose theirs. Decoding keeps the cache at the budget (one eviction every ``slack`` steps, see
    ``ScoredEviction.slack``; ``slack=1`` is the paper's one eviction per step).

    Parameters
    ----------
    budget : int | float
        Tokens kept per head (int) or fraction of the prompt (float in (0, 1]). Default 0.25.
    recent_ratio : float
        Fraction of the budget that is the recent window (the paper's 50/50 heavy/recent split). Default 0.5.
    """

    name = "h2o"
    state_key: ClassVar[str] = STATE  # key of the running score in ``layer.token_state``
    budget: int | float = 0.25
    recent_ratio: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        check_ratio("recent_ratio", self.recent_ratio)

    def accumulate(self, ctx) -> None:
        """Add the attention probabilities of this forward's queries to every held token's running score."""
        layer = ctx.layer
        probs = step_attention_probs(ctx)  # [narrow, full] axis: works after ThinK
        self.add_scores(layer, group_mean(probs, layer.keys.shape[1]))

    def wants_decode_probs(self) -> bool:
        return True

    def add_scores(self, layer, add: torch.Tensor) -> None:
        """Add ``add`` ``(B, H_kv, T)`` to the running scores (new tokens were zero-extended by ``update()``)."""
        old = layer.token_state.get(self.state_key)
        if old is None:
            layer.token_state[self.state_key] = add
        else:
            old.add_(add)

    def score(self, ctx) -> torch.Tensor:
        layer = ctx.layer
        acc = layer.token_state[self.state_key]
        recent = recent_mask(layer.token_valid(), recent_count(self.recent_ratio, self.capacity(ctx)))
        return torch.where(recent, _KEEP, acc)

    def after_prefill(self, ctx) -> None:
        self.accumulate(ctx)
        super().after_prefill(ctx)

    def after_decode(self, ctx) -> None:
        self.accumulate(ctx)
        super().after_decode(ctx)
