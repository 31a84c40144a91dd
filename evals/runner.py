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

FULL = "full"
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
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    return getattr(cfg, "max_position_embeddings", None)


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
@contextlib.contextmanager
def _method(model, spec: str):
    """Patch ``model`` with ``spec`` for the block (``full`` = the stock model)."""
    from kvaccel.api import patch, unpatch

    if spec == FULL:
        yield False
        return
    patch(model, spec)
    try:
        yield True
    finally:
        unpatch(model)


def _new_cache(model, patched: bool):
    from transformers import DynamicCache

    from kvaccel.cache import KVAccelCache

    return KVAccelCache(model) if patched else DynamicCache(config=model.config)


def _kv_bytes(model, cache, patched: bool) -> tuple[int, int]:
    if patched:
        from kvaccel.api import report

        r = report(model)
        return int(r["kv_bytes"]), int(r["kv_bytes_full"])
    n = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.is_initialized)
    return n, n


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


def answer_sample(
    model, tokenizer, sample, patched: bool, new_tokens: int, question_aware: bool, stop_when_found: bool = True
) -> dict:
    """Prefill the context (compressed by the method), then question + answer prefix, then greedy answer.

    Question-agnostic (default): the context is one forward (eviction happens there), the question and answer
    prefix a second forward on the already-compressed cache. Question-aware: context + question are prefilled
    (and compressed) together, only the answer prefix follows.
    """
    if hasattr(sample, "prompt"):  # evals.tasks.Sample: (compressed part, uncompressed part)
        head_text, tail_text = sample.prompt(question_aware=question_aware)
    else:
        head_text = sample.context + "\n\n" + (sample.question if question_aware else "")
        tail_text = ("" if question_aware else sample.question) + (sample.answer_prefix or "")
    from kvaccel.compare import input_device

    device = input_device(model)
    ctx = tokenizer(head_text, add_special_tokens=True, return_tensors="pt")["input_ids"].to(device)
    tail = tokenizer(tail_text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
    chunks = [ctx] + ([tail] if tail.shape[1] else [])
    eos = _eos_ids(tokenizer, model)
    answers = list(sample.answers)
    with torch.inference_mode():
        cache = _new_cache(model, patched)
        t0 = time.perf_counter()
        out = model(chunks[0], past_key_values=cache, use_cache=True, logits_to_keep=1)
        prefill_s = time.perf_counter() - t0
        kv, kv_full = _kv_bytes(model, cache, patched)  # right after the (compressing) context prefill
        if len(chunks) > 1:
            out = model(chunks[1], past_key_values=cache, use_cache=True, logits_to_keep=1)
        toks: list[int] = []
        t1 = time.perf_counter()
        for _ in range(new_tokens):
            tok = int(out.logits[0, -1].argmax())
            if tok in eos:
                break
            toks.append(tok)
            if len(toks) == new_tokens or (stop_when_found and _all_found(tokenizer, toks, answers)):
                break  # string_match_all cannot drop as text is appended: once every answer shows, it is final
            out = model(torch.tensor([[tok]], device=device), past_key_values=cache, use_cache=True,
                        logits_to_keep=1)
        decode_s = time.perf_counter() - t1
    pred = tokenizer.decode(toks, skip_special_tokens=True)
    return {
        "prediction": pred,
        "score": string_match_all(pred, answers),
        "answers": answers,
        "new_tokens": len(toks),
        "prompt_tokens": int(ctx.shape[1] + tail.shape[1]),
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "kv_bytes": kv,
        "kv_bytes_full": kv_full,
        "kv_ratio": kv / kv_full if kv_full else None,
    }


def fidelity_ids(tokenizer, length: int, sample: int) -> torch.Tensor:
    """``(1, length)`` prose tokens; sample ``i`` starts at a different offset into the pydoc_data text."""
    from kvaccel.compare import prose

    offset_chars = sample * 7919  # a prime stride: distinct, reproducible windows
    text = prose(offset_chars + length * 8)[offset_chars:]
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if ids.shape[1] < length:
        raise ValueError(f"could not build a {length}-token prose prompt")
    return ids[:, :length]


def _decode_steps(model, cache, ids, n: int, forced: list[int] | None = None):
    """Prefill ``ids`` then ``n - 1`` decode steps; returns (tokens, (n, V) logits, prefill seconds)."""
    t0 = time.perf_counter()
    out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    prefill_s = time.perf_counter() - t0
    logits = [out.logits[0, -1].float()]
    toks = [int(logits[-1].argmax())]
    for step in range(n - 1):
        fed = toks[-1] if forced is None else forced[step]
        out = model(torch.tensor([[fed]], device=ids.device), past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
        logits.append(out.logits[0, -1].float())
        toks.append(int(logits[-1].argmax()))
    return toks, torch.stack(logits), prefill_s


def fidelity_reference(model, ids: torch.Tensor, n: int = FIDELITY_TOKENS) -> dict:
    """The stock model's greedy continuation of ``n`` tokens and the logits that chose each."""
    with torch.inference_mode():
        cache = _new_cache(model, False)
        toks, logits, prefill_s = _decode_steps(model, cache, ids, n)
        kv, _ = _kv_bytes(model, cache, False)
    return {"tokens": toks, "logits": logits, "prefill_s": prefill_s, "kv_bytes": kv}


def fidelity_metrics(ref_logits: torch.Tensor, logits: torch.Tensor, ref_tokens: list[int], tokens: list[int]):
    """Mean next-token KL(full ‖ method), top-1 agreement (teacher-forced) and greedy continuation match."""
    p_ref = torch.log_softmax(ref_logits.double(), -1)
    p = torch.log_softmax(logits.double(), -1)
    kl_steps = (p_ref.exp() * (p_ref - p)).sum(-1).clamp_min(0.0)
    top1 = float((ref_logits.argmax(-1) == logits.argmax(-1)).double().mean())
    match = sum(a == b for a, b in zip(ref_tokens, tokens, strict=True)) / len(ref_tokens)
    prefix = next((i for i, (a, b) in enumerate(zip(ref_tokens, tokens, strict=True)) if a != b), len(ref_tokens))
    return {
        "kl": float(kl_steps.mean()),
        "kl_max": float(kl_steps.max()),
        "top1_agreement": top1,
        "greedy_match": match,
        "greedy_prefix": prefix,
    }


def fidelity_run(model, ids: torch.Tensor, ref: dict, patched: bool) -> dict:
    """Teacher-forced run on the reference continuation: KL and top-1 per step, and the greedy match.

    The method's own greedy continuation equals the argmax of the teacher-forced run up to the first step where
    it disagrees with full's token, so ``greedy_prefix`` (tokens identical before the first divergence) and
    ``greedy_match`` = ``greedy_prefix / N`` (exact-prefix match of the free greedy continuation) need no extra run.
    """
    n = len(ref["tokens"])
    if not patched:
        m = fidelity_metrics(ref["logits"], ref["logits"], ref["tokens"], ref["tokens"])
        return m | {"prefill_s": ref["prefill_s"], "kv_bytes": ref["kv_bytes"], "kv_bytes_full": ref["kv_bytes"],
                    "kv_ratio": 1.0, "prompt_tokens": int(ids.shape[1])}
    with torch.inference_mode():
        cache = _new_cache(model, True)
        forced_toks, forced_logits, prefill_s = _decode_steps(model, cache, ids, n, forced=ref["tokens"])
        kv, kv_full = _kv_bytes(model, cache, True)
    m = fidelity_metrics(ref["logits"], forced_logits, ref["tokens"], forced_toks)
    m["greedy_match"] = m["greedy_prefix"] / n
    return m | {"prefill_s": prefill_s, "kv_bytes": kv, "kv_bytes_full": kv_full,
                "kv_ratio": kv / kv_full if kv_full else None, "prompt_tokens": int(ids.shape[1])}


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
) -> dict:
    """Run the full baseline and every method on every (task, length, sample); returns the results dict.

    ``on_result`` is called with each new result row (after it is written). ``write`` also writes the reports
    (results.json complete, report.md, plots) at the end.
    """
    if samples is None or int(samples) <= 0:
        raise ValueError(f"samples must be >= 1, got {samples}")
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
        "fidelity_tokens": FIDELITY_TOKENS,
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
                ref = fidelity_reference(model, ids)
            for m in todo:
                t0 = time.perf_counter()
                with _method(model, m) as patched:
                    if task == FIDELITY:
                        res = fidelity_run(model, ids, ref, patched)
                    else:
                        res = answer_sample(model, tokenizer, sample, patched, _new_tokens(task, new_tokens),
                                            question_aware)
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
             "kv_bytes": _mean([r.get("kv_bytes") for r in rs]), "prefill_s": _mean([r.get("prefill_s") for r in rs])}
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
