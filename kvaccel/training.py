"""Training of attention gates on a frozen base model, on ``accelerate``: ``train_gate("seer", model, tok, ...)``.

A gate *kind* (``GATE_KINDS``) supplies four functions; the trainer owns everything else (data, seeding, the
``Accelerator`` with gradient accumulation, checkpoints with ``save_state``/``load_state`` and resume, progress bar):

- ``build(model, recipe) -> nn.Module``: fresh trainable gates for ``model``;
- ``target(model, input_ids) -> Any``: what one training sequence contributes, computed from the frozen model under
  ``torch.no_grad()`` (cached per sequence: it is the expensive part);
- ``loss(gates, target) -> Tensor``: the scalar to minimise;
- ``save(gates, out, recipe) -> Path``: write the gate files (safetensors + JSON, never pickle).

``seer`` (SeerAttention, https://arxiv.org/abs/2410.13276): one frozen forward per sequence captures every layer's
block-pooled pre-RoPE q/k features and the self-distillation target (true attention max-pooled to blocks, computed
blockwise); the gates then train on those tensors alone, so a training step costs a few small matmuls:
``loss = mean over layers, heads and query blocks i >= nb/4 of KL(target_i || softmax(gate_i))``.
``attention_gate`` (Attention-Gate eviction, https://arxiv.org/abs/2410.12876): the next-token KL of tokens continuing
a densely prefilled prompt the gates pruned, see :mod:`kvaccel.attention_gate_training`. ``duo_attention``
(https://arxiv.org/abs/2410.10819): per-KV-head gates mixing full and streaming attention, distilled on generated
needle tasks, see :mod:`kvaccel.duo_attention_training`. Other kinds plug in with ``register_gate_kind``.
"""

from __future__ import annotations

import json
import math
import random
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kvaccel.checks import check_int

CHECKPOINT_DIR = "checkpoint"


@dataclass(frozen=True)
class GateKind:
    """The four functions a trainable gate kind supplies (see the module docstring)."""

    name: str
    build: Callable[[Any, dict], nn.Module]
    target: Callable[[Any, Tensor], Any]
    loss: Callable[[nn.Module, Any], Tensor]
    save: Callable[[nn.Module, Path, dict], Path]
    task_haystacks: tuple[str, ...] = ("prose",)  # haystacks of the generated tasks in the default training data
    #: the kind's own default data: ``(tokenizer, seq_len, n, seed) -> token id sequences`` (instead of the texts)
    sequences: Callable[[Any, int, int, int], list[Tensor]] | None = None


class ModelTarget:
    """A training target that refers to its frozen model weakly (targets are cached by the trainer; the model is not
    kept alive by them)."""

    def __init__(self, model):
        self.model = weakref.ref(model)

    def get_model(self):
        model = self.model()
        if model is None:
            raise RuntimeError("the model of this training target was freed")
        return model


GATE_KINDS: dict[str, GateKind] = {}


def register_gate_kind(kind: GateKind) -> GateKind:
    GATE_KINDS[kind.name] = kind
    return kind


def gate_kind(name: str) -> GateKind:
    if name not in GATE_KINDS:
        raise ValueError(f"gate kind ({name!r}) must be one of {sorted(GATE_KINDS)}")
    return GATE_KINDS[name]


# ------------------------------------------------------------------------------------------ seer


def _seer_build(model, recipe: dict) -> nn.Module:
    from kvaccel.patches.prefill.seer_gate import SeerGate

    return SeerGate.for_model(model, hidden=recipe.get("hidden", 128), block_size=recipe.get("block_size", 64),
                              recipe=recipe)


def _capture_method(block_size: int, records: dict):
    """A prefill method used only for training: dense attention, plus per-layer gate features and target."""
    from kvaccel.patches.prefill.base import PrefillMethod

    @dataclass
    class SeerCapture(PrefillMethod):
        name = "_seer_capture"

        def attention(self, ctx):
            return _capture_layer(ctx, block_size, records)

    return SeerCapture()


