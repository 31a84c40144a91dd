"""Attention-Gate: a small trained gate before each attention layer decides which tokens each KV head keeps.

Zeng et al. 2024, "In-context KV-Cache Eviction for LLMs via Attention-Gate", https://arxiv.org/abs/2410.12876

``keep[l, h, t] = 1[σ(AG_l(X_l)[t, h] + a_lh · g_l[t, h] + c_lh) > τ]  ∨  (t among the last `window` tokens)  ∨
(t < sink)``

where ``X_l`` is the input of layer ``l``'s attention (after its input norm) and ``g`` the global-context feature
below (prompt tokens only; a token fed while decoding has none and gets ``c_lh`` alone).

Inference: a prompt is attended densely (each of its queries sees every earlier token of the prompt and all the
cache holds); after the prefill, each layer drops the prompt tokens whose flag says *evict*, the last ``window``
tokens and the sinks excepted. Decode tokens are flagged too and dropped once they leave the recent window. So a
token flagged *evict* is invisible to every decode query more than ``window`` tokens after it, give or take the
batching of decode drops: a layer evicts once one of its heads has ``max(1, held / 32)`` tokens to drop, so such a
token stays visible for at most that many more steps (the slack is counted in ``report()`` bytes). Decode tokens are
flagged in groups once ``window`` of them are pending (until then they all sit in the recent window, where no flag
is read): the same flags as token by token, with ~1/``window`` of the gate calls. The paper has no public code; the
choices below are ours.

Gate (per layer, ``AttentionGateLayer``): a reduced multi-head attention over the layer input with one gate head per
KV head, ``d_g`` (default 8) dims per head and a *sliding* causal context of ``gate_window`` (default 64) tokens;
``logit[t, h] = w_h · MHA'(X)[t, h] + u_h · X_t + b_h``, ``s = σ(logit)``. The paper's gate sees the global context;
we bound it to a window so that decoding keeps only ``gate_window - 1`` projected gate keys/values per layer
(constant memory, ``(gate_window - 1)·2·H_kv·d_g`` values; not counted in ``report()`` bytes) instead of a second,
growing cache. SmolLM2-135M: 30 layers x ~42k parameters.

Global context (``observation_window`` W, 32 in the shipped gates; 0 in gate files written before it): the paper's
gate "accepts the global context as input". Ours gets it at prefill from the attention each prompt token receives
from the prompt's last W queries, computed with the layer's own q/k (the score SnapKV ranks by, ~W·L·d per head, no
new projections): ``g[t, h] = log(n · maxpool_7(s)[t, h] + 1e-3)``, ``s`` that attention averaged over the W queries
and the kv head's query heads, ``n`` the number of keys (uniform attention gives ``g ≈ 0``); ``a_lh``, ``c_lh``
learned per layer and KV head (init 0.1 and 0, :func:`observation_feature`). A token's own 64-token context cannot
tell what the end of the prompt will look up; the term gives the gate that signal.

Training (``kvaccel train-gate attention_gate``): :mod:`kvaccel.attention_gate_training` replays this inference
rule on a frozen model.

Files: ``gate.safetensors`` + ``gate.json`` (model name and fingerprint, shapes, window/sink/observation_window,
training recipe). The shipped gates' training command and measured fidelity against SnapKV: README (Attention-Gate).

Parameters
----------
weights : str | None
    Gate directory (or its ``gate.safetensors``); default: the gate shipped in the package for the model.
threshold : float
    Keep a token iff its gate probability is above this (``0.5`` as trained; ``0`` keeps everything).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kvaccel.cache import compact_slots
from kvaccel.checks import check_int, check_number
from kvaccel.config import register
from kvaccel.gate_files import GateFile, text_config

from .base import EvictionMethod
from .snapkv import group_window_scores, pool_scores

FORMAT = "kvaccel-attention-gate-1"
DATA_DIR = Path(__file__).parent / "data"
STATE_KEY = "attention_gate"
OBS_EPS = 1e-3  # floor of n · s inside the observation feature's log
OBS_KERNEL = 7  # max-pooling of the observation scores along tokens (SnapKV's default)


# ------------------------------------------------------------------------------------------ gate modules


def local_attention(q: Tensor, k: Tensor, v: Tensor, window: int, key_valid: Tensor | None = None,
                    chunk: int = 256) -> Tensor:
    """Causal sliding-window attention: the last ``L`` of ``T`` keys are the queries' own; query ``i`` sees keys
    ``(P+i-window, P+i]`` (``P = T - L``). ``q`` ``(B, H, L, d)``, ``k``/``v`` ``(B, H, T, d)``, ``key_valid``
    ``(B, T)`` bool. Chunked over queries: memory ``O(chunk · (chunk + window))``, never ``(L, T)``."""
    B, H, L, d = q.shape
    T = k.shape[2]
    P = T - L
    outs = []
    for s in range(0, L, chunk):
        e = min(L, s + chunk)
        k0, k1 = max(0, P + s - window + 1), P + e
        logits = torch.matmul(q[:, :, s:e].float(), k[:, :, k0:k1].float().transpose(-1, -2)) / math.sqrt(d)
        qi = P + torch.arange(s, e, device=q.device)[:, None]
        kj = torch.arange(k0, k1, device=q.device)[None, :]
        mask = ((kj <= qi) & (kj > qi - window))[None, None]
        if key_valid is not None:
            mask = mask & key_valid[:, None, None, k0:k1]
        probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
        outs.append(torch.matmul(probs, v[:, :, k0:k1].float()))
    return torch.cat(outs, dim=2)


def observation_feature(query: Tensor, keys: Tensor, scaling: float, valid: Tensor | None = None) -> Tensor:
    """The gate's global-context input ``g[b, h, t] = log(n · maxpool_7(s)[b, h, t] + 1e-3)`` ``(B, H_kv, T)``.

    ``s[t]`` is the attention key ``t`` receives from ``query`` ``(B, H_q, W, D)`` (the sequence's last ``W``
    queries, post-RoPE, causal), averaged over those queries and the kv head's ``G`` query heads, with the layer's
    own q/k (SnapKV's score); ``n`` counts the valid keys, so uniform attention gives ``g ≈ 0``. ``keys`` ``(B, H_kv,
    T, D)``, ``valid`` ``(B, 1|H_kv, T)`` bool or ``None``."""
    W = query.shape[2]
    s = group_window_scores(query, keys, scaling, valid).float() / W
    n = keys.shape[2] if valid is None else valid.sum(-1, keepdim=True).clamp_min(1).float()
    return torch.log(n * pool_scores(s, OBS_KERNEL, "max") + OBS_EPS)


class AttentionGateLayer(nn.Module):
    """One layer's gate: ``σ(w_h · MHA'(X)[t, h] + u_h · X_t + b_h)`` per token ``t`` and KV head ``h``."""

    def __init__(self, hidden_size: int, num_kv_heads: int, gate_dim: int = 8, gate_window: int = 64,
                 init_bias: float = 0.5, observe: bool = False):
        super().__init__()
        self.heads, self.dim, self.window = num_kv_heads, gate_dim, gate_window
        self.qkv = nn.Linear(hidden_size, 3 * num_kv_heads * gate_dim, bias=False)
        self.out = nn.Parameter(torch.zeros(num_kv_heads, gate_dim))
        self.direct = nn.Linear(hidden_size, num_kv_heads)
        nn.init.zeros_(self.direct.weight)
        nn.init.constant_(self.direct.bias, init_bias)
        self.observe = observe
        if observe:  # global-context term a_h · g + c_h (see observation_feature)
            self.obs_scale = nn.Parameter(torch.full((num_kv_heads,), 0.1))
            self.obs_bias = nn.Parameter(torch.zeros(num_kv_heads))

    def observation_logits(self, g: Tensor | None) -> Tensor | float:
        """``a_h · g + c_h`` ``(B, H_kv, T)`` for a feature ``g`` of :func:`observation_feature`; ``c_h`` alone for
        tokens without one (``g = None``: decode tokens, scored as if uniformly attended); 0 without the term."""
        if not self.observe:
            return 0.0
        bias = self.obs_bias.float()[None, :, None]
        return bias if g is None else g * self.obs_scale.float()[None, :, None] + bias

    def forward(self, x: Tensor, past: tuple[Tensor, Tensor] | None = None,
                key_valid: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Gate logits ``(B, H_kv, L)`` of the ``L`` tokens of ``x`` ``(B, L, hidden)`` and the gate keys/values of
        the last ``gate_window - 1`` tokens (to pass as ``past`` with the next tokens). ``key_valid`` ``(B, P + L)``
        marks real tokens of ``[past, x]``."""
        B, L, _ = x.shape
        q, k, v = self.qkv(x.to(self.qkv.weight.dtype)).view(B, L, 3, self.heads, self.dim).permute(2, 0, 3, 1, 4)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        o = local_attention(q, k, v, self.window, key_valid)  # (B, H, L, d) fp32
        logits = (o * self.out.float()[None, :, None, :]).sum(-1)
        logits = logits + self.direct(x.to(self.direct.weight.dtype)).float().transpose(1, 2)
        keep = max(self.window - 1, 0)
        return logits, (k[:, :, -keep:].detach(), v[:, :, -keep:].detach()) if keep else (k[:, :, :0], v[:, :, :0])


