"""Accuracy and fidelity runs: every method against the stock model (full attention), resumable.

``run_eval`` writes one JSON line per (method, task, length, sample) to ``out_dir/results.jsonl`` as soon as it is
computed; a rerun with the same ``out_dir`` skips what is already there. ``out_dir/results.json`` carries the run
config and ``status``: ``"partial"`` while running (or after an interruption), ``"complete"`` at the end.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from .loop import FULL, LoopRun, fidelity, forced_run, kv_bytes, method, new_cache, prefill_decode, reference

FIDELITY = "fidelity"
FIDELITY_TOKENS = 16  # N: greedy continuation of the full model that fidelity is teacher-forced on
DEFAULT_NEW_TOKENS = {"passkey": 12, "niah_single": 16, "niah_multikey": 16, "fidelity": FIDELITY_TOKENS}
DEFAULT_NEW_TOKENS_OTHER = 24  # niah_*, variable tracking, local files
LONG_ANSWER_TASKS = ("cwe", "fwe", "common_words", "freq_words")  # word lists: longer answers
CONFIG_KEYS_MUST_MATCH = ("model", "seed", "haystack", "question_aware")


# ----------------------------------------------------------------------------------------------- tasks
def _tasks_module():
    from . import tasks  # the colleague's generators (evals/tasks.py)

    return tasks


def known_tasks() -> list[str]:
    """Names of the generator tasks (with RULER's short aliases) plus ``fidelity``."""
    names: list[str] = []
    with contextlib.suppress(ImportError):
        mod = _tasks_module()
        names = list(getattr(mod, "TASKS", {})) + list(getattr(mod, "_ALIASES", {}))
    return sorted(set(names)) + [FIDELITY]


def _is_file_task(task: str) -> bool:
    return task.endswith((".json", ".jsonl")) or os.sep in task or "/" in task


def check_tasks(tasks: Iterable[str]) -> list[str]:
    """Validate task names (generator names, ``fidelity`` or local JSON/JSONL paths); suggest the closest name."""
    tasks = [t.strip() for t in tasks if t and t.strip()]
    if not tasks:
        raise ValueError("no task given; choose from " + ", ".join(known_tasks()))
    names = known_tasks()
    for t in tasks:
        if _is_file_task(t):
            if not Path(t).is_file():
                raise ValueError(f"task file '{t}' does not exist")
            continue
        if t in names:
            continue
        close = difflib.get_close_matches(t, names, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown task '{t}'.{hint} Known tasks: {', '.join(names)}, or a .json/.jsonl file path")
    return tasks


def model_max_length(model) -> int | None:
    from kvaccel.models import text_config

    return getattr(text_config(model), "max_position_embeddings", None)


def check_lengths(model, lengths: Iterable[int], margin: int = 0) -> list[int]:
    lengths = [int(n) for n in lengths]
    if not lengths:
        raise ValueError("no length given")
    limit = model_max_length(model)
    for n in lengths:
        if n < 16:
            raise ValueError(f"length {n} is too short; use at least 16 tokens")
        if limit is not None and n + margin > limit:
            extra = f" (+{margin} tokens of question/answer)" if margin else ""
            raise ValueError(
                f"length {n}{extra} is beyond the model's context: max_position_embeddings = {limit}"
            )
    return lengths


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """Create ``out_dir`` and prove it is writable with a probe file; clear error otherwise."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"output directory '{out}' is not writable: {e.strerror or e}") from None
    return out


def check_methods(methods: Iterable[str]) -> list[str]:
    from kvaccel.config import parse_spec

    out = []
    for m in methods:
        if m in (FULL, "", None):
            continue
        parse_spec(m)  # raises ValueError with a suggestion on a bad spec
        out.append(m)
    return list(dict.fromkeys(out))


def _samples(task: str, tokenizer, length: int, n: int, seed: int, haystack: str) -> list[Any]:
    tasks = _tasks_module()
    if _is_file_task(task):
        load = tasks.load_json if task.endswith(".json") else tasks.load_jsonl
        samples = list(load(task, tokenizer))[:n]
    else:
        samples = list(tasks.generate(task, tokenizer, length, n=n, seed=seed, haystack=haystack))
    return samples


def _sample_id(sample, i: int) -> str:
    sid = getattr(sample, "id", None)
    return str(sid) if sid not in (None, "") else str(i)


def _new_tokens(task: str, new_tokens: int | dict | None) -> int:
    if isinstance(new_tokens, int):
        return new_tokens
    if isinstance(new_tokens, dict) and task in new_tokens:
        return int(new_tokens[task])
    if task in DEFAULT_NEW_TOKENS:
        return DEFAULT_NEW_TOKENS[task]
    if any(task.startswith(p) for p in LONG_ANSWER_TASKS):
        return 32
    return DEFAULT_NEW_TOKENS_OTHER


# --------------------------------------------------------------------------------------------- scoring
def string_match_all(pred: str, answers: list[str]) -> float:
    """RULER's metric: the fraction of expected strings found in the prediction (case-insensitive)."""
    try:
        from . import metrics

        return float(metrics.string_match_all(pred, answers))
    except (ImportError, AttributeError, TypeError):
        if not answers:
            return 0.0
        p = pred.lower()
        return sum(a.lower() in p for a in answers) / len(answers)


# --------------------------------------------------------------------------------------------- model runs
# one loop and one fidelity implementation for compare, bench and eval: evals/loop.py
_method, _new_cache, _kv_bytes = method, new_cache, kv_bytes


def _eos_ids(tokenizer, model) -> set[int]:
    ids = set()
    for v in (getattr(tokenizer, "eos_token_id", None), getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return ids


def _all_found(tokenizer, toks: list[int], answers: list[str]) -> bool:
    text = tokenizer.decode(toks, skip_special_tokens=True).lower()
    return bool(answers) and all(a.lower() in text for a in answers)


def sample_prompt(tokenizer, sample, question_aware: bool, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(compressed head, uncompressed tail) token ids of a task sample, as ``answer_sample`` feeds them."""
    if hasattr(sample, "prompt"):  # evals.tasks.Sample: (compressed part, uncompressed part)
        head_text, tail_text = sample.prompt(question_aware=question_aware)
    else:
        head_text = sample.context + "\n\n" + (sample.question if question_aware else "")
        tail_text = ("" if question_aware else sample.question) + (sample.answer_prefix or "")
    ctx = tokenizer(head_text, add_special_tokens=True, return_tensors="pt")["input_ids"].to(device)
    tail = tokenizer(tail_text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
    return ctx, tail


def answer_sample(
    model, tokenizer, sample, patched: bool, new_tokens: int, question_aware: bool, stop_when_found: bool = True
) -> dict:
    """Prefill the context (compressed by the method), then question + answer prefix, then greedy answer.

    Question-agnostic (default): the context is one forward (eviction happens there), the question and answer
    prefix a second forward on the already-compressed cache. Question-aware: context + question are prefilled
    (and compressed) together, only the answer prefix follows. Stops at EOS or once every answer shows
    (``string_match_all`` cannot drop as text is appended).
    """
    from kvaccel.compare import input_device

    ctx, tail = sample_prompt(tokenizer, sample, question_aware, input_device(model))
    answers = list(sample.answers)
    stop = (lambda toks: _all_found(tokenizer, toks, answers)) if stop_when_found else None
    run = prefill_decode(model, [ctx, tail], new_tokens, patched, eos=_eos_ids(tokenizer, model), stop=stop)
    toks = run.tokens[0]
    pred = tokenizer.decode(toks, skip_special_tokens=True)
    return {
        "prediction": pred,
        "score": string_match_all(pred, answers),
        "answers": answers,
        "new_tokens": len(toks),
        "prompt_tokens": run.prompt_tokens,
        "prefill_s": run.prefill_s,
        "decode_s": run.decode_s,
        "kv_bytes": run.kv_bytes,  # right after the (compressing) context prefill
        "kv_bytes_full": run.kv_bytes_full,
        "kv_ratio": run.kv_bytes / run.kv_bytes_full if run.kv_bytes_full else None,
    }


def fidelity_ids(tokenizer, length: int, sample: int) -> torch.Tensor:
    """``(1, length)`` prose tokens; sample ``i`` starts at a different offset into the pydoc_data text (sample 0 is
    ``kvaccel.compare.prompt_ids``'s prompt, the one ``compare`` and ``bench`` use)."""
    from kvaccel.compare import prose

    offset_chars = sample * 7919  # a prime stride: distinct, reproducible windows
    text = prose(offset_chars + length * 8)[offset_chars:]
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if ids.shape[1] < length:
        raise ValueError(f"could not build a {length}-token prose prompt")
    return ids[:, :length]


def fidelity_reference(model, ids: torch.Tensor, n: int = FIDELITY_TOKENS) -> LoopRun:
    """The stock model's greedy continuation of ``n`` tokens and the logits that chose each."""
    return reference(model, ids, n)


def fidelity_run(model, ids: torch.Tensor, ref: LoopRun, patched: bool) -> dict:
    """``evals.loop.fidelity`` of the (patched) model teacher-forced on ``ref``, with its KV bytes and prefill time."""
    run = forced_run(model, ids, ref, patched) if patched else ref
    return fidelity(ref, run) | {"prefill_s": run.prefill_s, "kv_bytes": run.kv_bytes,
                                 "kv_bytes_full": run.kv_bytes_full,
                                 "kv_ratio": run.kv_bytes / run.kv_bytes_full if run.kv_bytes_full else None,
                                 "prompt_tokens": run.prompt_tokens}


def method_path(rep: dict) -> dict:
    """What a method did in a row, from its ``report()``: each per-layer step counter (``*_steps*``: e.g. retrieval's
    graph / exact / before-index steps, quest's sparse / dense steps) summed over layers, a sparse prefill's
    ``prefill_density`` averaged over the layers that recorded one, and the report's notes."""
    path = {k: sum(v) for k, v in rep.items() if "_steps" in k and isinstance(v, list)
            and all(isinstance(x, int) for x in v)}
    density = [d for d in rep.get("prefill_density") or [] if d is not None]
    if density:
        path["prefill_density"] = sum(density) / len(density)
    return path | {"notes": list(rep.get("notes") or [])}


# --------------------------------------------------------------------------------------------- results store
def result_key(r: dict) -> tuple:
    return (r["method"], r["task"], int(r["length"]), str(r["sample"]))


def read_results(path: str | os.PathLike) -> list[dict]:
    """The JSON lines of ``results.jsonl``; a torn last line (interrupted write) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line without its newline (a write interrupted by a kill) so appends start on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def model_name(model) -> str:
    return str(getattr(model.config, "_name_or_path", "") or getattr(model.config, "name_or_path", "") or "?")


def check_resume(out_dir: Path, config: dict) -> None:
    """Raise if ``out_dir`` holds a run with a different model / seed / haystack / question setting."""
    path = out_dir / "results.json"
    if not path.exists():
        if (out_dir / "results.jsonl").exists():
            return
        return
    try:
        old = json.loads(path.read_text()).get("config", {})
    except json.JSONDecodeError:
        return
    diffs = [
        f"{k}: existing {old.get(k)!r} vs now {config.get(k)!r}"
        for k in CONFIG_KEYS_MUST_MATCH
        if k in old and old.get(k) != config.get(k)
    ]
    if diffs:
        raise ValueError(
            f"'{out_dir}' holds a run with a different configuration ({'; '.join(diffs)}); "
            "use another --out directory or the same settings to resume"
        )


# --------------------------------------------------------------------------------------------- run_eval
def run_eval(
    model,
    tokenizer,
    methods: list[str],
    tasks: list[str],
    lengths: list[int],
    samples: int,
    out_dir: str | os.PathLike,
    seed: int = 0,
    new_tokens: int | dict | None = None,
    haystack: str = "noise",
    question_aware: bool = False,
    progress: bool = True,
    on_result: Callable[[dict], None] | None = None,
    model_id: str | None = None,
    write: bool = True,
    fidelity_tokens: int = FIDELITY_TOKENS,
) -> dict:
    """Run the full baseline and every method on every (task, length, sample); returns the results dict.

    ``fidelity_tokens``: N, the length of full's greedy continuation the ``fidelity`` task teacher-forces on.
    ``on_result`` is called with each new result row (after it is written). ``write`` also writes the reports
    (results.json complete, report.md, plots) at the end.
    """
    if samples is None or int(samples) <= 0:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if int(fidelity_tokens) < 1:
        raise ValueError(f"fidelity_tokens must be >= 1, got {fidelity_tokens}")
    methods = check_methods(methods)
    tasks = check_tasks(tasks)
    lengths = check_lengths(model, lengths, margin=max(_new_tokens(t, new_tokens) for t in tasks))
    out = check_out_dir(out_dir)
    all_methods = [FULL] + methods
    config = {
        "model": model_id or model_name(model),
        "seed": seed,
        "haystack": haystack,
        "question_aware": question_aware,
        "methods": all_methods,
        "tasks": tasks,
        "lengths": lengths,
        "samples": int(samples),
        "new_tokens": new_tokens,
        "fidelity_tokens": int(fidelity_tokens),
    }
    check_resume(out, config)
    jsonl = out / "results.jsonl"
    _drop_torn_tail(jsonl)
    existing = read_results(jsonl)
    done = {result_key(r) for r in existing}
    from .report import run_metadata

    write_json_atomic(out / "results.json", {"status": "partial", "config": config, **run_metadata()})
    torch.manual_seed(seed)

    plan = [(t, n, i) for t in tasks for n in lengths for i in range(int(samples))]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan) * len(all_methods), desc="eval", unit="run", dynamic_ncols=True)
    new_rows: list[dict] = []
    try:
        sample_cache: dict[tuple, list] = {}
        planned: set[tuple] = set()
        for task, length, i in plan:
            if task == FIDELITY:
                sid, sample = str(i), None
            else:
                key = (task, length)
                if key not in sample_cache:
                    sample_cache[key] = _samples(task, tokenizer, length, int(samples), seed, haystack)
                ss = sample_cache[key]
                if i >= len(ss):
                    if bar:
                        bar.update(len(all_methods))
                    continue
                sample, sid = ss[i], _sample_id(ss[i], i)
            planned.update((m, task, length, sid) for m in all_methods)
            todo = [m for m in all_methods if (m, task, length, sid) not in done]
            if bar:
                bar.update(len(all_methods) - len(todo))
            if not todo:
                continue
            ids = ref = None
            if task == FIDELITY:
                from kvaccel.compare import input_device

                ids = fidelity_ids(tokenizer, length, i).to(input_device(model))
                ref = fidelity_reference(model, ids, int(fidelity_tokens))
            for m in todo:
                t0 = time.perf_counter()
                with _method(model, m) as patched:
                    if task == FIDELITY:
                        res = fidelity_run(model, ids, ref, patched)
                    else:
                        res = answer_sample(model, tokenizer, sample, patched, _new_tokens(task, new_tokens),
                                            question_aware)
                    if patched:
                        from kvaccel.api import report

                        res["path"] = method_path(report(model))
                row = {"method": m, "task": task, "length": length, "sample": sid, **res,
                       "wall_s": time.perf_counter() - t0, "time": time.time()}
                _append(jsonl, row)
                done.add(result_key(row))
                new_rows.append(row)
                if on_result is not None:
                    on_result(row)
                if bar:
                    bar.update(1)
                    bar.set_postfix_str(f"{m} {task} {length}")
    finally:
        if bar:
            bar.close()
    rows = [r for r in read_results(jsonl) if result_key(r) in planned]  # this run's items (old ones kept on disk)
    result = {"status": "complete", "config": config, "rows": rows, "summary": summarize_rows(rows),
              "computed": len(new_rows), "skipped": len(rows) - len(new_rows)}
    if write:
        from .report import write_reports

        write_reports(result, out)
    return result


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else float("nan")


def summarize_rows(rows: list[dict]) -> list[dict]:
    """Aggregate per (method, task, length): mean score (accuracy) or mean fidelity metrics, n, kv ratio."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["task"], int(r["length"])), []).append(r)
    full_right = {(r["task"], int(r["length"]), r.get("sample")) for r in rows
                  if r["method"] == FULL and r["task"] != FIDELITY and r.get("score") == 1.0}
    out = []
    for (m, t, n), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0] != FULL, kv[0][0])):
        s = {"method": m, "task": t, "length": n, "n": len(rs), "kv_ratio": _mean([r.get("kv_ratio") for r in rs]),
             "kv_bytes": _mean([r.get("kv_bytes") for r in rs]), "prefill_s": _mean([r.get("prefill_s") for r in rs]),
             "prefill_density": _mean([(r.get("path") or {}).get("prefill_density") for r in rs])}
        if t == FIDELITY:
            for k in ("kl", "kl_max", "top1_agreement", "greedy_match", "greedy_prefix"):
                s[k] = _mean([r.get(k) for r in rs])
        else:
            s["accuracy"] = _mean([r.get("score") for r in rs])
            # paired with full: of the samples full answered right, how many this method answered right
            paired = [r.get("score") == 1.0 for r in rs if (t, n, r.get("sample")) in full_right]
            s["full_right"], s["kept_right"] = len(paired), sum(paired)
        out.append(s)
    return out


# --------------------------------------------------------------------------------------------- lm-eval tasks
LM_EVAL_PREFIX = "lm_eval:"


def run_lm_eval_tasks(
    model,
    tokenizer,
    methods: list[str],
    tasks: list[str],
    out_dir: str | os.PathLike,
    include_path: str | None = None,
    limit: int | None = None,
    on_result: Callable[[dict], None] | None = None,
) -> int:
    """lm-eval tasks for full attention and every method, one row per document in ``out_dir/results.jsonl``.

    Rows look like the built-in tasks' (``task`` = ``lm_eval:<name>``, ``length`` = 0, ``sample`` = lm-eval's
    ``doc_id``, ``score`` = the task's first metric on that document), so the same summary, accuracy and
    "kept of full" tables cover them. Loglikelihood requests are scored on the compressed context (see
    ``lm_eval_adapter``). Resumable per (method, task): a pair with rows on disk is skipped. Returns rows computed.
    """
    from .lm_eval_adapter import _require_lm_eval, hflm, task_manager

    _require_lm_eval()
    from lm_eval import simple_evaluate

    out = check_out_dir(out_dir)
    jsonl = out / "results.jsonl"
    _drop_torn_tail(jsonl)
    done = {(r["method"], r["task"]) for r in read_results(jsonl)}
    manager = task_manager(include_path, list(tasks))
    computed = 0
    for m in [FULL] + [s for s in methods if s != FULL]:
        todo = [t for t in tasks if (m, LM_EVAL_PREFIX + t) not in done]
        if not todo:
            continue
        t0 = time.perf_counter()
        with hflm(model, tokenizer, method=None if m == FULL else m) as lm:
            res = simple_evaluate(model=lm, tasks=todo, limit=limit, task_manager=manager, log_samples=True)
            kv = None
            if m != FULL:
                from kvaccel.api import report

                kv = report(model)
        for t in todo:
            metric = res["configs"][t]["metric_list"][0]["metric"]
            for s in res["samples"][t]:
                row = {"method": m, "task": LM_EVAL_PREFIX + t, "length": 0, "sample": str(s["doc_id"]),
                       "score": float(s[metric]), "metric": metric,
                       "kv_ratio": (kv["kv_ratio"] if kv else 1.0), "wall_s": time.perf_counter() - t0,
                       "time": time.time()}
                _append(jsonl, row)
                computed += 1
                if on_result is not None:
                    on_result(row)
    return computed
