"""`kvaccel eval --ray local`: the grid's cells on Ray actors give the serial run's rows and tables."""

from __future__ import annotations

import sys

import pytest
from typer.testing import CliRunner

from kvaccel.cli import app
from kvaccel.evals.runner import read_results

from conftest import tiny_saved_model

SPEC = "streaming(budget=0.25)"
RESULT_KEYS = ("score", "prediction", "kl", "top1_agreement", "greedy_match", "kv_bytes", "kv_ratio", "prompt_tokens")


def test_missing_ray_says_how_to_install(monkeypatch, tmp_path):
    from kvaccel.evals import ray_sweep

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed, even where it is
    with pytest.raises(ImportError, match=r"pip install 'kvaccel\[ray\]'"):
        ray_sweep.run_eval_ray("local", None, [SPEC], ["passkey"], [128], 1, tmp_path)
    res = CliRunner().invoke(app, ["eval", "--ray", "local", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "kvaccel[ray]" in res.output  # before any model loads


def test_ray_local_equals_serial(tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is the optional extra kvaccel[ray]")
    model = tiny_saved_model(tmp_path / "tiny")
    args = ["eval", "--model", model, "--method", SPEC, "--tasks", "passkey,fidelity", "--lengths", "96",
            "--samples", "2", "--new-tokens", "4"]
    serial = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "serial")])
    assert serial.exit_code == 0, serial.output
    try:
        on_ray = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "ray"), "--ray", "local"])
        assert on_ray.exit_code == 0, on_ray.output
        assert ray.is_initialized()  # the cells really ran on the cluster
    finally:
        ray.shutdown()
    rows = {}
    for run in ("serial", "ray"):
        rows[run] = {(r["method"], r["task"], r["length"], r["sample"]): r
                     for r in read_results(tmp_path / run / "results.jsonl")}
    assert len(rows["serial"]) == 2 * 2 * 2 and rows["ray"].keys() == rows["serial"].keys()
    for key, r in rows["serial"].items():
        for k in RESULT_KEYS:
            if k in r:
                assert rows["ray"][key][k] == pytest.approx(r[k], abs=1e-6), (key, k)
    table = (tmp_path / "serial" / "report.md").read_text().split("## ")[1:4]  # accuracy, retention, fidelity
    assert table == (tmp_path / "ray" / "report.md").read_text().split("## ")[1:4]
    assert "8 computed, 0 reused" in " ".join(on_ray.output.split())

    # resumable: a second Ray run on the same directory computes nothing (no cluster needed)
    again = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "ray"), "--ray", "local"])
    assert again.exit_code == 0 and "0 computed, 8 reused" in " ".join(again.output.split())
    assert not ray.is_initialized()
