"""Attention-Gate: a small trained gate before each attention layer decides which tokens each KV head keeps.

Zeng et al. 2024, "In-context KV-Cache Eviction for LLMs via Attention-Gate", https://arxiv.org/abs/2410.12876

``keep[l, h, t] = 1[σ(AG_l(X_l)[t, h]) > τ]  ∨  (t among the last `window` tokens)  ∨  (t < sink)``

where ``X_l`` is the input of layer ``l``'s attention (after its input norm). A token whose flag says *evict* is
invisible to every query more than ``window`` tokens later, and is dropped from the cache once it leaves the recent
window. The paper has no public code; the choices below are ours.

Gate (per layer, ``AttentionGateLayer``): a reduced multi-head attention over the layer input with one gate head per
KV head, ``d_g`` (default 8) dims per head and a *sliding* causal context of ``gate_window`` (default 64) tokens;
``logit[t, h] = w_h · MHA'(X)[t, h] + u_h · X_t + b_h``, ``s = σ(logit)``. The paper's gate sees the global context;
we bound it to a window so that decoding keeps only ``gate_window - 1`` projected gate keys/values per layer
(constant memory, ``(gate_window - 1)·2·H_kv·d_g`` values; not counted in ``report()`` bytes) instead of a second,
growing cache. SmolLM2-135M: 30 layers x ~42k parameters.

Training (``kvaccel train-gate attention_gate``, see :func:`gate_loss`): base model frozen; a training-only attention
function (registered as ``"attention_gate_train"``, an eager fp32 attention) applies the flags as a multiplicative
key mask after the softmax, renormalised — i.e. exactly attention over the kept keys: query ``i`` sees key ``j``
iff ``j <= i`` and (``i - j < window`` or ``j < sink`` or ``keep[j]``). The flags use a straight-through estimator:
forward the hard ``1[s > τ]``, backward ``∂/∂s`` (:func:`straight_through`). Gates are computed by a forward pre-hook on
every ``self_attn`` from ``hidden_states``. Loss = LM cross-entropy of the gated model + ``rate_weight ·
(keep_rate − (1 − target_evict))²`` where ``keep_rate`` is the (straight-through) fraction of evictable tokens kept
(``sink <= t < L − window``: later tokens are never masked in a training sequence).
Initial bias ``+0.5`` (``s ≈ 0.62``, everything kept: the start is the base model).

Inference: prefill is dense (the full prompt is attended, as SnapKV does), then every prompt token is scored per KV
head and the cache keeps the flagged ones plus the window and sinks (per-head ragged storage: real bytes saved). Each
decode step scores the new token; a token flagged *evict* is dropped when it leaves the recent window, so the cache
only holds kept tokens. The flags live in the layer's ``token_state`` (1 byte per token and head, counted in bytes).

Objective actually used for the shipped gates: ``objective="local"`` (see :func:`gate_loss`), a per-layer
attention-output distillation on q/k/v recorded once per sequence, because the issue's LM loss through the gated
model took 115-145 s per step at 512 tokens on this shared 2-core CPU (measured; the local loss: ~3 s per step). The
LM objective is implemented and tested (``recipe={"objective": "lm"}``). A head-balance term (``balance_weight``)
penalises the spread of keep rates across a layer's KV heads: the ragged storage is padded to the fullest head, and
without it the gates kept 0.44 of the tokens but 0.62 of the bytes (with it: 0.35 of the tokens, 0.37 of the bytes).

Files: ``gate.safetensors`` + ``gate.json`` (model name and fingerprint, shapes, window/sink, training recipe).

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

FORMAT = "kvaccel-attention-gate-1"
DATA_DIR = Path(__file__).parent / "data"
STATE_KEY = "attention_gate"
TRAIN_ATTENTION = "attention_gate_train"


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


class AttentionGateLayer(nn.Module):
    """One layer's gate: ``σ(w_h · MHA'(X)[t, h] + u_h · X_t + b_h)`` per token ``t`` and KV head ``h``."""

    def __init__(self, hidden_size: int, num_kv_heads: int, gate_dim: int = 8, gate_window: int = 64,
                 init_bias: float = 0.5):
        super().__init__()
        self.heads, self.dim, self.window = num_kv_heads, gate_dim, gate_window
        self.qkv = nn.Linear(hidden_size, 3 * num_kv_heads * gate_dim, bias=False)
        self.out = nn.Parameter(torch.zeros(num_kv_heads, gate_dim))
        self.direct = nn.Linear(hidden_size, num_kv_heads)
        nn.init.zeros_(self.direct.weight)
        nn.init.constant_(self.direct.bias, init_bias)

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
            AttentionGateLayer(meta["hidden_size"], meta["num_kv_heads"], meta["gate_dim"], meta["gate_window"])
            for _ in range(meta["num_layers"])
        )

    @classmethod
    def for_model(cls, model, gate_dim: int = 8, gate_window: int = 64, window: int = 32, sink: int = 4,
                  recipe: dict | None = None) -> AttentionGates:
        """Freshly initialised gates shaped for ``model`` (everything kept at the start)."""
        from kvaccel.models import model_fingerprint, model_name

        for name, val, lo in (("gate_dim", gate_dim, 1), ("gate_window", gate_window, 1), ("window", window, 1),
                              ("sink", sink, 0)):
            if isinstance(val, bool) or not isinstance(val, int) or val < lo:
                raise ValueError(f"{name} ({val!r}) must be an int >= {lo}")
        cfg = _text_config(model)
        meta = dict(
            format=FORMAT, model_name=model_name(model), model_fingerprint=model_fingerprint(model),
            num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            gate_dim=gate_dim, gate_window=gate_window, window=window, sink=sink, recipe=recipe or {},
        )
        return cls(meta)

    @property
    def window(self) -> int:
        return self.meta["window"]

    @property
    def sink(self) -> int:
        return self.meta["sink"]


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
        past = self._past.get(layer)
        P = 0 if past is None else past[0].shape[2]
        key_valid = None
        if ctx.pad is not None:
            key_valid = ctx.pad[:, -(P + q):]
        logits, self._past[layer] = gates.layers[ctx.layer_idx](x, past, key_valid)
        flags = torch.sigmoid(logits) > self.threshold  # (B, H_kv, q)
        # sinks: the first `sink` real tokens of each sequence
        if ctx.pad is not None:
            real_idx = ctx.pad.long().cumsum(-1)[:, -q:] - 1  # (B, q)
        else:
            real_idx = (layer.seen - q + torch.arange(q, device=flags.device))[None]
        flags = flags | (real_idx < gates.sink)[:, None, :]
        B, H, T = layer.keys.shape[:3]
        st = layer.token_state.get(STATE_KEY)
        if st is None:
            st = torch.zeros(B, H, T, dtype=torch.bool, device=layer.keys.device)
        st[..., -q:] = flags
        unscored = layer.seen - q - self._scored_upto.get(layer, layer.seen - q)
        if unscored > 0:  # tokens fed inside kvaccel.paused(model) are kept whole
            st[..., -(q + unscored) : -q] = True
        self._scored_upto[layer] = layer.seen
        layer.token_state[STATE_KEY] = st
        valid = layer.full_valid().expand(B, H, T)
        from_end = valid.flip(-1).cumsum(-1).flip(-1)  # real tokens at or after each slot
        keep = valid & (st | (from_end <= gates.window))
        if bool((keep == valid).all()):
            return
        pos, slot_valid = compact_slots(keep)
        layer.keep(pos, slot_valid)


# ------------------------------------------------------------------------------------------ training


def masked_attention(query: Tensor, key: Tensor, value: Tensor, keep: Tensor, window: int, sink: int,
                     scaling: float, rows: int | None = None) -> Tensor:
    """Causal attention over the kept keys (fp32 eager, for training): query ``i`` sees key ``j`` iff ``j <= i`` and
    (``i - j < window`` or ``j < sink`` or ``keep[j]``); ``keep`` ``(B, H_kv, L)`` multiplies the softmax, which is
    then renormalised (forward = masked softmax; gradients reach ``keep``). Only the last ``rows`` queries when given.
    ``query`` ``(B, H_q, L, D)``, ``key``/``value`` ``(B, H_kv, L, D)`` (GQA not repeated); returns
    ``(B, H_q, rows | L, Dv)``."""
    B, Hq, L, D = query.shape
    Hkv = key.shape[1]
    G = Hq // Hkv
    r0 = 0 if rows is None else max(0, L - rows)
    R = L - r0
    q = query[:, :, r0:].float().reshape(B, Hkv, G * R, D)  # GQA: the G query heads of a kv head stacked on rows
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
    """Training-only attention (``objective="lm"``): :func:`masked_attention` with the flags the pre-hook put on the
    module; with ``module._ag_record`` set it records ``(q, k, v)`` instead and runs plain causal attention.
    Registered as ``"attention_gate_train"``."""
    scaling = module.scaling if scaling is None else scaling
    record = getattr(module, "_ag_record", None)
    if record is not None:
        record[module.layer_idx] = (query.detach(), key.detach(), value.detach())
        keep = torch.ones(key.shape[0], key.shape[1], key.shape[2], device=key.device)
        out = masked_attention(query, key, value, keep, 1, 0, scaling)
        return out.to(value.dtype).transpose(1, 2).contiguous(), None
    window, sink = module._ag_rule
    out = masked_attention(query, key, value, module._ag_keep, window, sink, scaling).to(value.dtype)
    return out.transpose(1, 2).contiguous(), None


def build_gates(model, recipe: dict) -> AttentionGates:
    """``GateKind.build``: fresh gates. Recipe keys (defaults): ``objective`` (``"local"``: per-layer attention-output
    distillation on recorded q/k/v; ``"lm"``: LM loss through the gated model), ``gate_dim`` (8), ``gate_window``
    (64), ``window`` (32), ``sink`` (4), ``target_evict`` (0.7), ``rate_weight`` (10), ``balance_weight`` (10: spread
    of keep rates across a layer's heads, which the padded per-head storage pays for), ``rows`` (128: queries per
    layer in the local loss, the last ones of the sequence)."""
    for k, v in dict(objective="local", gate_dim=8, gate_window=64, window=32, sink=4, target_evict=0.7,
                     rate_weight=10.0, balance_weight=10.0, threshold=0.5, rows=128).items():
        recipe.setdefault(k, v)
    te = recipe["target_evict"]
    if not (isinstance(te, (int, float)) and 0.0 <= te < 1.0):
        raise ValueError(f"target_evict ({te!r}) must be a float in [0, 1)")
    if recipe["objective"] not in ("local", "lm"):
        raise ValueError(f"objective ({recipe['objective']!r}) must be 'local' or 'lm'")
    return AttentionGates.for_model(model, recipe["gate_dim"], recipe["gate_window"], recipe["window"],
                                    recipe["sink"], recipe=recipe)


class TrainTarget:
    """One training sequence: the frozen model (weakly), its token ids ``(1, L)`` and, for the local objective, the
    recorded per-layer ``(x, q, k, v)`` (filled on first use, then cached by the trainer with this object)."""

    def __init__(self, model, input_ids: Tensor):
        self.model = weakref.ref(model)
        self.input_ids = input_ids
        self.layers: list[tuple[Tensor, Tensor, Tensor, Tensor]] | None = None

    def get_model(self):
        model = self.model()
        if model is None:
            raise RuntimeError("the model of this training target was freed")
        return model


def train_target(model, input_ids: Tensor) -> TrainTarget:
    """``GateKind.target``: the sequence; layer records are computed lazily by the local objective."""
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
            for a in ("_ag_keep", "_ag_rule", "_ag_record"):
                m.__dict__.pop(a, None)
        model.set_attn_implementation(previous)


def record_layers(model, input_ids: Tensor) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Per layer ``(x, q, k, v)`` of one frozen forward: the attention input and post-RoPE q/k/v (fp32)."""
    qkv: dict[int, tuple] = {}
    xs: dict[int, Tensor] = {}

    def hook(module, args, kwargs):
        xs[module.layer_idx] = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach()
        module._ag_record = qkv

    with torch.no_grad():
        _run_with(model, hook, input_ids=input_ids, use_cache=False, logits_to_keep=1)
    return [(xs[i].float(), *(t.float() for t in qkv[i])) for i in range(len(xs))]


