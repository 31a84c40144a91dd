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
