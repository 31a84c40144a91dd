"""Which heads keep the needle? Needle tokens kept by the prompt-time eviction, per layer and kv head.

A diagnostic for passkey failures: the passkey prompt (question-aware, as the papers compress it) is prefilled
once per method on the default model, and the first ``keep()`` of every cache layer (the prompt eviction, whose
indices are prompt positions) is recorded. Prints, per method, how many of the needle's key tokens each layer /
kv head kept, and the share of (layer, head) pairs that kept all of them.

    .venv/bin/python benchmarks/needle_retention.py --methods "snapkv(budget=0.5)" "h2o(budget=0.5)" --sample 3

``--sample k --samples n`` is the sample ``passkey-<length>-000k`` of ``kvaccel eval --samples n`` (seed 0).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import torch

import kvaccel
from kvaccel.cache import KVAccelCache, KVAccelLayer
from kvaccel.evals import tasks


def needle_positions(tok, context: str, answer: str) -> list[int]:
    """Token positions of every occurrence of ``answer`` in ``context`` (tokens whose text ends inside it)."""
    ids = tok(context, add_special_tokens=False)["input_ids"]
    ends, text = [], ""
    for t in ids:
        text += tok.decode([t])
        ends.append(len(text))
    spans, start = [], context.find(answer)
    while start >= 0:
        spans.append((start, start + len(answer)))
        start = context.find(answer, start + 1)
    return [i for i, e in enumerate(ends) if any(a < e <= b for a, b in spans)]


@contextlib.contextmanager
def first_keep_recorded() -> Iterator[dict[int, torch.Tensor]]:
    """Record the indices of the first ``KVAccelLayer.keep`` of each layer (keyed by ``id(layer)``)."""
    seen: dict[int, torch.Tensor] = {}
    stock = KVAccelLayer.keep

    def keep(self, idx, slot_valid=None):
        if id(self) not in seen:
            kept = idx.expand(self.keys.shape[0], self.keys.shape[1], idx.shape[-1])
            if slot_valid is not None:
                kept = torch.where(slot_valid.expand(kept.shape), kept, -1)
            seen[id(self)] = kept.clone()
        return stock(self, idx, slot_valid)

    KVAccelLayer.keep = keep
    try:
        yield seen
    finally:
        KVAccelLayer.keep = stock


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["snapkv(budget=0.5)", "h2o(budget=0.5)"])
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--sample", type=int, default=0, help="index of the passkey sample (seed 0)")
    ap.add_argument("--samples", type=int, default=8, help="size of the sample set, as kvaccel eval --samples")
    args = ap.parse_args()

    model, tok = kvaccel.load_model()
    s = tasks.generate("passkey", tok, args.length, args.samples, seed=0)[args.sample]
    context, _ = s.prompt(question_aware=True)
    ids = tok(context, return_tensors="pt", add_special_tokens=False)["input_ids"]
    needle = needle_positions(tok, context, s.answers[0])
    print(f"{s.id}: {ids.shape[1]} tokens, needle {s.answers[0]!r} at depth {s.depth:.2f}, tokens {needle}")
    for spec in args.methods:
        with kvaccel.patched(model, spec), first_keep_recorded() as kept, torch.inference_mode():
            cache = KVAccelCache(model)
            model(ids, cache=cache, use_cache=True)
            per_layer = []
            for layer in cache.layers:
                idx = kept.get(id(layer))
                if idx is None:  # nothing evicted in this layer
                    per_layer.append([len(needle)] * layer.keys.shape[1])
                    continue
                want = torch.tensor(needle)
                per_layer.append([int(torch.isin(want, idx[0, h]).sum()) for h in range(idx.shape[1])])
        whole = sum(c == len(needle) for row in per_layer for c in row) / sum(len(r) for r in per_layer)
        print(f"\n{spec}: (layer, head) pairs keeping the whole needle: {whole:.2f}")
        print("needle tokens kept per layer (one number per kv head):")
        print("  " + "  ".join(f"L{i}:{'/'.join(map(str, row))}" for i, row in enumerate(per_layer)))


if __name__ == "__main__":
    main()
