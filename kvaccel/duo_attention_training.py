"""Training of DuoAttention's gates (``kvaccel train-gate duo_attention``), the gate kind ``"duo_attention"`` of
:mod:`kvaccel.training`; the method is :mod:`kvaccel.patches.evict.duo_attention`.

The paper's optimisation (https://arxiv.org/abs/2410.10819, reference ``duo_attn/train.py``): the base model is
frozen; each layer ``l`` and KV head ``h`` has a gate ``α[l, h] ∈ [0, 1]`` (init 1); every query head of KV head
``h`` outputs ``α · full + (1 − α) · streaming``, where *full* is causal attention over every earlier token and
*streaming* over the first ``sink`` tokens and the last ``recent`` (:func:`duo_train_attention`, registered as
``"duo_attention_train"`` while the loss runs). Loss = mean over the supervised positions of the mean squared
difference of the final (normed) hidden states, mixed vs full model, + ``reg_weight`` (0.05) · mean ``|α|`` (the L1
term that pushes heads to streaming). ``α`` is clamped to [0, 1] before every step, as in the reference.

Data (:func:`passkey_sequences`, nothing downloaded): the harness's generated needle tasks (``kvaccel.evals.tasks``:
multi-value and multi-query NIAH, multi-key NIAH, passkey; noise and prose haystacks) with their answer appended;
the supervised positions are the last ``answer_tokens`` (32) tokens of each sequence, i.e. the answer and the end of
the question (the reference supervises its question + answer block). With ``--data``, the last ``answer_tokens``
tokens of each text are supervised: put the answer there.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kvaccel.checks import check_int, check_number
from kvaccel.patches.evict.duo_attention import DuoPatterns
from kvaccel.training import ModelTarget

TRAIN_ATTENTION = "duo_attention_train"
#: generated tasks of the default data (several needles: most positions of the answer need a retrieval head)
TASKS = ("niah_multivalue", "niah_multiquery", "niah_multikey", "passkey")
HAYSTACKS = ("noise", "prose")


def streaming_mask(length: int, sink: int, recent: int, device=None) -> Tensor:
    """``(L, L)`` bool: query ``i`` sees key ``j`` iff ``j <= i`` and (``j < sink`` or ``i − j < recent``)."""
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    return (j <= i) & ((j < sink) | (i - j < recent))


def duo_train_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask,
                        scaling: float | None = None, dropout: float = 0.0, **kwargs) -> tuple[Tensor, None]:
    """Training-only attention: ``α · full + (1 − α) · streaming`` per KV head (``module._duo_alpha`` ``(H_kv,)``,
    ``module._duo_window = (sink, recent)``), fp32. One unpadded sequence without a cache (queries = keys)."""
    if attention_mask is not None or query.shape[2] != key.shape[2]:
        raise ValueError("duo_attention training runs one unpadded sequence without a cache per forward")
    scaling = module.scaling if scaling is None else scaling
    G = query.shape[1] // key.shape[1]
    q = query.float()
    k, v = key.float().repeat_interleave(G, 1), value.float().repeat_interleave(G, 1)
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)
    sink, recent = module._duo_window
    mask = streaming_mask(q.shape[2], sink, recent, q.device)
    stream = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    a = module._duo_alpha.float().repeat_interleave(G).view(1, -1, 1, 1)
    out = a * full + (1 - a) * stream
    return out.to(value.dtype).transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def _duo_training_attention(model, alpha: Tensor, sink: int, recent: int):
    """``model`` runs :func:`duo_train_attention` with layer ``l``'s gates ``alpha[l]``; restored on exit."""
    from transformers import AttentionInterface

    from kvaccel.api import _attention_modules

    AttentionInterface.register(TRAIN_ATTENTION, duo_train_attention)
    previous = model.config._attn_implementation
    modules = _attention_modules(model)
    for m in modules:
        m._duo_alpha, m._duo_window = alpha[m.layer_idx], (sink, recent)
    try:
        model.set_attn_implementation(TRAIN_ATTENTION)
        yield
    finally:
        for m in modules:
            for a in ("_duo_alpha", "_duo_window"):
                m.__dict__.pop(a, None)
        model.set_attn_implementation(previous)


