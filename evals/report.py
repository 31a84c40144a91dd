"""Reports of eval and bench runs: ``results.json`` (with versions, machine, config), ``report.md`` and PNG plots."""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path
from typing import Any

FULL = "full"


def run_metadata() -> dict[str, Any]:
    """Versions of torch / transformers / kvaccel / python and the machine."""
    import torch
    import transformers

    import kvaccel

    return {
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "kvaccel": kvaccel.__version__, "python": platform.python_version()},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "cuda": torch.cuda.is_available()},
    }


def budget_of(spec: str) -> float | None:
    """The budget of a spec as a fraction (``full`` = 1.0); None when the spec has none or it is in tokens."""
    if spec == FULL:
        return 1.0
    try:
        from kvaccel.config import parse_spec

        for m in parse_spec(spec):
            b = getattr(m, "budget", None)
            if isinstance(b, float):
                return b
    except ValueError:
        return None
    return None


def _fmt(x: Any, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}f}" if abs(x) >= 10 ** -nd or x == 0 else f"{x:.1e}"
    return str(x)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def accuracy_table(summary: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Rows = (task, length), columns = full then each method; cells = mean string_match_all."""
    acc = [s for s in summary if "accuracy" in s]
    methods = [FULL] + sorted({s["method"] for s in acc} - {FULL})
    cells = {(s["task"], s["length"], s["method"]): s for s in acc}
    keys = sorted({(s["task"], s["length"]) for s in acc})
    header = ["task", "length", "n"] + methods
    rows = []
    for t, n in keys:
        ns = {cells[(t, n, m)]["n"] for m in methods if (t, n, m) in cells}
        rows.append([t, str(n), "/".join(map(str, sorted(ns)))] +
                    [_fmt(cells[(t, n, m)]["accuracy"], 2) if (t, n, m) in cells else "–" for m in methods])
    return header, rows


def retention_table(summary: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Rows = methods; per (task, length) the samples full answered right that the method also answered right
    ("kept/full"), and over all cells the fraction with its 95% Wilson interval: "keeps X% of full's accuracy"."""
    from .metrics import wilson_interval

    acc = [s for s in summary if "full_right" in s and s["method"] != FULL]
    keys = sorted({(s["task"], s["length"]) for s in acc})
    cells = {(s["method"], s["task"], s["length"]): s for s in acc}
    header = ["method"] + [f"{t} {n}" for t, n in keys] + ["all", "kept of full (95% CI)"]
    rows = []
    for m in sorted({s["method"] for s in acc}):
        got = [cells.get((m, t, n)) for t, n in keys]
        k = sum(c["kept_right"] for c in got if c)
        n_all = sum(c["full_right"] for c in got if c)
        lo, hi = wilson_interval(k, n_all)
        share = f"{k / n_all:.2f} ({lo:.2f}–{hi:.2f})" if n_all else "–"
        rows.append([m] + [f"{c['kept_right']}/{c['full_right']}" if c else "–" for c in got]
                    + [f"{k}/{n_all}", share])
    return header, rows


def fidelity_table(summary: list[dict]) -> tuple[list[str], list[list[str]]]:
    fid = [s for s in summary if "kl" in s and s["method"] != FULL]
    header = ["method", "length", "n", "KL(full‖method)", "KL max", "top-1 agree", "greedy match", "greedy prefix",
              "KV / full", "prefill density"]
    rows = [[s["method"], str(s["length"]), str(s["n"]), _fmt(s["kl"], 4), _fmt(s["kl_max"], 4),
             _fmt(s["top1_agreement"], 2), _fmt(s["greedy_match"], 2), _fmt(s["greedy_prefix"], 1),
             _fmt(s["kv_ratio"], 3), _fmt(s.get("prefill_density"), 3)]
            for s in sorted(fid, key=lambda s: (s["length"], s["method"]))]
    return header, rows


def bench_table(bench: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["method", "length", "batch", "TTFT s (p10–p90)", "prefill x", "ms/token (p10–p90)", "decode x",
              "tok/s", "KV MiB", "KV / full", "RSS Δ MiB", "prefill density"]
    rows = [[b["method"], str(b["length"]), str(b["batch"]),
             f"{b['ttft_s']:.3f} ({b['ttft_p10']:.3f}–{b['ttft_p90']:.3f})", _fmt(b["prefill_speedup"], 2),
             f"{b['tpot_s'] * 1e3:.1f} ({b['tpot_p10'] * 1e3:.1f}–{b['tpot_p90'] * 1e3:.1f})",
             _fmt(b["decode_speedup"], 2), _fmt(b["tokens_per_s"], 1), _fmt(b["kv_bytes"] / 2**20, 2),
             _fmt(b["kv_ratio"], 3), _fmt(b["rss_delta_mib"], 1),
             _fmt((b.get("path") or {}).get("prefill_density"), 3)] for b in bench]
    return header, rows


def markdown(results: dict) -> str:
    cfg = results.get("config", {})
    meta = {k: results.get(k) for k in ("versions", "machine")}
    parts = [f"# kvaccel report ({results.get('status', 'partial')})", ""]
    parts.append(f"- model: `{cfg.get('model', '?')}`")
    for k in ("seed", "haystack", "question_aware", "samples", "lengths", "batches", "new_tokens", "repeats"):
        if k in cfg:
            parts.append(f"- {k}: `{cfg[k]}`")
    if meta.get("versions"):
        parts.append("- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    if meta.get("machine"):
        m = meta["machine"]
        parts.append(f"- machine: {m.get('platform')}, {m.get('cpu_count')} CPUs, "
                     f"torch threads {m.get('torch_threads')}")
    summary = results.get("summary") or []
    if any("accuracy" in s for s in summary):
        parts += ["", "## Accuracy (string_match_all, mean over samples; `full` = stock model)", "",
                  _table(*accuracy_table(summary))]
        if any("full_right" in s and s["method"] != FULL for s in summary):
            parts += ["", "## Kept of full's right answers (paired by sample: method right / full right)", "",
                      _table(*retention_table(summary))]
    if any("kl" in s and s["method"] != FULL for s in summary):
        parts += ["", f"## Fidelity to full attention (teacher-forced on full's greedy continuation of "
                      f"{cfg.get('fidelity_tokens', 16)} tokens)", "", _table(*fidelity_table(summary))]
    if results.get("bench"):
        parts += ["", "## Speed and memory (median of repeats; x = speedup vs full)", "",
                  _table(*bench_table(results["bench"]))]
    plots = results.get("plots") or []
    if plots:
        parts += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _length_axis(ax, lengths) -> None:
    """Log2 x axis labelled with the measured lengths themselves (1024, 2048, ... rather than 2^10)."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log", base=2)
    ticks = sorted(set(lengths))
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    if len(ticks) == 1:
        ax.set_xlim(ticks[0] / 1.5, ticks[0] * 1.5)


def _save(fig, axes, path: Path) -> Path:
    """Grid and legend on every axis, then write the figure to ``path`` and free it."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def plot_accuracy_vs_budget(summary: list[dict], path: Path) -> Path | None:
    """Accuracy (per task) and top-1 agreement (fidelity) vs the budget fraction, one line per task × length."""
    pts: dict[tuple, list[tuple[float, float]]] = {}
    for s in summary:
        b = budget_of(s["method"])
        if b is None:
            continue
        y = s.get("accuracy", s.get("top1_agreement"))
        if y is None or (isinstance(y, float) and math.isnan(y)):
            continue
        label = (s["task"] if "accuracy" in s else "fidelity top-1", s["length"])
        pts.setdefault(label, []).append((b, y))
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (task, n), xy in sorted(pts.items()):
        xy.sort()
        ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=f"{task} @ {n}")
    ax.set_xlabel("KV budget (fraction of prompt; 1.0 = full attention)")
    ax.set_ylabel("accuracy / top-1 agreement")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlim(0, 1.05)
    ax.set_title("Accuracy vs budget")
    return _save(fig, [ax], path)


def plot_speedup_vs_length(bench: list[dict], path: Path) -> Path | None:
    rows = [b for b in bench if b["method"] != FULL]
    if not rows:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for key, ax, title in (("prefill_speedup", axes[0], "prefill (TTFT)"), ("decode_speedup", axes[1], "decode")):
        for (m, b) in sorted({(r["method"], r["batch"]) for r in rows}):
            xy = sorted((r["length"], r[key]) for r in rows if r["method"] == m and r["batch"] == b)
            ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=f"{m}, batch {b}")
        ax.axhline(1.0, color="gray", ls="--", lw=1)
        _length_axis(ax, [r["length"] for r in rows])
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("speedup vs full (x)")
        ax.set_title(title)
    return _save(fig, axes, path)


def plot_memory_vs_length(points: list[dict], path: Path) -> Path | None:
    """KV MiB (solid) and measured RSS delta (dashed, bench only) vs prompt length per method (× batch)."""
    if not points:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (m, b) in sorted({(p["method"], p.get("batch", 1)) for p in points}):
        ps = sorted((p for p in points if p["method"] == m and p.get("batch", 1) == b), key=lambda p: p["length"])
        line = ax.plot([p["length"] for p in ps], [p["kv_bytes"] / 2**20 for p in ps], marker="o",
                       label=f"{m}, batch {b}: KV")[0]
        if all("rss_delta_mib" in p for p in ps):
            ax.plot([p["length"] for p in ps], [p["rss_delta_mib"] for p in ps], ls="--", marker="x",
                    color=line.get_color(), label=f"{m}, batch {b}: RSS Δ")
    _length_axis(ax, [p["length"] for p in points])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("MiB")
    ax.set_title("Memory vs length")
    return _save(fig, [ax], path)


def write_reports(results: dict, out_dir: str | os.PathLike, status: str | None = None) -> dict:
    """Write ``results.json``, ``report.md`` and the PNG plots into ``out_dir``; returns the results dict.

    ``results`` is what ``run_eval`` returns (``config``, ``rows``, ``summary``) and/or ``{"bench": rows}``.
    """
    from .runner import write_json_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = dict(results)
    if status is not None:
        results["status"] = status
    results.setdefault("status", "complete")
    for k, v in run_metadata().items():
        results.setdefault(k, v)
    summary, bench = results.get("summary") or [], results.get("bench") or []
    plots = []
    p = plot_accuracy_vs_budget(summary, out / "accuracy_vs_budget.png")
    plots.append(p)
    plots.append(plot_speedup_vs_length(bench, out / "speedup_vs_length.png"))
    mem_points = bench
    if not bench:  # eval only: KV bytes after the context prefill, averaged over tasks per (method, length)
        agg: dict[tuple, list[float]] = {}
        for q in summary:
            if q.get("kv_bytes") is not None and q["kv_bytes"] == q["kv_bytes"]:
                agg.setdefault((q["method"], q["length"]), []).append(q["kv_bytes"])
        mem_points = [{"method": m, "length": n, "kv_bytes": sum(v) / len(v)} for (m, n), v in agg.items()]
    plots.append(plot_memory_vs_length(mem_points, out / "memory_vs_length.png"))
    results["plots"] = [str(q.name) for q in plots if q is not None]
    (out / ".report.md.tmp").write_text(markdown(results))
    os.replace(out / ".report.md.tmp", out / "report.md")
    write_json_atomic(out / "results.json", results)
    return results
