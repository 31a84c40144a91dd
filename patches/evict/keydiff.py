"""KeyDiff: keep the keys least similar to the mean key direction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvaccel.config import register

from .stateless import StatelessScorer


def keydiff_scores(keys: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, H_kv, N)`` KeyDiff scores ``-cos(k_j, a)`` of ``keys`` ``(B, H_kv, N, D)``, with the anchor
    ``a = mean_j k_j / ‖k_j‖`` per sequence and kv head over the real tokens (``valid`` ``(B, 1|H, N)``, ``None`` =
    all), float32."""
    k = keys.float()
    unit = F.normalize(k, dim=-1)
    if valid is None:
        anchor = unit.mean(2, keepdim=True)
    else:
        w = valid.expand(k.shape[:3]).unsqueeze(-1).to(k.dtype)
        anchor = (unit * w).sum(2, keepdim=True) / w.sum(2, keepdim=True).clamp_min(1.0)
    return -F.cosine_similarity(k, anchor, dim=-1)


@register
@dataclass
class KeyDiff(StatelessScorer):
    """KeyDiff: keep the keys whose direction differs most from the mean key direction, per kv head.

    https://arxiv.org/abs/2504.15364 (kvpress' ``KeyDiffPress``) — anchor ``a = mean_j k_j / ‖k_j‖`` over the held
    keys of a kv head, ``s_j = -cos(k_j, a)``; no attention is computed.

    Parameters
    ----------
    budget : int | float
        Tokens kept per head after the prompt (int) or fraction of the prompt (float in (0, 1]). Default 0.25.
    chunk : int
        Span-preserving selection (see ``ScoredEviction``). Default 1 (per token).
    decode_budget : int | float | None
        ``None`` (default, kvpress): no eviction while decoding. Tokens / fraction of the prompt: bound the cache
        while decoding (anchor and scores over the held keys).
    """

    name = "keydiff"
    needs_full_keys: ClassVar[bool] = True
    #: scores are signed (``-cos``): ``critical`` refuses to scale them by value norms
    signed_scores: ClassVar[bool] = True
    budget: int | float = 0.25

    def score(self, ctx) -> torch.Tensor:
        layer = ctx.layer
        keys, _ = self.full_width_keys(layer)
        return keydiff_scores(keys, layer.token_valid())