def _capture_layer(ctx, block_size: int, records: dict):
    """Record one layer's pooled pre-RoPE q/k features and the pooled-attention target; return dense attention."""
    from kvaccel.patches.attention import dense_prefill, rope_tables
    from kvaccel.patches.prefill.seer_gate import AttnGate, pool_blocks, pooled_attention_target
    from kvaccel.rope import unrotate

    if ctx.pad is not None:
        raise ValueError("gate training sequences must not be padded (one sequence per forward)")
    rope = rope_tables(ctx)
    if rope is None:
        raise ValueError(f"{type(ctx.module).__name__} has no RoPE tables; SeerAttention gates need a RoPE model")
    q_pre, k_pre = unrotate(ctx.query, *rope), unrotate(ctx.key, *rope)
    records[ctx.layer_idx] = (
        pool_blocks(q_pre, block_size, AttnGate.q_pool).float(),
        pool_blocks(k_pre, block_size, AttnGate.k_pool).float(),
        pooled_attention_target(ctx.query, ctx.key, ctx.scaling, block_size),
    )
    return dense_prefill(ctx)


def _seer_target(model, input_ids: Tensor, block_size: int = 64) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per layer ``(q features (1, H_q, nb, D), k features (1, H_kv, nb, 3D), target (1, H_q, nb, nb))``."""
    import kvaccel

    records: dict = {}
    capture = _capture_method(block_size, records)
    with kvaccel.patched(model, capture), torch.no_grad():
        model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    return [records[i] for i in range(len(records))]


def seer_kl(logits: Tensor, target: Tensor) -> Tensor:
    """KL(target ‖ softmax(logits)) per row, averaged over heads and query blocks ``i >= nb // 4`` (the paper skips
    the first quarter of rows: short causal rows are trivial and unstable)."""
    n = logits.shape[-1]
    start = n // 4
    logp = F.log_softmax(logits[..., start:, :].float(), dim=-1)
    t = target[..., start:, :]
    return F.kl_div(logp, t, reduction="none").sum(-1).mean()


def _seer_loss(gates: nn.Module, target: list) -> Tensor:
    losses = [seer_kl(gate(qf, kf), tgt) for gate, (qf, kf, tgt) in zip(gates.layers, target, strict=True)]
    return torch.stack(losses).mean()


def _seer_save(gates: nn.Module, out: Path, recipe: dict) -> Path:
    gates.meta["recipe"] = recipe
    return gates.save(out)


register_gate_kind(GateKind("seer", _seer_build, _seer_target, _seer_loss, _seer_save))


# ------------------------------------------------------------------------------------------ attention_gate


def _ag(fn: str):  # the Attention-Gate kind lives in kvaccel.attention_gate_training (imported when used)
    def call(*args):
        from kvaccel import attention_gate_training

        return getattr(attention_gate_training, fn)(*args)

    return call


# the harness's tasks use the noise haystack by default: the gates see both kinds (their keep rate is content-driven)
register_gate_kind(GateKind("attention_gate", _ag("build_gates"), _ag("train_target"), _ag("gate_loss"),
                            _ag("save_gates"), task_haystacks=("noise", "prose")))


# ------------------------------------------------------------------------------------------ duo_attention


def _duo(fn: str):  # the DuoAttention kind lives in kvaccel.duo_attention_training (imported when used)
    def call(*args):
        from kvaccel import duo_attention_training

        return getattr(duo_attention_training, fn)(*args)

    return call


register_gate_kind(GateKind("duo_attention", _duo("build_gates"), _duo("train_target"), _duo("gate_loss"),
                            _duo("save_gates"), sequences=_duo("passkey_sequences")))


# ------------------------------------------------------------------------------------------ data


def default_texts(tokenizer, seq_len: int, n: int, seed: int = 0,
                  haystacks: tuple[str, ...] = ("prose",)) -> list[str]:
    """Offline training text: pydoc prose windows (2/3) and the harness's long-context tasks (1/3), cycling through
    the task names and the ``haystacks`` (shifted by one per round of names, so every pairing occurs)."""
    from kvaccel.evals import tasks

    rng = random.Random(seed)
    prose = tasks._prose_text()
    n_tasks = n // 3
    texts = []
    chars = seq_len * 6  # ~4-5 characters per token: enough for seq_len tokens
    for _ in range(n - n_tasks):
        start = rng.randrange(max(1, len(prose) - chars))
        texts.append(prose[start : start + chars])
    names = ("passkey", "niah_single", "niah_multikey", "variable_tracking")
    for i in range(n_tasks):
        length = int(seq_len * 1.05) + 16  # tasks land within 2 % of their length: make sure seq_len tokens exist
        sample = tasks.generate(names[i % len(names)], tokenizer, length, 1, seed=seed + i,
                                haystack=haystacks[(i + i // len(names)) % len(haystacks)])[0]
        texts.append(tasks.format_prompt(sample))
    return texts


def load_texts(data: Any) -> list[str]:
    """Texts from a ``datasets`` dataset (column ``text``), a JSONL file (field ``text``) or a list of strings."""
    if isinstance(data, (list, tuple)):
        return [str(t) for t in data]
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.is_file():
            raise ValueError(f"data ({str(data)!r}) is not a file; give a JSONL file with a 'text' field per line")
        texts = []
        for i, line in enumerate(path.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i + 1}: not JSON ({e})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise ValueError(f"{path}:{i + 1}: expected an object with a string field 'text'")
            texts.append(rec["text"])
        return texts
    if hasattr(data, "column_names"):  # a datasets.Dataset
        if "text" not in data.column_names:
            raise ValueError(f"dataset has no 'text' column (columns: {data.column_names})")
        return list(data["text"])
    raise ValueError(f"data ({type(data).__name__}) must be a datasets.Dataset, a JSONL path or a list of strings")


def tokenize_sequences(tokenizer, texts: list[str], seq_len: int) -> list[Tensor]:
    """Token id sequences of exactly ``seq_len`` tokens (texts too short are dropped, longer ones cut)."""
    seqs = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        if ids.numel() >= seq_len:
            seqs.append(ids[:seq_len])
    if not seqs:
        raise ValueError(f"no training text has seq_len ({seq_len}) tokens; lower seq_len or give longer texts")
    return seqs


# ------------------------------------------------------------------------------------------ trainer


class _Progress:
    """Training position and the wall time spent reaching it (over every run resumed so far), saved and restored by
    accelerate's ``save_state``/``load_state``."""

    def __init__(self):
        self.step = 0
        self.wall_s = 0.0

    def state_dict(self) -> dict:
        return {"step": self.step, "wall_s": self.wall_s}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.wall_s = float(state.get("wall_s", 0.0))  # checkpoints written before 2026-12-07 have no wall time


