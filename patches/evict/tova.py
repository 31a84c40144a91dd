"""TOVA: keep the tokens the last query attends to most (mean over every query head of the layer)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvaccel.config import register

from .base import KEEP_SCORE
from .h2o import held_attention_probs, recent_mask, step_attention_probs
from .stateless import StatelessScorer


def tova_scores(probs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(B, 1, N)`` TOVA scores from one query's attention ``probs`` ``(B, H_q, N)``: the mean over all ``H_q`` query
    heads (one score for every kv head of the layer), the last real token of each row (``valid`` ``(B, 1|H, N)``)
    scored ``KEEP_SCORE``."""
    score = probs.float().mean(1, keepdim=True)
    last = recent_mask(valid[:, :1], 1)
    return torch.where(last, KEEP_SCORE, score)


@register
@dataclass
class TOVA(StatelessScorer):
    """TOVA: keep the tokens with the largest attention from the current query, averaged over the layer's heads.

    https://arxiv.org/abs/2401.06104 (kvpress' ``TOVAPress``) — ``s_j = mean_h softmax_j(q_h . k / sqrt(d))`` for the
    last query ``q`` (the prompt's last token, or the current decode token), over *all* ``H_q`` query heads, so every
    kv head of a layer keeps the same tokens; the last token is always kept. Only that one query row is computed
    (never an attention matrix). At the prompt the top-``budget`` tokens stay. While decoding the paper evicts, at
    every step, the token the current query attends to least: ``decode_budget=N, slack=1`` is exactly that loop
    (``slack > 1`` drops the ``slack`` lowest-scored tokens at once every ``slack`` steps, by the query of that step).

    Parameters
    ----------
    budget : int | float
        Tokens kept per head after the prompt (int) or fraction of the prompt (float in (0, 1]). Default 0.25.
    chunk : int
        Span-preserving selection (see ``ScoredEviction``). Default 1 (per token).
    decode_budget : int | float | None
        ``None`` (default, kvpress): no eviction while decoding. Tokens / fraction of the prompt: the cache is kept at
        this size while decoding, by the rule above.
    """

    name = "tova"
    budget: int | float = 0.25

    def wants_decode_probs(self) -> bool:
        return self.decode_budget is not None and self.slack == 1  # the decode attention's probs, every step

    def score(self, ctx) -> torch.Tensor:
        layer = ctx.layer
        if ctx.phase == "decode":
            probs = step_attention_probs(ctx)
        else:
            probs = held_attention_probs(layer, ctx.query[:, :, -1:], ctx.scaling)
        return tova_scores(probs, layer.token_valid())
