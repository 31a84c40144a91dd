"""The README and docs/ say only what the repository backs: every file they cite exists, every benchmark script
they cite runs (``--help``) with the options they give it, every ``make`` target and ``kvaccel`` subcommand and option
exists, the README stays short, the plot script's figures are the ones docs/results.md states, and the README's
quick start runs from the repository root."""

from __future__ import annotations

import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT = 10_000
#: repository paths the docs may cite: under these folders, or these root files
REPO_DIRS = ("benchmarks", "docs", "tests", "kvaccel", "patches", "kernels", "evals")
ROOT_FILES = ("Makefile", "pyproject.toml", "requirements.lock", "README.md")
PATH_RE = re.compile(rf"(?<![\w./-])((?:{'|'.join(REPO_DIRS)})/[\w./-]*[\w/]|(?:{'|'.join(ROOT_FILES)})(?![\w.-]))")
FENCE_RE = re.compile(r"```(\w*)\n(.*?)```", re.S)


def _text(doc: Path) -> str:
    return doc.read_text(encoding="utf-8")


def _code(doc: Path) -> list[str]:
    """The doc's inline code spans and shell code blocks (not Python blocks), continuation lines joined."""
    text = _text(doc)
    blocks = [body for lang, body in FENCE_RE.findall(text) if lang in ("", "bash", "sh", "console")]
    spans = [s.replace("\n", " ") for s in re.findall(r"`([^`]+)`", FENCE_RE.sub("", text))]  # a span may wrap
    return [c.replace("\\\n", " ") for c in blocks + spans]


def _commands(doc: Path) -> list[list[str]]:
    """Every command line in the doc's shell code, as tokens from the program on (``OMP_NUM_THREADS=1`` and the
    like dropped); a ``#`` comment or ``|`` ends a command."""
    out = []
    for code in _code(doc):
        for line in code.splitlines():
            line = line.split(" #", 1)[0]
            if "kvaccel " not in line and "benchmarks/" not in line:
                continue
            try:
                tokens = shlex.split(line)
            except ValueError as e:
                raise AssertionError(f"{doc.name}: cannot split the command `{line}`: {e}") from None
            if "|" in tokens:
                tokens = tokens[: tokens.index("|")]
            while tokens and (re.fullmatch(r"[A-Z_]+=\S*", tokens[0]) or tokens[0] == "nice"):
                tokens = tokens[3:] if tokens[0] == "nice" else tokens[1:]  # env settings, `nice -n 5`
            if tokens:
                out.append(tokens)
    return out


def _script_calls(doc: Path) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """``(benchmarks/x.py, arguments)`` for every ``python benchmarks/x.py ...`` in the doc and ``(path, [])`` for a
    script cited alone; and the commands that run a script without ``python`` in front (they have no run bit)."""
    calls, errors = [], []
    for tokens in _commands(doc):
        for i, tok in enumerate(tokens):
            if tok.startswith("benchmarks/") and tok.endswith(".py"):
                if not (i > 0 and Path(tokens[i - 1]).name.startswith("python")) and len(tokens) > 1:
                    errors.append(f"{doc.name}: `{' '.join(tokens)}`: run it as `python {tok}` (no run bit)")
                calls.append((tok, tokens[i + 1 :]))
    return calls, errors


def _flags(args: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in args if a.startswith("--")}


#: run in one subprocess from the repository root: each script's ``--help`` as ``python script [sub] --help`` runs
#: it (its folder first on sys.path, run as __main__), so torch is imported once for all of them
_HELP_DRIVER = """
import contextlib, io, json, runpy, sys, traceback
out = {}
for script, sub in json.loads(sys.argv[1]):
    sys.argv = [script, *([sub] if sub else []), "--help"]
    sys.path.insert(0, script.rsplit("/", 1)[0])
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code or 0
    except BaseException:
        code = traceback.format_exc()
    sys.path.pop(0)
    out[script + " " + (sub or "")] = [code, buf.getvalue()]
print(json.dumps(out))
"""


