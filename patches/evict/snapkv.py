"""SnapKV: score prompt tokens by the attention of an observation window of the last prompt queries."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvaccel.checks import check_int
from kvaccel.config import register, resolve_budget, validate_budget
from kvaccel.kernels.window_scores import window_attention_scores

from .base import ScoredEviction, eviction_due
from .h2o import _KEEP, group_mean, step_attention_probs

STATE = "snapkv"
POOLINGS = ("max", "avg")


def pool_scores(scores: torch.Tensor, kernel_size: int, pooling: str) -> torch.Tensor:
    """1-D pooling along tokens of ``(B, H, T)`` scores, stride 1, ``kernel_size // 2`` padding (same length).

    As the reference: ``F.max_pool1d`` / ``F.avg_pool1d`` (zero padding counted in the average).
    """
    if scores.shape[-1] == 0 or kernel_size == 1:
        return scores
    B, H, T = scores.shape
    x = scores.reshape(B * H, 1, T)
    pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
    return pool(x, kernel_size=kernel_size, stride=1, padding=kernel_size // 2).reshape(B, H, T)


def group_window_scores(query: torch.Tensor, keys: torch.Tensor, scaling: float,
                        valid: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, H_kv, T)`` attention mass each key receives from ``query`` ``(B, H_q, W, D)`` (the sequence's last ``W``
    queries, causal), summed over them and averaged over each kv head's ``G`` query heads (SnapKV's score, unpooled)."""
    return group_mean(window_attention_scores(query, keys, scale=scaling, valid=valid), keys.shape[1])


def selection_scores(acc: torch.Tensor, keep_last: int, kernel_size: int, pooling: str) -> torch.Tensor:
    """SnapKV's selection: pooled scores of the prefix, ``+max`` for the last ``keep_last`` slots (the window).

    The prefix ``[..., :T - keep_last]`` is pooled on its own, as in the reference (the window does not leak
    into its neighbours).
    """
    T = acc.shape[-1]
    cut = max(0, T - keep_last)
    prefix = pool_scores(acc[..., :cut], kernel_size, pooling)
    return torch.cat([prefix, acc.new_full((*acc.shape[:-1], T - cut), _KEEP)], dim=-1)


@register
@dataclass
class SnapKV(ScoredEviction):
    """SnapKV: keep the prompt tokens the last ``window`` prompt queries attend to most, plus that window.

    https://arxiv.org/abs/2404.14469 — ``s_j = pool_k(mean_group sum_{i in window} softmax_j(q_i . k / sqrt(d)))``
    over the prefix ``j < T - window``; kept = top-``(budget - window)`` prefix tokens per kv head + the window.
    Prompts of at most ``budget`` tokens are not evicted. With ``budget < window`` the kept window is clipped to
    ``budget`` (pure recency). The group of ``G = H_q / H_kv`` query heads is averaged.

    Decoding: with ``decode_budget=None`` (the paper) the cache grows by one token per step. With a budget,
    every held token carries ``token_state["snapkv"]`` = its unpooled window score from the prompt plus the
    group-mean attention probability of every generated query so far (H2O-style accumulation); when the
    cache fills ``decode_budget + slack`` slots it is cut back to ``decode_budget`` with the same rule (prefix
    pooled over the *kept* order, last ``window`` tokens always kept); see ``ScoredEviction.slack``.

    Parameters
    ----------
    budget : int | float
        Tokens kept per head after the prompt (int) or fraction of the prompt (float in (0, 1]). Default 0.25.
    window : int
        Observation window: the last prompt queries that score the prefix; always kept. Default 32.
    kernel_size : int
        Odd 1-D pooling kernel over the token axis (clusters neighbours of important tokens). Default 7.
    pooling : str
        ``"max"`` (reference default) or ``"avg"``.
    decode_budget : int | float | None
        ``None``: no eviction while decoding (default, the paper). Int tokens / float fraction of the prompt:
        bound the cache during decoding as described above.
    """

    name = "snapkv"
    budget: int | float = 0.25
    window: int = 32
    kernel_size: int = 7
    pooling: str = "max"
    decode_budget: int | float | None = None

    def __post_init__(self):
        super().__post_init__()
        check_int("window", self.window, 1)
        check_int("kernel_size", self.kernel_size, 1)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size ({self.kernel_size}) must be odd (same-length pooling)")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling ({self.pooling!r}) must be one of {POOLINGS}")
        if self.decode_budget is not None:
            validate_budget(self.decode_budget, "decode_budget")

    # ------------------------------------------------------------------ per-layer sizes (PyramidKV overrides)
    def decode_capacity(self, ctx) -> int | None:
        """Tokens kept per head while decoding in this layer, ``None`` = unbounded."""
        if self.decode_budget is None:
            return None
        return resolve_budget(self.decode_budget, ctx.layer.prompt_len)

    # ------------------------------------------------------------------ scoring
    def window_scores(self, ctx) -> torch.Tensor:
        """``(B, H_kv, T)`` group-mean attention mass from the last ``min(window, q)`` queries (unpooled)."""
        layer = ctx.layer
        w = min(self.window, ctx.query.shape[2])
        keys, valid = layer.dense_keys()  # [narrow, full] axis: works after ThinK pruned channels
        return group_window_scores(ctx.query[:, :, -w:], keys, ctx.scaling, valid)

    def score(self, ctx) -> torch.Tensor:
        """Selection scores (higher = keep) for the layer's current tokens, given the capacity they are cut to."""
        layer = ctx.layer
        if ctx.phase == "decode":
            acc, cap = layer.token_state[STATE], self.decode_capacity(ctx)
        else:
            acc, cap = self.window_scores(ctx), self.capacity(ctx)
        return selection_scores(acc, min(self.window, cap), self.kernel_size, self.pooling)

    # ------------------------------------------------------------------ hooks
    def after_prefill(self, ctx) -> None:
        layer = ctx.layer
        cap = self.capacity(ctx)
        ctx.record_capacity(cap)
        track = self.decode_budget is not None
        if track:
            layer.reserve = self.decode_slack(self.decode_capacity(ctx))
        if layer.length <= cap and not track:
            return
        acc = self.window_scores(ctx)
        if track:  # later prompt chunks add their window to the tokens kept so far
            old = layer.token_state.get(STATE)
            layer.token_state[STATE] = acc if old is None else old + acc
        if layer.length > cap:
            sel = selection_scores(acc, min(self.window, cap), self.kernel_size, self.pooling)
            self.keep(layer, sel, cap)

    def wants_decode_probs(self) -> bool:
        return self.decode_budget is not None

    def after_decode(self, ctx) -> None:
        cap = self.decode_capacity(ctx)
        if cap is None:
            return
        layer = ctx.layer
        layer.token_state[STATE].add_(group_mean(step_attention_probs(ctx), layer.keys.shape[1]))
        if eviction_due(layer, cap, self.decode_slack(cap)):
            self.keep(layer, self.score(ctx), cap)
