"""The speed/memory grid and the reports it feeds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kvaccel.evals.bench import RssSampler, percentile, run_bench, spread
from kvaccel.evals.report import write_reports

from conftest import tiny_model

SPEC = "streaming(budget=0.25)"


class CharTokenizer:
    eos_token_id = 2

    def __call__(self, text, return_tensors="pt", add_special_tokens=False):
        return {"input_ids": torch.tensor([[3 + (ord(c) % 256) for c in text]])}


KEYS = {"method", "length", "batch", "ttft_s", "ttft_p10", "ttft_p90", "tpot_s", "tpot_p10", "tpot_p90",
        "tokens_per_s", "rss_delta_mib", "rss_peak_mib", "kv_bytes", "kv_bytes_full", "kv_ratio", "prefill_speedup",
        "decode_speedup"}


def test_bench_grid_rows_and_reports(tmp_path):
    model = tiny_model("llama")
    rows = run_bench(model, CharTokenizer(), [SPEC], [96], [1, 2], new_tokens=3, repeats=2, warmup=1)
    assert [(r["method"], r["batch"]) for r in rows] == [("full", 1), (SPEC, 1), ("full", 2), (SPEC, 2)]
    for r in rows:
        assert KEYS <= set(r)
        assert r["ttft_s"] > 0 and r["tpot_s"] > 0 and r["tokens_per_s"] > 0 and r["kv_bytes"] > 0
        assert r["ttft_p10"] <= r["ttft_s"] <= r["ttft_p90"]
    full1, m1, full2 = rows[0], rows[1], rows[2]
    assert full1["prefill_speedup"] == 1.0 and full1["kv_ratio"] == 1.0
    assert m1["kv_bytes"] < full1["kv_bytes"] and full2["kv_bytes"] == 2 * full1["kv_bytes"]

    res = write_reports({"config": {"model": "tiny", "batches": [1, 2]}, "bench": rows}, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "Speed and memory" in md and f"| {SPEC} | 96 | 2 |" in md
    assert (tmp_path / "speedup_vs_length.png").stat().st_size > 1000
    assert (tmp_path / "memory_vs_length.png").stat().st_size > 1000
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "complete" == res["status"]


def test_bench_rejects_bad_grid():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="max_position_embeddings = 4096"):
        run_bench(model, CharTokenizer(), [SPEC], [4090], [1], new_tokens=32)
    with pytest.raises(ValueError, match="batch sizes"):
        run_bench(model, CharTokenizer(), [SPEC], [64], [0])


def test_spread_and_rss_sampler():
    assert percentile([1, 2, 3, 4, 5], 50) == 3 and percentile([0, 10], 10) == pytest.approx(1.0)
    s = spread([1.0, 2.0, 3.0, 4.0, 5.0])
    assert s["median"] == 3 and s["p10"] == pytest.approx(1.4) and s["p90"] == pytest.approx(4.6)
    with RssSampler() as mem:
        buf = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        del buf
    assert mem.delta > 32 * 2**20
