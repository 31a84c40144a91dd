"""KNorm: keep the keys with the smallest L2 norm."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvaccel.config import register

from .stateless import StatelessScorer


def knorm_scores(keys: torch.Tensor) -> torch.Tensor:
    """``(B, H_kv, N)`` KNorm scores ``-‖k_j‖₂`` of ``keys`` ``(B, H_kv, N, D)``, float32."""
    return -keys.float().norm(dim=-1)


@register
@dataclass
class KNorm(StatelessScorer):
    """KNorm: keep the keys of lowest L2 norm (they draw the most attention), per kv head.

    https://arxiv.org/abs/2406.11430 (kvpress' ``KnormPress``) — ``s_j = -‖k_j‖₂`` (RoPE keeps the norm, so the score
    is position-free); no attention is computed.

    Parameters
    ----------
    budget : int | float
        Tokens kept per head after the prompt (int) or fraction of the prompt (float in (0, 1]). Default 0.25.
    chunk : int
        Span-preserving selection (see ``ScoredEviction``). Default 1 (per token).
    decode_budget : int | float | None
        ``None`` (default, kvpress): no eviction while decoding. Tokens / fraction of the prompt: bound the cache
        while decoding (the same score over the held keys).
    """

    name = "knorm"
    needs_full_keys: ClassVar[bool] = True
    #: scores are negative: ``critical`` refuses to scale them by value norms (it assumes attention-like scores)
    signed_scores: ClassVar[bool] = True
    budget: int | float = 0.25

    def score(self, ctx) -> torch.Tensor:
        keys, _ = self.full_width_keys(ctx.layer)
        return knorm_scores(keys)
