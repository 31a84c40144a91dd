"""lm-eval on a patched model, from a local task file (no hub access)."""

from __future__ import annotations

import json

import pytest

import kvaccel

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is the optional extra kvaccel[eval]")
pytestmark = pytest.mark.real_model

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


def test_lm_eval_local_task_on_patched_model(default_model, tmp_path, monkeypatch):
    from kvaccel.evals.lm_eval_adapter import run_lm_eval

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model, tok = default_model
    data = tmp_path / "data.jsonl"
    rows = [("The capital of France is", "Paris"), ("The largest planet of the solar system is", "Jupiter"),
            ("Water freezes at zero degrees", "Celsius")]
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows))
    (tmp_path / "kvaccel_local_qa.yaml").write_text(TASK.format(data=data))
    try:
        res = run_lm_eval(model, tok, ["kvaccel_local_qa"], method="streaming(budget=4, sink=2)",
                          include_path=str(tmp_path), log_samples=True)
        report = kvaccel.report(model)
    finally:
        kvaccel.unpatch(model)
    out = res["results"]["kvaccel_local_qa"]
    assert 0.0 <= out["exact_match,none"] <= 1.0
    assert len(res["samples"]["kvaccel_local_qa"]) == 3
    assert report["methods"] == {"evict": "streaming(budget=4,sink=2)"}
    assert report["seen_tokens"] > 4 and max(max(h) for h in report["kept_tokens"][0]) == 4  # evicted for real
