"""StreamingLLM: keep the first ``sink`` tokens (attention sinks) and the most recent ones."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvaccel.checks import check_int
from kvaccel.config import register

from .base import ScoredEviction


@register
@dataclass
class Streaming(ScoredEviction):
    """StreamingLLM: ``sink`` attention-sink tokens + a recent window, ``sink + window = budget``.

    https://arxiv.org/abs/2309.17453 — score = +inf for the first ``sink`` real tokens of each sequence, else
    the token's position (so the top-``budget`` are the sinks and the most recent tokens).

    Parameters
    ----------
    budget : int | float
        Tokens kept per head (int) or fraction of the prompt (float in (0, 1]). Default 0.25.
    sink : int
        Number of initial tokens always kept. Default 4.
    """

    name = "streaming"
    budget: int | float = 0.25
    sink: int = 4

    def __post_init__(self):
        super().__post_init__()
        check_int("sink", self.sink, 0)

    def score(self, ctx) -> torch.Tensor:
        valid = ctx.layer.token_valid()  # (B, 1|H, N) over [narrow, full]
        pos = torch.arange(valid.shape[-1], device=valid.device, dtype=torch.float32).expand(valid.shape)
        rank = valid.cumsum(-1) - 1  # rank among real tokens (left padding is skipped)
        return torch.where(rank < self.sink, torch.finfo(torch.float32).max, pos)
