"""lm-eval integration (optional extra ``kvaccel[eval]``): run lm-eval tasks on a kvaccel-patched model.

    from kvaccel.evals.lm_eval_adapter import hflm, run_lm_eval
    run_lm_eval(model, tok, ["my_task"], method="streaming(budget=0.25)", include_path="my_tasks/", limit=20)
    with hflm(model, tok, method="snapkv(budget=0.25)") as lm:   # unpatched (previous patch back) on exit
        lm.loglikelihood(requests)

The method is measured on every request type:
- ``loglikelihood`` (multiple choice, perplexity): lm-eval's ``HFLM`` scores ``context + continuation`` in one
  forward, so eviction would run after the logits exist and the scores would equal the unpatched model's. Here the
  context is prefilled (and compressed by the method) first, then the continuation is scored in a second forward
  against what was kept — as a user's prompt is compressed before the model answers. With nothing evicted this
  equals the one-forward score (up to float rounding of the split forward).
- ``generate_until``: the patched ``generate`` prefills (compresses) the prompt, then decodes.
Nothing here downloads: use local task YAMLs (``include_path``) and data the user already has.
"""

from __future__ import annotations

import copy
import difflib
import functools
import os
from typing import Any

import torch

from kvaccel.cache import cache_kwarg

INSTALL_HINT = "pip install 'kvaccel[eval]'"


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise ImportError(
            f"lm-eval is not installed; it is an optional extra of kvaccel: {INSTALL_HINT}"
        ) from e
    return HFLM