class AttentionGates(GateFile, nn.Module):
    """The gates of every layer of one model, with the metadata saved beside the weights (``meta``: model name and
    fingerprint, shapes, ``window``, ``sink``, ``threshold``, training ``recipe``)."""

    LABEL = "Attention-Gate file"
    FORMAT = FORMAT
    REQUIRED = ("model_name", "model_fingerprint", "num_layers", "hidden_size", "num_kv_heads", "gate_dim",
                "gate_window", "window", "sink")
    TRAIN_KIND = "attention_gate"
    DATA_DIR = DATA_DIR
    SHIPPED_PREFIX = "attention_gate"

    def __init__(self, meta: dict[str, Any]):
        super().__init__()
        self.meta = dict(meta)
        self.layers = nn.ModuleList(
            AttentionGateLayer(meta["hidden_size"], meta["num_kv_heads"], meta["gate_dim"], meta["gate_window"],
                               observe=self.observation_window > 0)
            for _ in range(meta["num_layers"])
        )

    @classmethod
    def for_model(cls, model, gate_dim: int = 8, gate_window: int = 64, window: int = 32, sink: int = 4,
                  recipe: dict | None = None, observation_window: int = 0) -> AttentionGates:
        """Freshly initialised gates shaped for ``model`` (everything kept at the start); ``observation_window > 0``
        adds the global-context term over the prompt's last ``observation_window`` queries."""
        from kvaccel.models import model_fingerprint, model_name

        for name, val, lo in (("gate_dim", gate_dim, 1), ("gate_window", gate_window, 1), ("window", window, 1),
                              ("sink", sink, 0), ("observation_window", observation_window, 0)):
            check_int(name, val, lo)
        cfg = text_config(model)
        meta = dict(
            format=FORMAT, model_name=model_name(model), model_fingerprint=model_fingerprint(model),
            num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            gate_dim=gate_dim, gate_window=gate_window, window=window, sink=sink,
            observation_window=observation_window, recipe=recipe or {},
        )
        return cls(meta)

    @property
    def window(self) -> int:
        return self.meta["window"]

    @property
    def sink(self) -> int:
        return self.meta["sink"]

    @property
    def observation_window(self) -> int:
        """Prompt queries of the global-context term (0: none; files written before it have none)."""
        return int(self.meta.get("observation_window", 0))


