"""Cold compile cost of retrieval's numba kernels: CPU seconds per kernel in a fresh process with an empty
``NUMBA_CACHE_DIR``, for the working tree and, side by side, for earlier git revisions.

Each measurement is a new process (``--child``) with its own empty cache directory. It imports the index module
(numba included: ``import``), then runs the calls a decode step of the exact path makes, in the order
:func:`~kvaccel.kernels.attention_index.compile_kernels` makes them, on a tiny index: ``scan_rows`` with the bfloat16
margin (``_select_rescore_bf16`` and what it calls), ``attend_union_groups`` (``_attend_union_groups``), ``scan_rows``
in float32 (``_select_rows``; callees compiled by an earlier step are not counted again). Per step: process CPU time
(``time.process_time``). Three more fresh processes per tree time what retrieval's background compile runs:
``compile_kernels(("exact",), scan_bf16=...)`` with the bfloat16 scan (the default where oneDNN has native bfloat16)
and with the float32 scan, and ``compile_kernels(("graph",))`` (the graph path, past ``exact_below``). ``--rev``
revisions are extracted with ``git archive`` into a temporary directory put first on ``sys.path``; the processes of
the revisions alternate, ``--repeat`` rounds, and the minimum per step is reported with the load average.

    nice -n 10 .venv/bin/python benchmarks/retrieval_compile.py --rev HEAD --repeat 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("import", "select_rescore_bf16", "attend_union_groups", "select_rows")
PATHS = ("exact_bf16", "exact_f32", "graph")


def child(what: str) -> None:
    """One fresh process: CPU seconds of each step (``what="steps"``) or of ``compile_kernels`` for one exact path
    (prints a JSON line)."""
    t = time.process_time()
    import numpy as np
    import torch

    torch.matmul(torch.ones(2, 2, dtype=torch.bfloat16), torch.ones(2, 2, dtype=torch.bfloat16))  # oneDNN's start
    out = {"torch": time.process_time() - t}
    t = time.process_time()
    from kvaccel.kernels import attention_index as ai

    out["import"] = time.process_time() - t
    out["file"] = ai.__file__
    if what in PATHS:
        t = time.process_time()
        ai.compile_kernels(("graph",) if what == "graph" else ("exact",), scan_bf16=what == "exact_bf16")
        out[what] = time.process_time() - t
        print(json.dumps(out))
        return
    rng = np.random.default_rng(0)
    rows, G, D, n, k = 2, 2, 8, 48, 4
    index = ai.AttentionIndex(rows, D, D)
    index.store([rng.standard_normal((n, D), dtype=np.float32) for _ in range(rows)],
                [rng.standard_normal((n, D), dtype=np.float32) for _ in range(rows)],
                [np.arange(n, dtype=np.int64) for _ in range(rows)])
    q = rng.standard_normal((rows, G, D), dtype=np.float32)
    static = rng.standard_normal((rows, 4, D), dtype=np.float32)
    t = time.process_time()
    ids, scores = index.scan_rows(q, k, k)
    out["select_rescore_bf16"] = time.process_time() - t
    t = time.process_time()
    index.attend_union_groups(ids, scores, 0.5, q, static, static, np.ones((rows, 4), np.bool_))
    out["attend_union_groups"] = time.process_time() - t
    t = time.process_time()
    index.scan_rows(q, k, None)
    out["select_rows"] = time.process_time() - t
    print(json.dumps(out))


def run(tree: str | None, what: str) -> dict:
    """One child process (``what``: see :func:`child`) over ``tree`` (a source tree put first on ``sys.path``;
    ``None`` = the installed package) with an empty cache directory."""
    with tempfile.TemporaryDirectory(prefix="kvaccel-compile-") as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        if tree is not None:
            env["PYTHONPATH"] = tree + os.pathsep + env.get("PYTHONPATH", "")
        res = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", what], env=env, check=True,
                             capture_output=True, text=True, cwd=tree or ROOT)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", choices=("steps", *PATHS), help=argparse.SUPPRESS)
    ap.add_argument("--rev", action="append", default=[], help="git revision to compare with the working tree")
    ap.add_argument("--repeat", type=int, default=1, help="rounds (fresh processes each)")
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    with tempfile.TemporaryDirectory(prefix="kvaccel-revs-") as tmp:
        trees: dict[str, str | None] = {"working tree": None}
        for rev in args.rev:
            path = os.path.join(tmp, rev.replace("/", "_"))
            os.makedirs(path)
            archive = subprocess.run(["git", "archive", rev, "kvaccel", "kernels", "patches", "evals"], cwd=ROOT,
                                     check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", path], input=archive, check=True)
            trees[rev] = path
        best: dict[str, dict[str, float]] = {}
        for _ in range(args.repeat):
            for name, tree in trees.items():
                for what in ("steps", *PATHS):
                    got = run(tree, what)
                    if tree is not None and not got["file"].startswith(tree):
                        raise RuntimeError(f"{name}: imported {got['file']}, not the extracted tree {tree}")
                    mine = best.setdefault(name, {})
                    for step in (*STEPS, *PATHS):
                        if step in got:
                            mine[step] = min(mine.get(step, float("inf")), got[step])
    print(f"load average {os.getloadavg()[0]:.2f}, min of {args.repeat} fresh process(es), CPU seconds")
    cols = (*STEPS, *(f"compile_kernels {p}" for p in PATHS))
    print("| tree | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, mine in best.items():
        print(f"| {name} | " + " | ".join(f"{mine[s]:.2f}" for s in (*STEPS, *PATHS)) + " |")


if __name__ == "__main__":
    main()
