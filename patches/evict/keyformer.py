"""Keyformer: key tokens chosen by accumulated Gumbel-softmax scores of the raw attention logits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvaccel.checks import check_int, check_number
from kvaccel.config import register

from .base import one_thread
from .h2o import H2O

STATE = "keyformer"
_ROW_CHUNK = 256  # stacked query rows per logits block: temporaries are O(_ROW_CHUNK * T) per kv head
DEFAULT_LENGTH = 128  # temperature schedule length when neither the field nor generate() gives one
#: a decode step's scoring of at most this many ``B * H_q * T`` logits runs on one CPU thread (``one_thread``)
_SERIAL_MAX = 1 << 18


def step_seed(seed: int, layer_idx: int, step: int) -> int:
    """Seed of the Gumbel generator of one layer at one step (0 = the prompt, t = the t-th decode step)."""
    return (seed * 1_000_003 + layer_idx * 10_007 + step) % (2**63)


def uniform_noise(shape, generator: torch.Generator) -> torch.Tensor:
    """``u ~ U(0, 1)`` drawn with ``generator`` on its device (float32), clamped to ``[tiny, 1 - eps]`` (so that
    ``log(-log(u))`` is finite). No host-to-device copy: a CUDA generator draws on the GPU."""
    u = torch.rand(shape, generator=generator, dtype=torch.float32, device=generator.device)
    return u.clamp_(torch.finfo(torch.float32).tiny, 1.0 - torch.finfo(torch.float32).eps)


def neg_gumbel_noise(shape, generator: torch.Generator) -> torch.Tensor:
    """``-zeta = log(-log(u))`` for ``u`` of :func:`uniform_noise`, computed in place in ``u``'s buffer (no other
    allocation): ``x - neg_gumbel_noise(...)`` is exactly ``x + gumbel_noise(...)`` drawn from the same generator."""
    return uniform_noise(shape, generator).log_().neg_().log_()


def gumbel_noise(shape, generator: torch.Generator) -> torch.Tensor:
    """``zeta = -log(-log(u))``, ``zeta ~ Gumbel(0, 1)``, ``u`` of :func:`uniform_noise` (float32, on the generator's
    device)."""
    return neg_gumbel_noise(shape, generator).neg_()


def tau_at(step: int, tau_init: float, tau_end: float, max_new_tokens: int) -> float:
    """``tau_t = tau_init + t (tau_end - tau_init) / max_new_tokens``, clamped to ``[tau_init, tau_end]``."""
    t = min(max(step, 0), max_new_tokens)
    return tau_init + t * (tau_end - tau_init) / max_new_tokens


def noisy_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    tau: float,
    generator: torch.Generator,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(B, H_kv, T)``: Gumbel-softmax probabilities of the last ``W`` queries, summed over them, mean over the group.

    ``f_ij = softmax_j((scale q_i . k_j + zeta_ij) / tau)`` with causal masking (query ``i`` at position
    ``T - W + i``) and invalid keys masked. The ``G`` query heads of a kv head are stacked as ``(B, H_kv, G*W, T)``
    rows (no K repeat) and processed ``_ROW_CHUNK`` rows at a time; one noise block of the chunk's shape is drawn
    per chunk, in order, from ``generator`` (which must live on ``q``'s device). With ``W = T`` (every prompt query)
    the ``(G*T, T)`` map is never built: at most ``_ROW_CHUNK`` rows at a time.
    """
    B, Hq, W, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    G = Hq // Hkv
    qg = q.reshape(B, Hkv, G * W, D)
    kt = k.float().transpose(-1, -2)
    if W == 1:  # a decode step: one block of G rows that see every key (no causal mask to build)
        logits = (qg.float() @ kt).mul_(scale).sub_(neg_gumbel_noise((B, Hkv, G, T), generator)).div_(tau)
        if valid is None:  # every key real: no row is fully masked, so no NaN to clear
            return torch.softmax(logits, dim=-1).sum(2).div_(G)
        logits.masked_fill_(~valid[:, :, None, :], float("-inf"))
        return torch.softmax(logits, dim=-1).nan_to_num_(0.0).sum(2).div_(G)
    row_pos = (T - W + torch.arange(W, device=q.device)).repeat(G)  # absolute position of each stacked row
    key_pos = torch.arange(T, device=q.device)
    out = torch.zeros(B, Hkv, T, dtype=torch.float32, device=q.device)
    for r0 in range(0, G * W, _ROW_CHUNK):
        r1 = min(G * W, r0 + _ROW_CHUNK)
        logits = (qg[:, :, r0:r1].float() @ kt).mul_(scale)
        logits.sub_(neg_gumbel_noise(logits.shape, generator))
        mask = key_pos[None, :] <= row_pos[r0:r1, None]  # (rows, T)
        if valid is not None:
            mask = mask & valid[:, :, None, :]
        logits = logits.div_(tau).masked_fill_(~mask, float("-inf"))
        out += torch.softmax(logits, dim=-1).nan_to_num_(0.0).sum(2)
    return out / G


