"""Helpers shared by the prefill tests: recording a method's calls, building a left-padded batch, and two checks
through a model (a dense setting gives stock logits; the reported density is the tiles the selections kept)."""

from __future__ import annotations

import pytest
import torch

import kvaccel
from kvaccel.kernels.block_sparse_attention import causal_block_mask
from kvaccel.patches.prefill.base import _diagonal_tiles


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


def assert_dense_setting_matches_stock(model, spec: str) -> None:
    """``spec`` at a setting that keeps every tile (threshold / gamma 1) gives the stock logits, density 1 per layer."""
    ids = torch.randint(3, 512, (1, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        with kvaccel.patched(model, spec):
            out = model(ids, use_cache=False).logits
            rep = kvaccel.report(model)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert rep["prefill_density"] == [1.0] * model.config.num_hidden_layers
    assert rep["prefill_estimate_s"] > 0


def assert_density_is_the_computed_tiles(model, method, length: int = 320, block: int = 32) -> None:
    """A sparse ``method`` (square ``block`` tiles) reports, per layer, the share of causal tiles its selections kept
    (with the diagonal), every layer below 1, and its logits differ from stock's (tiles were skipped)."""
    ids = torch.randint(3, 512, (1, length), generator=torch.Generator().manual_seed(2))
    calls = recording(method)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        with kvaccel.patched(model, method):
            out = model(ids, use_cache=False).logits
            rep = kvaccel.report(model)
    H = model.config.num_attention_heads
    causal, diag = causal_block_mask(length, block, block), _diagonal_tiles(length, block, block, None)
    want = [float(((s.mask | diag) & causal).expand(1, H, -1, -1).sum() / (causal.sum() * H)) for s in calls]
    assert len(calls) == model.config.num_hidden_layers
    assert rep["prefill_density"] == pytest.approx(want)
    assert all(d < 1 for d in want), want
    assert not torch.allclose(out, ref, atol=1e-4)
