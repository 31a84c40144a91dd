"""Training of Attention-Gate's gates (``kvaccel train-gate attention_gate``), the gate kind ``"attention_gate"`` of
:mod:`kvaccel.training`; the gates and the inference rule are in :mod:`kvaccel.patches.evict.attention_gate`.

:func:`gate_loss` replays the inference rule: base model frozen; a training sequence is cut at a random ``P`` (``L/2
<= P <= L − continuation``); the prompt ``[0, P)`` is prefilled densely (its per-layer k/v and gate inputs come from
one recorded frozen forward per sequence), the gates flag it, and the next ``continuation`` (32) tokens run through
the frozen model attending only the kept prompt keys (+ sinks + the recent window) and themselves, with a
training-only attention function (an eager fp32 attention, :func:`masked_attention`, registered as
``"attention_gate_train"`` while the loss runs). The flags use a straight-through estimator: forward the hard ``1[s
> τ]``, backward ``∂/∂s`` (:func:`straight_through`). Loss = distortion + ``rate_weight · (keep_rate − (1 −
target_evict))²`` + ``balance_weight ·`` (variance of the keep rates across a layer's KV heads), ``keep_rate`` the
straight-through fraction of prompt tokens from ``sink`` on kept. Distortion = mean over the continuation tokens of
``KL(p_full ‖ p_gated)`` of the next-token distributions (what the harness's fidelity task measures), plus
``local_weight`` (0.5) x the per-layer attention-output distortion of the same continuation queries (``‖o_gated −
o_full‖² / ‖o_full‖²`` on recorded q/k/v, averaged over layers), which gives every layer a direct signal. Prompt
queries are never masked, as at inference. Initial bias ``+0.5`` (``s ≈ 0.62``): the start keeps everything but,
with the global term, the keys that receive under ~0.6% of a uniform share (``g < −5``). The head-balance term
matters for bytes: the ragged storage is padded to a layer's fullest head. The default training data holds generated
tasks on both the noise and the prose haystack: the keep rate is content-driven.

The shipped gates were trained before the per-layer term took the continuation queries: theirs took the last 128
queries of the whole sequence as a prompt, masked (recipe ``rows``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from kvaccel.checks import check_int
from kvaccel.patches.evict.attention_gate import AttentionGates, observation_feature
from kvaccel.training import ModelTarget

TRAIN_ATTENTION = "attention_gate_train"


def straight_through(prob: Tensor, threshold: float = 0.5) -> Tensor:
    """Hard flags ``1[prob > threshold]`` in the forward pass, the gradient of ``prob`` in the backward pass."""
    hard = (prob > threshold).to(prob.dtype)
    return hard + prob - prob.detach()


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
    check_int(k, recipe[k], 1)
    return AttentionGates.for_model(model, recipe["gate_dim"], recipe["gate_window"], recipe["window"],
                                    recipe["sink"], recipe=recipe, observation_window=recipe["observation_window"])


class TrainTarget(ModelTarget):
    """One training sequence: the frozen model (weakly), its token ids ``(1, L)`` and the recorded per-layer
    ``(x, q, k, v)`` and final normed hidden states (filled on first use, then cached by the trainer with this
    object)."""

    def __init__(self, model, input_ids: Tensor):
        super().__init__(model)
        self.input_ids = input_ids
        self.layers: list[tuple] | None = None
        self.final: Tensor | None = None


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
