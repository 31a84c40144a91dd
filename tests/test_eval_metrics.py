"""Eval metrics (kvaccel.evals.metrics) on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from kvaccel.evals import metrics as M


def test_string_match():
    answers = ["71432", "Blue-Apple"]
    assert M.string_match_all("the key is 71432 and blue-apple.", answers) == 1.0
    assert M.string_match_all("The key is 71432.", answers) == 0.5
    assert M.string_match_all("nothing", answers) == 0.0
    assert M.string_match_part("The key is 71432.", answers) == 1.0
    assert M.string_match_part("nothing", answers) == 0.0
    assert M.string_match_all("x 42 y", "42") == 1.0  # a single answer as a string
    with pytest.raises(ValueError, match="answers is empty"):
        M.string_match_all("x", [])


def test_kl_divergence_by_hand():
    p = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)
    # KL(p||q) = 0.5 ln 2 + 0.25 ln 1 + 0.25 ln(1/2) = 0.25 ln 2
    kl = M.kl_divergence(p.log() + 3.0, q.log() - 1.0)  # logits are log-probs up to a constant
    assert kl.dtype == torch.float64 and kl.shape == ()
    assert kl.item() == pytest.approx(0.25 * math.log(2), abs=1e-12)
    # per position, float32 input, identical rows give 0
    ref = torch.stack([p.log(), q.log()]).float()
    test = torch.stack([q.log(), q.log()]).float()
    out = M.kl_divergence(ref, test)
    assert out.shape == (2,)
    assert out[0].item() == pytest.approx(0.25 * math.log(2), abs=1e-6) and out[1].item() == pytest.approx(0, abs=1e-7)
    # -inf logits in the reference contribute nothing; where only the test has zero mass KL is infinite
    masked = torch.tensor([0.0, 0.0, float("-inf")])
    # p_ref = (1/2, 1/2, 0), p_test = (1, 1, e^5) / (2 + e^5): KL = ln((2 + e^5) / 2)
    kl = M.kl_divergence(masked, torch.tensor([0.0, 0.0, 5.0]))
    assert kl.item() == pytest.approx(math.log((2 + math.exp(5)) / 2), abs=1e-9)
    assert math.isinf(M.kl_divergence(torch.tensor([0.0, 0.0]), torch.tensor([0.0, float("-inf")])).item())
    with pytest.raises(ValueError, match=r"logits_ref \(2, 3\) and logits_test \(2, 4\)"):
        M.kl_divergence(torch.zeros(2, 3), torch.zeros(2, 4))


def test_top1_agreement():
    ref = torch.tensor([[[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]]])
    test = torch.tensor([[[9.0, 1.0, 0.0], [0.0, 1.0, 2.0], [0.0, 0.0, 1.0], [0.0, 4.0, 0.0]]])
    assert M.top1_agreement(ref, test) == 0.5
    assert M.top1_agreement(ref, ref) == 1.0


def test_greedy_match():
    assert M.greedy_match([1, 2, 3, 4], [1, 2, 9, 4]) == {"prefix_match": 2, "fraction": 0.75, "n_ref": 4, "n_test": 4}
    assert M.greedy_match([1, 2, 3, 4], [1, 2]) == {"prefix_match": 2, "fraction": 0.5, "n_ref": 4, "n_test": 2}
    assert M.greedy_match([1, 2], [1, 2, 3])["fraction"] == 1.0
    assert M.greedy_match([5, 2, 3], [1, 2, 3])["prefix_match"] == 0
    got = M.greedy_match(torch.tensor([[7, 8, 9]]), torch.tensor([7, 8, 9]))
    assert got["prefix_match"] == 3 and got["fraction"] == 1.0
    assert M.greedy_match([], [])["fraction"] == 1.0 and M.greedy_match([], [1])["fraction"] == 0.0


def test_perplexity():
    vocab = 50
    logits = torch.zeros(2, 7, vocab)  # uniform: perplexity = vocab size
    targets = torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(0))
    assert M.perplexity(logits, targets) == pytest.approx(vocab)
    # two positions: p = 1/2 and p = 1/4 -> exp((ln 2 + ln 4) / 2) = sqrt(8)
    logits = torch.log(torch.tensor([[0.5, 0.5, 1e-300], [0.25, 0.75, 1e-300]], dtype=torch.float64))
    assert M.perplexity(logits, torch.tensor([0, 0])) == pytest.approx(math.sqrt(8))
    assert M.perplexity(logits, torch.tensor([0, -100])) == pytest.approx(2.0)  # HF ignore label
    assert M.perplexity(logits, torch.tensor([0, 0]), mask=torch.tensor([False, True])) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="every position is ignored"):
        M.perplexity(logits, torch.tensor([-100, -100]))
    with pytest.raises(ValueError, match=r"logits \(2, 3\) must be targets \(3,\)"):
        M.perplexity(logits, torch.tensor([0, 0, 0]))


def test_summarize():
    s = M.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    # linear interpolation on the sorted values 1..5: p10 = 1 + 0.4 * (2 - 1), p90 = 4 + 0.6 * (5 - 4)
    assert s == pytest.approx({"median": 3.0, "mean": 3.0, "p10": 1.4, "p90": 4.6, "min": 1.0, "max": 5.0, "n": 5})
    assert isinstance(s["n"], int)
    assert M.summarize(torch.tensor([2.0]))["p90"] == 2.0
    with pytest.raises(ValueError, match="at least one value"):
        M.summarize([])
    with pytest.raises(ValueError, match="non-finite"):
        M.summarize([1.0, float("nan")])


def test_wilson_interval_known_values():
    z2 = 1.96**2
    assert M.wilson_interval(0, 8) == pytest.approx((0.0, z2 / (8 + z2)))  # not empty at p = 0
    assert M.wilson_interval(8, 8) == pytest.approx((8 / (8 + z2), 1.0))
    assert M.wilson_interval(4, 8) == pytest.approx((0.2152, 0.7848), abs=1e-4)
    assert all(math.isnan(x) for x in M.wilson_interval(0, 0))
    with pytest.raises(ValueError, match="successes"):
        M.wilson_interval(9, 8)