def train_gate(
    kind: str,
    model,
    tokenizer,
    data: Any = None,
    steps: int = 200,
    out: str | Path = "gate",
    lr: float = 1e-3,
    seq_len: int = 2048,
    seed: int = 0,
    grad_accum: int = 1,
    resume: str | Path | bool | None = None,
    num_sequences: int = 16,
    checkpoint_every: int = 50,
    recipe: dict | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train gates of ``kind`` on the frozen ``model``; write them to ``out`` and return a summary.

    Parameters
    ----------
    kind : str
        A key of ``GATE_KINDS`` (``"seer"``).
    data : datasets.Dataset | str | list[str] | None
        Training text; ``None``: ``num_sequences`` offline texts (pydoc prose + generated long-context tasks).
    steps : int
        Optimizer steps; each accumulates ``grad_accum`` sequences (sequence ``i`` of a seeded order).
    out : str | Path
        Output directory: the gate files, ``train_log.json`` and ``checkpoint/`` (accelerate state).
    resume : str | Path | bool | None
        A checkpoint directory (``True``: ``out/checkpoint``) to continue from; the result equals an uninterrupted
        run with the same arguments.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    gk = gate_kind(kind)
    for name, val, lo in (("steps", steps, 1), ("seq_len", seq_len, 2), ("grad_accum", grad_accum, 1),
                          ("num_sequences", num_sequences, 1), ("checkpoint_every", checkpoint_every, 1)):
        check_int(name, val, lo)
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr ({lr!r}) must be a positive float")
    out = Path(out)
    t_start = time.perf_counter()
    accelerator = Accelerator(gradient_accumulation_steps=grad_accum, cpu=not torch.cuda.is_available())
    set_seed(seed)

    model.requires_grad_(False).eval()
    if data is None and gk.sequences is not None:
        sequences = gk.sequences(tokenizer, seq_len, num_sequences, seed)
    else:
        texts = (default_texts(tokenizer, seq_len, num_sequences, seed, gk.task_haystacks) if data is None
                 else load_texts(data))
        sequences = tokenize_sequences(tokenizer, texts, seq_len)
    order = list(range(len(sequences)))
    random.Random(seed).shuffle(order)

    default_data = (f"default ({kind}'s generated sequences)" if gk.sequences is not None else
                    f"default (pydoc prose + generated tasks, haystacks {'/'.join(gk.task_haystacks)})")
    rec = dict(kind=kind, steps=steps, lr=lr, seq_len=seq_len, seed=seed, grad_accum=grad_accum,
               sequences=len(sequences), data=default_data if data is None else str(
                   data if isinstance(data, (str, Path)) else type(data).__name__), optimizer="AdamW(wd=0)",
               **(recipe or {}))
    gates = gk.build(model, rec).float()
    optimizer = torch.optim.AdamW(gates.parameters(), lr=lr, weight_decay=0.0)
    gates, optimizer = accelerator.prepare(gates, optimizer)
    state = _Progress()
    accelerator.register_for_checkpointing(state)
    if resume:
        ckpt = out / CHECKPOINT_DIR if resume is True else Path(resume)
        if not ckpt.is_dir():
            raise ValueError(f"resume ({str(resume)!r}): checkpoint directory {ckpt} does not exist")
        accelerator.load_state(str(ckpt))
    wall_before = state.wall_s  # a resumed run's wall time counts the runs that reached its checkpoint

    device = accelerator.device
    cache: dict[int, Any] = {}

    def target_of(i: int):
        idx = order[i % len(order)]
        if idx not in cache:
            cache[idx] = gk.target(model, sequences[idx][None].to(device))
        return cache[idx]

    losses: list[float] = []
    bar = tqdm(total=steps, initial=state.step, desc=f"train-gate {kind}", disable=not progress)
    gates.train()
    while state.step < steps:
        step_loss = 0.0
        for micro in range(grad_accum):
            tgt = target_of(state.step * grad_accum + micro)
            with accelerator.accumulate(gates):
                loss = gk.loss(gates, tgt)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            step_loss += float(loss.detach()) / grad_accum
        losses.append(step_loss)
        state.step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}")
        if state.step % checkpoint_every == 0 or state.step == steps:
            state.wall_s = wall_before + time.perf_counter() - t_start
            accelerator.save_state(str(out / CHECKPOINT_DIR))
    bar.close()
    gates.eval()
    run_wall = time.perf_counter() - t_start
    wall = wall_before + run_wall
    final = sum(losses[-10:]) / max(1, len(losses[-10:])) if losses else None
    rec.update(final_loss=final, wall_s=round(wall, 1))
    path = gk.save(accelerator.unwrap_model(gates), out, rec)
    summary = dict(out=str(path), final_loss=final, losses=losses, wall_s=wall, run_wall_s=run_wall, steps=steps,
                   recipe=rec)
    (out / "train_log.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
