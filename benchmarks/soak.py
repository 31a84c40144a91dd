"""Soak test: thousands of decode steps under eviction with resident memory flat.

One prompt is prefilled on a patched model (default ``streaming(budget=256)``, the default model), then greedy
decode runs for ``--steps`` tokens on the same ``KVAccelCache``; RSS (``/proc/self/statm``), the cache's bytes
and the step time are sampled every ``--sample-every`` steps. Pass criterion (issue 12): RSS growth over the last
90% of the steps below 2% (``growth_last_90pct``, relative to the RSS at 10% of the steps). Positions run past
the model's trained context (8k on the default model): the text is meaningless there, the memory is what counts.

    python benchmarks/soak.py --steps 10000 --out runs/soak          # the acceptance run (~5-10 min, 2 cores)
    python benchmarks/soak.py --steps 300 --out runs/soak-smoke      # smoke

Writes ``soak.json`` (config, samples, summary) and ``soak_rss.png`` (RSS and KV bytes vs step).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import torch

import kvaccel
from kvaccel.compare import input_device, prompt_ids


def rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc``; ``resource`` peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def soak(model, tok, method: str, steps: int, prompt_length: int, sample_every: int) -> dict:
    kvaccel.patch(model, method)
    device = input_device(model)
    ids = prompt_ids(tok, prompt_length, device)
    cache = kvaccel.KVAccelCache(model)
    samples = []
    try:
        with torch.inference_mode():
            out = model(ids, cache=cache, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1:].argmax(-1)
            t_last = time.perf_counter()
            for step in range(1, steps + 1):
                out = model(nxt, cache=cache, use_cache=True, logits_to_keep=1)
                nxt = out.logits[:, -1:].argmax(-1)
                if step % sample_every == 0 or step == steps:
                    now = time.perf_counter()
                    gc.collect()  # what stays after a collection is held for real
                    r = kvaccel.report(model)
                    samples.append({"step": step, "rss": rss_bytes(), "kv_bytes": r["kv_bytes"],
                                    "seen_tokens": r["seen_tokens"],
                                    "step_s": (now - t_last) / (sample_every if step % sample_every == 0
                                                                else step % sample_every)})
                    t_last = time.perf_counter()
    finally:
        kvaccel.unpatch(model)
    return {"samples": samples, "summary": summarize(samples, steps)}


def summarize(samples: list[dict], steps: int) -> dict:
    """RSS growth over the last 90% of the steps (vs the first sample at or after 10%), KV bytes range."""
    ref = next(s for s in samples if s["step"] >= steps // 10)
    last = samples[-1]
    tail = [s for s in samples if s["step"] >= ref["step"]]
    return {
        "rss_at_10pct_mib": ref["rss"] / 2**20,
        "rss_end_mib": last["rss"] / 2**20,
        "rss_max_last_90pct_mib": max(s["rss"] for s in tail) / 2**20,
        "growth_last_90pct": (last["rss"] - ref["rss"]) / ref["rss"],
        "max_growth_last_90pct": (max(s["rss"] for s in tail) - ref["rss"]) / ref["rss"],
        "kv_bytes_min": min(s["kv_bytes"] for s in tail),
        "kv_bytes_max": max(s["kv_bytes"] for s in tail),
        "seen_tokens_end": last["seen_tokens"],
        "step_ms_median": 1e3 * sorted(s["step_s"] for s in samples)[len(samples) // 2],
    }


def plot(samples: list[dict], summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s["step"] for s in samples]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [s["rss"] / 2**20 for s in samples], label="RSS (MiB)")
    ax.set_xlabel("decode step")
    ax.set_ylabel("RSS (MiB)")
    ax2 = ax.twinx()
    ax2.plot(steps, [s["kv_bytes"] / 2**20 for s in samples], color="tab:orange", label="KV cache (MiB)")
    ax2.set_ylabel("KV cache held (MiB)")
    ax2.set_ylim(bottom=0)
    ax.set_title(f"{title}\nRSS growth over the last 90%: {100 * summary['growth_last_90pct']:+.2f}%")
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], loc="center right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--method", default="streaming(budget=256)")
    ap.add_argument("--prompt-length", type=int, default=512)
    ap.add_argument("--sample-every", type=int, default=50)
    ap.add_argument("--model", default=None, help="local path or hub id; default: the embedded SmolLM2-135M")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path("runs/soak"))
    args = ap.parse_args()
    if args.steps < 10 or args.sample_every < 1:
        raise SystemExit("need --steps >= 10 and --sample-every >= 1")
    args.out.mkdir(parents=True, exist_ok=True)
    model, tok = kvaccel.load_model(args.model, dtype=args.dtype, device=args.device)
    t0 = time.perf_counter()
    res = soak(model, tok, args.method, args.steps, args.prompt_length, min(args.sample_every, args.steps // 10))
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config.update(torch_threads=torch.get_num_threads(), wall_s=time.perf_counter() - t0)
    (args.out / "soak.json").write_text(json.dumps({"config": config, **res}, indent=2))
    plot(res["samples"], res["summary"], args.out / "soak_rss.png",
         f"{args.method}, {args.steps} decode steps after {args.prompt_length} prompt tokens")
    s = res["summary"]
    print(f"RSS {s['rss_at_10pct_mib']:.1f} MiB at 10% -> {s['rss_end_mib']:.1f} MiB at the end "
          f"({100 * s['growth_last_90pct']:+.2f}%, max {100 * s['max_growth_last_90pct']:+.2f}%); KV held "
          f"{s['kv_bytes_min'] / 2**20:.2f}-{s['kv_bytes_max'] / 2**20:.2f} MiB; {s['step_ms_median']:.1f} ms/step; "
          f"{config['wall_s']:.0f} s; {args.out}/soak.json, soak_rss.png")


if __name__ == "__main__":
    main()
