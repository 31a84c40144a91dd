"""The one prefill/decode loop and the one fidelity implementation behind ``compare``, ``bench`` and ``eval``.

``prefill_decode`` runs a prompt (one or more chunks) through the model on a fresh cache, then greedy decode steps,
timing the prefill (time to first token) and the decode steps separately. ``fidelity`` compares a method's run,
teacher-forced on the stock model's greedy continuation, with that reference run.

Fidelity definitions (the same numbers in every front end):

- ``kl``: mean over the N steps of KL(P_full ‖ P_method) of the next-token distributions (nats, float64);
  ``kl_max`` its maximum over steps.
- ``top1_agreement``: fraction of the N teacher-forced steps whose argmax equals full's token.
- ``greedy_prefix``: number of leading tokens of the method's own greedy continuation equal to full's. Teacher
  forcing feeds full's tokens, so up to the first disagreement the forced run IS the method's free greedy run; the
  first step whose argmax differs is where the free run diverges. ``greedy_match = greedy_prefix / N``: the
  fraction of full's N-token greedy continuation the method reproduces exactly before it first diverges (tokens
  after a divergence are conditioned on a different text and are not counted, even if they happen to coincide).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from kvaccel.cache import cache_kwarg

FULL = "full"
_clock = time.perf_counter  # module attribute: the tests drive the loop with a fake clock


@contextlib.contextmanager
def method(model, spec: str) -> Iterator[bool]:
    """Patch ``model`` with ``spec`` for the block (``full`` = the stock model); yields whether it is patched."""
    from kvaccel.api import patch, unpatch

    if spec == FULL:
        yield False
        return
    patch(model, spec)
    try:
        yield True
    finally:
        unpatch(model)


def new_cache(model, patched: bool):
    """A fresh cache: ``KVAccelCache`` for a patched model, the stock ``DynamicCache`` otherwise."""
    from transformers import DynamicCache

    from kvaccel.cache import KVAccelCache

    return KVAccelCache(model) if patched else DynamicCache(config=model.config)


def kv_bytes(model, cache, patched: bool) -> tuple[int, int]:
    """(bytes held, bytes a full cache would hold) of ``cache`` now."""
    if patched:
        from kvaccel.api import report

        r = report(model)
        return int(r["kv_bytes"]), int(r["kv_bytes_full"])
    n = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.is_initialized)
    return n, n


def _sync(device: torch.device) -> None:
    """Wait for queued device work so that a timestamp taken next covers it (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class LoopRun:
    """What ``prefill_decode`` measured. ``tokens[b]`` are row ``b``'s greedy tokens (argmax at each step, also under
    teacher forcing); ``logits`` is ``(B, steps, V)`` fp32 when ``keep_logits``."""

    tokens: list[list[int]]
    prefill_s: float
    decode_s: float
    decode_steps: int  # forward passes timed in decode_s
    kv_bytes: int  # right after the first (compressing) chunk
    kv_bytes_full: int
    kv_bytes_end: int  # after the last decode step
    kv_bytes_full_end: int
    prompt_tokens: int
    logits: torch.Tensor | None = None

    @property
    def tpot_s(self) -> float:
        """Seconds per decode step (nan without decode steps)."""
        return self.decode_s / self.decode_steps if self.decode_steps else float("nan")


def prefill_decode(
    model,
    chunks: torch.Tensor | Sequence[torch.Tensor],
    new_tokens: int,
    patched: bool,
    *,
    forced: Sequence[int] | None = None,
    keep_logits: bool = False,
    eos: set[int] | frozenset[int] = frozenset(),
    stop: Callable[[list[int]], bool] | None = None,
) -> LoopRun:
    """Prefill ``chunks`` on a fresh cache, then greedy-decode up to ``new_tokens`` tokens.

    The first chunk is the timed prefill (a method compresses there; ``kv_bytes`` is read right after it); further
    chunks (e.g. the question after a question-agnostic compression) follow untimed. Token 1 is the argmax of the
    prompt's last logits, each later token costs one decode forward (``new_tokens - 1`` timed steps at most).
    ``forced`` (batch 1): feed these tokens instead of the argmax (teacher forcing). ``eos`` / ``stop(tokens)``
    (batch 1): end early when the token is an EOS (not kept) or ``stop`` is true on the tokens so far.
    """
    chunks = [chunks] if isinstance(chunks, torch.Tensor) else list(chunks)
    ids = chunks[0]
    batch, device = ids.shape[0], ids.device
    if (forced is not None or eos or stop is not None) and batch != 1:
        raise ValueError(f"forced / eos / stop need batch size 1, got input_ids of batch {batch}")
    if forced is not None and len(forced) < new_tokens - 1:
        raise ValueError(f"forced has {len(forced)} tokens; {new_tokens} new tokens need >= {new_tokens - 1}")
    kw = cache_kwarg(model)
    host_check = bool(eos) or stop is not None
    with torch.inference_mode():
        cache = new_cache(model, patched)
        _sync(device)
        t0 = _clock()
        out = model(ids, **{kw: cache}, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        prefill_s = _clock() - t0
        kv, kv_full = kv_bytes(model, cache, patched)
        for chunk in chunks[1:]:
            if chunk.shape[1]:
                out = model(chunk, **{kw: cache}, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        steps, toks, kept, done = 0, [], [], []
        _sync(device)
        t1 = _clock()
        for step in range(new_tokens):
            if keep_logits:
                kept.append(out.logits[:, -1].float())
            toks.append(nxt)
            if host_check:
                tok = int(nxt)
                if tok in eos:
                    toks.pop()
                    break
                done.append(tok)
                if stop is not None and stop(done):
                    break
            if step == new_tokens - 1:
                break
            fed = nxt if forced is None else torch.tensor([[int(forced[step])]], device=device)
            out = model(fed, **{kw: cache}, use_cache=True, logits_to_keep=1)
            steps += 1
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        decode_s = _clock() - t1
        kv_end, kv_full_end = kv_bytes(model, cache, patched)
        del cache
    tokens = torch.cat(toks, 1).tolist() if toks else [[] for _ in range(batch)]
    return LoopRun(tokens=tokens, prefill_s=prefill_s, decode_s=decode_s, decode_steps=steps, kv_bytes=kv,
                   kv_bytes_full=kv_full, kv_bytes_end=kv_end,
                   kv_bytes_full_end=kv_full_end, prompt_tokens=int(sum(c.shape[1] for c in chunks)),
                   logits=torch.stack(kept, 1) if kept else None)


def reference(model, ids: torch.Tensor, n: int) -> LoopRun:
    """The stock model's greedy ``n``-token continuation of ``ids`` (batch 1) and the logits that chose each token."""
    if ids.shape[0] != 1:
        raise ValueError(f"fidelity needs a batch-1 prompt, got batch {ids.shape[0]}")
    return prefill_decode(model, ids, n, patched=False, keep_logits=True)


def forced_run(model, ids: torch.Tensor, ref: LoopRun, patched: bool) -> LoopRun:
    """The (patched) model teacher-forced on ``ref``'s continuation, logits kept."""
    n = len(ref.tokens[0])
    return prefill_decode(model, ids, n, patched=patched, forced=ref.tokens[0], keep_logits=True)


def fidelity(ref: LoopRun, run: LoopRun) -> dict[str, float]:
    """KL, top-1 agreement, greedy prefix and greedy match of ``run`` (teacher-forced on ``ref``) against ``ref``.

    See the module docstring for the definitions. ``kl`` per step is clamped at 0 (float64 rounding).
    """
    from .metrics import greedy_match, kl_divergence, top1_agreement

    if ref.logits is None or run.logits is None:
        raise ValueError("fidelity needs runs with keep_logits=True (reference() and forced_run())")
    ref_logits, logits = ref.logits[0], run.logits[0]
    if ref_logits.shape != logits.shape:
        raise ValueError(f"fidelity: reference logits {tuple(ref_logits.shape)} vs run {tuple(logits.shape)}")
    kl = kl_divergence(ref_logits, logits).clamp_min(0.0)
    n = len(ref.tokens[0])
    prefix = greedy_match(ref.tokens[0], run.tokens[0])["prefix_match"]
    return {"kl": float(kl.mean()), "kl_max": float(kl.max()), "top1_agreement": top1_agreement(ref_logits, logits),
            "greedy_prefix": prefix, "greedy_match": prefix / n}
