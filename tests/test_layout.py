"""The checkout never shadows a dependency: run from the repository root, `kernels` is Hugging Face's package and
kvaccel's own kernels are reachable only as `kvaccel.kernels` (DESIGN.md section 1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _run_in_root(code: str) -> subprocess.CompletedProcess:
    """``python -c code`` with the repository root as the working directory (so it is first on ``sys.path``)."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_only_kvaccel_is_a_regular_package_at_the_root():
    regular = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert regular == ["kvaccel"], (
        f"{regular}: a top-level folder with __init__.py shadows any installed package of that name from the root; "
        "map it into kvaccel through a link instead (kvaccel/kernels -> ../kernels)")


def test_layout_folders_are_linked_into_the_package():
    for name in ("kernels", "patches", "evals"):
        link = ROOT / "kvaccel" / name
        assert link.is_symlink() and link.resolve() == (ROOT / name).resolve(), f"kvaccel/{name} must link to {name}/"


def test_importing_from_the_root_finds_the_installed_kernels_package():
    code = (
        "import kernels, transformers\n"
        "from transformers import LlamaForCausalLM\n"
        "import kvaccel.kernels.block_sparse_attention as bsa, kvaccel.patches.attention, kvaccel.evals.runner\n"
        "print(kernels.__file__)\n"
        "print(bsa.__file__)\n"
    )
    done = _run_in_root(code)
    assert done.returncode == 0, done.stderr
    hf_kernels, ours = done.stdout.split()
    assert Path(hf_kernels).resolve().parent != (ROOT / "kernels").resolve(), f"the checkout's `kernels`: {hf_kernels}"
    assert Path(ours).resolve() == (ROOT / "kernels" / "block_sparse_attention.py").resolve()


@pytest.mark.real_model
def test_readme_quick_start_runs_from_the_root():
    done = _run_in_root("import kvaccel; model, tok = kvaccel.load_model(); print(type(model).__name__)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "LlamaForCausalLM"


def _lock(path: Path = ROOT / "requirements.lock") -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_lock_pins_every_dependency_within_the_declared_ranges():
    """`make test` installs requirements.lock, then kvaccel with --no-deps: the lock must hold every requirement of
    pyproject (extras included) at a version its range allows."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [r for extra in ("dev", "eval", "ray", "retrieval")
                                          for r in project["optional-dependencies"][extra]]
    pins = _lock()
    for text in declared:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is required by pyproject but not pinned in requirements.lock: make lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"lock pins {name}=={pins[name]}, outside {req}"


def test_lock_matches_the_environment_the_suite_runs_in():
    """The suite runs in the environment `make test` built from the lock: every pin is what is installed (`make
    upgrade` runs the suite on the new versions with KVACCEL_LOCK naming the lock it is about to write)."""
    from importlib.metadata import PackageNotFoundError, version

    for name, pinned in _lock(Path(os.environ.get("KVACCEL_LOCK", ROOT / "requirements.lock"))).items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            pytest.fail(f"{name}=={pinned} is in requirements.lock but not installed: make install")
        assert installed.split("+")[0] == pinned, f"{name}: installed {installed}, locked {pinned} (make install)"