def gate_loss(gates: AttentionGates, target: TrainTarget, return_parts: bool = False):
    """``GateKind.loss``: distortion + ``rate_weight · (keep_rate − (1 − target_evict))²``.

    ``keep_rate`` is the straight-through fraction of evictable tokens kept (``sink <= t < L − window``: later
    tokens are never masked inside a training sequence). The distortion is, per the recipe's ``objective``:

    - ``"local"``: mean over layers of ``‖o_gated − o_full‖² / ‖o_full‖²`` of the attention outputs of the last
      ``rows`` queries, on q/k/v recorded once per sequence (no backward through the model: ~100x cheaper);
    - ``"lm"``: the LM cross-entropy of the frozen model run with the gated attention (backward through the model).
    """
    inner = getattr(gates, "module", gates)  # accelerate may wrap it
    rec = inner.meta.get("recipe", {})
    threshold = rec.get("threshold", 0.5)
    window, sink = inner.window, inner.sink
    L = target.input_ids.shape[1]
    kept: list[Tensor] = []
    if rec.get("objective", "local") == "lm":
        model = target.get_model()

        def hook(module, args, kwargs):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            flags = straight_through(torch.sigmoid(inner.layers[module.layer_idx](x)[0]), threshold)
            module._ag_keep, module._ag_rule = flags, (window, sink)
            kept.append(flags)

        ids = target.input_ids
        distortion = _run_with(model, hook, input_ids=ids, labels=ids, use_cache=False).loss
    else:
        rows = rec.get("rows", 256)
        if target.layers is None:  # (x, q, k, v, full attention output of the last `rows` queries) per layer
            target.layers = [
                (x, q, k, v, masked_attention(q, k, v, torch.ones_like(k[..., 0]), 1, 0, q.shape[-1] ** -0.5, rows))
                for x, q, k, v in record_layers(target.get_model(), target.input_ids)
            ]
        errs = []
        for gate, (x, q, k, v, full) in zip(inner.layers, target.layers, strict=True):
            flags = straight_through(torch.sigmoid(gate(x)[0]), threshold)
            kept.append(flags)
            out = masked_attention(q, k, v, flags, window, sink, q.shape[-1] ** -0.5, rows)
            errs.append(((out - full) ** 2).sum(-1).mean() / (full**2).sum(-1).mean())
        distortion = torch.stack(errs).mean()
    lo, hi = min(sink, L), max(min(sink, L), L - window)
    per_head = torch.stack([(f[..., lo:hi] if hi > lo else f).mean(dim=(0, 2)) for f in kept])  # (layers, H_kv)
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
