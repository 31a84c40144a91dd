"""Helpers shared by the prefill tests: recording a method's calls, building a left-padded batch."""

from __future__ import annotations

import torch


def recording(obj, attr: str = "select") -> list:
    """Wrap ``obj.attr`` (an instance method) so every result is also appended to the returned list, in call order
    (layer by layer, sequence by sequence, forward by forward)."""
    calls = []
    fn = getattr(obj, attr)

    def record(*args):
        out = fn(*args)
        calls.append(out)
        return out

    setattr(obj, attr, record)
    return calls


def left_padded(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask, position_ids)`` of 1-D token sequences left-padded to the longest."""
    L = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, L - len(s) :] = s
        mask[b, L - len(s) :] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def padded_batch_and_alone(model, method, seqs: list[torch.Tensor]) -> tuple[list[float], list, list]:
    """Run ``seqs`` as one left-padded batch and each alone with ``method`` patched in: the batch's
    ``prefill_density``, each row's logits on its real tokens, and each sequence's logits alone."""
    import kvaccel

    ids, mask, pos = left_padded(seqs)
    L = ids.shape[1]
    with torch.no_grad(), kvaccel.patched(model, method):
        batched = model(ids, attention_mask=mask, position_ids=pos).logits
        dens = kvaccel.report(model)["prefill_density"]
        single = [model(s[None]).logits[0] for s in seqs]
    return dens, [batched[b, L - len(s) :] for b, s in enumerate(seqs)], single
