"""Warm per-call time of retrieval's compiled selection and attention kernels, a git revision's version against the
working tree's, side by side in one process.

The revision's ``kernels/attention_index_{scan,heap,attend}.py`` are read with ``git show`` into temporary modules
(they import the working tree's helpers they name, e.g. ``_dot``); both versions run on the same inputs, the shapes of
the default model (SmolLM2-135M) at 8k: 3 kv heads x 3 query heads, 7,400 host keys per row (clustered synthetic
keys, D=64), top-100 with the bfloat16 margin of 16, 640 static keys; ``_write_results`` on a graph walk's heap of
128 results. Outputs are checked equal first. Per kernel and thread count (numba's), calls alternate between the two
versions in blocks; reported: min / median microseconds per call, thread CPU time at 1 thread, wall clock at 2.

    NUMBA_CACHE_DIR=$(mktemp -d) nice -n 10 .venv/bin/python benchmarks/retrieval_kernels_warm.py --rev 4274071
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import tempfile
import time

import numba
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_rev(rev: str, path: str, name: str, tmp: str):
    """``path`` as of git revision ``rev``, imported as module ``name``."""
    src = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    file = os.path.join(tmp, name + ".py")
    with open(file, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(name, file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", default="HEAD", help="git revision to compare with the working tree")
    ap.add_argument("--calls", type=int, default=3000, help="calls per version, kernel and thread count")
    args = ap.parse_args()
    from kvaccel.kernels import attention_index_attend, attention_index_heap, attention_index_scan

    tmp = tempfile.mkdtemp(prefix="kvaccel-rev-")
    old = {m: load_rev(args.rev, f"kernels/attention_index_{m}.py", f"rev_{m}", tmp)
           for m in ("scan", "heap", "attend")}
    new = {"scan": attention_index_scan, "heap": attention_index_heap, "attend": attention_index_attend}
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    R, M, D, n, k, kc, T = 3, 3, 64, 7400, 100, 116, 640
    centers = rng.standard_normal((40, D)).astype(np.float32) * 2
    keys = np.zeros((R, 8192, D), np.float32)
    for r in range(R):
        keys[r, :n] = centers[rng.integers(0, 40, n)] + rng.standard_normal((n, D))
    qs = (centers[rng.integers(0, 40, (R, M))] * 1.5 + rng.standard_normal((R, M, D))).astype(np.float32)
    held = np.full(R, n, np.int64)
    f32 = np.einsum("rmd,rjd->rmj", qs, keys).astype(np.float32)  # slots past n are ignored
    bits = torch.from_numpy(f32).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    skeys = rng.standard_normal((R, T, D)).astype(np.float32)
    svalid = np.ones((R, T), np.bool_)
    ids = np.stack([rng.permutation(n)[:k] for _ in range(R * M)]).reshape(R, M, k).astype(np.int64)
    scores = (rng.standard_normal((R, M, k)) * 3).astype(np.float32)
    rows = np.repeat(np.arange(R), M).astype(np.int64)
    heap_s, heap_i = -rng.standard_normal(129).astype(np.float32), rng.permutation(129).astype(np.int64)
    scale = np.float32(D ** -0.5)

    def cases(mods: dict) -> dict:
        """kernel -> (call, its output arrays), fresh outputs per version."""
        sel = (np.empty((R, M, k), np.int64), np.empty((R, M, k), np.float32))
        sel2 = (np.empty((R, M, k), np.int64), np.empty((R, M, k), np.float32))
        att = np.empty((R, M, D), np.float32)
        att2 = (np.empty((R * M, D), np.float32), np.empty(R * M, np.float32))
        wr = (np.empty(k, np.int64), np.empty(k, np.float32))
        s, h, a = mods["scan"], mods["heap"], mods["attend"]
        return {
            "_select_rescore_bf16": (lambda: s._select_rescore_bf16(bits, held, qs, keys, kc, *sel), sel),
            "_select_rows": (lambda: s._select_rows(f32, held, *sel2), sel2),
            "_attend_union_groups": (lambda: a._attend_union_groups(ids, scores, keys, qs, skeys, skeys, svalid, scale,
                                                                    att), (att,)),
            "_attend_rows": (lambda: a._attend_rows(ids.reshape(R * M, k), scores.reshape(R * M, k), rows, keys, scale,
                                                    *att2), att2),
            "_write_results": (lambda: h._write_results(heap_s.copy(), heap_i.copy(), 128, *wr), wr),
        }

    versions = {"old": cases(old), "new": cases(new)}
    for name in versions["old"]:
        for v in versions.values():
            v[name][0]()
        for a, b in zip(versions["old"][name][1], versions["new"][name][1], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
    print(f"{args.rev} (old) vs working tree (new); load average {os.getloadavg()[0]:.2f}; outputs equal")
    print("| kernel | threads | clock | old min / median us | new min / median us | new / old median |")
    print("|---|---|---|---|---|---|")
    for name in versions["old"]:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            clock = time.thread_time if threads == 1 else time.perf_counter
            t: dict[str, list[float]] = {"old": [], "new": []}
            for block in range(10):
                for v in ("old", "new") if block % 2 == 0 else ("new", "old"):
                    call = versions[v][name][0]
                    for _ in range(args.calls // 10):
                        c = clock()
                        call()
                        t[v].append(clock() - c)
            o, w = (np.array(t[v]) * 1e6 for v in ("old", "new"))
            print(f"| {name} | {threads} | {'thread CPU' if threads == 1 else 'wall'} | {o.min():.1f} / "
                  f"{np.median(o):.1f} | {w.min():.1f} / {np.median(w):.1f} | {np.median(w) / np.median(o):.3f} |")


if __name__ == "__main__":
    main()
