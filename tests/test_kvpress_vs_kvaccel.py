"""benchmarks/peers/kvpress_vs_kvaccel.py's KL protocol: ``--model`` reaches the loaders, one model per table."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

from kvaccel.compare import prose

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "peers" / "kvpress_vs_kvaccel.py"


@pytest.fixture(scope="module")
def script():
    return runpy.run_path(str(SCRIPT), run_name="not_main")


def run(script, monkeypatch, *argv: str) -> None:
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *argv])
    script["main"]()


class CharTokenizer:
    """Stands in for a model's tokenizer: records where it was loaded from; one id per character."""

    loaded: list[str] = []

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        cls.loaded.append(str(path))
        return cls()

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 1000 for c in text]}


def export(script, monkeypatch, tmp_path, *model: str) -> list[dict]:
    import transformers

    CharTokenizer.loaded = []
    monkeypatch.setattr(transformers, "AutoTokenizer", CharTokenizer)
    out = tmp_path / "prompts.jsonl"
    run(script, monkeypatch, "export-kl", "--out", str(out), "--samples", "2", "--context", "20", "--tokens", "4",
        *model)
    return [json.loads(line) for line in out.read_text().splitlines()]


def fake_fetched(tmp_path, monkeypatch, name: str = "qwen2.5-coder-1.5b") -> Path:
    """A de-quantized copy of an offline model in a temporary kvaccel cache dir (files present, not loadable)."""
    monkeypatch.setenv("KVACCEL_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "cache" / name
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"")
    return path


def test_export_kl_model_name_reaches_the_tokenizer(script, monkeypatch, tmp_path):
    path = fake_fetched(tmp_path, monkeypatch)
    rows = export(script, monkeypatch, tmp_path, "--model", "qwen2.5-coder-1.5b")
    assert CharTokenizer.loaded == [str(path)]
    assert [r["model"] for r in rows] == [str(path)] * 2
    text_ids = [ord(c) % 1000 for c in prose(400_000)]
    s0 = rows[0]["start"]
    assert rows[0]["context_ids"] == text_ids[s0:s0 + 20] and rows[0]["target_ids"] == text_ids[s0 + 20:s0 + 24]


def test_export_kl_model_directory_recorded_absolute(script, monkeypatch, tmp_path):
    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    rows = export(script, monkeypatch, tmp_path, "--model", "m")
    assert CharTokenizer.loaded == [str(tmp_path / "m")] and rows[0]["model"] == str(tmp_path / "m")


def test_export_kl_default_model_unchanged(script, monkeypatch, tmp_path):
    from kvaccel.models import default_model_path

    try:
        default = str(default_model_path())
    except FileNotFoundError as e:
        pytest.skip(str(e))
    rows = export(script, monkeypatch, tmp_path)
    assert CharTokenizer.loaded == [default] and rows[0]["model"] == default


def write_prompts(tmp_path, model: str) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"id": "prose-0", "start": 0, "context_ids": [1, 2], "target_ids": [3],
                                "model": model}) + "\n")
    return path


class Loaded(Exception):
    pass


def test_kl_model_reaches_the_loader(script, monkeypatch, tmp_path):
    import transformers

    def from_pretrained(path, **kwargs):
        raise Loaded(path)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    prompts = write_prompts(tmp_path, "/cache/qwen2.5-coder-1.5b")
    with pytest.raises(Loaded, match="^/cache/qwen2.5-coder-1.5b$"):
        run(script, monkeypatch, "kl", "--framework", "kvaccel", "--prompts", str(prompts), "--out",
            str(tmp_path / "out.jsonl"), "--model", "qwen2.5-coder-1.5b")


def test_kl_refuses_a_model_the_prompts_were_not_exported_for(script, monkeypatch, tmp_path):
    prompts = write_prompts(tmp_path, "/cache/SmolLM2-135M-Instruct")
    with pytest.raises(SystemExit, match="export-kl --model qwen2.5-coder-1.5b"):
        run(script, monkeypatch, "kl", "--framework", "kvaccel", "--prompts", str(prompts), "--out",
            str(tmp_path / "out.jsonl"), "--model", "qwen2.5-coder-1.5b")


def kl_row(method: str, kl: float, **model) -> dict:
    return {"framework": "kvaccel", "method": method, "budget": 0.25, "id": "prose-0", "kl": kl, "top1": 1.0,
            "kv_bytes_after_prefill": 1, "kv_bytes_full": 4, **model}


def test_kl_refuses_an_out_file_of_another_model(script, monkeypatch, tmp_path):
    prompts = write_prompts(tmp_path, "/cache/qwen2.5-coder-1.5b")
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps(kl_row("snapkv", 0.1)) + "\n")  # recorded before --model: the default model's
    with pytest.raises(SystemExit, match="SmolLM2-135M-Instruct"):
        run(script, monkeypatch, "kl", "--framework", "kvaccel", "--prompts", str(prompts), "--out", str(out))


def test_report_kl_refuses_rows_of_two_models(script, monkeypatch, tmp_path, capsys):
    a, b, legacy = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "legacy.jsonl"
    a.write_text(json.dumps(kl_row("snapkv", 0.1, model="qwen2.5-coder-1.5b")) + "\n")
    b.write_text(json.dumps(kl_row("snapkv", 0.3, model="SmolLM2-135M-Instruct")) + "\n")
    legacy.write_text(json.dumps(kl_row("tova", 0.2)) + "\n")
    with pytest.raises(SystemExit) as err:
        run(script, monkeypatch, "report-kl", str(a), str(b))
    assert f"qwen2.5-coder-1.5b in {a}" in str(err.value) and f"SmolLM2-135M-Instruct in {b}" in str(err.value)
    run(script, monkeypatch, "report-kl", str(b), str(legacy))  # rows without a model are the default model's
    table = capsys.readouterr().out
    assert table.startswith("model: SmolLM2-135M-Instruct\n")
    assert "| kvaccel | snapkv | 0.25 | 0.75 | 0.3000" in table and "| kvaccel | tova | 0.25 | 0.75 | 0.2000" in table
