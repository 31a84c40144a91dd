"""PyramidKV: SnapKV scoring with per-layer budgets decreasing linearly from the bottom to the top layer."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from kvaccel.checks import check_number
from kvaccel.config import register, resolve_budget

from .snapkv import SnapKV


@lru_cache(maxsize=256)  # pure: called per layer per decode step
def _pyramid(budget: int, prompt_len: int, window: int, num_layers: int, beta: float) -> tuple[int, ...]:
    return tuple(pyramid_capacities(budget, prompt_len, window, num_layers, beta))


def pyramid_capacities(budget: int, prompt_len: int, window: int, num_layers: int, beta: float) -> list[int]:
    """Per-layer token capacities: linear from bottom to top, average exactly ``budget`` (the reference's ends).

    As PyramidKV's reference (``pyramidkv_utils.py``): with the prefix budget ``P = budget - window``, the top
    layer keeps ``min = P // beta`` prefix tokens and the bottom one ``max = 2P - min``; when ``max`` exceeds the
    prefix ``prompt_len - window`` it is clipped and ``min = 2P - max``. Unlike the reference (integer step
    ``(max - min) // L``, average slightly off), layer ``l`` gets ``max - l (max - min) / (L - 1)`` rounded by
    largest remainder so the capacities are non-increasing and sum to exactly ``L * P``; each adds ``window``.
    A budget of at most ``window`` (no prefix budget) or a single layer gives ``budget`` everywhere.
    """
    prefix = budget - window
    if prefix <= 0 or num_layers == 1:
        return [budget] * num_layers
    lo = int(prefix // beta)
    hi = 2 * prefix - lo
    if hi >= prompt_len - window:
        hi = prompt_len - window
        lo = 2 * prefix - hi
    exact = [hi - i * (hi - lo) / (num_layers - 1) for i in range(num_layers)]
    caps = [int(x) for x in exact]  # floor: all values are >= 0
    short = num_layers * prefix - sum(caps)
    by_fraction = sorted(range(num_layers), key=lambda i: (-(exact[i] - caps[i]), i))
    for i in by_fraction[:short]:
        caps[i] += 1
    return [c + window for c in caps]


@register
@dataclass
class PyramidKV(SnapKV):
    """PyramidKV: SnapKV with a pyramid of layer budgets — many tokens low in the stack, few at the top.

    https://arxiv.org/abs/2406.02069 — capacity of layer ``l`` of ``L``: ``window + max - l (max - min)/(L - 1)``,
    ``min = (budget - window) // beta``, ``max = 2 (budget - window) - min``, so the mean over layers is the
    budget (see :func:`pyramid_capacities`); scoring and selection per layer are SnapKV's. Prompts of at most
    ``budget`` tokens are not evicted in any layer (as the reference). ``decode_budget`` gets the same pyramid.

    Parameters
    ----------
    budget : int | float
        Mean tokens kept per head over layers (int) or fraction of the prompt (float in (0, 1]). Default 0.25.
    window, kernel_size, pooling, decode_budget
        As :class:`SnapKV` (defaults 32, 7, ``"max"``, ``None``).
    beta : float
        Ratio of the bottom layers' prefix budget to the top layer's (reference default 20). Must be >= 1.
    """

    name = "pyramidkv"
    beta: float = 20

    def __post_init__(self):
        super().__post_init__()
        check_number("beta", self.beta, 1)

    def _schedule(self, ctx, budget) -> int:
        total = resolve_budget(budget, ctx.layer.prompt_len)
        if ctx.layer.prompt_len <= total:  # short prompt: nothing is evicted in any layer
            return total
        return _pyramid(total, ctx.layer.prompt_len, self.window, ctx.num_layers, float(self.beta))[ctx.layer_idx]

    def capacity(self, ctx) -> int:
        return self._schedule(ctx, self.budget)

    def decode_capacity(self, ctx) -> int | None:
        return None if self.decode_budget is None else self._schedule(ctx, self.decode_budget)
