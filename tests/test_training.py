"""Gate training on accelerate: loss goes down, resume equals an uninterrupted run, data loading, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from kvaccel.patches.prefill.seer_gate import SeerGate
from kvaccel.training import GATE_KINDS, load_texts, seer_kl, train_gate

from conftest import tiny_model


class CharTokenizer:
    """Offline stand-in for a HF tokenizer: one token per character."""

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        return {"input_ids": torch.tensor([[3 + ord(c) % 500 for c in text]])}


TEXTS = [("".join(chr(97 + (i * 7 + j * j) % 26) for j in range(300))) for i in range(4)]
ARGS = dict(data=TEXTS, seq_len=160, lr=3e-2, seed=1, progress=False, checkpoint_every=2)


def test_seer_kl_zero_at_target_and_ignores_first_quarter():
    n = 8
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    t = torch.rand(1, 2, n, n) * causal
    t = t / t.sum(-1, keepdim=True)
    logits = torch.log(t.clamp_min(1e-30)).masked_fill(~causal, -1e9)
    assert float(seer_kl(logits, t)) < 1e-5
    worse = logits.clone()
    worse[..., : n // 4, :] = 0.0  # rows of the first quarter do not count
    assert float(seer_kl(worse, t)) < 1e-5
    worse[..., -1, :] = 0.0
    assert float(seer_kl(worse, t)) > 1e-3


def test_loss_decreases_on_a_tiny_model(tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():  # peakier attention than the random init, so the target is not uniform
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
    args = {**ARGS, "data": TEXTS[:1], "lr": 1e-2}  # one sequence: the same target every step
    r = train_gate("seer", model, CharTokenizer(), steps=12, out=tmp_path, **args)
    assert r["losses"][-1] < 0.5 * r["losses"][0], r["losses"]
    assert all(not p.requires_grad for p in model.parameters())
    gate = SeerGate.load(tmp_path)
    gate.check_model(model)
    assert gate.meta["recipe"]["steps"] == 12 and gate.meta["recipe"]["final_loss"] == pytest.approx(r["final_loss"])
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert len(log["losses"]) == 12


def test_resume_equals_uninterrupted(tmp_path):
    model = tiny_model("qwen3")
    full = train_gate("seer", model, CharTokenizer(), steps=4, out=tmp_path / "full", grad_accum=2, **ARGS)
    train_gate("seer", model, CharTokenizer(), steps=2, out=tmp_path / "cut", grad_accum=2, **ARGS)
    resumed = train_gate("seer", model, CharTokenizer(), steps=4, out=tmp_path / "cut", grad_accum=2, resume=True,
                         **ARGS)
    assert resumed["losses"] == pytest.approx(full["losses"][2:], rel=1e-5)
    a, b = load_file(str(tmp_path / "full" / "gate.safetensors")), load_file(str(tmp_path / "cut" / "gate.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    fresh = SeerGate.for_model(model)
    assert not torch.allclose(fresh.state_dict()["layers.0.q_weight"], a["layers.0.q_weight"])


def test_load_texts_jsonl_and_dataset(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "hello"}) + "\n\n" + json.dumps({"text": "world"}) + "\n")
    assert load_texts(p) == ["hello", "world"]
    p.write_text('{"txt": 1}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:1: expected an object with a string field 'text'"):
        load_texts(p)
    with pytest.raises(ValueError, match="is not a file"):
        load_texts(tmp_path / "none.jsonl")
    datasets = pytest.importorskip("datasets")
    assert load_texts(datasets.Dataset.from_dict({"text": ["a", "b"]})) == ["a", "b"]
    with pytest.raises(ValueError, match="no 'text' column"):
        load_texts(datasets.Dataset.from_dict({"body": ["a"]}))


def test_bad_arguments(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"gate kind \('nope'\)"):
        train_gate("nope", model, CharTokenizer(), out=tmp_path)
    with pytest.raises(ValueError, match=r"steps \(0\)"):
        train_gate("seer", model, CharTokenizer(), steps=0, out=tmp_path)
    with pytest.raises(ValueError, match=r"no training text has seq_len \(10000\)"):
        train_gate("seer", model, CharTokenizer(), data=["short"], seq_len=10000, out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="checkpoint directory"):
        train_gate("seer", model, CharTokenizer(), data=TEXTS, seq_len=100, out=tmp_path, resume=True, progress=False)
    assert "seer" in GATE_KINDS


def test_cli_unknown_kind_fails_before_loading():
    from typer.testing import CliRunner

    from kvaccel.cli import app

    r = CliRunner().invoke(app, ["train-gate", "nope", "--steps", "1"])
    assert r.exit_code == 2
    assert "gate kind" in r.output


def test_attention_gate_resume_equals_uninterrupted(tmp_path):
    """The distill objective draws its prompt cut from the global RNG: a resumed run must draw the same cuts."""
    model = tiny_model("llama")
    args = {**ARGS, "lr": 2e-2, "recipe": dict(gate_dim=4, gate_window=8, window=4, sink=1, continuation=8)}
    full = train_gate("attention_gate", model, CharTokenizer(), steps=4, out=tmp_path / "full", **args)
    first = train_gate("attention_gate", model, CharTokenizer(), steps=2, out=tmp_path / "cut", **args)
    resumed = train_gate("attention_gate", model, CharTokenizer(), steps=4, out=tmp_path / "cut", resume=True, **args)
    assert resumed["recipe"]["objective"] == "distill"
    # the reported wall time covers both runs: this run's plus the first run's up to its checkpoint (its last step)
    assert first["wall_s"] == first["run_wall_s"]
    assert first["wall_s"] - 1.0 < resumed["wall_s"] - resumed["run_wall_s"] <= first["wall_s"]
    assert resumed["recipe"]["wall_s"] == round(resumed["wall_s"], 1)
    assert resumed["losses"] == pytest.approx(full["losses"][2:], rel=1e-5)
    a, b = load_file(str(tmp_path / "full" / "gate.safetensors")), load_file(str(tmp_path / "cut" / "gate.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