# ------------------------------------------------------------------------------------------ the method


@register
@dataclass
class AttentionGate(EvictionMethod):
    """Attention-Gate: trained per-layer gates flag, per token and KV head, what the cache keeps.

    https://arxiv.org/abs/2410.12876 — see the module docstring for the gate and the inference rule.
    """

    name = "attention_gate"

    weights: str | None = None
    threshold: float = 0.5

    def __post_init__(self):
        check_number("threshold", self.threshold, 0, 1, high_open=True, why="0.5 as trained")
        if self.weights is not None and not isinstance(self.weights, (str, Path)):
            raise ValueError(f"weights ({self.weights!r}) must be a gate directory path or None")

    def bind(self, model) -> None:
        gates = AttentionGates.trained_for(model, self.weights, "attention_gate")
        p = next(model.parameters())
        self._gates = gates.to(device=p.device, dtype=p.dtype).eval().requires_grad_(False)
        self._hidden: dict[int, weakref.ref] = {}
        self._past: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._scored_upto: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> tokens seen when scored
        self._check_at: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> when to count drops again
        self._pending: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> decode inputs not scored
        self._defer = True  # False: score every decode token at once (tests compare both)

    def install_hooks(self, model, modules: list[nn.Module]) -> list:
        """Forward pre-hooks on every ``self_attn`` capturing (weakly) the layer input; removed by ``unpatch``."""

        def capture(module, args, kwargs):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            self._hidden[module.layer_idx] = weakref.ref(x)

        return [mod.register_forward_pre_hook(capture, with_kwargs=True) for mod in modules]

    def gates(self) -> AttentionGates:
        g = getattr(self, "_gates", None)
        if g is None:
            raise RuntimeError("attention_gate is not bound to a model; use kvaccel.patch(model, 'attention_gate')")
        return g

    def after_prefill(self, ctx) -> None:
        self._score_and_evict(ctx)

    def after_decode(self, ctx) -> None:
        self._score_and_evict(ctx)

    def _score_and_evict(self, ctx) -> None:
        layer = ctx.layer
        if layer.narrow is not None:
            raise NotImplementedError("attention_gate cannot evict after channel pruning (ThinK); use it alone")
        ref = self._hidden.get(ctx.layer_idx)
        x = ref() if ref is not None else None
        if x is None:
            raise RuntimeError(f"attention_gate: the layer input of layer {ctx.layer_idx} was not captured")
        gates = self.gates()
        q = x.shape[1]
        B, H, T = *layer.keys.shape[:2], layer.length  # every slot held (a quantized layer's codes included)
        st = layer.token_state.get(STATE_KEY)
        if st is None:
            st = torch.zeros(B, H, T, dtype=torch.bool, device=layer.keys.device)
        layer.token_state[STATE_KEY] = st
        pending = self._pending.setdefault(layer, [])
        unscored = layer.seen - q - self._scored_upto.get(layer, layer.seen - q)
        if unscored > 0:  # tokens fed inside kvaccel.paused(model) are kept whole
            self._score(ctx, st, after=q + unscored, prompt=False)  # the decode tokens before them
            st[..., -(q + unscored) : -q] = True
        self._scored_upto[layer] = layer.seen
        decode = ctx.phase == "decode"
        if not decode:
            self._score(ctx, st, after=q, prompt=False)  # decode tokens before this prompt (a later turn)
            pending.append(x)
            self._score(ctx, st, after=0, prompt=True)
        else:
            # decode tokens are scored in groups, once `window` are pending: until then they are all inside the
            # recent window, where no flag is read (it says keep); the flags are those of scoring token by token
            pending.append(x)
            st[..., -q:] = True
            if not self._defer or sum(p.shape[1] for p in pending) >= gates.window:
                self._score(ctx, st, after=0, prompt=False)
            if layer.seen < self._check_at.get(layer, 0):
                return  # too few tokens fed since the last count for a head to reach the batch size (see below)
        valid = layer.full_valid().expand(B, H, T)
        from_end = valid.flip(-1).cumsum(-1).flip(-1)  # real tokens at or after each slot
        keep = valid & (st | (from_end <= gates.window))
        dropped = int((valid & ~keep).sum(-1).max())
        # decode: evict in batches, once a head has max(1, held / 32) tokens to drop (the slack report() counts).
        # Each token fed moves at most one token per head out of the recent window, so a head's count of tokens to
        # drop grows by at most 1 per token: the next count is due after `batch - dropped` more tokens.
        batch = max(1, T // 32)
        if dropped == 0 or (decode and dropped < batch):
            self._check_at[layer] = layer.seen + (batch - dropped if decode else 1)
            return
        pos, slot_valid = compact_slots(keep)  # pending tokens are in the recent window: kept, flags written later
        layer.keep(pos, slot_valid)
        self._check_at[layer] = layer.seen + max(1, layer.length // 32)  # nothing left to drop

    def _score(self, ctx, st: Tensor, after: int, prompt: bool) -> None:
        """Flag the layer's pending tokens (``self._pending``, the ``n`` slots before the last ``after``) into ``st``:
        one gate call over all of them, with the gate keys/values carried from the previous call; ``prompt``: they
        are this prefill call's tokens (the global-context term applies)."""
        layer = ctx.layer
        pending = self._pending.get(layer)
        if not pending:
            return
        x = pending[0] if len(pending) == 1 else torch.cat(pending, dim=1)
        pending.clear()
        gates = self.gates()
        gate = gates.layers[ctx.layer_idx]
        n = x.shape[1]
        past = self._past.get(layer)
        P = 0 if past is None else past[0].shape[2]
        pad = None if ctx.pad is None else ctx.pad[:, : ctx.pad.shape[1] - after]
        logits, self._past[layer] = gate(x, past, None if pad is None else pad[:, -(P + n) :])
        obs = None
        if prompt and gate.observe:  # global context: the prompt's last queries (decode tokens: c_h alone)
            keys, valid = layer.dense_keys()
            w = min(gates.observation_window, n)
            obs = observation_feature(ctx.query[:, :, -w:], keys, ctx.scaling, valid)[..., -n:]
        flags = torch.sigmoid(logits + gate.observation_logits(obs)) > self.threshold  # (B, H_kv, n)
        # sinks: the first `sink` real tokens of each sequence
        if pad is not None:
            real_idx = pad.long().cumsum(-1)[:, -n:] - 1  # (B, n)
        else:
            real_idx = (layer.seen - after - n + torch.arange(n, device=flags.device))[None]
        flags = flags | (real_idx < gates.sink)[:, None, :]
        T = st.shape[-1]
        if prompt:  # this prefill call's tokens, padding included: its last slots
            st[..., T - after - n : T - after] = flags
            return
        # decode tokens (all real): the n held tokens of each head before the last `after` slots' real tokens; an
        # eviction since they were fed moved them (front-packed rows padded to the fullest head)
        valid = layer.full_valid().expand_as(st)
        tail = valid[..., T - after :].sum(-1, keepdim=True)
        from_end = valid.flip(-1).cumsum(-1).flip(-1)
        where = valid & (from_end > tail) & (from_end <= tail + n)
        st.masked_scatter_(where, flags.expand(st.shape[0], st.shape[1], n).contiguous())


__all__ = ["AttentionGate", "AttentionGateLayer", "AttentionGates", "observation_feature"]
