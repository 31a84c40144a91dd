"""D2O: dynamic discriminative operations — per-layer budgets from attention density, H2O eviction, merging."""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kvaccel.cache import KVAccelLayer, compact_slots
from kvaccel.checks import check_int
from kvaccel.config import register, validate_budget

from .base import EvictionMethod, check_slack, decode_slack, eviction_due, one_thread
from .h2o import step_attention_probs

if TYPE_CHECKING:
    from kvaccel.patches.attention import AttentionContext

Tensor = torch.Tensor
STATE = "d2o"  # key of the accumulated attention scores in ``layer.token_state``
#: a decode-time eviction of a layer holding at most this many ``B * H_kv * N * D`` key elements runs on one
#: CPU thread (``one_thread``)
_SERIAL_MAX = 1 << 20


def layer_sigma(col_sums: Tensor, valid: Tensor | None = None) -> Tensor:
    """σ_l of one layer: per head the variance over tokens of the column sums, min-max normalised across heads, mean.

    ``col_sums`` ``(B, H, T)`` (``S = A.sum(-2)`` per attention head); ``valid`` ``(B, 1|H, T)`` real tokens.
    Population variance over the real tokens; a layer whose heads all have the same variance gets 0.
    Returns ``(B,)`` float32.
    """
    s = col_sums.float()
    m = torch.ones_like(s, dtype=torch.bool) if valid is None else valid.expand(s.shape)
    n = m.sum(-1).clamp(min=1)
    mean = (s * m).sum(-1) / n
    var = (((s - mean[..., None]) ** 2) * m).sum(-1) / n  # (B, H)
    lo, hi = var.amin(-1, keepdim=True), var.amax(-1, keepdim=True)
    norm = torch.where(hi > lo, (var - lo) / (hi - lo).clamp(min=1e-30), torch.zeros_like(var))
    return norm.mean(-1)


def allocate_ratios(sigmas: Tensor, rho: float) -> Tensor:
    """Keep ratios of the compressible layers: ``r_l = clamp(softmax(−σ)_l · M · ρ, 0.01, 1)``, ``M = len(σ)``.

    ``ρ >= 1`` keeps every token (all ratios 1).
    """
    if rho >= 1.0:
        return torch.ones_like(sigmas, dtype=torch.float32)
    w = torch.softmax(-sigmas.float(), dim=0)
    return (w * sigmas.numel() * rho).clamp(0.01, 1.0)


def dense_view(layer: KVAccelLayer) -> tuple[Tensor, Tensor, Tensor]:
    """Keys, values and validity of every held token on the concatenated ``[narrow, full]`` axis.

    Narrow keys are zero-filled in their pruned channels (so ``q · K`` equals ThinK's narrow logits).
    Returns ``K (B, H, N, D)``, ``V (B, H, N, Dv)``, ``valid (B, H, N)`` bool.
    """
    K, _ = layer.dense_keys()
    nar = layer.narrow
    V = layer.values if nar is None else torch.cat([nar.dense_values(layer.values.shape[-1]), layer.values], 2)
    return K, V, layer.token_valid().expand(K.shape[0], K.shape[1], K.shape[2])


