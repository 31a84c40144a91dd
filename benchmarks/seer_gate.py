"""SeerAttention gate quality on a model (default: the embedded one): block density and output error per layer vs
dense attention.

For each prompt length, gate and block selection (threshold τ or per-row density), one frozen forward of the model
(``--model``; default SmolLM2-135M-Instruct) over a prose prompt (pydoc topics + a pass key, the harness's
``passkey`` generator with seed 1234) measures, per layer:

- ``density``: fraction of causal 64x64 blocks computed (gate mask + diagonal + the last ``dense_last_rows`` rows);
- ``recall``: share of the true pooled attention mass (SeerAttention's target) inside the kept blocks;
- ``rel_err``: ``‖O_sparse − O_dense‖ / ‖O_dense‖`` of the layer's attention output (same q/k/v for both);
- ``oracle_rel_err``: the same at the same per-row density but blocks chosen from the true pooled attention;
- ``kl``: the gate's held-out training loss (KL(target ‖ gate) over query blocks ``i >= nb/4``).

Several gates (``--weights`` repeated) are measured on the same forward, so ``--densities`` compares them at exactly
equal density. Run (one thread, a few minutes at 8k)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/seer_gate.py --lengths 4096,8192 \
        --thresholds 0.001,0.002,0.005,0.01 --out runs/seer_gate.json
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/seer_gate.py --lengths 8192 --thresholds "" \
        --densities 0.2,0.3 --weights OLD_DIR --weights NEW_DIR --out runs/seer_gate_cmp.json
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/seer_gate.py --model qwen2.5-coder-1.5b --weights DIR \
        --lengths 8192 --layers 3,9,15,21 --out runs/seer_gate_qwen.json

``--layers`` measures a sample of layers and stops the forward after the last of them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import kvaccel
from kvaccel.evals import tasks
from kvaccel.kernels.block_sparse_attention import block_sparse_attention, causal_block_mask
from kvaccel.patches.attention import dense_prefill, rope_tables
from kvaccel.patches.prefill.base import PrefillMethod, _diagonal_tiles
from kvaccel.patches.prefill.seer import Seer
from kvaccel.patches.prefill.seer_gate import SeerGate, pooled_attention_target, shipped_gate_dir, unrotate
from kvaccel.training import seer_kl


def selections(thresholds: list[float], densities: list[float], dense_last_rows: int) -> list[tuple[str, Seer]]:
    """``(label, Seer)`` pairs whose ``mask_from_scores`` gives each block selection."""
    out = [(f"tau={t:g}", Seer(mode="oracle", threshold=t, dense_last_rows=dense_last_rows)) for t in thresholds]
    out += [(f"density={d:g}", Seer(mode="oracle", density=d, dense_last_rows=dense_last_rows)) for d in densities]
    return out


def measure_layer(ctx, gates: dict[str, SeerGate], sels: list[tuple[str, Seer]]) -> list[dict]:
    q, k, v = ctx.query, ctx.key, ctx.value
    L = q.shape[2]
    bs = next(iter(gates.values())).block_size
    dense = dense_prefill(ctx).transpose(1, 2)  # (1, Hq, L, D)
    cos, sin = rope_tables(ctx)
    q_pre, k_pre = unrotate(q, cos, sin), unrotate(k, cos, sin)
    target = pooled_attention_target(q, k, ctx.scaling, bs)
    causal = causal_block_mask(L, bs, bs, device=q.device)
    diag = _diagonal_tiles(L, bs, bs, q.device)
    order = target.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order).contiguous())
    oracle_err: dict[bytes, float] = {}  # by per-row block counts: equal counts -> the same oracle mask
    rows = []
    for gname, gate in gates.items():
        t0 = time.perf_counter()
        layer = gate.layers[ctx.layer_idx]
        logits = layer(*layer.features(q_pre, k_pre))
        scores = torch.softmax(logits, -1)
        gate_s = time.perf_counter() - t0
        kl = float(seer_kl(logits, target))
        for label, sel in sels:
            mask = (sel.mask_from_scores(scores) | diag) & causal
            per_row = mask.sum(-1).float() / causal.sum(-1).float()  # (1, Hq, nb)
            out = block_sparse_attention(q, k, v, mask, scale=ctx.scaling, block_m=bs, block_n=bs)
            counts = mask.sum(-1, keepdim=True)
            key = counts.cpu().numpy().tobytes()
            if key not in oracle_err:  # oracle at the same per-row block count (top blocks of the true attention)
                omask = ((rank < counts) | diag) & causal
                oout = block_sparse_attention(q, k, v, omask, scale=ctx.scaling, block_m=bs, block_n=bs)
                oracle_err[key] = float((oout - dense).norm() / dense.norm())
            rows.append(dict(
                gate=gname, layer=ctx.layer_idx, selection=label,
                density=float(mask.sum()) / (float(causal.sum()) * mask.shape[1]),
                row_density_last_quarter=float(per_row[..., -max(1, per_row.shape[-1] // 4):].mean()),
                recall=float((target * mask).sum(-1).mean()),
                rel_err=float((out - dense).norm() / dense.norm()),
                oracle_rel_err=oracle_err[key],
                gate_s=gate_s, kl=kl,
            ))
    return rows


class _Done(Exception):
    """Raised after the last measured layer: the rest of the forward is not needed."""


class Measure(PrefillMethod):
    """Dense prefill that measures the gates on the q/k/v of the layers ``layers`` (``None``: all) on the way."""

    name = "_seer_measure"

    def __init__(self, rows: list, gates: dict[str, SeerGate], sels: list[tuple[str, Seer]],
                 layers: list[int] | None = None):
        self.rows, self.gates, self.sels, self.layers = rows, gates, sels, layers

    def attention(self, ctx):
        if self.layers is None or ctx.layer_idx in self.layers:
            self.rows.extend(measure_layer(ctx, self.gates, self.sels))
            if self.layers is not None and ctx.layer_idx == max(self.layers):
                raise _Done
        return dense_prefill(ctx)


def run(lengths: list[int], thresholds: list[float], densities: list[float], weights: list[str] | None,
        dense_last_rows: int, model_name: str | None = None, layers: list[int] | None = None) -> list[dict]:
    model, tok = kvaccel.load_model(model_name)
    n_layers = model.config.get_text_config().num_hidden_layers
    if layers is not None and not all(0 <= i < n_layers for i in layers):
        raise SystemExit(f"--layers {layers}: the model has layers 0..{n_layers - 1}")
    gates = {}
    for w in weights or [str(shipped_gate_dir(kvaccel.models.model_name(model)))]:
        gates[w] = SeerGate.load(w)
        gates[w].check_model(model, where=w)
    sels = selections(thresholds, densities, dense_last_rows)
    if not sels:
        raise SystemExit("give at least one --thresholds or --densities value")
    results = []
    for L in lengths:
        sample = tasks.generate("passkey", tok, L + 64, 1, seed=1234, haystack="prose")[0]
        ids = tok(tasks.format_prompt(sample), return_tensors="pt", add_special_tokens=False)["input_ids"][:, :L]
        rows: list[dict] = []
        t0 = time.perf_counter()
        try:
            with kvaccel.patched(model, Measure(rows, gates, sels, layers)), torch.no_grad():
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
        except _Done:
            pass
        print(f"L={L}: {time.perf_counter() - t0:.0f} s")
        for gname in gates:
            kls = [r["kl"] for r in rows if r["gate"] == gname and r["selection"] == sels[0][0]]
            print(f"gate {gname}: held-out KL (mean over layers) {sum(kls) / len(kls):.4f}")
            print(f"{'selection':>14} {'density':>8} {'recall':>7} {'rel_err':>8} {'max_err':>8} {'oracle':>8}")
            for label, _ in sels:
                sel = [r for r in rows if r["gate"] == gname and r["selection"] == label]
                keys = ("density", "recall", "rel_err", "oracle_rel_err")
                mean = {k: sum(r[k] for r in sel) / len(sel) for k in keys}
                print(f"{label:>14} {mean['density']:8.3f} {mean['recall']:7.3f} {mean['rel_err']:8.4f} "
                      f"{max(r['rel_err'] for r in sel):8.4f} {mean['oracle_rel_err']:8.4f}")
        results.append(dict(length=L, layers=rows))
    return results


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="local path, hub id or fetched name (default: the embedded model)")
    ap.add_argument("--layers", default="all", help="'all' or comma-separated layer indices")
    ap.add_argument("--lengths", default="4096,8192")
    ap.add_argument("--thresholds", default="0.001,0.002,0.005,0.01", help="gate thresholds τ ('' for none)")
    ap.add_argument("--densities", default="", help="per-row densities (top-k mode), e.g. 0.2,0.3")
    ap.add_argument("--weights", action="append", default=None,
                    help="gate directory, repeatable (default: the shipped gate)")
    ap.add_argument("--dense-last-rows", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("runs/seer_gate.json"))
    a = ap.parse_args()
    torch.manual_seed(0)
    layers = None if a.layers == "all" else sorted({int(x) for x in a.layers.split(",")})
    res = run([int(x) for x in a.lengths.split(",")], _floats(a.thresholds), _floats(a.densities), a.weights,
              a.dense_last_rows, a.model, layers)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(dict(model=a.model, thresholds=a.thresholds, densities=a.densities, results=res),
                                indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
