"""--device / --dtype on the CLI: a bf16 model runs end to end; bad values are clear errors before loading."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import kvaccel
from kvaccel.cli import app

from conftest import tiny_saved_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return tiny_saved_model(tmp_path_factory.mktemp("tiny"))


def test_generate_bf16_runs_and_loads_in_bf16(saved, monkeypatch):
    loaded = []
    real_load = kvaccel.load_model

    def spy(*args, **kwargs):
        model, tok = real_load(*args, **kwargs)
        loaded.append(model)
        return model, tok

    monkeypatch.setattr(kvaccel, "load_model", spy)
    res = CliRunner().invoke(app, ["generate", "--model", saved, "--prompt", "the cat sat on the mat " * 8,
                                   "--dtype", "bfloat16", "--device", "cpu", "--method", "streaming(budget=8)",
                                   "--max-new-tokens", "6"])
    assert res.exit_code == 0, res.output
    assert loaded[0].dtype == torch.bfloat16
    assert "kv" in res.output and "nothing was evicted" not in res.output


@pytest.mark.parametrize("command", ["generate", "compare", "eval", "bench"])
def test_bad_dtype_and_device_fail_before_loading(command, monkeypatch):
    monkeypatch.setattr(kvaccel, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    extra = ["--prompt", "x"] if command == "generate" else []
    res = CliRunner().invoke(app, [command, *extra, "--dtype", "int8"])
    assert res.exit_code == 2 and "--dtype 'int8'" in res.output
    res = CliRunner().invoke(app, [command, *extra, "--device", "gpu0"])
    assert res.exit_code == 2 and "--device 'gpu0'" in res.output
    if not torch.cuda.is_available():
        res = CliRunner().invoke(app, [command, *extra, "--device", "cuda"])
        assert res.exit_code == 2 and "CUDA is not available" in res.output


def test_eval_and_bench_bf16_on_tiny_model(saved, tmp_path):
    res = CliRunner().invoke(app, ["eval", "--model", saved, "--dtype", "bfloat16", "--method", "streaming(budget=16)",
                                   "--tasks", "passkey,fidelity", "--lengths", "96", "--samples", "1",
                                   "--new-tokens", "2", "--out", str(tmp_path / "eval")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["bench", "--model", saved, "--dtype", "bfloat16", "--method",
                                   "streaming(budget=16)", "--lengths", "64", "--new-tokens", "3", "--repeats", "1",
                                   "--warmup", "0", "--out", str(tmp_path / "bench")])
    assert res.exit_code == 0, res.output
    assert '"dtype": "bfloat16"' in (tmp_path / "bench" / "results.json").read_text()


def test_bench_no_fidelity_skips_the_fidelity_phase(saved, tmp_path):
    args = ["bench", "--model", saved, "--method", "streaming(budget=16)", "--lengths", "64", "--new-tokens", "3",
            "--repeats", "1", "--warmup", "0"]
    rows = {}
    for flag in ("--fidelity", "--no-fidelity"):
        res = CliRunner().invoke(app, [*args, flag, "--out", str(tmp_path / flag)])
        assert res.exit_code == 0, res.output
        data = json.loads((tmp_path / flag / "results.json").read_text())
        assert data["config"]["fidelity"] is (flag == "--fidelity")
        rows[flag] = {r["method"]: r for r in data["bench"]}
    assert rows["--fidelity"]["streaming(budget=16)"]["kl"] >= 0
    assert all("kl" not in r and r["ttft_s"] > 0 for r in rows["--no-fidelity"].values())
