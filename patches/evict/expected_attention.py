"""Expected attention: score each cached key by the attention that future queries are expected to pay it."""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

from kvaccel.checks import check_int, check_ratio
from kvaccel.config import register, resolve_budget, validate_budget
from kvaccel.rope import rotate_half, unrotate

from .base import KEEP_SCORE, ScoredEviction, eviction_due
from .snapkv import group_window_scores, pool_scores

Tensor = torch.Tensor


#: ``future_positions`` values
FUTURE_POSITIONS = ("average", "mixture")
#: ``observation_pooling`` values
OBSERVATION_POOLINGS = ("centered", "forward")


def query_statistics(q_pre: Tensor, mask: Tensor, covariance: bool) -> tuple[Tensor, Tensor | None]:
    """Mean ``(B, H, D)`` and population covariance ``(B, H, D, D)`` of the queries ``q_pre`` ``(B, H, L, D)``
    selected by ``mask`` ``(B, L)`` (float32)."""
    w = mask.to(torch.float32)[:, None, :, None]  # (B, 1, L, 1)
    n = w.sum(2).clamp(min=1.0)  # (B, 1, 1)
    q = q_pre.float()
    mu = (q * w).sum(2) / n
    if not covariance:
        return mu, None
    c = (q - mu[:, :, None]) * w
    return mu, c.transpose(-1, -2) @ c / n[..., None]


def average_rotation(cos: Tensor, sin: Tensor) -> Tensor:
    """``R̄ = mean_p R_p`` ``(B, D, D)`` from the future positions' ``cos``/``sin`` ``(B, F, D)``, with
    ``R_p = diag(cos_p) + diag(sin_p) P`` (so ``R_p x`` = HF's RoPE of ``x`` at position ``p``)."""
    c, s = cos.float().mean(1), sin.float().mean(1)  # (B, D)
    D = c.shape[-1]
    eye = torch.eye(D, device=c.device, dtype=c.dtype)
    P = rotate_half(eye).T  # P @ x == rotate_half(x): column j of P is rotate_half(e_j)
    return torch.diag_embed(c) + s[:, :, None] * P


def forward_max_pool(scores: Tensor, kernel: int) -> Tensor:
    """``out[..., j] = max(scores[..., j - kernel + 1 .. j])`` (same length, the window clipped at the start)."""
    if kernel == 1 or scores.shape[-1] == 0:
        return scores
    shape = scores.shape
    x = torch.nn.functional.pad(scores.reshape(-1, 1, shape[-1]), (kernel - 1, 0), value=float("-inf"))
    return torch.nn.functional.max_pool1d(x, kernel, stride=1).reshape(shape)


def future_offsets(n_future_positions: int, samples: int) -> list[int]:
    """Offsets ``0 .. n_future_positions - 1`` after the next position at which ``future_positions="mixture"``
    evaluates the expected attention: ``samples`` log-spaced points ``round(logspace(0, log10 F, samples)) - 1``,
    duplicates removed (e.g. 0, 1, 5, 13, ... F - 1: the near future weighs more, as a 1/offset prior)."""
    pts = torch.logspace(0, math.log10(n_future_positions), samples, dtype=torch.float64).round().long() - 1
    return sorted(set(pts.clamp(0, n_future_positions - 1).tolist()))


def expected_logits(mu: Tensor, cov: Tensor | None, keys: Tensor, scale: float) -> Tensor:
    """``log E_q[exp(s q·k)]`` for ``q ~ N(mu, cov)``: ``s μ·k + s² kᵀΣk / 2`` ``(B, H_kv, G, N)``.

    ``mu`` ``(B, H_q, D)``, ``cov`` ``(B, H_q, D, D)`` (already rotated to the future positions), ``keys``
    ``(B, H_kv, N, D)`` post-RoPE; the ``G = H_q / H_kv`` query heads of a kv head are grouped (K not repeated).
    """
    B, Hkv, N, D = keys.shape
    G = mu.shape[1] // Hkv
    k = keys.float()
    out = scale * torch.einsum("bhgd,bhnd->bhgn", mu.view(B, Hkv, G, D), k)
    if cov is not None:  # kᵀΣk as (K Σ) · K: O(G·N·D²) time, O(G·N·D) memory (no (N, D, D) intermediate)
        kc = k[:, :, None] @ cov.view(B, Hkv, G, D, D)  # (B, Hkv, G, N, D)
        out = out + 0.5 * scale * scale * (kc * k[:, :, None]).sum(-1)
    return out


