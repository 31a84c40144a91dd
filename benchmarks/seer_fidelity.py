"""seer end to end on the default model: prefill density and next-token fidelity vs dense over the last 64 positions.

One prose prompt (the harness's ``passkey`` generator, prose haystack, seed 99), logits of the last 64 prompt
positions with dense attention and with each ``seer`` spec; prints mean block density (``report()``), top-1
agreement and KL(dense ‖ seer)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/seer_fidelity.py 8192 "seer(threshold=0.01)" "seer(threshold=0.02)"
"""

from __future__ import annotations

import sys
import time

import torch

import kvaccel
from kvaccel.evals import tasks


def main(length: int, specs: list[str]) -> None:
    model, tok = kvaccel.load_model()
    sample = tasks.generate("passkey", tok, length + 64, 1, seed=99, haystack="prose")[0]
    ids = tok(tasks.format_prompt(sample), return_tensors="pt", add_special_tokens=False)["input_ids"][:, :length]
    with torch.no_grad():
        ref = torch.log_softmax(model(ids, logits_to_keep=64).logits[0].float(), -1)
        for spec in specs:
            t0 = time.perf_counter()
            with kvaccel.patched(model, spec):
                out = torch.log_softmax(model(ids, logits_to_keep=64).logits[0].float(), -1)
                dens = kvaccel.report(model)["prefill_density"]
            kl = (ref.exp() * (ref - out)).sum(-1)
            top1 = (ref.argmax(-1) == out.argmax(-1)).float().mean()
            print(f"L={length} {spec}: density {sum(dens) / len(dens):.3f}, top-1 agreement {top1:.3f}, "
                  f"KL mean {kl.mean():.4f} max {kl.max():.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2:] or ["seer"])
