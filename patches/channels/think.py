"""ThinK: prune the least important key channels of cached tokens, stored narrow (the bytes really drop)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvaccel.cache import KVAccelLayer, NarrowSegment
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


@register
@dataclass
class ThinK(ChannelMethod):
    """ThinK: query-driven key-channel pruning; the pruned keys are stored narrow.

    https://arxiv.org/abs/2407.21018 — per kv head, ``score_c = ‖Q_obs[:, c]‖ · ‖K[:, c]‖`` over the last ``window``
    queries of the prompt (the GQA group's queries pooled); the ``⌊D·ratio⌋`` lowest-scoring channels are dropped
    for every held token but the last ``window`` slots, which stay full-width, as do all decode tokens. Decode logits
    are ``concat(q[kept]·K_narrowᵀ, q·K_fullᵀ) / √D`` (the scale of the full ``D``), i.e. exactly attention over
    keys whose pruned channels are zero.

    Choices where the paper is silent: ``K`` is the layer's keys *after* the eviction method ran (SnapKV-then-ThinK
    as in the reference), invalid (padding / ragged) slots excluded; the norm product ranks channels exactly like
    the reference's ``mean_t Q² · mean_n K²`` (its square over constants). A later prompt chunk ("extend") moves its
    older tokens into the narrow segment with the channels chosen at the first prefill. ``token_state`` is not
    touched: it spans the concatenated ``[narrow, full]`` token axis, whose order pruning preserves.

    Parameters
    ----------
    ratio : float
        Fraction of key channels dropped, in ``[0, 1)``; ``0`` is a no-op. Default 0.4.
    window : int
        Observation window (queries scored) and number of most recent prompt slots kept full-width. Default 32.
    """

    name = "think"
    ratio: float = 0.4
    window: int = 32

    def __post_init__(self):
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not (0.0 <= self.ratio < 1.0):
            raise ValueError(f"ratio ({self.ratio!r}) must be a float in [0, 1)")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window ({self.window!r}) must be an int >= 1")

    def pruned_channels(self, head_dim: int) -> int:
        return math.floor(head_dim * self.ratio)

    def after_prefill(self, ctx: AttentionContext) -> None:
        layer = ctx.layer
        D = layer.keys.shape[-1]
        drop = self.pruned_channels(D)
        if drop == 0:
            return
        T = layer.keys.shape[-2]
        n_move = T - self.window
        if n_move <= 0:
            return
        if layer.narrow is None:
            q_obs = ctx.query[:, :, -self.window :]
            scores = channel_scores(q_obs, layer.keys, layer.valid)
            channel_idx = scores.topk(D - drop, dim=-1).indices.sort(dim=-1).values  # (B, H_kv, Dk)
        else:
            channel_idx = layer.narrow.channel_idx
        self.prune(layer, channel_idx, n_move)

    @staticmethod
    def prune(layer: KVAccelLayer, channel_idx: Tensor, n_move: int) -> None:
        """Move the oldest ``n_move`` full-width slots of ``layer`` into its narrow segment (``channel_idx``)."""
        k_old = layer.keys[:, :, :n_move]
        idx = channel_idx[:, :, None, :].expand(*k_old.shape[:3], channel_idx.shape[-1])
        k_narrow = k_old.gather(-1, idx)
        v_narrow = layer.values[:, :, :n_move]
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
        )
        layer.keys = layer.keys[:, :, n_move:].contiguous()
        layer.values = layer.values[:, :, n_move:].contiguous()
        if layer.valid is not None:
            rest = layer.valid[:, :, n_move:]
            layer.valid = None if bool(rest.all()) else rest.contiguous()