@register
@dataclass
class Keyformer(H2O):
    """Keyformer: keep a recent window + the "key" tokens with the largest accumulated Gumbel-softmax score.

    https://arxiv.org/abs/2403.09054 (MLSys 2024) —
    ``f(x_i) = exp((x_i + zeta_i)/tau) / sum_j exp((x_j + zeta_j)/tau)``, ``x`` the raw logits ``q . k / sqrt(d)``,
    ``zeta ~ Gumbel(0, 1)`` redrawn every step, ``tau_t = tau_init + t (tau_end - tau_init) / max_new_tokens``
    (clamped at ``tau_end``). Per layer and kv head the scores accumulate over steps in
    ``layer.token_state["keyformer"]`` (``(B, H_kv, T)``, mean over the ``G`` query heads; an evicted token's
    score is dropped with it). At the prompt (``t = 0``) every prompt query's noisy probabilities are summed, as
    the reference accumulates them (``window=0``, computed in blocks of rows, never an ``(L, L)`` map at once;
    ``window=N`` = the last ``N`` queries only); each decode step ``t`` adds the new query's noisy probabilities
    and cuts the cache back to ``budget``: ``round(recent_ratio * budget)`` most recent tokens + the top-scoring
    rest. The noise of layer ``l`` at step ``t`` comes from a generator on the model's device seeded with
    ``step_seed(seed, l, t)``: reproducible, whatever else runs, and drawn where it is used (no host copy).

    Temperature length: ``max_new_tokens`` when set; else the ``max_new_tokens`` of the running ``generate()``
    call (its argument or the generation config, recorded by kvaccel's ``generate`` wrapper); else (manual
    decode loops, ``max_length`` only) 128, noted in ``kvaccel.report(model)["notes"]``.

    Parameters
    ----------
    budget : int | float
        Tokens kept per head (int) or fraction of the prompt (float in (0, 1]). Default 0.25.
    recent_ratio : float
        Fraction of the budget used as recent window (reference: 0.3; paper recommends 0.2–0.3). Default 0.3.
    window : int
        Prompt queries whose logits score the prompt at prefill: ``0`` = all of them (the reference), ``N`` = the
        last ``N``. Default 0.
    tau_init, tau_end : float
        Gumbel-softmax temperature at the first and at the ``max_new_tokens``-th step (> 0). Default 1.0, 2.0.
    max_new_tokens : int | None
        Steps over which the temperature rises linearly; ``None`` = the generation's length (see above).
        Default None.
    seed : int
        Seed of the Gumbel noise (combined with the layer index and the step). Default 0.
    """

    name = "keyformer"
    state_key: ClassVar[str] = STATE
    budget: int | float = 0.25
    recent_ratio: float = 0.3
    window: int = 0
    tau_init: float = 1.0
    tau_end: float = 2.0
    max_new_tokens: int | None = None
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()  # budget, recent_ratio
        check_int("window", self.window, 0)
        for field in ("tau_init", "tau_end"):
            v = getattr(self, field)
            check_number(field, v, 0, low_open=True)
        if self.max_new_tokens is not None:
            check_int("max_new_tokens", self.max_new_tokens, 1)
        check_int("seed", self.seed, 0)

    def tau(self, step: int, length: int | None = None) -> float:
        """Temperature at decode step ``step`` of a ``length``-token generation (default: ``max_new_tokens``)."""
        length = length or self.max_new_tokens or DEFAULT_LENGTH
        return tau_at(step, self.tau_init, self.tau_end, length)

    def generation_length(self, ctx) -> int:
        """Steps of the temperature schedule: the field, else the running ``generate()``'s ``max_new_tokens``."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        state = getattr(ctx, "state", None)
        length = getattr(state, "max_new_tokens", None)
        if isinstance(length, int) and length >= 1:
            return length
        if state is not None:
            state.notes.add(
                f"keyformer: generation length unknown (no generate() max_new_tokens): temperature rises over "
                f"{DEFAULT_LENGTH} steps; set keyformer(max_new_tokens=...)"
            )
        return DEFAULT_LENGTH

    def wants_decode_probs(self) -> bool:
        return False  # Keyformer accumulates noisy probabilities of its own (Gumbel logits), not the attention's

    def accumulate(self, ctx) -> None:
        """Add this step's Gumbel-softmax scores (window at the prompt, the new query at decode)."""
        layer = ctx.layer
        step = layer.decode_steps if ctx.phase == "decode" else 0
        q = ctx.query
        if ctx.phase != "decode" and self.window:
            q = q[:, :, -min(self.window, q.shape[2]) :]
        gen = torch.Generator(device=q.device).manual_seed(step_seed(self.seed, ctx.layer_idx, step))
        keys, valid = layer.dense_keys()
        tau = self.tau(step, self.generation_length(ctx) if step else None)  # tau_0 = tau_init whatever the length
        small = ctx.phase == "decode" and q.device.type == "cpu" and q.shape[0] * q.shape[1] * keys.shape[2] <= (
            _SERIAL_MAX
        )
        with one_thread(small):  # a few thousand logits: parallel regions would cost more than the work
            add = noisy_scores(q, keys, scale=ctx.scaling, tau=tau, generator=gen, valid=valid)
        self.add_scores(layer, add)
