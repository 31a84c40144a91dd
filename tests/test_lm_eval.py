"""lm-eval on a patched model: loglikelihood scored against the compressed cache, local task files, clean unpatch."""

from __future__ import annotations

import json

import pytest
import torch

import kvaccel

from conftest import tiny_model

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is the optional extra kvaccel[eval]")

TASK = """task: kvaccel_local_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: " {{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
"""


def _stock_logprob(model, ids: list[int], n: int) -> float:
    """Log-probability of the last ``n`` tokens of ``ids`` from one forward of the stock model (lm-eval's way)."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0, -n:].float(), -1)
    return float(logp.gather(-1, torch.tensor(ids[-n:])[:, None]).sum())


def test_continuation_scored_against_the_compressed_context():
    from kvaccel.evals.lm_eval_adapter import score_continuation

    model = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    context = torch.randint(3, 512, (1000,), generator=g).tolist()
    continuation = torch.randint(3, 512, (5,), generator=g).tolist()
    stock = _stock_logprob(model, context + continuation, len(continuation))
    unpatched, _ = score_continuation(model, context, continuation, max_length=4096)
    with kvaccel.patched(model, "streaming(budget=1.0)"):  # budget = all: nothing evicted
        full, _ = score_continuation(model, context, continuation, max_length=4096)
    with kvaccel.patched(model, "streaming(budget=16, sink=4)"):
        small, _ = score_continuation(model, context, continuation, max_length=4096)
        assert kvaccel.report(model)["seen_tokens"] == len(context) + len(continuation) - 1
    assert float(unpatched.sum()) == pytest.approx(stock, abs=1e-3)
    assert float(full.sum()) == pytest.approx(stock, abs=1e-3)
    assert abs(float(small.sum()) - stock) > 0.05  # the method changes the score
    with pytest.raises(ValueError, match="continuation"):
        score_continuation(model, context, [], max_length=4096)


@pytest.mark.parametrize("spec", ["streaming(budget=16)", "h2o(budget=16)", "keyformer(budget=16)",
                                  "snapkv(budget=0.1)+think(ratio=0.5)"])
def test_shared_context_is_prefilled_once_with_the_same_scores(spec):
    """Multiple choice: one prefill per context, each choice on its own copy = each request scored alone."""
    from kvaccel.evals.lm_eval_adapter import score_continuation, score_requests

    model = tiny_model("llama")
    g = torch.Generator().manual_seed(1)
    ctx_a, ctx_b = (torch.randint(3, 512, (n,), generator=g).tolist() for n in (300, 200))
    choices = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (1, 3, 4, 2)]
    requests = [(ctx_a, c) for c in choices] + [(ctx_b, c) for c in choices[:2]]
    with kvaccel.patched(model, spec):
        alone = [score_continuation(model, c, x, max_length=4096) for c, x in requests]
        calls = []
        hook = model.model.register_forward_pre_hook(lambda mod, args, kw: calls.append(1), with_kwargs=True)
        try:
            grouped = score_requests(model, requests, max_length=4096)
        finally:
            hook.remove()
    assert len(calls) == 2 + sum(len(x) > 1 for _, x in requests)  # 2 prefills + one forward per longer choice
    for (lp_a, gr_a), (lp_b, gr_b) in zip(alone, grouped, strict=True):
        torch.testing.assert_close(lp_b, lp_a, atol=1e-5, rtol=0)
        assert torch.equal(gr_a, gr_b)


@pytest.mark.real_model
def test_lm_eval_loglikelihood_moves_with_budget_and_unpatches(default_model):
    """The issue's acceptance: a loglikelihood request on a ~1k-token context, through lm-eval's API."""
    from lm_eval.api.instance import Instance

    from kvaccel.compare import prose
    from kvaccel.evals.lm_eval_adapter import hflm

    model, tok = default_model
    text = prose(6000)
    ids = tok(text, add_special_tokens=False)["input_ids"][:1000]
    context = tok.decode(ids) + "\n\nThe passage above is mostly about"
    req = [Instance(request_type="loglikelihood", doc={}, arguments=(context, " the Python language"), idx=0)]
    kvaccel.patch(model, "streaming(budget=64)")  # a previous patch: hflm must give it back
    try:
        with hflm(model, tok, method="snapkv(budget=32)") as lm:
            small = lm.loglikelihood(req)[0][0]
            assert kvaccel.report(model)["methods"]["evict"].startswith("snapkv(budget=32")
        assert kvaccel.report(model)["methods"]["evict"].startswith("streaming(budget=64")
    finally:
        kvaccel.unpatch(model)
    with hflm(model, tok, method="snapkv(budget=1.0)") as lm:
        full = lm.loglikelihood(req)[0][0]
    assert not kvaccel.is_patched(model)
    with hflm(model, tok) as lm:  # the stock model, lm-eval's own one-forward scoring
        stock = lm.loglikelihood(req)[0][0]
    assert full == pytest.approx(stock, abs=2e-3)
    assert abs(small - stock) > 0.05, (small, stock)


@pytest.mark.real_model
def test_lm_eval_local_task_on_patched_model(default_model, tmp_path, monkeypatch):
    from lm_eval import simple_evaluate

    from kvaccel.evals.lm_eval_adapter import hflm, task_manager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model, tok = default_model
    data = tmp_path / "data.jsonl"
    rows = [("The capital of France is", "Paris"), ("The largest planet of the solar system is", "Jupiter"),
            ("Water freezes at zero degrees", "Celsius")]
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows))
    (tmp_path / "kvaccel_local_qa.yaml").write_text(TASK.format(data=data))
    with hflm(model, tok, method="streaming(budget=4, sink=2)") as lm:
        res = simple_evaluate(model=lm, tasks=["kvaccel_local_qa"], log_samples=True,
                              task_manager=task_manager(tmp_path, ["kvaccel_local_qa"]))
        report = kvaccel.report(model)
    assert not kvaccel.is_patched(model)
    assert len(res["samples"]["kvaccel_local_qa"]) == 3
    assert report["methods"]["evict"].startswith("streaming(budget=4")
    assert report["seen_tokens"] > 4 and max(max(h) for h in report["kept_tokens"][0]) == 4  # evicted for real


MC_TASK = """task: kvaccel_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}\\nQuestion: which word was repeated?\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_cli_eval_runs_lm_eval_tasks_beside_builtin_ones(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from kvaccel.cli import app
    from kvaccel.evals.runner import read_results

    from conftest import tiny_saved_model

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model = tiny_saved_model(tmp_path / "tiny")
    words = ["apple", "river", "stone", "cloud"]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"context": " ".join([w] * 60 + words * 20), "choices": words,
                                        "label": i}) + "\n" for i, w in enumerate(words)))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "kvaccel_local_mc.yaml").write_text(MC_TASK.format(data=data))
    out = tmp_path / "run"
    args = ["eval", "--model", model, "--method", "streaming(budget=16)", "--tasks", "passkey", "--lengths", "96",
            "--samples", "1", "--new-tokens", "2", "--lm-eval", "kvaccel_local_mc",
            "--lm-eval-include", str(tmp_path / "tasks"), "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    rows = read_results(out / "results.jsonl")
    lm = [r for r in rows if r["task"] == "lm_eval:kvaccel_local_mc"]
    assert sorted((r["method"], r["sample"]) for r in lm) == sorted(
        (m, str(i)) for m in ("full", "streaming(budget=16)") for i in range(4))
    assert all(r["score"] in (0.0, 1.0) and r["metric"] == "acc" for r in lm)
    assert [r["kv_ratio"] < 0.5 for r in lm if r["method"] != "full"] == [True] * 4
    md = (out / "report.md").read_text()
    assert "| lm_eval:kvaccel_local_mc | 0 | 4 |" in md and "| passkey | 96 | 1 |" in md
    again = CliRunner().invoke(app, args)  # resumable: nothing recomputed
    assert again.exit_code == 0 and "0 computed" in " ".join(again.output.split())


def test_unknown_lm_eval_task_is_a_clear_error_before_loading(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from kvaccel.cli import app

    (tmp_path / "kvaccel_local_mc.yaml").write_text(MC_TASK.format(data=tmp_path / "none.jsonl"))
    monkeypatch.setattr(kvaccel, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    res = CliRunner().invoke(app, ["eval", "--tasks", "", "--lm-eval", "kvaccel_local_mcq", "--lm-eval-include",
                                   str(tmp_path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "unknown lm-eval task(s) 'kvaccel_local_mcq' (did you mean 'kvaccel_local_mc'?)" in " ".join(
        res.output.split())
