"""AdaKV: adaptive per-head budgets on top of a scorer, stored packed per head (bytes = budget, not a mask)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvaccel.cache import compact_slots
from kvaccel.checks import check_ratio
from kvaccel.config import register, validate_budget
from kvaccel.varlen_cache import VarlenLayer, check_varlen_stages

from .base import EvictionMethod
from .pyramidkv import PyramidKV
from .snapkv import SnapKV
from .streaming import Streaming

#: scorers whose prompt-time score is a pure function of the layer (no state accumulated in hooks)
INNER = {"snapkv": SnapKV, "pyramidkv": PyramidKV, "streaming": Streaming}
LAYOUTS = ("varlen", "padded")


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
    Heads end up with different lengths. With ``layout="varlen"`` (default) the layer is replaced by a
    :class:`~kvaccel.varlen_cache.VarlenLayer` holding every (sequence, head) packed at its own length, so the bytes
    are the budget (plus a small decode-growth slack, counted); decoding runs ``varlen_decode_attention``.
    ``layout="padded"`` keeps the ``KVAccelLayer`` padded to the longest head with a validity mask (the previous
    layout: more bytes, composes with ThinK and retrieval decode). Prompt-time eviction only (the cache grows while
    decoding, as in the paper and kvpress' AdaKVPress). When the budget covers the prompt nothing is evicted and the
    layer is left as is (tokens identical to full attention).

    Parameters
    ----------
    budget : int | float
        Average tokens kept per head (int) or fraction of the prompt (float in (0, 1]). Default 0.25.
    inner : str
        Scorer: ``"snapkv"`` (default), ``"pyramidkv"`` (its per-layer budgets) or ``"streaming"``.
    alpha_safeguard : float
        Fraction of the per-head average every head keeps at least, in [0, 1]. Default 0.2 (the paper's).
    layout : str
        ``"varlen"`` (default, packed per head) or ``"padded"`` (padded to the longest head).
    """

    name = "adakv"
    budget: int | float = 0.25
    inner: str = "snapkv"
    alpha_safeguard: float = 0.2
    layout: str = "varlen"

    def __post_init__(self):
        validate_budget(self.budget)
        if self.inner not in INNER:
            raise ValueError(f"inner ({self.inner!r}) must be one of {sorted(INNER)}")
        check_ratio("alpha_safeguard", self.alpha_safeguard)
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout ({self.layout!r}) must be one of {LAYOUTS}")
        self._scorer = INNER[self.inner](budget=self.budget)

    def check_stages(self, stages: dict) -> None:
        """Refuse methods of other stages that the varlen layout cannot serve: channels / decode methods read a
        layer's padded per-head ``keys`` / ``values``, which a ``VarlenLayer`` does not hold."""
        if self.layout == "varlen":
            check_varlen_stages("adakv's varlen layout (per-head budgets packed, bytes = budget)", stages,
                                "use adakv(layout='padded') with it, or drop '{other}'")

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
        if self.layout == "padded" or isinstance(layer, VarlenLayer):  # a later prompt chunk: repack in place
            layer.keep(idx, slot_valid)
            return
        cache = ctx.state.cache  # the cache of this forward (the pre-hook of layer 0 records it)
        if cache is None or cache.layers[ctx.layer_idx] is not layer:
            raise RuntimeError(
                f"adakv cannot find layer {ctx.layer_idx} of this forward's cache to replace it with its varlen "
                "layout; use adakv(layout='padded')"
            )
        # The pre-hook reads cache.layers[i] at every forward: the next forward of this layer uses the new one.
        cache.layers[ctx.layer_idx] = VarlenLayer.from_selection(layer, idx, slot_valid)