def _helps(calls: list[tuple[str, str | None]]) -> dict[tuple[str, str | None], str]:
    """``--help`` output of each ``(script, subcommand)``; fails naming the scripts whose ``--help`` fails."""
    import json

    res = subprocess.run([sys.executable, "-c", _HELP_DRIVER, json.dumps(calls)], cwd=ROOT, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    failed = {k: code for k, (code, _) in got.items() if code != 0}
    assert not failed, "`python <script> --help` failed from the repository root:\n" + "\n".join(
        f"{k}: {v}" for k, v in failed.items())
    return {(s, sub): got[s + " " + (sub or "")][1] for s, sub in calls}


def _subcommands(help_text: str) -> set[str]:
    m = re.search(r"\{([\w,-]+)\}", help_text)
    return set(m.group(1).split(",")) if m else set()


def _has_anchor(text: str, anchor: str) -> bool:
    slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", text, re.M)}
    return f'id="{anchor}"' in text or anchor in slugs


def test_readme_is_short():
    n = len(_text(ROOT / "README.md"))
    assert n <= README_LIMIT, f"README.md has {n} characters (at most {README_LIMIT}); move detail to docs/"


def test_cited_repository_files_exist():
    missing = []
    for doc in DOCS:
        text = _text(doc)
        cited = set(PATH_RE.findall(" ".join(_code(doc))))
        # markdown links and images, relative to the doc (anchors and web links left out)
        links = [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t]
        cited |= {str((doc.parent / t.split("#")[0]).resolve().relative_to(ROOT)) for t in links if t[0] != "#"}
        for t in links:  # an anchor must be an `<a id=...>` or a heading of its document
            target, _, anchor = t.partition("#")
            target_doc = (doc.parent / target).resolve() if target else doc
            if anchor and target_doc.is_file() and not _has_anchor(_text(target_doc), anchor):
                missing.append(f"{doc.relative_to(ROOT)}: {t} (no such anchor)")
        for path in sorted(cited):
            p = ROOT / path.rstrip("/")
            if not (p.exists() or p.with_suffix(".py").exists()):  # `kernels/decode_attention` names a module
                missing.append(f"{doc.relative_to(ROOT)}: {path}")
    assert not missing, "cited but not in the repository:\n" + "\n".join(missing)


def test_cited_benchmark_scripts_run_with_the_options_the_docs_give():
    calls = [c for doc in DOCS for c in _script_calls(doc)[0]]
    assert calls, "the docs cite no benchmark command"
    not_runnable = [e for doc in DOCS for e in _script_calls(doc)[1]]
    assert not not_runnable, "commands that cannot run as written:\n" + "\n".join(not_runnable)
    calls = [(s, a) for s, a in calls if (ROOT / s).is_file()]  # a missing one fails test_cited_repository_files_exist
    scripts = sorted({s for s, _ in calls})
    argparse_scripts = [s for s in scripts if "argparse" in (ROOT / s).read_text()]
    top = _helps([(s, None) for s in argparse_scripts])
    subs = sorted({(s, a[0]) for s, a in calls if s in argparse_scripts and a and a[0] in _subcommands(top[s, None])})
    helps = {**top, **_helps(subs)} if subs else top
    bad = []
    for script, args in calls:
        if script not in argparse_scripts:  # positional arguments only: it must import without running
            assert not _flags(args), f"{script} takes no options, the docs give it {_flags(args)}"
            runpy.run_path(str(ROOT / script), run_name="not_main")
            continue
        sub = args[0] if args and (script, args[0]) in helps else None
        known = set(re.findall(r"--[\w-]+", helps[script, sub]))
        bad += [f"python {script} {' '.join(args)}: {f}" for f in sorted(_flags(args) - known)]
    assert not bad, "options the scripts do not have:\n" + "\n".join(bad)


def test_cited_kvaccel_subcommands_and_options_exist():
    import typer.main

    from kvaccel.cli import app

    res = subprocess.run([sys.executable, "-c", "from kvaccel.cli import app; app()", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    commands = typer.main.get_command(app).commands
    bad, seen = [], 0
    for doc in DOCS:
        for tokens in _commands(doc):
            if Path(tokens[0]).name != "kvaccel":
                continue
            seen += 1
            sub = tokens[1] if len(tokens) > 1 else None
            if sub not in commands:
                bad.append(f"{doc.name}: `{' '.join(tokens)}`: no subcommand '{sub}' (have {sorted(commands)})")
                continue
            assert sub in res.stdout
            known = {o for p in commands[sub].params for o in (*p.opts, *p.secondary_opts)}
            bad += [f"{doc.name}: `kvaccel {sub}` has no option {f}" for f in sorted(_flags(tokens[2:]) - known)]
    assert seen, "the docs cite no kvaccel command"
    assert not bad, "\n".join(bad)


def test_cited_make_targets_exist():
    targets = set(re.findall(r"^([\w-]+)\s*:", (ROOT / "Makefile").read_text(), re.M))
    cited = {(doc.name, t) for doc in DOCS for c in _code(doc) for t in re.findall(r"\bmake ([\w-]+)", c)}
    assert cited, "the docs cite no make target"
    missing = sorted(f"{d}: make {t}" for d, t in cited if t not in targets)
    assert not missing, f"not a Makefile target: {missing}"


def test_plot_data_is_what_results_states():
    """Every figure benchmarks/plot_results.py draws appears, as written, in docs/results.md."""
    results = _text(ROOT / "docs" / "results.md")
    data = runpy.run_path(str(ROOT / "benchmarks" / "plot_results.py"), run_name="not_main")

    def strings(x):
        if isinstance(x, str):
            yield x
        elif isinstance(x, dict):
            for v in x.values():
                yield from strings(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                yield from strings(v)

    figures = [s for name in ("KL_PROTOCOL", "GATE_FIDELITY", "PREFILL_OPERATOR", "TTFT_8K", "DECODE")
               for s in strings(data[name]) if re.fullmatch(r"[\d.]+", s)]
    assert len(figures) > 30
    missing = [f for f in figures if not re.search(rf"(?<![\d.]){re.escape(f)}(?![\d])", results)]
    assert not missing, f"plot figures not in docs/results.md: {missing}"
    for png in ("fidelity_kl.png", "prefill_speedup.png", "decode_speedup.png"):
        assert f"]({png})" in results, f"docs/results.md does not show {png}"


@pytest.mark.real_model
def test_readme_quick_start_runs_from_the_repository_root():
    from kvaccel.models import default_gguf_path

    try:
        default_gguf_path()
    except FileNotFoundError as e:  # as the default_model fixture: a dev machine without the model skips loudly
        pytest.skip(str(e))
    (code,) = [body for lang, body in FENCE_RE.findall(_text(ROOT / "README.md")) if lang == "python"]
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    ratio = float(res.stdout.strip().splitlines()[-1])  # the snippet prints kv_ratio last
    assert 0.1 < ratio < 0.3, f"snapkv(0.25)+think(0.4) should hold about 0.2 of the full cache, got {ratio}"
