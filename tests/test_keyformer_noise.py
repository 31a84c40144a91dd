"""Keyformer's Gumbel noise and decode scoring: the in-place forms are bit-for-bit the written-out formula."""

from __future__ import annotations

import math

import pytest
import torch

from kvaccel.patches.evict.keyformer import gumbel_noise, neg_gumbel_noise, noisy_scores, step_seed

FI = torch.finfo(torch.float32)


def formula_noise(shape, seed: int) -> torch.Tensor:
    """``zeta = -log(-log(u))``, ``u = clamp(rand(shape), tiny, 1 - eps)``, each step its own tensor."""
    u = torch.rand(shape, generator=torch.Generator().manual_seed(seed)).clamp(FI.tiny, 1 - FI.eps)
    return -torch.log(-torch.log(u))


def test_noise_is_the_formula_bit_for_bit():
    shape = (2, 3, 5, 700)  # more than one vectorised block of the log kernel
    z = formula_noise(shape, 11)
    assert torch.equal(gumbel_noise(shape, torch.Generator().manual_seed(11)), z)
    assert torch.equal(neg_gumbel_noise(shape, torch.Generator().manual_seed(11)), -z)


@pytest.mark.parametrize("with_valid", [False, True])
def test_decode_scores_are_the_formula_bit_for_bit(with_valid):
    """One decode query per head (``W = 1``), GQA ``G = 3``: the in-place step equals
    ``softmax((scale q.k + zeta) / tau)`` summed over the group / G, invalid keys (a whole padded row in one
    sequence and head) scoring 0."""
    B, Hkv, G, T, D, tau = 2, 2, 3, 300, 16, 1.37
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(B, Hkv * G, 1, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    valid = None
    if with_valid:
        valid = torch.rand(B, Hkv, T, generator=g) > 0.2
        valid[1, 0] = False  # a head with no real key: its row is all -inf, NaN cleared to 0
    scale, seed = 1 / math.sqrt(D), step_seed(4, 3, 9)
    got = noisy_scores(q, k, scale=scale, tau=tau, generator=torch.Generator().manual_seed(seed), valid=valid)
    logits = (q.reshape(B, Hkv, G, D) @ k.transpose(-1, -2)) * scale
    logits = (logits + formula_noise((B, Hkv, G, T), seed)) / tau
    if valid is not None:
        logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
    want = torch.softmax(logits, dim=-1).nan_to_num(0.0).sum(2) / G
    assert torch.equal(got, want)
    if with_valid:
        assert not got[1, 0].any() and got[0].sum(-1).allclose(torch.ones(Hkv))
