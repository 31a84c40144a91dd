"""Smoke test of an installed (non-editable) kvaccel wheel, run from a directory outside the checkout.

    python wheel_smoke.py CHECKOUT

Checks that kvaccel is imported from site-packages (not from CHECKOUT), that the package data ships (trained gates,
SALE thresholds), that `kvaccel methods` runs, and that patch + generate on the embedded default model works with
seer, sale, attention_gate, kvzip and retrieval: each changes what it says it changes (report()), and with every
method unpatched the model gives stock tokens again.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import torch

import kvaccel

checkout = Path(sys.argv[1]).resolve()
installed = Path(kvaccel.__file__).resolve().parent
assert installed.is_relative_to(Path(sys.prefix).resolve()) and installed != checkout / "kvaccel", (
    f"kvaccel imported from {installed}, not from the wheel installed in {sys.prefix}")
assert not Path.cwd().resolve().is_relative_to(checkout), "run this from a directory outside the checkout"
for data in ("patches/prefill/data/sale/SmolLM2-135M-Instruct.json",
             "patches/prefill/data/seer_gate_SmolLM2-135M-Instruct/gate.safetensors",
             "patches/evict/data/attention_gate_SmolLM2-135M-Instruct/gate.safetensors"):
    assert (installed / data).is_file(), f"package data missing from the wheel: {data}"

cli = shutil.which("kvaccel")
assert cli and Path(cli).resolve().is_relative_to(Path(sys.prefix).resolve()), f"`kvaccel` is not the wheel's: {cli}"
listed = subprocess.run([cli, "methods"], check=True, capture_output=True, text=True).stdout
for name in ("seer", "sale", "attention_gate", "kvzip", "retrieval"):
    assert name in listed, f"`kvaccel methods` does not list {name}"

torch.manual_seed(0)
model, tok = kvaccel.load_model()
from pydoc_data.topics import topics  # noqa: E402  (long natural text on every Python install)

text = " ".join(topics[k] for k in sorted(topics))[:12000]
ids = tok(text, return_tensors="pt").input_ids[:, :1536]  # above sale's and seer's min_length
prompt_len = ids.shape[1]


def generate() -> torch.Tensor:
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)[0, prompt_len:]


stock = generate()
for spec, check in [
    ("seer", lambda r: max(r["prefill_density"]) < 1.0),  # per layer: each computes fewer tiles than dense
    ("sale(dense_above=1.0)", lambda r: max(r["prefill_density"]) < 1.0),  # at 1.5k its default goes dense
    ("attention_gate", lambda r: r["kv_bytes"] < r["kv_bytes_full"]),
    ("kvzip(budget=0.25)", lambda r: r["kv_bytes"] < r["kv_bytes_full"]),
    ("retrieval(sink=16,window=64,top_k=64)", lambda r: r["kv_bytes"] < r["kv_bytes_full"]),
]:
    kvaccel.patch(model, spec)
    tokens = generate()
    report = kvaccel.report(model)
    kvaccel.unpatch(model)
    assert tokens.shape == stock.shape, f"{spec}: generated {tokens.shape[0]} tokens, expected {stock.shape[0]}"
    assert check(report), f"{spec}: report() shows it did nothing: {report}"
    density = sum(report["prefill_density"]) / len(report["prefill_density"])
    print(f"{spec}: ok, {int((tokens == stock).sum())}/{len(stock)} tokens as stock, "
          f"KV bytes {report['kv_ratio']:.3f} of full, prefill density {density:.3f}")
assert torch.equal(generate(), stock), "after unpatch the model does not give stock tokens"
print("wheel smoke test passed")