def merge_evicted(
    K: Tensor, V: Tensor, kept: Tensor, evicted: Tensor, tau_prev: Tensor | None, alpha: float, beta: float,
    chunk: int = 512, normalize: bool = True, per_head: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """D2O merge compensation on ``(B, H, N, ·)`` keys/values with ``kept`` / ``evicted`` masks ``(B, H, N)``.

    ``s_e = max_{t kept} cos(K_e, K_t)`` with ``t*`` the argmax (same head); ``τ = mean(s)`` over the evicted
    (head, token) pairs of a sequence at the first call, else ``τ = α·τ_prev + β·mean(s)``.

    * Decision: ``per_head`` — ``e`` merges in head ``h`` when ``s_e[h] >= τ``; else (the reference) ``e`` merges
      in every head that evicts it when the mean of ``s_e`` over those heads is ``>= τ``.
    * Weights: ``normalize`` — the convex combination ``K_t ← (K_t + Σ_{e→t} s_e K_e) / (1 + Σ_{e→t} s_e)``; else
      (the reference's ``scatter_reduce(mean, include_self)`` of ``s_e K_e``) ``K_t ← (K_t + Σ s_e K_e)/(1 + n_t)``,
      whose weights sum to ``(1 + Σ s_e)/(1 + n_t) < 1``: merged keys and values shrink. Same for V.

    Cost: ``E x N`` similarities per head for the ``E`` evicted rows (not ``N x N``), and only the kept tokens that
    receive a merge are recomputed; the result is the all-rows computation's (``tests/test_d2o.py``).

    Returns ``(K', V', τ (B,), merged (B, H, N) bool)``.
    """
    B, H, N, D = K.shape
    kf = K.float()
    kn = F.normalize(kf, dim=-1)
    # Only the evicted rows are compared with the kept tokens (a decode eviction drops ``slack`` of ``N`` tokens),
    # and only the kept tokens that receive a merge are rewritten: ``(K_t + 0) / 1`` is ``K_t`` for the others.
    rows, is_row = compact_slots(evicted)  # (B, H, E): evicted positions in order, then padding (not evicted)
    E = rows.shape[-1]
    s_e = kf.new_zeros(B, H, E)
    near_e = torch.zeros(B, H, E, dtype=torch.long, device=K.device)
    hide = torch.zeros(B, H, 1, N, dtype=torch.float32, device=K.device).masked_fill_(~kept[:, :, None], float("-inf"))
    for r0 in range(0, E, chunk):
        r1 = min(E, r0 + chunk)
        ke = kn.gather(2, rows[..., r0:r1, None].expand(B, H, r1 - r0, D))
        m, a = (ke @ kn.transpose(-1, -2)).add_(hide).max(-1)  # + 0 or -inf: the masked fill, exactly
        s_e[..., r0:r1], near_e[..., r0:r1] = m, a
    s_e = torch.where(is_row, s_e, torch.zeros_like(s_e))
    s = kf.new_zeros(B, H, N).scatter_(2, rows, s_e)  # rows is a permutation prefix: padding writes 0 elsewhere
    mean_s = s.sum((1, 2)) / evicted.sum((1, 2)).clamp(min=1)
    tau = mean_s if tau_prev is None else alpha * tau_prev + beta * mean_s
    if per_head:
        merged = evicted & (s >= tau[:, None, None])
    else:
        heads = evicted.sum(1, keepdim=True)
        m_e = s.sum(1, keepdim=True) / heads.clamp(min=1)
        merged = evicted & (m_e >= tau[:, None, None])
    merged_e = merged.gather(2, rows)  # False on padding (not evicted)
    w = torch.where(merged_e, s_e, torch.zeros_like(s_e))  # (B, H, E)
    mass = kf.new_zeros(B, H, N).scatter_add_(2, near_e, w if normalize else merged_e.float())
    denom = (1.0 + mass.gather(2, near_e))[..., None]  # of each evicted row's target (padding: any kept token)

    def merge_into_targets(X: Tensor) -> Tensor:
        F_ = X.shape[-1]
        tgt = near_e[..., None].expand(B, H, E, F_)
        x_e = X.gather(2, rows[..., None].expand(B, H, E, F_)).float()
        acc = X.new_zeros(B, H, N, F_, dtype=torch.float32).scatter_add_(2, tgt, w[..., None] * x_e)
        new = (X.gather(2, tgt).float() + acc.gather(2, tgt)) / denom
        return X.clone().scatter_(2, tgt, new.to(X.dtype))  # a target named twice gets the same row twice

    return merge_into_targets(K), merge_into_targets(V), tau, merged


@register
@dataclass
class D2O(EvictionMethod):
    """D2O: layer budgets from attention density, H2O-style token eviction, merging of similar evicted tokens.

    https://arxiv.org/abs/2406.13035 — ``r_l = clamp(softmax(−σ)_l · M · ρ, 0.01, 1)`` with ``σ_l`` the mean over
    heads of the min-max normalised variance of the prompt's attention column sums; tokens: first ``sink`` + top
    accumulated attention + recent; evicted ``e`` merges into its most cosine-similar kept token ``t`` (per head)
    when ``s_e >= τ_t`` (EMA threshold), ``K_t ← (K_t + Σ s_e K_e)/(1 + Σ s_e)``, same for V. The reference
    (github.com/AIoT-MLSys-Lab/d2o, ``scatter_reduce(mean)``) divides by ``1 + n_t`` instead, so merged keys and
    values shrink, and takes one decision on ``mean_heads(s_e)``: ``normalize_merge=False, per_head_merge=False``.

    Choices where the paper is silent (see ``merge_evicted`` for the merge):

    * **Deferred allocation.** σ_l needs every layer's attention, but layers run one after the other. Each
      compressible layer stores its column sums (as the H2O scores) and σ_l at its prefill call and keeps its full
      cache for the moment; the *last* layer's call (which is kept full) computes the allocation and evicts every
      compressible layer through ``ctx.state.cache.layers``. So the first prompt is allocated exactly like the
      reference's profiling pass, at the cost of holding the full cache until the end of the prefill forward.
    * Layers 0, 1 and ``L−1`` keep everything; the softmax runs over the ``M = L − 3`` other layers and ``M``
      replaces ``L`` in ``r_l``, so that the compressible layers average ``ρ`` (before clamping).
      ``ρ = budget`` (float) or ``budget / prompt_len`` (int); ``ρ >= 1`` keeps everything, at decode too
      (otherwise decode holds each layer at its capacity, as the paper's fixed-size cache does).
      σ of a batch is the mean over its sequences (one allocation per batch); variance is the population one.
    * Per layer capacity ``c_l = max(1, ceil(r_l · prompt_len))`` per head; ``int(c_l · recent_ratio)`` recent
      tokens + the first ``sink`` + the highest accumulated scores fill it. Scores of a kv head are the sums over
      its GQA query heads; decode steps add their attention probabilities (H2O accumulation).
    * With a narrow segment (ThinK), similarities and scores use the keys zero-filled in the pruned channels.
      Because eviction is deferred to the end of the prefill forward, ThinK (which runs right after each layer's
      call) chooses the channels of layers 2..L−2 on their not-yet-evicted keys, and D2O's ``keep`` then evicts
      across the narrow and full-width segments.

    Parameters
    ----------
    budget : int | float
        Global ratio ``ρ``: a fraction of the prompt (float in (0, 1]) or tokens per head (int). Default 0.25.
    recent_ratio : float
        Fraction of each layer's capacity given to the most recent tokens. Default 0.5.
    sink : int
        First tokens always kept. Default 4.
    merge : bool
        Merge compensation on/off. Default True.
    alpha, beta : float
        EMA weights of the merge threshold. Default 0.5, 0.5.
    normalize_merge : bool
        Merge as a convex combination (weights sum to one). ``False`` = the reference's ``mean(K_t, s_e K_e)``,
        which shrinks merged keys and values. Default True (see ``merge_evicted``).
    per_head_merge : bool
        Decide the merge per head (``s_e[h] >= τ``). ``False`` = the reference's one decision on the mean over
        heads. Default True.
    slack : int | None
        Decode-time batching of evictions (and merges), as ``ScoredEviction.slack``: ``1`` = every step (the
        paper), ``None`` = ``max(1, capacity // 32)``.
    """

    name = "d2o"
    budget: int | float = 0.25
    recent_ratio: float = 0.5
    sink: int = 4
    merge: bool = True
    alpha: float = 0.5
    beta: float = 0.5
    normalize_merge: bool = True
    per_head_merge: bool = True
    slack: int | None = None

    def __post_init__(self):
        validate_budget(self.budget)
        check_slack(self.slack)
        if not (0.0 <= self.recent_ratio <= 1.0):
            raise ValueError(f"recent_ratio ({self.recent_ratio!r}) must be in [0, 1]")
        check_int("sink", self.sink, 0)
        for f in ("merge", "normalize_merge", "per_head_merge"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"{f} ({getattr(self, f)!r}) must be True or False")
        for f in ("alpha", "beta"):
            v = getattr(self, f)
            if not (0.0 <= v <= 1.0):
                raise ValueError(f"{f} ({v!r}) must be in [0, 1]")
        # per cache layer: {"capacity": int, "tau": (B,) tensor | None}; weak so a dropped cache frees it
        object.__setattr__(self, "_layers", weakref.WeakKeyDictionary())

    def bind(self, model) -> None:
        n = model.config.get_text_config(decoder=True).num_hidden_layers
        if n < 4:
            raise ValueError(
                f"d2o needs at least 4 layers (layers 0, 1 and the last keep the full cache); the model has {n}"
            )

    @staticmethod
    def compressible(layer_idx: int, num_layers: int) -> bool:
        return 2 <= layer_idx < num_layers - 1

    # ------------------------------------------------------------------ prefill: score, then allocate at the end
    def after_prefill(self, ctx: AttentionContext) -> None:
        L, l = ctx.num_layers, ctx.layer_idx
        if self.compressible(l, L):
            col = self._accumulate(ctx)
            K_valid = dense_view(ctx.layer)[2]
            G = ctx.groups
            ctx.stats["d2o_sigma"] = float(layer_sigma(col, K_valid.repeat_interleave(G, 1)).mean())
        if l == L - 1:
            self._allocate_and_evict(ctx)

    def _accumulate(self, ctx: AttentionContext) -> Tensor:
        """Add this forward's attention column sums to the layer's scores; returns them per query head."""
        layer = ctx.layer
        col = step_attention_probs(ctx)  # (B, Hq, N) over the [narrow, full] axis, causal among the queries
        B, Hq, N = col.shape
        Hkv = layer.keys.shape[1]
        grouped = col.view(B, Hkv, Hq // Hkv, N).sum(2)
        prev = layer.token_state.get(STATE)
        if prev is None:
            layer.token_state[STATE] = grouped
        else:
            prev.add_(grouped)
        return col

    def _allocate_and_evict(self, ctx: AttentionContext) -> None:
        state, L = ctx.state, ctx.num_layers
        cache = state.cache
        mids = [l for l in range(L) if self.compressible(l, L)]
        sig = torch.tensor([state.layer_stats[l].pop("d2o_sigma", 0.0) for l in mids])
        prompt_len = ctx.layer.prompt_len
        rho = self.budget if isinstance(self.budget, float) else self.budget / max(1, prompt_len)
        ratios = allocate_ratios(sig, rho)
        for l in range(L):
            if not self.compressible(l, L):
                state.layer_stats[l]["capacity"] = cache.layers[l].prompt_len
        for l, r in zip(mids, ratios.tolist(), strict=True):
            layer = cache.layers[l]
            cap = max(1, math.ceil(r * layer.prompt_len))
            state.layer_stats[l]["capacity"] = cap
            state.layer_stats[l]["d2o_ratio"] = r
            if rho >= 1.0:  # everything kept, also during decoding (no capacity to hold the layer at)
                self._layers.pop(layer, None)
                continue
            st = self._layers.setdefault(layer, {"capacity": cap, "tau": None})
            st["capacity"] = cap
            layer.reserve = decode_slack(cap, self.slack)
            if layer.length > cap:
                self.compress(layer, cap, st)
            else:
                state.notes.add(f"d2o: budget ({cap} tokens) >= prompt ({layer.length} tokens) in layer {l}")

    # ------------------------------------------------------------------ decode: keep each layer at its capacity
    def wants_decode_probs(self) -> bool:
        return True

    def after_decode(self, ctx: AttentionContext) -> None:
        st = self._layers.get(ctx.layer)
        if st is None or not self.compressible(ctx.layer_idx, ctx.num_layers):
            return
        self._accumulate(ctx)
        layer = ctx.layer
        if eviction_due(layer, st["capacity"], decode_slack(st["capacity"], self.slack)):
            K = layer.keys
            small = K.device.type == "cpu" and K.shape[0] * K.shape[1] * layer.length * K.shape[-1] <= _SERIAL_MAX
            with one_thread(small):  # a decode eviction's ops are small: parallel regions would cost more than them
                self.compress(layer, st["capacity"], st)

    def compress(self, layer: KVAccelLayer, capacity: int, st: dict) -> None:
        """Keep ``capacity`` tokens per head (sinks + recent + top scores), merging evicted ones if enabled."""
        K, V, valid = dense_view(layer)
        B, H, N, _ = K.shape
        score = layer.token_state[STATE].float().expand(B, H, N)
        rank = valid.cumsum(-1) - 1
        rank_end = valid.flip(-1).cumsum(-1).flip(-1) - 1
        n_recent = int(capacity * self.recent_ratio)
        protect = valid & ((rank < self.sink) | (rank_end < n_recent))
        pri = torch.where(protect, torch.finfo(torch.float32).max, score).masked_fill(~valid, float("-inf"))
        idx = pri.topk(min(capacity, N), dim=-1).indices.sort(dim=-1).values
        slot_valid = pri.gather(-1, idx) > float("-inf")
        if self.merge:
            kept = torch.zeros_like(valid).scatter_(-1, idx, slot_valid)
            evicted = valid & ~kept
            if bool(evicted.any()):
                K2, V2, st["tau"], merged = merge_evicted(
                    K, V, kept, evicted, st["tau"], self.alpha, self.beta,
                    normalize=self.normalize_merge, per_head=self.per_head_merge,
                )
                if bool(merged.any()):
                    self._write_back(layer, K2, V2)
        layer.keep(idx, None if bool(slot_valid.all()) else slot_valid)

    @staticmethod
    def _write_back(layer: KVAccelLayer, K: Tensor, V: Tensor) -> None:
        nar = layer.narrow
        Tn = 0 if nar is None else nar.keys.shape[2]
        layer.keys, layer.values = K[:, :, Tn:], V[:, :, Tn:]
        if nar is not None:
            ci = nar.channel_idx
            nar.keys = K[:, :, :Tn].gather(-1, ci[:, :, None, :].expand(*K.shape[:2], Tn, ci.shape[-1]))
            vi = nar.value_idx
            Vn = V[:, :, :Tn]
            nar.values = Vn if vi is None else Vn.gather(-1, vi[:, :, None, :].expand(*Vn.shape[:3], vi.shape[-1]))
