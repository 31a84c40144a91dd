"""DuoAttention: retrieval heads keep the full cache, streaming heads keep attention sinks + a recent window.

Xiao et al. 2024, https://arxiv.org/abs/2410.10819 (reference: mit-han-lab/duo-attention). One gate value
``α[l, h] ∈ [0, 1]`` per layer and KV head, optimised offline on synthetic passkey retrieval
(``kvaccel train-gate duo_attention``, :mod:`kvaccel.duo_attention_training`). At deployment the ``sparsity``
fraction of all KV heads with the lowest ``α`` become *streaming heads* (``duo_attn/utils.py``
``sparsify_attention_heads``: a quantile of ``α``; ties here go to the lower layer/head index, not random noise); the
others are *retrieval heads*.

Inference: the prompt is attended densely by every head (or by the prefill-stage method), then each layer with a
streaming head is stored as a :class:`DuoLayer`, a :class:`~kvaccel.varlen_cache.VarlenLayer` where each (sequence,
head) is packed at its own length: a retrieval head holds every real token, a streaming head the first ``sink`` real
tokens of its sequence (padding is never stored, so a left-padded row's sinks are its first real tokens) and the
last ``recent``. While decoding, a streaming head's new tokens go into its segment and, once a segment holds ``slack``
tokens beyond ``sink + recent``, the oldest recent tokens are dropped in place (no repack of the layer): its bytes
stay bounded, which ``report()`` counts. Dense prefill, not the paper's streaming prefill for streaming heads: it is
what kvpress' ``DuoAttentionPress`` does, composes with every prefill-stage method, and the prompt's later tokens
then read the whole prompt in every head (the cache, which is what the method saves, is the same either way).

Files: ``gate.safetensors`` (``alpha`` ``(layers, kv heads)``) + ``gate.json`` (model name and fingerprint, the
``sink`` / ``recent`` the gates were trained with, training recipe). Measured figures: docs/results.md
(#duo-attention).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kvaccel.cache import compact_slots
from kvaccel.checks import check_int, check_ratio
from kvaccel.config import register
from kvaccel.gate_files import GateFile, text_config
from kvaccel.varlen_cache import VarlenLayer, check_varlen_stages

from .base import EvictionMethod, check_slack, decode_slack

FORMAT = "kvaccel-duo-attention-1"
DATA_DIR = Path(__file__).parent / "data"


class DuoPatterns(GateFile, nn.Module):
    """The trained gate values ``alpha`` ``(layers, kv heads)`` of one model, with their ``meta`` (model name and
    fingerprint, ``sink`` / ``recent`` used in training, ``recipe``)."""

    LABEL = "DuoAttention patterns"
    FORMAT = FORMAT
    REQUIRED = ("model_name", "model_fingerprint", "num_layers", "num_kv_heads", "sink", "recent")
    TRAIN_KIND = "duo_attention"
    DATA_DIR = DATA_DIR
    SHIPPED_PREFIX = "duo_attention"

    def __init__(self, meta: dict[str, Any]):
        super().__init__()
        self.meta = dict(meta)
        self.alpha = nn.Parameter(torch.full((meta["num_layers"], meta["num_kv_heads"]),
                                             float(meta.get("initial_value", 1.0))))

    @classmethod
    def for_model(cls, model, sink: int = 64, recent: int = 256, initial_value: float = 1.0,
                  recipe: dict | None = None) -> DuoPatterns:
        """Fresh gates shaped for ``model``, every ``alpha`` at ``initial_value`` (1 = all heads retrieval)."""
        from kvaccel.models import model_fingerprint, model_name

        check_int("sink", sink, 0)
        check_int("recent", recent, 1)
        check_ratio("initial_value", initial_value)
        cfg = text_config(model)
        meta = dict(
            format=FORMAT, model_name=model_name(model), model_fingerprint=model_fingerprint(model),
            num_layers=cfg.num_hidden_layers,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            sink=sink, recent=recent, initial_value=initial_value, recipe=recipe or {},
        )
        return cls(meta)

    def streaming_heads(self, sparsity: float) -> Tensor:
        """``(layers, kv heads)`` bool: the ``round(sparsity · layers · heads)`` heads of lowest ``alpha`` (ties: lower
        index first) stream; the rest are retrieval heads."""
        check_ratio("sparsity", sparsity)
        a = self.alpha.detach().float().clamp(0, 1).flatten()
        n = round(sparsity * a.numel())
        order = torch.sort(a, stable=True).indices
        mask = torch.zeros(a.numel(), dtype=torch.bool)
        mask[order[:n]] = True
        return mask.view(self.alpha.shape)


class DuoLayer(VarlenLayer):
    """A :class:`VarlenLayer` whose streaming heads ``streaming`` ``(H,)`` keep ``sink`` + the last ``recent`` tokens
    (:meth:`roll`); ``stream_max`` is a host-side bound on the longest streaming segment (no device sync per step)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.streaming: Tensor | None = None  # (H,) bool
        self.sink = 0
        self.recent = 0
        self.stream_max = 0

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        out = super().update(key_states, value_states, *args, **kwargs)
        self.stream_max += key_states.shape[-2]
        return out

    def roll(self) -> None:
        """Cut every streaming segment longer than ``sink + recent`` back to its first ``sink`` and last ``recent``
        tokens, in place: the kept recent rows move down to follow the sinks; other segments are untouched (the rows
        freed stay in the segment until the next repack)."""
        cap = self.sink + self.recent
        if self.stream_max <= cap:
            return
        B, H = self.seg_len.shape
        flat_len = self.seg_len.view(-1)
        over = (self.streaming[None, :].expand(B, H).reshape(-1) & (flat_len > cap)).nonzero().flatten()
        if over.numel():
            start, length = self.seg_start.view(-1)[over], flat_len[over]
            ar = torch.arange(self.recent, device=start.device)
            src = ((start + length - self.recent)[:, None] + ar).flatten()
            dst = ((start + self.sink)[:, None] + ar).flatten()
            for buf in (self.key_buffer, self.value_buffer):
                buf.index_copy_(0, dst, buf.index_select(0, src))  # index_select copies first: overlap is safe
            self.total_len -= int((length - cap).sum())
            flat_len[over] = cap
            self.max_len = int(flat_len.max())
        self.stream_max = cap


