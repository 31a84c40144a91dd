"""Draw the plots of docs/results.md from the figures it states (no benchmark is run).

    python benchmarks/plot_results.py            # writes docs/fidelity_kl.png, docs/prefill_speedup.png,
    python benchmarks/plot_results.py --out DIR  # docs/decode_speedup.png (or into DIR)

The figures are copied below as strings exactly as docs/results.md writes them (tests/test_docs.py checks that each
one appears there); change both together.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"

#: kvpress' KL protocol (8 windows, 1500-token prose): method -> [(fraction kept, KL)]
KL_PROTOCOL = {
    "kvpress ExpectedAttentionPress = kvaccel expected_attention": [("0.5", "0.0190"), ("0.25", "0.0637")],
    "expected_attention_kl": [("0.5", "0.0139"), ("0.25", "0.0465")],
    "kvpress KVzipPress = kvaccel kvzip": [("0.5", "0.0044"), ("0.25", "0.0343")],
    "kvzip_window": [("0.5", "0.0027"), ("0.25", "0.0176")],
}
#: kvaccel eval fidelity (1k / 2k n=16, 4k n=8): method -> [(KV/full, mean KL)]
GATE_FIDELITY = {
    "attention_gate": [("0.342", "0.0144"), ("0.311", "0.0141"), ("0.275", "0.0070")],
    "snapkv at the same bytes": [("0.353", "0.0290"), ("0.320", "0.0265"), ("0.284", "0.0114")],
}
#: prefill attention operator at 8k, 1 thread: method -> (speedup vs SDPA, mean output error %)
PREFILL_OPERATOR = {
    "a_shape": ("2.96", "14.1"),
    "seer": ("2.69", "9.1"),
    "seer_accurate": ("2.00", "5.3"),
    "pbs": ("1.73", "7.5"),
    "vertical_slash": ("1.66", "8.4"),
    "sale": ("0.82", "0.7"),
}
#: time to first token at 8k, quiet machine, 2 threads: method -> speedup vs stock (sale: the earlier run)
TTFT_8K = {"a_shape": "1.74", "seer": "1.55", "sale (earlier run)": "0.74"}
#: decode step vs full, CPU time, 1 thread: group -> method -> speedup
DECODE = {
    "2k, batch 1, budget 0.25": {
        "streaming": "1.22",
        "h2o": "1.15",
        "keyformer": "1.17",
        "d2o": "1.20",
        "snapkv": "1.26",
        "pyramidkv": "1.29",
        "adakv": "1.18",
        "expected_attention": "1.31",
        "attention_gate": "1.13",
        "kvzip": "1.04",
        "h2o+think": "1.20",
        "snapkv(decode_budget)+think": "1.22",
    },
    "8k, batch 4, budget 0.2": {"streaming": "3.46"},
    "retrieval, 8k end to end (first of 3 runs)": {"retrieval": "1.60"},
}


def fidelity_plot(path: Path) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, pts in KL_PROTOCOL.items():
        a.plot([float(x) for x, _ in pts], [float(y) for _, y in pts], "o-", label=name)
    a.set(xlabel="fraction of the cache kept", ylabel="KL(full ‖ method), mean", yscale="log",
          title="kvpress' KL protocol (8 windows)")
    a.invert_xaxis()
    a.legend(fontsize=7)
    for name, pts in GATE_FIDELITY.items():
        b.plot([float(x) for x, _ in pts], [float(y) for _, y in pts], "o", label=name)
    for (x, y), label in zip(GATE_FIDELITY["attention_gate"], ("1k", "2k", "4k"), strict=True):
        b.annotate(label, (float(x), float(y)), textcoords="offset points", xytext=(4, 4), fontsize=8)
    b.set(xlabel="KV bytes / full", ylabel="KL, mean", title="kvaccel eval fidelity: attention_gate vs snapkv")
    b.legend(fontsize=8)
    fig.suptitle("Fidelity vs KV kept (SmolLM2-135M-Instruct, CPU)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def prefill_plot(path: Path) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, (speed, err) in PREFILL_OPERATOR.items():
        a.plot(float(err), float(speed), "o")
        a.annotate(name, (float(err), float(speed)), textcoords="offset points", xytext=(4, 4), fontsize=8)
    a.axhline(1.0, color="grey", lw=0.8)
    a.set(xlabel="mean relative output error (%)", ylabel="speedup vs SDPA",
          title="attention operator, 8k, 1 thread (CPU time)")
    names = list(TTFT_8K)
    b.bar(names, [float(TTFT_8K[n]) for n in names], color="tab:blue")
    b.axhline(1.0, color="grey", lw=0.8)
    b.set(ylabel="TTFT speedup vs stock", title="time to first token, 8k, 2 threads (wall)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def decode_plot(path: Path) -> None:
    fig, ax = plt.subplots(figsize=(11, 4.2))
    labels: list[str] = []
    for i, (group, rows) in enumerate(DECODE.items()):
        xs = range(len(labels), len(labels) + len(rows))
        ax.bar(xs, [float(v) for v in rows.values()], color=f"C{i}", label=group)
        labels += list(rows)
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(ylabel="decode step speedup vs full", title="decode step vs full attention (CPU time, 1 thread)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DOCS, help="directory for the PNG files (default: docs/)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, draw in (("fidelity_kl.png", fidelity_plot), ("prefill_speedup.png", prefill_plot),
                       ("decode_speedup.png", decode_plot)):
        draw(args.out / name)
        print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
