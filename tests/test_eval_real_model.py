"""Full attention answers the harness's own passkey and NIAH prompts on the real default model (SmolLM2-135M).

1024 tokens, one sample of each task (2 runs, ~25 s on a quiet core), through ``run_eval``: the prompts, the
question-after-compression split and the greedy loop every method is scored with. SmolLM2-135M-Instruct answers
both tasks at 1k (checked: 2 samples of each, 4/4); if this fails, the harness is broken, not a method.
"""

from __future__ import annotations

import pytest

from kvaccel.evals.runner import run_eval


@pytest.mark.real_model
def test_full_attention_answers_passkey_and_niah(default_model, tmp_path):
    model, tok = default_model
    res = run_eval(model, tok, [], ["passkey", "niah_single"], [1024], 1, tmp_path, progress=False, write=False)
    rows = res["rows"]
    assert sorted((r["task"], r["sample"]) for r in rows) == [
        ("niah_single", "niah_single-1024-0000"), ("passkey", "passkey-1024-0000")]
    for r in rows:
        assert r["method"] == "full" and abs(r["prompt_tokens"] - 1024) <= 25, r
        assert r["score"] == 1.0, (r["task"], r["prediction"], r["answers"])
        assert r["answers"][0] in r["prediction"]
