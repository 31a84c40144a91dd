"""KVzip's prefill cost in NVIDIA kvpress (``KVzipPress``), on the prompts of ``benchmarks/kvzip_prefill.py``.

The same protocol as that benchmark, on kvpress' side: stock dense prefills (sdpa, ``DynamicCache``) and KVzipPress
prefills (the context forward, then kvpress' reconstruction forwards and compression when its context manager exits)
alternate in one process, wall clock at the machine's default threads; ratio = median kvzip / median dense over
``--repeats``. Two steps, two venvs (kvpress pins an older transformers, see ``setup_kvpress.sh``):

    python benchmarks/peers/kvzip_prefill_kvpress.py export --lengths 1536 4096 --out runs/kvzip-prefill/prompts.json
    .venv-kvpress/bin/python benchmarks/peers/kvzip_prefill_kvpress.py run --prompts runs/kvzip-prefill/prompts.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path


def export(args) -> None:
    import kvaccel
    from kvaccel.compare import prompt_ids

    model, tok = kvaccel.load_model()
    rows = [{"model": model.config._name_or_path, "length": n, "ids": prompt_ids(tok, n, "cpu")[0].tolist()}
            for n in args.lengths]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows))
    print(f"{len(rows)} prompts of {model.config._name_or_path} -> {args.out}")


def run(args) -> None:
    import torch
    from kvpress import KVzipPress
    from kvpress_vs_kvaccel import _plain_text_kvzip
    from transformers import AutoModelForCausalLM, DynamicCache

    rows = json.loads(Path(args.prompts).read_text())
    model = AutoModelForCausalLM.from_pretrained(rows[0]["model"], dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    _plain_text_kvzip()

    def prefill(ids, press) -> float:
        cache = DynamicCache()
        with torch.inference_mode():
            t0 = time.perf_counter()
            if press is None:
                model(ids, past_key_values=cache, use_cache=True)
            else:
                with press(model):
                    model(ids, past_key_values=cache, use_cache=True)
            return time.perf_counter() - t0

    press = KVzipPress(compression_ratio=1 - args.budget)
    print(f"kvpress KVzipPress(compression_ratio={1 - args.budget:g}); torch threads {torch.get_num_threads()}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(" length  dense s  kvzip s  ratio  per-run ratios")
    first = torch.tensor([rows[0]["ids"][:128]])
    prefill(first, None), prefill(first, press)  # warm-up
    for row in rows:
        ids = torch.tensor([row["ids"]])
        dense, kvzip = [], []
        for rep in range(args.repeats):
            order = [None, press] if rep % 2 == 0 else [press, None]
            for p in order:
                (dense if p is None else kvzip).append(prefill(ids, p))
        d, z = statistics.median(dense), statistics.median(kvzip)
        runs = " ".join(f"{b / a:.2f}" for a, b in zip(dense, kvzip, strict=True))
        print(f"{row['length']:7d} {d:8.2f} {z:8.2f} {z / d:5.2f}x  {runs}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="the prompts' token ids (run in kvaccel's venv)")
    e.add_argument("--lengths", type=int, nargs="+", default=[1536, 4096])
    e.add_argument("--out", default="runs/kvzip-prefill/prompts.json")
    r = sub.add_parser("run", help="time dense and KVzipPress prefills (run in kvpress' venv)")
    r.add_argument("--prompts", default="runs/kvzip-prefill/prompts.json")
    r.add_argument("--repeats", type=int, default=3)
    r.add_argument("--budget", type=float, default=0.25, help="kept fraction (compression_ratio = 1 - budget)")
    args = ap.parse_args()
    export(args) if args.cmd == "export" else run(args)


if __name__ == "__main__":
    main()