def _streaming_selection(valid: Tensor, streaming: Tensor, sink: int, recent: int) -> tuple[Tensor, Tensor]:
    """Per (sequence, head) of ``valid`` ``(B, H, T)``: a retrieval head keeps every real token, a streaming head
    (``streaming`` ``(H,)``) its first ``sink`` and last ``recent`` real tokens. Returns ``compact_slots`` of it."""
    rank = valid.cumsum(-1) - 1  # rank among the real tokens (padding skipped)
    n = valid.sum(-1, keepdim=True)
    window = valid & ((rank < sink) | (rank >= n - recent))
    return compact_slots(torch.where(streaming[None, :, None], window, valid))


@register
@dataclass
class DuoAttention(EvictionMethod):
    """DuoAttention: streaming heads hold ``sink`` + ``recent`` tokens, retrieval heads the full cache.

    https://arxiv.org/abs/2410.10819 — head ``(l, h)`` streams iff its trained gate ``α[l, h]`` is among the lowest
    ``sparsity`` fraction of all KV heads; see the module docstring for storage and decoding.

    Parameters
    ----------
    sparsity : float
        Fraction of all KV heads (every layer) that are streaming heads, in [0, 1]. ``0``: every head keeps the full
        cache (identical to stock). Default 0.5. Bytes ≈ ``(1 − sparsity) + sparsity · (sink + recent) / tokens``.
    sink : int | None
        Initial real tokens a streaming head keeps; ``None`` (default): the value the patterns were trained with.
    recent : int | None
        Most recent tokens a streaming head keeps; ``None`` (default): the trained value.
    patterns : str | None
        Patterns directory (``kvaccel train-gate duo_attention --out DIR``); default: the patterns shipped for the
        model (refused for a model of another fingerprint).
    slack : int | None
        Decode tokens a streaming head may hold beyond ``sink + recent`` before they are dropped (one in-place move per
        ``slack`` steps); ``None``: ``max(1, (sink + recent) // 32)``.
    """

    name = "duo_attention"
    sparsity: float = 0.5
    sink: int | None = None
    recent: int | None = None
    patterns: str | None = None
    slack: int | None = None

    def __post_init__(self):
        check_ratio("sparsity", self.sparsity)
        if self.sink is not None:
            check_int("sink", self.sink, 0, why="or None for the trained value")
        if self.recent is not None:
            check_int("recent", self.recent, 1, why="or None for the trained value")
        if self.patterns is not None and not isinstance(self.patterns, (str, Path)):
            raise ValueError(f"patterns ({self.patterns!r}) must be a patterns directory path or None")
        check_slack(self.slack)

    def check_stages(self, stages: dict) -> None:
        """Refuse channel / decode methods: they read padded per-head keys, which the packed layers do not hold."""
        check_varlen_stages("duo_attention (retrieval and streaming heads packed at their own lengths)", stages,
                            "drop '{other}'")

    def bind(self, model) -> None:
        pats = DuoPatterns.trained_for(model, self.patterns, "duo_attention", option="patterns")
        self._sink = pats.meta["sink"] if self.sink is None else self.sink
        self._recent = pats.meta["recent"] if self.recent is None else self.recent
        device = next(model.parameters()).device
        stream = pats.streaming_heads(self.sparsity)
        self._stream = stream.to(device)
        self._has_stream = stream.any(-1).tolist()  # host copy: layers with no streaming head are left alone

    def streaming_heads(self) -> Tensor:
        """``(layers, kv heads)`` bool of the bound model: True = streaming head."""
        s = getattr(self, "_stream", None)
        if s is None:
            raise RuntimeError("duo_attention is not bound to a model; use kvaccel.patch(model, 'duo_attention')")
        return s

    def after_prefill(self, ctx) -> None:
        self._evict(ctx, 0)

    def after_decode(self, ctx) -> None:
        self._evict(ctx, decode_slack(self._sink + self._recent, self.slack))

    def _evict(self, ctx, slack: int) -> None:
        """Bound the streaming heads of this layer to ``sink + recent`` once one may hold ``slack`` more tokens."""
        i = ctx.layer_idx
        if not self._has_stream[i]:
            return
        cap = self._sink + self._recent
        ctx.stats["streaming_heads"] = int(self._stream[i].sum())
        layer = ctx.layer
        if isinstance(layer, DuoLayer):
            layer.streaming, layer.sink, layer.recent = self._stream[i], self._sink, self._recent  # (again after reset)
            if layer.stream_max >= cap + max(slack, 1):
                layer.roll()
            return
        if layer.length <= cap + slack:
            return
        if isinstance(layer, VarlenLayer) or layer.narrow is not None:
            raise NotImplementedError(f"duo_attention cannot evict from a {type(layer).__name__} with this layout")
        cache = ctx.state.cache  # the cache of this forward (the pre-hook of layer 0 records it)
        if cache is None or cache.layers[i] is not layer:
            raise RuntimeError(f"duo_attention cannot find layer {i} of this forward's cache to replace it")
        B, H, T = layer.keys.shape[:3]
        idx, slot_valid = _streaming_selection(layer.full_valid().expand(B, H, T), self._stream[i], self._sink,
                                               self._recent)
        new = DuoLayer.from_selection(layer, idx, slot_valid)
        new.streaming, new.sink, new.recent = self._stream[i], self._sink, self._recent
        new.stream_max = cap  # every streaming segment holds at most sink + recent now
        # The pre-hook reads cache.layers[i] at every forward: the next forward of this layer uses the new one.
        cache.layers[i] = new


__all__ = ["DuoAttention", "DuoLayer", "DuoPatterns"]
