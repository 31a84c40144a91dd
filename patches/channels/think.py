"""ThinK: prune the least important key channels of cached tokens, stored narrow (the bytes really drop)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvaccel.cache import KVAccelLayer, NarrowSegment
from kvaccel.checks import check_int, check_number
from kvaccel.config import register

from .base import ChannelMethod

if TYPE_CHECKING:
    from kvaccel.patches.attention import AttentionContext

Tensor = torch.Tensor


def channel_scores(q_obs: Tensor, keys: Tensor, valid: Tensor | None = None) -> Tensor:
    """ThinK channel scores ``score[b, h, c] = ‖Q_obs[b, group(h), :, c]‖ · ‖K[b, h, :, c]‖``.

    Parameters
    ----------
    q_obs : Tensor
        ``(B, H_q, W, D)`` observation-window queries; the ``G = H_q / H_kv`` query heads of a kv head are pooled
        (the norm runs over their ``G * W`` rows).
    keys : Tensor
        ``(B, H_kv, T, D)`` keys held; slots with ``valid == False`` are left out of the norm.
    valid : Tensor, optional
        ``(B, 1|H_kv, T)`` bool.

    Returns
    -------
    Tensor
        ``(B, H_kv, D)`` float32.
    """
    B, Hq, W, D = q_obs.shape
    Hkv = keys.shape[1]
    qn = q_obs.float().reshape(B, Hkv, (Hq // Hkv) * W, D).norm(dim=2)
    k = keys.float()
    if valid is not None:
        k = k * valid[..., None]
    return qn * k.norm(dim=2)


def value_channel_scores(
    q_obs: Tensor, keys: Tensor, values: Tensor, scale: float, valid: Tensor | None = None
) -> Tensor:
    """ThinK's value-channel scores ``score[b, h, c] = ‖softmax(scale · Q_obs Kᵀ) V[:, c]‖`` (paper, appendix).

    The ``W`` observation queries are the last ``W`` tokens and the last ``W`` slots their own keys, so query
    ``i`` sees every slot before the window and window slots ``<= i`` (causal); ``valid`` masks evicted/padding
    slots. The norm runs over the ``G * W`` rows of a kv head's query group. Shapes as :func:`channel_scores`,
    ``values`` ``(B, H_kv, T, Dv)``; returns ``(B, H_kv, Dv)`` float32.
    """
    B, Hq, W, D = q_obs.shape
    Hkv, T = keys.shape[1], keys.shape[2]
    G = Hq // Hkv
    qg = q_obs.float().reshape(B, Hkv, G * W, D)
    logits = (qg @ keys.float().transpose(-1, -2)) * scale  # (B, H_kv, G*W, T)
    row_q = torch.arange(W, device=keys.device).repeat(G)  # window index of each stacked row
    mask = torch.arange(T, device=keys.device)[None, :] <= (T - W + row_q)[:, None]
    mask = mask[None, None]
    if valid is not None:
        mask = mask & valid[:, :, None, :]
    probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num_(0.0)
    return (probs @ values.float()).norm(dim=2)


@register
@dataclass
class ThinK(ChannelMethod):
    """ThinK: query-driven key-channel pruning (value channels opt-in); pruned channels are stored narrow.

    https://arxiv.org/abs/2407.21018 — per kv head, ``score_c = ‖Q_obs[:, c]‖ · ‖K[:, c]‖`` over the last ``window``
    queries of the prompt (the GQA group's queries pooled); the ``⌊D·ratio⌋`` lowest-scoring channels are dropped
    for every held prompt token but the last ``full_recent`` slots; decode tokens stay full-width. Decode logits
    are ``concat(q[kept]·K_narrowᵀ, q·K_fullᵀ) / √D`` (the scale of the full ``D``), i.e. exactly attention over
    keys whose pruned channels are zero.

    Choices where the paper is silent: ``K`` is the layer's keys *after* the eviction method ran (SnapKV-then-ThinK
    as in the reference), invalid (padding / ragged) slots excluded; the norm product ranks channels exactly like
    the reference's ``mean_t Q² · mean_n K²`` (its square over constants). A later prompt chunk ("extend") moves its
    older tokens into the narrow segment with the channels chosen at the first prefill. ``token_state`` is not
    touched: it spans the concatenated ``[narrow, full]`` token axis, whose order pruning preserves.

    ``full_recent`` (default 0: every prompt slot pruned, as kvpress' ThinKPress, reviewed by the paper's first
    author): the reference code keeps its last ``window`` prompt keys full-width (``full_recent=32``). Measured on
    the default model, that mix breaks passkey retrieval (0/8 vs 8/8 at 1k, question-aware,
    ``benchmarks/peers``): narrow keys lose logit mass against the full-width question tokens, so copy heads
    match "pass key" in the question instead of the needle.

    Value channels (opt-in, ``value_ratio > 0``): the paper's appendix extends the query-driven criterion to the
    value cache, ``score_c = ‖softmax(Q_obs Kᵀ/√D) V[:, c]‖`` (:func:`value_channel_scores`); the same tokens
    then store narrow values too and the decode kernel scatters their contribution into the kept channels, i.e.
    attention over values zero-filled in the pruned channels. The reference code prunes keys only; so does the
    default.

    Parameters
    ----------
    ratio : float
        Fraction of key channels dropped, in ``[0, 1)``; ``0`` is a no-op. Default 0.4.
    window : int
        Observation window: the last ``window`` prompt queries score the channels. Default 32.
    full_recent : int
        Most recent prompt slots kept full-width (the reference code's ``window``). Default 0.
    value_ratio : float
        Fraction of value channels dropped, in ``[0, 1)``. Default 0 (keys only, as the paper's main method).
    """

    name = "think"
    ratio: float = 0.4
    window: int = 32
    value_ratio: float = 0.0
    full_recent: int = 0

    def __post_init__(self):
        for field in ("ratio", "value_ratio"):
            r = getattr(self, field)
            check_number(field, r, 0, 1, high_open=True)
        check_int("window", self.window, 1)
        check_int("full_recent", self.full_recent, 0)

    def pruned_channels(self, head_dim: int) -> int:
        return math.floor(head_dim * self.ratio)

    def after_prefill(self, ctx: AttentionContext) -> None:
        layer = ctx.layer
        D, Dv = layer.keys.shape[-1], layer.values.shape[-1]
        drop, drop_v = self.pruned_channels(D), math.floor(Dv * self.value_ratio)
        if drop == 0 and drop_v == 0:
            return
        T = layer.keys.shape[-2]
        n_move = T - self.full_recent
        if n_move <= 0:
            return
        if layer.narrow is None:
            q_obs = ctx.query[:, :, -self.window :]
            scores = channel_scores(q_obs, layer.keys, layer.valid)
            channel_idx = scores.topk(D - drop, dim=-1).indices.sort(dim=-1).values  # (B, H_kv, Dk)
            value_idx = None
            if drop_v:
                v_scores = value_channel_scores(q_obs, layer.keys, layer.values, ctx.scaling, layer.valid)
                value_idx = v_scores.topk(Dv - drop_v, dim=-1).indices.sort(dim=-1).values  # (B, H_kv, Dvn)
        else:
            channel_idx, value_idx = layer.narrow.channel_idx, layer.narrow.value_idx
        self.prune(layer, channel_idx, n_move, value_idx)

    @staticmethod
    def prune(layer: KVAccelLayer, channel_idx: Tensor, n_move: int, value_idx: Tensor | None = None) -> None:
        """Move the oldest ``n_move`` full-width slots of ``layer`` into its narrow segment (keys keep
        ``channel_idx``; values keep ``value_idx``, or all channels when ``None``)."""
        k_old = layer.keys[:, :, :n_move]
        idx = channel_idx[:, :, None, :].expand(*k_old.shape[:3], channel_idx.shape[-1])
        k_narrow = k_old.gather(-1, idx)
        v_narrow = layer.values[:, :, :n_move]
        if value_idx is not None:
            v_narrow = v_narrow.gather(-1, value_idx[:, :, None, :].expand(*v_narrow.shape[:3], value_idx.shape[-1]))
        valid_old = None if layer.valid is None else layer.valid[:, :, :n_move]
        old = layer.narrow
        if old is not None:
            k_narrow = torch.cat([old.keys, k_narrow], dim=2)
            v_narrow = torch.cat([old.values, v_narrow], dim=2)
            if old.valid is not None or valid_old is not None:
                B, H = k_old.shape[:2]
                a = old.valid if old.valid is not None else k_old.new_ones(B, 1, old.keys.shape[2], dtype=torch.bool)
                b = valid_old if valid_old is not None else k_old.new_ones(B, 1, n_move, dtype=torch.bool)
                heads = max(a.shape[1], b.shape[1])
                valid_old = torch.cat([a.expand(B, heads, -1), b.expand(B, heads, -1)], dim=-1)
        layer.narrow = NarrowSegment(
            keys=k_narrow.contiguous(),
            values=v_narrow.contiguous(),
            channel_idx=channel_idx.contiguous(),
            valid=None if valid_old is None else valid_old.contiguous(),
            value_idx=None if value_idx is None else value_idx.contiguous(),
        )
        layer.keys = layer.keys[:, :, n_move:].contiguous()
        layer.values = layer.values[:, :, n_move:].contiguous()
        if layer.valid is not None:
            rest = layer.valid[:, :, n_move:]
            layer.valid = None if bool(rest.all()) else rest.contiguous()
