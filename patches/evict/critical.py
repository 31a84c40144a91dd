"""CriticalKV: a two-stage selection over any scorer, the second stage weighted by the value's projected norm."""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass

import torch

from kvaccel.checks import check_number, check_ratio
from kvaccel.config import Method, build_method, method_class, register, registry, split_spec, validate_budget

from .base import KEEP_SCORE, EvictionMethod, ScoredEviction, keep_top

Tensor = torch.Tensor

#: tokens per block of the projected-norm computation (bounds its ``(B, H_kv, block, hidden)`` temporary)
NORM_BLOCK = 4096


def projected_value_norms(values: Tensor, o_weight: Tensor) -> Tensor:
    """``n_j = mean_{h in group} ‖v_j W_o^{(h)}‖₁`` ``(B, H_kv, N)`` float32.

    ``values`` ``(B, H_kv, N, Dv)``; ``o_weight`` the ``o_proj`` weight ``(hidden, H_q * Dv)`` (``nn.Linear``'s
    ``(out, in)``), so query head ``h``'s slice ``W_o^{(h)}`` is columns ``h*Dv .. (h+1)*Dv`` and ``v W_o^{(h)}`` is
    ``v @ weight[:, h*Dv:(h+1)*Dv].T``; the ``G = H_q / H_kv`` query heads of kv head ``g`` are ``g*G .. g*G+G-1``.
    """
    B, Hkv, N, Dv = values.shape
    hidden, width = o_weight.shape
    if width % (Dv * Hkv):
        raise ValueError(
            f"o_proj takes {width} input features, not a multiple of {Hkv} kv heads x head size {Dv}: "
            "critical cannot split it per head"
        )
    G = width // (Dv * Hkv)
    w = o_weight.float().view(hidden, Hkv, G, Dv).permute(2, 1, 3, 0)  # (G, H_kv, Dv, hidden)
    v = values.float()
    out = v.new_zeros(B, Hkv, N)
    for s in range(0, N, NORM_BLOCK):
        vs = v[:, :, s:s + NORM_BLOCK]
        for g in range(G):
            out[:, :, s:s + NORM_BLOCK] += (vs @ w[g]).abs().sum(-1)
    return out / G


def critical_scores(scores: Tensor, norms: Tensor, valid: Tensor, capacity: int, first_stage_ratio: float,
                    epsilon: float) -> Tensor:
    """``(B, H_kv, N)`` CriticalKV selection scores: the top ``int(capacity * first_stage_ratio)`` real tokens by the
    inner ``scores`` ``(B, 1|H_kv, N)`` (and the tokens the inner scorer always keeps, ``KEEP_SCORE``) get
    ``KEEP_SCORE``; the others ``(s + epsilon) * n`` with ``norms`` ``n`` ``(B, H_kv, N)``; non-tokens (``valid``
    ``(B, 1|H_kv, N)`` False) ``-inf``. The top-``capacity`` of these is CriticalKV's kept set."""
    s = scores.float().expand_as(norms).masked_fill(~valid, float("-inf"))
    out = torch.where(s >= KEEP_SCORE, KEEP_SCORE, (s + epsilon) * norms).masked_fill(~valid, float("-inf"))
    first = min(int(capacity * first_stage_ratio), s.shape[-1])
    if first > 0:
        top = s.topk(first, dim=-1)
        out.scatter_(-1, top.indices, torch.where(top.values > float("-inf"), KEEP_SCORE, float("-inf")))
    return out


def scorer_names() -> list[str]:
    """Registered eviction methods ``critical`` can wrap (scored ones with non-negative scores)."""
    return sorted(n for n, c in registry().items()
                  if issubclass(c, ScoredEviction) and not getattr(c, "signed_scores", False))


