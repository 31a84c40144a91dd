"""Cold start of retrieval attention: wall clock of a short greedy generation, stock vs ``retrieval``, in fresh
processes.

Each measurement is a new process (``--child``) with ``NUMBA_CACHE_DIR`` set to a directory of this run: the first
process finds it empty (``cold``: every kernel is compiled), the second populated (``warm-cache``: loaded from disk).
In each process, after a short stock forward (torch's own warm-up): stock ``generate`` of ``--new-tokens`` tokens
after a ``--length``-token prose prompt, then ``kvaccel.patch`` + the same generation on a second copy of the default
model patched with ``retrieval``; then both again in the same process (``warm``). Reported per generation: seconds,
stock / retrieval (speedup; > 1 = retrieval faster), how many leading tokens equal stock's (free-running greedy: after
the first difference the texts part ways, so a count of equal positions would say nothing), with the load average and
torch's threads. ``--no-compile-ahead`` also runs the processes with retrieval's background compile switched off (the
kernels then compile inside the first decode step, as before it existed), side by side.

    .venv/bin/python benchmarks/retrieval_cold_start.py --length 7800 --new-tokens 24
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def child(args) -> None:
    """One fresh process: stock, retrieval (cold or warm-cache), then both again (warm); prints a JSON line."""
    import torch

    import kvaccel
    from kvaccel.compare import prompt_ids
    from kvaccel.patches.decode import retrieval as R

    if not args.compile_ahead:  # before: nothing compiled ahead, the first decode step compiles
        R.Retrieval._compile_ahead = lambda self, *a, **k: None
    stock, tok = kvaccel.load_model()
    patched, _ = kvaccel.load_model()
    ids = prompt_ids(tok, args.length)
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    with torch.no_grad():
        stock(ids[:, :64])  # torch's first-call costs, outside every timing

        def timed(model, patch: bool = False) -> tuple[float, torch.Tensor]:
            t0 = time.perf_counter()
            if patch:
                kvaccel.patch(model, "retrieval")
            out = model.generate(ids, **gen)
            return time.perf_counter() - t0, out[0, ids.shape[1]:]

        rows = []
        for round_ in ("first", "warm"):
            s, ref = timed(stock)
            r, got = timed(patched, patch=round_ == "first")
            differ = (ref != got).nonzero()
            rows.append({"round": round_, "stock_s": s, "retrieval_s": r,
                         "same_prefix": int(differ[0]) if len(differ) else len(ref)})
    compile_s = [f.result() for f in R._COMPILES.values()]
    print(json.dumps({"rows": rows, "compile_s": compile_s, "load": os.getloadavg(),
                      "threads": torch.get_num_threads()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=7800, help="prompt tokens (prose)")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--no-compile-ahead", dest="compile_ahead", action="store_false",
                    help="also measure with retrieval's background compile switched off (the kernels compile in "
                         "the first decode step)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    variants = [True] + ([False] if not args.compile_ahead else [])
    print(f"prompt {args.length} tokens, {args.new_tokens} new tokens, greedy; default model; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"{'compile ahead':>13} {'process':>10} {'round':>6} {'stock s':>8} {'retr s':>8} {'speedup':>8} "
          f"{'same pre':>8} {'compile s':>10}  load")
    for ahead in variants:
        with tempfile.TemporaryDirectory(prefix="kvaccel-cold-") as cache:
            for process in ("cold", "warm-cache"):
                cmd = [sys.executable, __file__, "--child", "--length", str(args.length), "--new-tokens",
                       str(args.new_tokens)] + ([] if ahead else ["--no-compile-ahead"])
                proc = subprocess.run(cmd, env={**os.environ, "NUMBA_CACHE_DIR": cache}, capture_output=True,
                                      text=True)
                if proc.returncode != 0:
                    sys.exit(f"child failed:\n{proc.stderr[-4000:]}")
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                for row in res["rows"]:
                    label = process if row["round"] == "first" else "warm"
                    comp = " ".join(f"{c:.1f}" for c in res["compile_s"]) if row["round"] == "first" else ""
                    print(f"{'on' if ahead else 'off':>13} {label:>10} {row['round']:>6} {row['stock_s']:8.2f} "
                          f"{row['retrieval_s']:8.2f} {row['stock_s'] / row['retrieval_s']:7.2f}x "
                          f"{row['same_prefix']:>5}/{args.new_tokens} {comp:>10}  "
                          f"{' '.join(f'{x:.1f}' for x in res['load'])} ({res['threads']} threads)", flush=True)


if __name__ == "__main__":
    main()
