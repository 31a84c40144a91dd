"""The kvaccel command line."""

from __future__ import annotations

from typer.testing import CliRunner

from kvaccel.cli import app

runner = CliRunner()


def test_methods_lists_registered_methods():
    res = runner.invoke(app, ["methods"])
    assert res.exit_code == 0, res.output
    assert "streaming" in res.output and "evict" in res.output


def test_generate_rejects_bad_spec_before_loading():
    res = runner.invoke(app, ["generate", "--prompt", "hi", "--method", "streamng(budget=3)"])
    assert res.exit_code == 2
    assert "Did you mean 'streaming'" in res.output
    res = runner.invoke(app, ["generate", "--prompt", "hi", "--method", "streaming(budget=0)"])
    assert res.exit_code == 2 and "budget (0) must be >= 1" in res.output
    res = runner.invoke(app, ["generate"])
    assert res.exit_code == 2 and "exactly one of --prompt or --file" in res.output


def test_compare_table_on_a_tiny_saved_model(tmp_path):
    """`kvaccel compare` (the demo's front end): its options and every column of its table."""
    from conftest import tiny_saved_model

    path = tiny_saved_model(tmp_path / "tiny")
    res = runner.invoke(app, ["compare", "--model", path, "--method", "streaming(budget=16)", "--length", "64",
                              "--new-tokens", "3", "--repeats", "1", "--device", "cpu", "--dtype", "float32"],
                        env={"COLUMNS": "220"})  # wide enough for one header line
    assert res.exit_code == 0, res.output
    header = next(line for line in res.output.splitlines() if "method" in line and "┃" in line)
    assert [c.strip() for c in header.split("┃")[1:-1]] == [
        "method", "prefill s", "prefill x", "decode tok/s", "decode x", "KV MiB", "KV / full", "KL (mean/step)",
        "top-1 agree", "greedy match"]
    full = next(line for line in res.output.splitlines() if "full (stock)" in line)
    cells = [c.strip() for c in full.split("│")[1:-1]]
    assert cells[0] == "full (stock)" and cells[2] == "1.00" and cells[4] == "1.00" and cells[6] == "1.000"
    assert cells[7] == "0.00e+00" and cells[8] == "1.00" and cells[9] == "1.00"
    row = next(line for line in res.output.splitlines() if "streaming" in line)
    assert float([c.strip() for c in row.split("│")[1:-1]][6]) < 0.5  # 16 of 64 tokens kept
