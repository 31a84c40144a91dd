"""lm-eval integration (optional extra ``kvaccel[eval]``): run any lm-eval task on a kvaccel-patched model.

    from kvaccel.evals.lm_eval_adapter import run_lm_eval
    run_lm_eval(model, tok, ["my_task"], method="streaming(budget=0.25)", include_path="my_tasks/", limit=20)

The patched model is wrapped in lm-eval's ``HFLM`` (``pretrained=`` accepts a model instance); its forward and
generate create a ``KVAccelCache`` when lm-eval passes none, so the method applies to every request.
Nothing here downloads: use local task YAMLs (``include_path``) and data the user already has.
"""

from __future__ import annotations

from typing import Any

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


def hflm(model, tokenizer, method: str | None = None, batch_size: int = 1, **kwargs: Any):
    """An lm-eval ``HFLM`` around ``model`` patched with ``method`` (None: the model as it is)."""
    HFLM = _require_lm_eval()
    if method:
        from kvaccel.api import patch

        patch(model, method)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kwargs)


def run_lm_eval(
    model,
    tokenizer,
    tasks: list[str],
    method: str | None = None,
    include_path: str | None = None,
    limit: int | float | None = None,
    **kwargs: Any,
) -> dict:
    """``lm_eval.simple_evaluate`` on the patched model; ``include_path`` adds a folder of local task YAMLs."""
    lm = hflm(model, tokenizer, method=method)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path) if include_path else None
    return simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=manager, **kwargs)