def build_gates(model, recipe: dict) -> DuoPatterns:
    """``GateKind.build``: gates at ``initial_value``. Recipe keys (defaults, the reference's): ``sink`` (64),
    ``recent`` (256), ``reg_weight`` (0.05), ``initial_value`` (1.0), ``answer_tokens`` (32: supervised positions at
    the end of each sequence)."""
    for k, v in dict(sink=64, recent=256, reg_weight=0.05, initial_value=1.0, answer_tokens=32).items():
        recipe.setdefault(k, v)
    check_int("answer_tokens", recipe["answer_tokens"], 1)
    check_number("reg_weight", recipe["reg_weight"], 0)
    return DuoPatterns.for_model(model, recipe["sink"], recipe["recent"], recipe["initial_value"], recipe=recipe)


class TrainTarget(ModelTarget):
    """One training sequence: the frozen model (weakly), its token ids ``(1, L)`` and the full model's final normed
    hidden states ``(1, L, hidden)``."""

    def __init__(self, model, input_ids: Tensor, hidden: Tensor):
        super().__init__(model)
        self.input_ids = input_ids
        self.hidden = hidden


def train_target(model, input_ids: Tensor) -> TrainTarget:
    """``GateKind.target``: the sequence and the full model's final hidden states (one frozen forward)."""
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
    return TrainTarget(model, input_ids, hidden.float())


def gate_loss(gates: DuoPatterns, target: TrainTarget, return_parts: bool = False):
    """``GateKind.loss``: ``mean ‖h_mixed − h_full‖² / hidden`` over the last ``answer_tokens`` positions +
    ``reg_weight · mean |α|`` (see the module docstring); ``α`` is first clamped to [0, 1] in place."""
    inner = getattr(gates, "module", gates)  # accelerate may wrap it
    rec = inner.meta.get("recipe", {})
    with torch.no_grad():
        inner.alpha.clamp_(0, 1)
    model = target.get_model()
    n = min(int(rec.get("answer_tokens", 32)), target.input_ids.shape[1])
    with _duo_training_attention(model, inner.alpha, inner.meta["sink"], inner.meta["recent"]):
        hidden = model.get_decoder()(input_ids=target.input_ids, use_cache=False).last_hidden_state
    distill = (hidden[:, -n:].float() - target.hidden[:, -n:]).pow(2).mean(-1).mean()
    reg = inner.alpha.abs().mean()
    loss = distill + float(rec.get("reg_weight", 0.05)) * reg
    if return_parts:
        return loss, dict(distill=float(distill.detach()), reg=float(reg.detach()))
    return loss


def save_gates(gates: DuoPatterns, out: Path, recipe: dict) -> Path:
    """``GateKind.save``: ``gate.safetensors`` (``alpha`` clamped to [0, 1]) + ``gate.json`` in ``out``."""
    with torch.no_grad():
        gates.alpha.clamp_(0, 1)
    gates.meta["recipe"] = {k: v for k, v in recipe.items() if isinstance(v, (str, int, float, bool, type(None)))}
    return gates.save(out)


def passkey_sequences(tokenizer, seq_len: int, n: int, seed: int = 0) -> list[Tensor]:
    """``GateKind.sequences``: ``n`` token sequences of about ``seq_len`` tokens, each a generated needle task
    (:data:`TASKS` in turn, haystacks alternating) followed by its answer, so the sequence ends with the answer."""
    from kvaccel.evals import tasks

    seqs = []
    for i in range(n):
        sample = tasks.generate(TASKS[i % len(TASKS)], tokenizer, seq_len, 1, seed=seed + i,
                                haystack=HAYSTACKS[(i // len(TASKS)) % len(HAYSTACKS)])[0]
        answer = " " + ", ".join(sample.answers) + "."
        ids = [tokenizer(t, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
               for t in (tasks.format_prompt(sample), answer)]
        seqs.append(torch.cat(ids))
    return seqs


__all__ = ["build_gates", "duo_train_attention", "gate_loss", "passkey_sequences", "save_gates", "streaming_mask",
           "train_target"]
