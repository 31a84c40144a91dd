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

Training (``kvaccel train-gate attention_gate``, see :func:`gate_loss`) replays the inference rule: base model
frozen; a training sequence is cut at a random ``P`` (``L/2 <= P <= L − continuation``); the prompt ``[0, P)`` is
prefilled densely (its per-layer k/v and gate inputs come from one recorded frozen forward per sequence), the gates
flag it, and the next ``continuation`` (32) tokens run through the frozen model attending only the kept prompt keys
(+ sinks + the recent window) and themselves, with a training-only attention function (an eager fp32 attention,
:func:`masked_attention`, registered as ``"attention_gate_train"`` while the loss runs). The flags use a
straight-through estimator: forward the hard ``1[s > τ]``, backward ``∂/∂s`` (:func:`straight_through`). Loss =
distortion + ``rate_weight · (keep_rate − (1 − target_evict))²`` + ``balance_weight ·`` (variance of the keep rates
across a layer's KV heads), ``keep_rate`` the straight-through fraction of prompt tokens from ``sink`` on kept.
Distortion = mean over the continuation tokens of ``KL(p_full ‖ p_gated)`` of the next-token distributions (what the
harness's fidelity task measures), plus ``local_weight`` (0.5) x the per-layer attention-output distortion of the
same continuation queries (``‖o_gated − o_full‖² / ‖o_full‖²`` on recorded q/k/v, averaged over layers), which gives
every layer a direct signal. Prompt queries are never masked, as at inference. Initial bias ``+0.5`` (``s ≈ 0.62``):
the start keeps everything but, with the global term, the keys that receive under ~0.6% of a uniform share
(``g < −5``). The head-balance term matters for bytes: the ragged storage is padded to a layer's fullest head. The
default training data holds generated tasks on both the noise and the prose haystack: the keep rate is
content-driven.

Files: ``gate.safetensors`` + ``gate.json`` (model name and fingerprint, shapes, window/sink/observation_window,
training recipe). The shipped gates' training command and measured fidelity against SnapKV: README (Attention-Gate).
They were trained before the per-layer term took the continuation queries: theirs took the last 128 queries of the
whole sequence as a prompt, masked (recipe ``rows``).

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
from kvaccel.config import register
from kvaccel.gate_files import WEIGHTS_FILE, GateFile

from .base import EvictionMethod
from .snapkv import group_window_scores, pool_scores

FORMAT = "kvaccel-attention-gate-1"
DATA_DIR = Path(__file__).parent / "data"
STATE_KEY = "attention_gate"
TRAIN_ATTENTION = "attention_gate_train"
OBS_EPS = 1e-3  # floor of n · s inside the observation feature's log
OBS_KERNEL = 7  # max-pooling of the observation scores along tokens (SnapKV's default)


def shipped_gate_dir(model_name: str) -> Path:
    """Where the package keeps the trained Attention-Gate for a model (it may not exist)."""
    return DATA_DIR / f"attention_gate_{model_name}"


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


def straight_through(prob: Tensor, threshold: float = 0.5) -> Tensor:
    """Hard flags ``1[prob > threshold]`` in the forward pass, the gradient of ``prob`` in the backward pass."""
    hard = (prob > threshold).to(prob.dtype)
    return hard + prob - prob.detach()


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


class AttentionGates(GateFile, nn.Module):
    """The gates of every layer of one model, with the metadata saved beside the weights (``meta``: model name and
    fingerprint, shapes, ``window``, ``sink``, ``threshold``, training ``recipe``)."""

    LABEL = "Attention-Gate file"
    FORMAT = FORMAT
    REQUIRED = ("model_name", "model_fingerprint", "num_layers", "hidden_size", "num_kv_heads", "gate_dim",
                "gate_window", "window", "sink")
    TRAIN_KIND = "attention_gate"

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
            if isinstance(val, bool) or not isinstance(val, int) or val < lo:
                raise ValueError(f"{name} ({val!r}) must be an int >= {lo}")
        cfg = _text_config(model)
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

    https://arxiv.org/abs/2410.12876 — see the module docstring for the gate, training and inference rules.
    """

    name = "attention_gate"

    weights: str | None = None
    threshold: float = 0.5

    def __post_init__(self):
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not (
            0.0 <= self.threshold < 1.0
        ):
            raise ValueError(f"threshold ({self.threshold!r}) must be a float in [0, 1) (0.5 as trained)")
        if self.weights is not None and not isinstance(self.weights, (str, Path)):
            raise ValueError(f"weights ({self.weights!r}) must be a gate directory path or None")

    def bind(self, model) -> None:
        from kvaccel.models import model_name

        if self.weights is not None:
            where = Path(self.weights)
        else:
            where = shipped_gate_dir(model_name(model))
            if not (where / WEIGHTS_FILE).is_file():
                raise ValueError(
                    f"attention_gate has no shipped gates for model '{model_name(model)}' (looked in {where}); train "
                    "them with `kvaccel train-gate attention_gate --model ... --out DIR` and pass weights=DIR"
                )
        gates = AttentionGates.load(where)
        gates.check_model(model, where)
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
        B, H, T = layer.keys.shape[:3]
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
        self._check_at[layer] = layer.seen + max(1, layer.keys.shape[2] // 32)  # nothing left to drop

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


# ------------------------------------------------------------------------------------------ training


def masked_attention(query: Tensor, key: Tensor, value: Tensor, keep: Tensor, window: int, sink: int,
                     scaling: float, rows: int | None = None) -> Tensor:
    """Causal attention over the kept keys (fp32 eager, for training): query ``i`` sees key ``j`` iff ``j <= i`` and
    (``i - j < window`` or ``j < sink`` or ``keep[j]``); ``keep`` ``(B, H_kv, L)`` multiplies the softmax, which is
    then renormalised (forward = masked softmax; gradients reach ``keep``). Only the last ``rows`` queries when given.
    ``query`` ``(B, H_q, L_q, D)`` are the last ``L_q <= L`` positions, ``key``/``value`` ``(B, H_kv, L, D)`` (GQA not
    repeated); returns ``(B, H_q, rows | L_q, Dv)``."""
    B, Hq, Lq, D = query.shape
    Hkv, L = key.shape[1], key.shape[2]
    G = Hq // Hkv
    R = Lq if rows is None else min(rows, Lq)
    r0 = L - R
    q = query[:, :, Lq - R :].float().reshape(B, Hkv, G * R, D)  # GQA: the G query heads of a kv head stacked on rows
    logits = torch.matmul(q, key.float().transpose(-1, -2)) * scaling  # (B, H_kv, G*R, L)
    i = torch.arange(r0, L, device=query.device).repeat(G)[:, None]
    j = torch.arange(L, device=query.device)[None, :]
    logits = logits.masked_fill(~(j <= i), float("-inf"))
    exempt = ((i - j) < window) | (j < sink)
    mult = torch.where(exempt, 1.0, keep.float()[:, :, None, :])
    probs = torch.softmax(logits, dim=-1) * mult
    probs = probs / probs.sum(-1, keepdim=True)  # = softmax over the kept keys (the diagonal is always kept)
    return torch.matmul(probs, value.float()).reshape(B, Hq, R, -1)


def gated_train_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask,
                          scaling: float | None = None, dropout: float = 0.0, **kwargs) -> tuple[Tensor, None]:
    """Training-only attention: with ``module._ag_record`` set it records ``(q, k, v)`` and runs plain causal
    attention; otherwise the queries continue a densely prefilled prompt (``module._ag_prefix = (k, v)``, recorded)
    and attend ``[prompt, themselves]`` through :func:`masked_attention` with the prompt flags ``module._ag_keep``
    (the continuation's own keys all kept: it is the recent window). Registered as ``"attention_gate_train"``."""
    scaling = module.scaling if scaling is None else scaling
    record = getattr(module, "_ag_record", None)
    if record is not None:
        record[module.layer_idx] = (query.detach(), key.detach(), value.detach())
        keep = torch.ones(key.shape[0], key.shape[1], key.shape[2], device=key.device)
        out = masked_attention(query, key, value, keep, 1, 0, scaling)
        return out.to(value.dtype).transpose(1, 2).contiguous(), None
    window, sink = module._ag_rule
    k_pre, v_pre = module._ag_prefix
    key, value = torch.cat([k_pre.to(key.dtype), key], dim=2), torch.cat([v_pre.to(value.dtype), value], dim=2)
    keep = _with_continuation(module._ag_keep, query.shape[2])
    out = masked_attention(query, key, value, keep, window, sink, scaling).to(value.dtype)
    return out.transpose(1, 2).contiguous(), None


def _with_continuation(prompt_flags: Tensor, n: int) -> Tensor:
    """Flags of ``[prompt, n continuation tokens]``: the continuation is kept (it is the recent window)."""
    return torch.cat([prompt_flags, prompt_flags.new_ones(*prompt_flags.shape[:2], n)], dim=-1)


#: objectives of earlier versions, refused: they masked the keys of prompt queries, which inference attends densely
REMOVED_OBJECTIVES = ("local", "lm")


def build_gates(model, recipe: dict) -> AttentionGates:
    """``GateKind.build``: fresh gates. Recipe keys (defaults): ``objective`` (``"distill"``, the only one: see
    :func:`gate_loss`), ``gate_dim`` (8), ``gate_window`` (64), ``window`` (32), ``sink`` (4), ``target_evict`` (0.7),
    ``rate_weight`` (10), ``balance_weight`` (10: spread of keep rates across a layer's heads, which the padded
    per-head storage pays for), ``continuation`` (32: tokens after the prompt), ``local_weight`` (0.5: weight of the
    per-layer attention-output loss of the continuation queries), ``observation_window`` (32: prompt queries of the
    global-context term; 0 leaves the term out)."""
    for k, v in dict(objective="distill", gate_dim=8, gate_window=64, window=32, sink=4, target_evict=0.7,
                     rate_weight=10.0, balance_weight=10.0, threshold=0.5, continuation=32, local_weight=0.5,
                     observation_window=32).items():
        recipe.setdefault(k, v)
    if recipe["objective"] in REMOVED_OBJECTIVES:
        raise ValueError(f"objective ({recipe['objective']!r}) was removed: it masked the keys prompt queries see, "
                         "which inference attends densely; use objective 'distill' (the default)")
    if recipe["objective"] != "distill":
        raise ValueError(f"objective ({recipe['objective']!r}) must be 'distill'")
    if "rows" in recipe:
        raise ValueError(f"rows ({recipe['rows']!r}) is no longer a recipe key: the per-layer loss is taken on the "
                         "continuation queries (set continuation)")
    te = recipe["target_evict"]
    if not (isinstance(te, (int, float)) and 0.0 <= te < 1.0):
        raise ValueError(f"target_evict ({te!r}) must be a float in [0, 1)")
    k = "continuation"
    if isinstance(recipe[k], bool) or not isinstance(recipe[k], int) or recipe[k] < 1:
        raise ValueError(f"{k} ({recipe[k]!r}) must be an int >= 1")
    return AttentionGates.for_model(model, recipe["gate_dim"], recipe["gate_window"], recipe["window"],
                                    recipe["sink"], recipe=recipe, observation_window=recipe["observation_window"])


class TrainTarget:
    """One training sequence: the frozen model (weakly), its token ids ``(1, L)`` and the recorded per-layer
    ``(x, q, k, v)`` and final normed hidden states (filled on first use, then cached by the trainer with this
    object)."""

    def __init__(self, model, input_ids: Tensor):
        self.model = weakref.ref(model)
        self.input_ids = input_ids
        self.layers: list[tuple] | None = None
        self.final: Tensor | None = None

    def get_model(self):
        model = self.model()
        if model is None:
            raise RuntimeError("the model of this training target was freed")
        return model


def train_target(model, input_ids: Tensor) -> TrainTarget:
    """``GateKind.target``: the sequence; its frozen forward is recorded on first use by :func:`gate_loss`."""
    return TrainTarget(model, input_ids)


def _run_with(model, hook, **attrs):
    """Run ``model(**attrs["call"])`` with the training attention and ``hook`` on every ``self_attn``; restore."""
    from transformers import AttentionInterface

    from kvaccel.api import _attention_modules

    AttentionInterface.register(TRAIN_ATTENTION, gated_train_attention)
    previous = model.config._attn_implementation
    modules = _attention_modules(model)
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]
    try:
        model.set_attn_implementation(TRAIN_ATTENTION)
        return model(**attrs)
    finally:
        for h in handles:
            h.remove()
        for m in modules:
            for a in ("_ag_keep", "_ag_rule", "_ag_record", "_ag_prefix"):
                m.__dict__.pop(a, None)
        model.set_attn_implementation(previous)


def record_layers(model, input_ids: Tensor, final: bool = False):
    """Per layer ``(x, q, k, v)`` of one frozen forward: the attention input and post-RoPE q/k/v (fp32). With
    ``final``, also the decoder's final (normed) hidden states ``(1, L, hidden)``: ``(layers, final)``."""
    qkv: dict[int, tuple] = {}
    xs: dict[int, Tensor] = {}
    finals: list[Tensor] = []

    def hook(module, args, kwargs):
        xs[module.layer_idx] = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach()
        module._ag_record = qkv

    handle = None
    if final:
        norm = getattr(model.get_decoder(), "norm", None)
        if norm is None:
            raise ValueError(f"{type(model).__name__}: the decoder has no final `norm` to distill from")
        handle = norm.register_forward_hook(lambda m, a, out: finals.append(out.detach()))
    try:
        with torch.no_grad():
            _run_with(model, hook, input_ids=input_ids, use_cache=False, logits_to_keep=1)
    finally:
        if handle is not None:
            handle.remove()
    layers = [(xs[i].float(), *(t.float() for t in qkv[i])) for i in range(len(xs))]
    return (layers, finals[-1]) if final else layers


def local_distortion(layers: list[tuple], flags: list[Tensor], window: int, sink: int, n: int) -> Tensor:
    """Mean over layers of ``‖o_gated − o_full‖² / ‖o_full‖²`` of the attention outputs of the ``n`` queries after
    a prompt of ``P`` tokens, on recorded ``(x, q, k, v)`` (each ``(1, H, ≥ P + n, D)``) with the prompt ``flags``
    ``(1, H_kv, P)``: the continuation's attention, one layer at a time (the prompt's own queries are never
    masked)."""
    errs = []
    for f, (_, q, k, v) in zip(flags, layers, strict=True):
        end = f.shape[-1] + n
        q, k, v = q[:, :, :end], k[:, :, :end], v[:, :, :end]
        keep = _with_continuation(f, n)
        scaling = q.shape[-1] ** -0.5
        out = masked_attention(q, k, v, keep, window, sink, scaling, n)
        with torch.no_grad():
            full = masked_attention(q, k, v, torch.ones_like(keep), 1, 0, scaling, n)
        errs.append(((out - full) ** 2).sum(-1).mean() / (full**2).sum(-1).mean())
    return torch.stack(errs).mean()


def _replay(gates, target: TrainTarget, rec: dict, threshold: float, window: int, sink: int):
    """The inference rule replayed on a cut of the sequence. Prompt = the first ``P`` tokens (``P`` drawn per step
    from the global torch RNG, which accelerate checkpoints), prefilled densely (its per-layer k/v and the gate inputs
    come from one recorded frozen forward); the next ``continuation`` tokens attend the prompt keys the gates keep
    (+ sinks, + the recent window) and themselves. Distortion = mean over those positions of ``KL(p_full ‖
    p_gated)`` of the next-token distributions, plus ``local_weight ·`` :func:`local_distortion` of the same
    queries. Returns ``(distortion, evictable prompt flags per layer)``."""
    model = target.get_model()
    ids = target.input_ids
    L = ids.shape[1]
    R = min(int(rec.get("continuation", 32)), L - 1)
    local_weight = float(rec.get("local_weight", 0.0))
    obs_w = gates.observation_window
    if target.layers is None:
        target.layers, target.final = record_layers(model, ids, final=True)
    lo = min(max(sink + 1, L // 2), L - R)
    P = int(torch.randint(lo, L - R + 1, (1,)))
    flags = []  # prompt [0, P), the global-context term from its last queries
    for gate, (x, q, k, _) in zip(gates.layers, target.layers, strict=True):
        logit = gate(x[:, :P])[0]
        g = None
        if gate.observe:
            with torch.no_grad():
                g = observation_feature(q[:, :, max(0, P - obs_w) : P], k[:, :, :P], q.shape[-1] ** -0.5)
        flags.append(straight_through(torch.sigmoid(logit + gate.observation_logits(g)), threshold))

    def hook(module, args, kwargs):
        i = module.layer_idx
        _, _, k, v = target.layers[i]
        module._ag_keep, module._ag_rule, module._ag_prefix = flags[i], (window, sink), (k[:, :, :P], v[:, :, :P])

    pos = torch.arange(P, P + R, device=ids.device)[None]
    logits = _run_with(model, hook, input_ids=ids[:, P : P + R], position_ids=pos, use_cache=False).logits
    with torch.no_grad():
        ref = torch.log_softmax(model.get_output_embeddings()(target.final[:, P : P + R]).float(), dim=-1)
    logp = torch.log_softmax(logits.float(), dim=-1)
    distortion = (ref.exp() * (ref - logp)).sum(-1).mean()
    if local_weight:
        distortion = distortion + local_weight * local_distortion(target.layers, flags, window, sink, R)
    return distortion, [f[..., sink:P] for f in flags]


def gate_loss(gates: AttentionGates, target: TrainTarget, return_parts: bool = False):
    """``GateKind.loss``: distortion + ``rate_weight · (keep_rate − (1 − target_evict))²`` + ``balance_weight ·``
    the variance of the keep rates across each layer's KV heads.

    The distortion is that of tokens continuing a densely prefilled prompt whose cache the gates pruned, the
    inference rule (see :func:`_replay`); ``keep_rate`` is the straight-through fraction of the prompt tokens from
    ``sink`` on that the gates keep.
    """
    inner = getattr(gates, "module", gates)  # accelerate may wrap it
    rec = inner.meta.get("recipe", {})
    distortion, kept = _replay(inner, target, rec, rec.get("threshold", 0.5), inner.window, inner.sink)
    per_head = torch.stack([f.mean(dim=(0, 2)) for f in kept])  # (layers, H_kv)
    keep_rate = per_head.mean()
    reg = rec.get("rate_weight", 10.0) * (keep_rate - (1.0 - rec.get("target_evict", 0.6))) ** 2
    # storage is padded to the layer's fullest head: penalise the spread of keep rates across a layer's heads
    reg = reg + rec.get("balance_weight", 0.0) * per_head.var(dim=1, unbiased=False).mean()
    loss = distortion + reg
    if return_parts:
        return loss, dict(distortion=float(distortion.detach()), keep_rate=float(keep_rate.detach()),
                          reg=float(reg.detach()))
    return loss


def save_gates(gates: AttentionGates, out: Path, recipe: dict) -> Path:
    """``GateKind.save``: ``gate.safetensors`` + ``gate.json`` in ``out``."""
    gates.meta["recipe"] = {k: v for k, v in recipe.items() if isinstance(v, (str, int, float, bool, type(None)))}
    return gates.save(out)


__all__ = ["AttentionGate", "AttentionGateLayer", "AttentionGates", "gate_loss", "straight_through"]
