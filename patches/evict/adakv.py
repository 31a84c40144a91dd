"""AdaKV: adaptive per-head budgets on top of a scorer, stored ragged (real bytes saved, not a mask)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvaccel.cache import compact_slots
from kvaccel.config import register, validate_budget

from .base import EvictionMethod
from .h2o import check_ratio
from .pyramidkv import PyramidKV
from .snapkv import SnapKV
from .streaming import Streaming

#: scorers whose prompt-time score is a pure function of the layer (no state accumulated in hooks)
INNER = {"snapkv": SnapKV, "pyramidkv": PyramidKV, "streaming": Streaming}


def ada_select(scores: torch.Tensor, capacity: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head ragged selection: the layer's ``H * capacity`` slots go to the highest scores across heads.

    Each head first gets its top ``floor(alpha * capacity)`` tokens (AdaKV's safeguard), the rest of the
    ``H * capacity`` slots are the best remaining scores of all heads. ``scores`` ``(B, H, N)`` with ``-inf`` on
    invalid slots. Returns ``idx`` ``(B, H, K)`` (kept tokens first, in order) and ``slot_valid`` ``(B, H, K)``,
    ``K`` the largest per-head count.
    """
    B, H, N = scores.shape
    valid = torch.isfinite(scores)
    s = scores.clone()
    floor = min(N, int(alpha * capacity))
    if floor > 0:
        s.scatter_(-1, s.topk(floor, dim=-1).indices, torch.finfo(s.dtype).max)
    sel = s.reshape(B, H * N).topk(min(H * capacity, H * N), dim=-1).indices
    mask = torch.zeros(B, H * N, dtype=torch.bool, device=s.device).scatter_(1, sel, True).view(B, H, N) & valid
    return compact_slots(mask, min_width=1)


@register
@dataclass
class AdaKV(EvictionMethod):
    """AdaKV: per-head adaptive budgets — a layer's ``H·budget`` slots go to the best scores of all its heads.

    https://arxiv.org/abs/2407.11550 — scores of the ``inner`` method (SnapKV by default); every head keeps at
    least ``alpha_safeguard · budget`` tokens; then top-``H·budget`` over the flattened ``(head, token)`` scores.
    Heads end up with different lengths; the cache stores them padded to the longest head (not to the prompt),
    so the bytes saved are real, unlike a mask. Prompt-time eviction only (the cache grows while decoding, as in
    the paper and kvpress' AdaKVPress).

    Parameters
    ----------
    budget : int | float
        Average tokens kept per head (int) or fraction of the prompt (float in (0, 1]). Default 0.25.
    inner : str
        Scorer: ``"snapkv"`` (default), ``"pyramidkv"`` (its per-layer budgets) or ``"streaming"``.
    alpha_safeguard : float
        Fraction of the per-head average every head keeps at least, in [0, 1]. Default 0.2 (the paper's).
    """

    name = "adakv"
    budget: int | float = 0.25
    inner: str = "snapkv"
    alpha_safeguard: float = 0.2

    def __post_init__(self):
        validate_budget(self.budget)
        if self.inner not in INNER:
            raise ValueError(f"inner ({self.inner!r}) must be one of {sorted(INNER)}")
        check_ratio("alpha_safeguard", self.alpha_safeguard)
        self._scorer = INNER[self.inner](budget=self.budget)

    def after_prefill(self, ctx) -> None:
        cap = self._scorer.capacity(ctx)
        ctx.record_capacity(cap)
        layer = ctx.layer
        if layer.length <= cap:
            return
        scores = self._scorer.score(ctx).float()
        scores = scores.expand(layer.keys.shape[0], layer.keys.shape[1], scores.shape[-1])
        scores = scores.masked_fill(~layer.token_valid(), float("-inf"))
        idx, slot_valid = ada_select(scores, cap, self.alpha_safeguard)
        layer.keep(idx, slot_valid)
