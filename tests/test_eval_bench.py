"""The speed/memory grid and the reports it feeds."""

from __future__ import annotations

import json
import mmap
import statistics
import time

import pytest
import torch

from kvaccel.api import is_patched
from kvaccel.compare import compare
from kvaccel.evals import loop
from kvaccel.evals.bench import RssSampler, percentile, run_bench, spread
from kvaccel.evals.report import write_reports
from kvaccel.evals.runner import run_eval

from conftest import tiny_model

SPEC = "streaming(budget=0.25)"


class CharTokenizer:
    eos_token_id = 2

    def __call__(self, text, return_tensors="pt", add_special_tokens=False):
        ids = ([1] if add_special_tokens else []) + [3 + (ord(c) % 256) for c in text]
        return {"input_ids": torch.tensor([ids])}


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
    # what the method did, as eval rows record it: an eviction's prefill is dense; full has no method
    assert "path" not in full1 and m1["path"]["prefill_density"] == 1.0 and m1["path"]["notes"] == []

    res = write_reports({"config": {"model": "tiny", "batches": [1, 2]}, "bench": rows}, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "Speed and memory" in md and f"| {SPEC} | 96 | 2 |" in md
    assert next(ln for ln in md.splitlines() if ln.startswith(f"| {SPEC} | 96 | 2 |")).endswith("| 1.000 |")
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
        # 64 MiB of fresh anonymous pages, all touched (not the allocator's recycled, already-resident memory)
        buf = mmap.mmap(-1, 64 * 2**20)
        buf.write(b"\x01" * (64 * 2**20))
        deadline = time.monotonic() + 10.0  # give the sampling thread time to run on a loaded machine
        while mem.peak - mem.start <= 32 * 2**20 and time.monotonic() < deadline:
            time.sleep(0.01)
        buf.close()
    assert mem.delta > 32 * 2**20


class FakeClock:
    """A clock that only moves inside model forwards: ``unit`` per input token, half that when patched.

    With it the bench's bookkeeping is checked exactly, independently of machine noise: prefill of L tokens costs
    L units (L/2 patched), every decode step 1 unit (1/2 patched), so both speedups must be exactly 2.
    """

    def __init__(self, model, unit: float = 1e-3):
        self.now, self.unit, self.model = 100.0, unit, model
        self.handle = model.register_forward_pre_hook(self._tick, with_kwargs=True)

    def _tick(self, module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        self.now += ids.numel() * self.unit * (0.5 if is_patched(self.model) else 1.0)

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake_clock(monkeypatch):
    model = tiny_model("llama")
    clock = FakeClock(model)
    monkeypatch.setattr(loop, "_clock", clock)
    yield model, clock
    clock.handle.remove()


def test_bench_ratios_match_independently_timed_runs(fake_clock):
    model, clock = fake_clock
    rows = run_bench(model, CharTokenizer(), [SPEC], [64], [1, 2], new_tokens=5, repeats=3, warmup=1,
                     with_fidelity=False)
    by = {(r["method"], r["batch"]): r for r in rows}
    for batch in (1, 2):
        full, meth = by[("full", batch)], by[(SPEC, batch)]
        # the clock's cost model, computed here by hand
        assert full["ttft_s"] == pytest.approx(64 * batch * clock.unit)
        assert meth["ttft_s"] == pytest.approx(32 * batch * clock.unit)
        assert full["tpot_s"] == pytest.approx(batch * clock.unit) and meth["tpot_s"] == pytest.approx(
            batch * clock.unit / 2)
        assert meth["prefill_speedup"] == pytest.approx(2.0) and meth["decode_speedup"] == pytest.approx(2.0)
        assert full["tokens_per_s"] == pytest.approx(1 / clock.unit)
        for r in (full, meth):  # the medians and ratios are those of the raw timed runs
            assert len(r["ttft_runs"]) == len(r["tpot_runs"]) == 3
            assert r["ttft_s"] == statistics.median(r["ttft_runs"])
            assert r["prefill_speedup"] == pytest.approx(statistics.median(full["ttft_runs"]) / r["ttft_s"])
            assert r["decode_speedup"] == pytest.approx(statistics.median(full["tpot_runs"]) / r["tpot_s"])


def test_compare_ratios_match_independently_timed_runs(fake_clock):
    model, clock = fake_clock
    rows = compare(model, CharTokenizer(), [SPEC], length=64, new_tokens=5, repeats=2)
    full, meth = rows
    assert full["method"] == "full (stock)" and meth["method"] == SPEC
    assert full["prefill_s"] == pytest.approx(64 * clock.unit) and meth["prefill_s"] == pytest.approx(32 * clock.unit)
    assert full["decode_tok_s"] == pytest.approx(1 / clock.unit)
    assert meth["prefill_speedup"] == pytest.approx(2.0) and meth["decode_speedup"] == pytest.approx(2.0)


def test_compare_bench_and_eval_agree_on_fidelity(tmp_path):
    """One prompt (prose from pydoc_data, 160 tokens), one method, N = 6: the three front ends report the same
    fidelity numbers; the method's free greedy tokens in compare follow full's exactly for greedy_prefix tokens."""
    model, tok, n = tiny_model("llama"), CharTokenizer(), 6
    spec = "streaming(budget=32)"
    c_full, c_meth = compare(model, tok, [spec], length=160, new_tokens=n, repeats=1)
    b_rows = run_bench(model, tok, [spec], [160], [1, 2], new_tokens=n, repeats=1, warmup=0)
    e_rows = run_eval(model, tok, [spec], ["fidelity"], [160], 1, tmp_path, progress=False, write=False,
                      fidelity_tokens=n)["rows"]
    e_meth = next(r for r in e_rows if r["method"] == spec)
    assert c_meth["next_token_kl"] > 1e-4  # the method really changes the logits: the comparison is not vacuous
    for b in (r for r in b_rows if r["method"] == spec):
        for key in ("kl", "kl_max", "top1_agreement", "greedy_match", "greedy_prefix"):
            c_val = c_meth["next_token_kl" if key == "kl" else key]
            assert b[key] == pytest.approx(c_val, rel=1e-9, abs=1e-12) == e_meth[key], key
    assert c_full["next_token_kl"] == 0 and c_full["greedy_match"] == 1.0
    k = c_meth["greedy_prefix"]
    assert c_meth["tokens"][:k] == c_full["tokens"][:k]
    if k < n:
        assert c_meth["tokens"][k] != c_full["tokens"][k]