@register
@dataclass
class ExpectedAttention(ScoredEviction):
    """Expected attention (kvpress' ``ExpectedAttentionPress``): keep the keys future queries will attend to.

    https://arxiv.org/abs/2510.00636 — queries before RoPE ``q̃ ~ N(μ, Σ)`` (statistics of the prompt's queries);
    a query at a future position ``p`` is ``R_p q̃``, and averaging ``R_p`` over the next ``n_future_positions``
    positions gives ``μ̄ = R̄ μ``, ``Σ̄ = R̄ Σ R̄ᵀ``. Each cached key ``k`` scores
    ``softmax_k(μ̄·k/√d + kᵀΣ̄k/(2d))`` (the Gaussian expectation of ``exp(q·k/√d)``, normalised over the
    scored keys), averaged over the ``G`` query heads of its kv head, times ``‖v‖`` (``use_vnorm``); the first
    ``n_sink`` tokens are always kept and their queries are left out of the statistics.

    RoPE frames: our keys are cached *after* RoPE (``k = R_j k̃`` at their own position ``j``), so
    ``E[(R_p q̃)·k]`` needs no per-key rotation: rotating μ and Σ to the future absolute positions is enough
    (kvpress does the same on its post-RoPE cache). The pre-RoPE queries are recovered by un-rotating the
    post-RoPE queries the attention receives with the model's own rotary embedding (``model.model.rotary_emb``,
    found at ``bind``) at their positions (``position_ids`` when given, else the positions the layer has seen);
    for Qwen3 that is the query after ``q_norm``, the one RoPE sees. The ``1/√d`` above is the module's
    ``scaling``.

    Decoding: ``decode_budget=None`` (kvpress: compress at prefill only) lets the cache grow. With a budget,
    each step re-scores the held keys with the prompt's statistics rotated to the next ``n_future_positions``
    positions after the current one and cuts the cache back to ``decode_budget``.

    Parameters
    ----------
    budget : int | float
        Tokens kept per head (int) or fraction of the prompt (float in (0, 1]). Default 0.25.
    chunk : int
        Span-preserving selection (see ``ScoredEviction``). Default 1 (per token).
    n_future_positions : int
        Future positions the RoPE rotation is averaged over. Default 512.
    n_sink : int
        First tokens always kept (and left out of the query statistics). Default 4.
    use_covariance : bool
        Add the ``kᵀΣ̄k/(2d)`` term. Default True.
    use_vnorm : bool
        Multiply scores by ``‖v‖``. Default True.
    window : int
        Queries the statistics are taken from: ``0`` = every prompt query after the sinks (kvpress), ``N`` = the
        last ``N`` prompt queries. Default 0.
    decode_budget : int | float | None
        ``None``: no eviction while decoding (default). Tokens / fraction of the prompt: bound the cache while
        decoding as described above.
    future_positions : str
        How the future positions enter. ``"average"`` (kvpress, default): one Gaussian expectation with the
        rotation averaged over the ``n_future_positions`` positions (``R̄``, which shrinks the rotating
        components). ``"mixture"``: the expectation the method stands for, taken per position — the mean over
        ``position_samples`` future offsets ``o`` (log-spaced in ``[0, n_future_positions)``, ``future_offsets``)
        of ``softmax_k(E-logits with the exact rotation R_{start+o})``; ``position_samples`` times the scoring cost.
    position_samples : int
        Offsets of ``future_positions="mixture"``. Default 8 (offsets 0, 1, 5, 13, 34, 85, 209, 511 of 512).
    observation_weight : float
        In [0, 1]. Mix the *observed* attention of the last ``observation_window`` prompt queries (SnapKV's
        score: their softmax attention summed, averaged over the group, max-pooled over ``observation_kernel``
        tokens, normalised over the scored tokens) into the expected attention:
        ``p = (1 - λ) p_expected + λ p_observed`` before the ``‖v‖`` weighting. The Gaussian of all prompt queries
        models the future queries' spread; the window's real attention adds the recent queries' sharp, local
        pattern the Gaussian averages away. Prompt-time only: ``observation_weight > 0`` with a
        ``decode_budget`` is refused (decode-time re-scoring has no observation window). Default 0 (kvpress).
    observation_window : int
        Prompt queries of the observation term. Default 32 (SnapKV's window).
    observation_kernel : int
        Odd max-pooling kernel of the observation term. Default 7 (SnapKV's).
    observation_pooling : str
        ``"centered"`` (SnapKV's, default): a token takes the max over ``±kernel//2`` neighbours. ``"forward"``: a
        token takes the max over itself and the ``kernel - 1`` tokens *before* it, so what follows an attended token
        scores like it — the continuation a copy reads next (a question attends to the first digits of a number;
        answering needs the rest of it).
    span_rule : str
        ``ScoredEviction``'s: ``"sliding"`` keeps the best ``chunk``-wide windows wherever they start.

    Recommended non-default setting (measured on kvpress' KL protocol, ``benchmarks/peers/README.md``):
    ``expected_attention(future_positions="mixture", observation_weight=0.2)`` (chosen on 4 tuning windows).
    For question-aware retrieval (the question is in the observation window; needles at budget 0.25):
    ``expected_attention(observation_weight=1.0, observation_pooling="forward", observation_kernel=15, chunk=16,
    span_rule="sliding")``.
    """

    name = "expected_attention"
    supports_rerotate = False  # future query statistics are taken at the tokens' true positions
    budget: int | float = 0.25
    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    window: int = 0
    decode_budget: int | float | None = None
    future_positions: str = "average"
    position_samples: int = 8
    observation_weight: float = 0.0
    observation_window: int = 32
    observation_kernel: int = 7
    observation_pooling: str = "centered"

    def __post_init__(self):
        super().__post_init__()
        check_int("n_future_positions", self.n_future_positions, 1)
        check_int("n_sink", self.n_sink, 0)
        check_int("window", self.window, 0)
        if self.future_positions not in FUTURE_POSITIONS:
            raise ValueError(f"future_positions ({self.future_positions!r}) must be one of {FUTURE_POSITIONS}")
        check_int("position_samples", self.position_samples, 1)
        check_ratio("observation_weight", self.observation_weight)
        check_int("observation_window", self.observation_window, 1)
        check_int("observation_kernel", self.observation_kernel, 1)
        if self.observation_kernel % 2 == 0:
            raise ValueError(f"observation_kernel ({self.observation_kernel}) must be odd (same-length pooling)")
        if self.observation_pooling not in OBSERVATION_POOLINGS:
            raise ValueError(
                f"observation_pooling ({self.observation_pooling!r}) must be one of {OBSERVATION_POOLINGS}"
            )
        if self.observation_weight > 0 and self.decode_budget is not None:
            raise ValueError(
                f"observation_weight ({self.observation_weight}) mixes in the prompt's observation window, which "
                "decode-time re-scoring does not have: use observation_weight=0 with a decode_budget, or "
                "decode_budget=None"
            )
        for f in ("use_covariance", "use_vnorm"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"{f} ({getattr(self, f)!r}) must be True or False")
        if self.decode_budget is not None:
            validate_budget(self.decode_budget, "decode_budget")
        # attention module -> rotary embedding of its model; cache layer -> (μ, Σ, next position (B,)) pre-RoPE
        object.__setattr__(self, "_rotary", weakref.WeakKeyDictionary())
        object.__setattr__(self, "_stats", weakref.WeakKeyDictionary())

    def bind(self, model) -> None:
        super().bind(model)
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        rotary = getattr(decoder, "rotary_emb", None)
        if rotary is None:
            raise ValueError(
                f"expected_attention needs the model's rotary embedding (`{type(decoder).__name__}.rotary_emb`), "
                "which this model does not have; use another eviction method (e.g. snapkv)"
            )
        for layer in decoder.layers:
            self._rotary[layer.self_attn] = rotary

    # ------------------------------------------------------------------ statistics
    def _positions(self, ctx) -> Tensor:
        """``(B, L)`` absolute positions of this forward's queries."""
        B, _, L, _ = ctx.query.shape
        pos = ctx.kwargs.get("position_ids")
        if pos is not None and pos.shape[-1] == L:
            return pos.expand(B, L).to(ctx.query.device)
        start = ctx.layer.seen - L
        return torch.arange(start, start + L, device=ctx.query.device).expand(B, L)

    def _prompt_statistics(self, ctx) -> tuple[Tensor, Tensor | None, Tensor]:
        """Pre-RoPE ``μ (B, H_q, D)``, ``Σ (B, H_q, D, D) | None`` of this forward's queries and ``(B,)`` the
        position right after the last one."""
        rotary = self._rotary.get(ctx.module)
        if rotary is None:
            raise RuntimeError("expected_attention was not bound to this model; patch it with kvaccel.patch")
        q = ctx.query
        B, _, L, _ = q.shape
        pos = self._positions(ctx)
        cos, sin = rotary(q.float(), pos)  # (B, L, D)
        q_pre = unrotate(q.float(), cos[:, None], sin[:, None])
        real = torch.ones(B, L, dtype=torch.bool, device=q.device) if ctx.pad is None else ctx.pad[:, -L:].bool()
        rank = real.cumsum(-1) - 1  # rank among the real tokens of this forward
        mask = real & (rank >= (self.n_sink if ctx.phase == "prefill" else 0))
        if self.window:
            from_end = real.flip(-1).cumsum(-1).flip(-1)
            mask &= from_end <= self.window
        mu, cov = query_statistics(q_pre, mask, self.use_covariance)
        nxt = torch.where(real, pos, pos.new_full((), -1)).amax(-1) + 1
        return mu, cov, nxt

    def _position_probs(self, ctx, R: Tensor, mu: Tensor, cov: Tensor | None, keys: Tensor, scored: Tensor) -> Tensor:
        """``(B, H_kv, N)`` group-mean softmax over the scored keys of the expected logits with rotation ``R``."""
        mu_f = (R @ mu[..., None])[..., 0]
        cov_f = None if cov is None else R @ cov @ R.transpose(-1, -2)
        logits = expected_logits(mu_f, cov_f, keys, ctx.scaling)  # (B, Hkv, G, N)
        masked = logits.masked_fill(~scored[:, :, None, :], float("-inf"))
        return torch.softmax(masked, dim=-1).nan_to_num_(0.0).mean(2)

    def observed_probs(self, ctx, scored: Tensor) -> Tensor:
        """``(B, H_kv, N)`` SnapKV's observation score of the held tokens from this forward's last
        ``observation_window`` queries, max-pooled, normalised to sum 1 over the ``scored`` tokens."""
        keys, valid = ctx.layer.dense_keys()
        w = min(self.observation_window, ctx.query.shape[2])
        acc = group_window_scores(ctx.query[:, :, -w:], keys, ctx.scaling, valid)
        if self.observation_pooling == "forward":
            acc = forward_max_pool(acc.float(), self.observation_kernel).masked_fill(~scored, 0.0)
        else:
            acc = pool_scores(acc.float(), self.observation_kernel, "max").masked_fill(~scored, 0.0)
        return acc / acc.sum(-1, keepdim=True).clamp_min(torch.finfo(acc.dtype).tiny)

    def scores_from(self, ctx, mu: Tensor, cov: Tensor | None, start: Tensor) -> Tensor:
        """``(B, H_kv, N)`` scores of the held tokens for queries at positions ``start .. start+F-1`` (per row)."""
        layer = ctx.layer
        keys, _ = layer.dense_keys()
        valid = layer.token_valid()
        rank = valid.cumsum(-1) - 1
        sink = valid & (rank < self.n_sink)
        scored = valid & ~sink
        rotary = self._rotary[ctx.module]
        if self.future_positions == "average":
            fpos = start[:, None] + torch.arange(self.n_future_positions, device=keys.device)
            cos, sin = rotary(mu, fpos)
            probs = self._position_probs(ctx, average_rotation(cos, sin)[:, None], mu, cov, keys, scored)
        else:  # mixture: the expectation per future position (exact rotation), averaged over sampled offsets
            offsets = future_offsets(self.n_future_positions, self.position_samples)
            probs = 0.0
            for o in offsets:
                cos, sin = rotary(mu, (start + o)[:, None])
                probs = probs + self._position_probs(ctx, average_rotation(cos, sin)[:, None], mu, cov, keys, scored)
            probs = probs / len(offsets)
        if self.observation_weight > 0 and ctx.phase != "decode":
            lam = self.observation_weight
            probs = (1 - lam) * probs + lam * self.observed_probs(ctx, scored)
        if self.use_vnorm:
            probs = probs * layer.dense_values().float().norm(dim=-1)
        return torch.where(sink, KEEP_SCORE, probs)

    # ------------------------------------------------------------------ ScoredEviction
    def score(self, ctx) -> Tensor:
        if ctx.phase == "decode":
            mu, cov, start = self._stats[ctx.layer]
            return self.scores_from(ctx, mu, cov, start + ctx.layer.decode_steps)
        mu, cov, start = self._prompt_statistics(ctx)
        if self.decode_budget is not None:
            self._stats[ctx.layer] = (mu, cov, start - ctx.layer.decode_steps)
        return self.scores_from(ctx, mu, cov, start)

    def decode_capacity(self, ctx) -> int | None:
        """Tokens kept per head while decoding in this layer, ``None`` = unbounded."""
        return None if self.decode_budget is None else resolve_budget(self.decode_budget, ctx.layer.prompt_len)

    def after_prefill(self, ctx) -> None:
        cap = self.capacity(ctx)
        ctx.record_capacity(cap)
        if self.decode_budget is not None:
            ctx.layer.reserve = self.decode_slack(self.decode_capacity(ctx))
        if ctx.layer.length > cap:
            self.keep(ctx.layer, self.score(ctx), cap)
        elif self.decode_budget is not None:  # statistics for decode-time eviction
            mu, cov, start = self._prompt_statistics(ctx)
            self._stats[ctx.layer] = (mu, cov, start - ctx.layer.decode_steps)

    def after_decode(self, ctx) -> None:
        cap = self.decode_capacity(ctx)
        if cap is not None and eviction_due(ctx.layer, cap, self.decode_slack(cap)):
            self.keep(ctx.layer, self.score(ctx), cap)