def _split(context: list[int], continuation: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """``(head, tail)``: the prefilled (compressed) part ends with the last context token; ``tail`` =
    ``continuation[:-1]``. Inputs longer than ``max_length + 1`` lose tokens on the left, as lm-eval's ``HFLM``."""
    if not context or not continuation:
        raise ValueError(f"context ({len(context)} tokens) and continuation ({len(continuation)}) must be non-empty")
    if len(continuation) > max_length:
        raise ValueError(f"continuation ({len(continuation)} tokens) is longer than max_length ({max_length})")
    whole = (list(context) + list(continuation))[-(max_length + 1):]
    n = len(continuation)
    return whole[: len(whole) - n], whole[len(whole) - n: -1]


def _prefill(model, head: list[int]):
    """One forward over ``head`` on a fresh cache (compressed by a patched model); returns (cache, last logits)."""
    from kvaccel.api import is_patched
    from kvaccel.cache import KVAccelCache
    from kvaccel.compare import input_device

    if is_patched(model):
        cache = KVAccelCache(model)
    else:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        out = model(torch.tensor([head], device=input_device(model)), logits_to_keep=1, use_cache=True,
                    **{cache_kwarg(model): cache})
    return cache, out.logits[0, -1:]


def _score(model, cache, first_logits: torch.Tensor, tail: list[int], continuation: list[int]):
    """Feed ``tail`` on ``cache`` after the prefill; log-probabilities and greedy tokens of ``continuation``."""
    from kvaccel.compare import input_device

    logits = [first_logits]
    if tail:
        with torch.inference_mode():
            logits.append(model(torch.tensor([tail], device=input_device(model)), use_cache=True,
                                **{cache_kwarg(model): cache}).logits[0])
    logp = torch.log_softmax(torch.cat(logits).float(), dim=-1)
    target = torch.tensor(continuation, device=logp.device)
    return logp.gather(-1, target[:, None])[:, 0], logp.argmax(-1)


def score_continuation(
    model, context: list[int], continuation: list[int], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities ``(n,)`` (fp32) and greedy tokens ``(n,)`` of ``continuation`` after ``context``.

    ``context`` is one forward (a patched model compresses its cache there), ``continuation[:-1]`` a second one on
    the kept cache. Inputs longer than ``max_length + 1`` lose tokens on the left, as lm-eval's ``HFLM``.
    """
    head, tail = _split(context, continuation, max_length)
    cache, first = _prefill(model, head)
    return _score(model, cache, first, tail, continuation)


def score_requests(model, requests: list[tuple[list[int], list[int]]], max_length: int, progress: bool = False):
    """``score_continuation`` for many ``(context, continuation)`` pairs; requests sharing a context (multiple
    choice) prefill and compress it once, each continuation then runs on its own copy of the compressed cache."""
    groups: dict[tuple[int, ...], list[int]] = {}
    splits = [_split(c, x, max_length) for c, x in requests]
    for i, (head, _) in enumerate(splits):
        groups.setdefault(tuple(head), []).append(i)
    results: list = [None] * len(requests)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(requests), desc="loglikelihood (kvaccel, compressed context)")
    for head, idxs in groups.items():
        cache, first = _prefill(model, list(head))
        for k, i in enumerate(idxs):
            own = cache if k == len(idxs) - 1 else copy.deepcopy(cache)  # the continuation's forward changes it
            results[i] = _score(model, own, first, splits[i][1], requests[i][1])
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    return results


@functools.cache
def _lm_class():
    HFLM = _require_lm_eval()

    class KVAccelLM(HFLM):
        """``HFLM`` whose loglikelihood requests run through the (compressed) KV cache; a context manager that
        unpatches what it patched on exit (the model's previous patch, if any, comes back)."""

        _kvaccel_restore: Any = None

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            from kvaccel.api import is_patched

            if not is_patched(self.model):  # the stock model: lm-eval's own (batched, one-forward) scoring
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            res = []
            scored = score_requests(self.model, [(c, x) for _, c, x in requests], self.max_length,
                                    progress=not disable_tqdm and self.rank == 0)
            for (request_str, _, continuation_enc), (logp, greedy) in zip(requests, scored, strict=True):
                greedy_ok = bool((greedy == torch.tensor(continuation_enc, device=greedy.device)).all())
                answer = (float(logp.sum()), greedy_ok)
                res.append(answer)
                if request_str is not None:
                    self.cache_hook.add_partial("loglikelihood", request_str, answer)
            return res

        def close(self) -> None:
            """Undo the patch this adapter applied (idempotent)."""
            restore, self._kvaccel_restore = self._kvaccel_restore, None
            if restore is not None:
                restore()

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.close()

    return KVAccelLM


def hflm(model, tokenizer, method: str | None = None, batch_size: int = 1, **kwargs: Any):
    """An lm-eval LM around ``model`` patched with ``method`` (None: the model as it is).

    Use it as a context manager (or call ``.close()``): on exit the model is unpatched, or re-patched with what
    it had before.
    """
    cls = _lm_class()
    restore = None
    if method:
        from kvaccel.api import _STATE_ATTR, patch, unpatch

        previous = getattr(model, _STATE_ATTR, None)
        patch(model, method)

        def restore():
            unpatch(model)
            if previous is not None:
                patch(model, *previous.methods.values())

    try:
        lm = cls(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kwargs)
    except BaseException:
        if restore is not None:
            restore()
        raise
    lm._kvaccel_restore = restore
    return lm


def task_manager(include_path: str | os.PathLike | None, tasks: list[str]):
    """lm-eval's ``TaskManager`` that knows every task in ``tasks`` (``ValueError`` naming the unknown ones).

    With ``include_path`` holding every task, the built-in index (~15k YAMLs, tens of seconds to scan) is skipped.
    """
    return _task_manager(str(include_path) if include_path else None, tuple(tasks))


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None, tasks: tuple[str, ...]):
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path:
        if not os.path.isdir(include_path):
            raise ValueError(f"lm-eval include path '{include_path}' is not a directory of task YAMLs")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        hints = []
        for t in unknown:
            close = difflib.get_close_matches(t, manager.all_tasks, n=1, cutoff=0.6)
            hints.append(f"'{t}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        where = f" in '{include_path}' or" if include_path else ""
        raise ValueError(f"unknown lm-eval task(s) {', '.join(hints)}: not found{where} among lm-eval's "
                         f"{len(manager.all_tasks)} built-in tasks; pass a folder of task YAMLs with --lm-eval-include")
    return manager


def run_lm_eval(
    model,
    tokenizer,
    tasks: list[str],
    method: str | None = None,
    include_path: str | None = None,
    limit: int | float | None = None,
    **kwargs: Any,
) -> dict:
    """``lm_eval.simple_evaluate`` on the patched model (unpatched afterwards); ``include_path`` adds a folder of
    local task YAMLs."""
    _require_lm_eval()
    from lm_eval import simple_evaluate

    manager = task_manager(include_path, list(tasks))
    with hflm(model, tokenizer, method=method) as lm:
        return simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=manager, **kwargs)