@register
@dataclass
class Critical(EvictionMethod):
    """CriticalKV: the inner scorer's top tokens, then the rest by score x the value's norm through ``o_proj``.

    https://arxiv.org/abs/2502.03805 (kvpress' ``CriticalKVPress``) — a token's contribution to the layer output is
    its attention times ``v_j W_o``, so a score alone misjudges tokens with small or large projected values. Stage 1
    keeps the top ``int(first_stage_ratio * capacity)`` tokens per kv head by the inner score ``s``; stage 2 fills
    the rest of the capacity by ``(s_j + epsilon) n_j``, ``n_j = mean_{h in group} ‖v_j W_o^{(h)}‖₁`` (the value
    through query head ``h``'s slice of ``o_proj``, averaged over the kv head's ``G`` query heads). The inner method
    runs as it does alone (its hooks, decode budget, ``chunk`` / ``span_rule``, slack, re-rotation): only its
    selection is replaced, wherever it selects (the prompt, later chunks, decode-time evictions).

    Spec: ``critical(scorer=snapkv, budget=0.25)`` or ``critical(scorer=expected_attention(use_vnorm=False,
    decode_budget=512))``: the scorer's options go inside its own spec, the budget to ``critical``.

    Parameters
    ----------
    scorer : str | ScoredEviction
        The inner method: a registered scored eviction method's name or spec string, or its config object. Its scores
        must be attention-like (non-negative): ``knorm`` / ``keydiff`` are refused, as is ``expected_attention`` with
        ``use_vnorm=True`` (it already weights by ``‖v‖``). Default ``"expected_attention(use_vnorm=False)"``
        (kvpress' ``critical_expected_attention``).
    budget : int | float
        Tokens kept per head (int) or fraction of the prompt (float in (0, 1]); the scorer runs with it (a different
        budget given to the scorer is refused). Default 0.25.
    first_stage_ratio : float
        Fraction of the capacity chosen by the inner score alone, in [0, 1]. Default 0.5.
    epsilon : float
        Added to the inner score before the projected norm multiplies it (>= 0). Default 1e-4.
    """

    name = "critical"
    scorer: str | ScoredEviction = "expected_attention(use_vnorm=False)"
    budget: int | float = 0.25
    first_stage_ratio: float = 0.5
    epsilon: float = 1e-4

    def __post_init__(self):
        validate_budget(self.budget)
        check_ratio("first_stage_ratio", self.first_stage_ratio)
        check_number("epsilon", self.epsilon, 0)
        inner = self._build_inner()
        if not isinstance(inner, ScoredEviction):
            raise ValueError(
                f"critical wraps a scored eviction method (one that scores every token), and '{inner.name}' is not "
                f"one; pick one of {scorer_names()}"
            )
        if getattr(inner, "signed_scores", False):
            raise ValueError(
                f"critical multiplies the inner score by the projected value norm, which assumes attention-like "
                f"(non-negative) scores; '{inner.name}' scores are signed, so the tokens with the largest projected "
                f"values would go first. Use '{inner.name}' alone, or wrap one of {scorer_names()}"
            )
        if getattr(inner, "use_vnorm", False):
            raise ValueError(
                f"'{inner.name}' with use_vnorm=True already weights its score by ‖v‖ and critical weights it by the "
                f"projected value norm: wrap '{inner.name}(use_vnorm=False)' (kvpress' setting)"
            )
        # the canonical spec of the scorer, without the budget (critical's): spec() round-trips, replace() works
        name, kwargs = split_spec(inner.spec())
        kwargs.pop("budget", None)
        self.scorer = f"{name}({','.join(f'{k}={v!r}' for k, v in kwargs.items())})" if kwargs else name
        # the inner method selects through critical's two stages (an instance attribute shadows its ``keep``)
        inner.keep = self._select
        self._inner = inner
        self._modules = weakref.WeakKeyDictionary()  # cache layer -> its attention module (o_proj)

    def _build_inner(self) -> Method:
        scorer = self.scorer
        if isinstance(scorer, str):
            if "+" in scorer:
                raise ValueError(f"scorer ({scorer!r}) must be one method; compose other stages outside critical(...)")
            name, kwargs = split_spec(scorer)
            if "budget" in kwargs and kwargs["budget"] != self.budget:
                raise ValueError(
                    f"the scorer's budget ({kwargs['budget']!r}) differs from critical's ({self.budget!r}): give the "
                    f"budget to critical, e.g. critical(scorer={name}, budget={kwargs['budget']!r})"
                )
            if not issubclass(method_class(name), ScoredEviction):
                return build_method(name, kwargs)  # refused by the caller, with the list of scorers
            return build_method(name, {**kwargs, "budget": self.budget})
        if isinstance(scorer, Method):
            if not isinstance(scorer, ScoredEviction):
                return scorer  # refused by the caller, with the list of scorers
            default = {f.name: f.default for f in dataclasses.fields(scorer)}["budget"]
            if scorer.budget not in (self.budget, default):
                raise ValueError(
                    f"the scorer's budget ({scorer.budget!r}) differs from critical's ({self.budget!r}): give the "
                    f"budget to critical, e.g. Critical(scorer=..., budget={scorer.budget!r})"
                )
            return dataclasses.replace(scorer, budget=self.budget)
        raise ValueError(
            f"scorer ({scorer!r}) must be a scored eviction method's name, spec string or config; one of "
            f"{scorer_names()}"
        )

    @property
    def inner(self) -> ScoredEviction:
        """The wrapped scorer (its selection replaced by critical's)."""
        return self._inner

    # ------------------------------------------------------------------ what the framework reads from an evict method
    @property
    def rerotate(self) -> bool:
        return self._inner.rerotate

    @property
    def rope_shift(self):
        return self._inner.rope_shift

    def check_stages(self, stages: dict) -> None:
        self._inner.check_stages(stages)

    def bind(self, model) -> None:
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        for layer in decoder.layers:
            o_proj = getattr(layer.self_attn, "o_proj", None)
            weight = getattr(o_proj, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
                raise ValueError(
                    f"critical needs each attention's output projection as a plain weight matrix "
                    f"(`self_attn.o_proj.weight`), which {type(layer.self_attn).__name__} does not have; use "
                    f"'{self._inner.name}' alone"
                )
        self._inner.bind(model)

    def report_stats(self, cache, layer_stats: list[dict]) -> None:
        self._inner.report_stats(cache, layer_stats)

    def capacity(self, ctx) -> int:
        return self._inner.capacity(ctx)

    def wants_decode_probs(self) -> bool:
        return self._inner.wants_decode_probs()

    def after_prefill(self, ctx) -> None:
        self._modules[ctx.layer] = ctx.module
        self._inner.after_prefill(ctx)

    def after_decode(self, ctx) -> None:
        self._modules[ctx.layer] = ctx.module
        self._inner.after_decode(ctx)

    # ------------------------------------------------------------------ selection
    def _select(self, layer, scores: Tensor, capacity: int) -> None:
        """The inner method's ``keep``: CriticalKV's two stages, then its ``chunk`` / ``span_rule`` selection."""
        module = self._modules[layer]
        norms = projected_value_norms(layer.dense_values(), module.o_proj.weight)
        merged = critical_scores(scores, norms, layer.token_valid(), capacity, self.first_stage_ratio, self.epsilon)
        keep_top(layer, merged, capacity, self._inner.chunk, self._inner.span_rule)
