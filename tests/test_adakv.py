"""AdaKV: per-head adaptive budgets stored ragged (physically smaller), exact with budget = all."""

from __future__ import annotations

import pytest
import torch

import kvaccel
from kvaccel.cache import KVAccelCache
from kvaccel.patches.evict.adakv import AdaKV, ada_select

from conftest import tiny_model


def test_ada_select_by_hand():
    inf = float("-inf")
    scores = torch.tensor([[[9.0, 8.0, 7.0, 6.0], [1.0, 0.5, 0.2, inf]]])  # head 1 has an invalid slot
    idx, sv = ada_select(scores, capacity=2, alpha=0.5)  # floor 1 per head, 4 slots in all
    kept = [sorted(idx[0, h][sv[0, h]].tolist()) for h in range(2)]
    assert kept == [[0, 1, 2], [0]]  # head 0 wins the shared slots, head 1 keeps its safeguard token
    idx, sv = ada_select(scores, capacity=2, alpha=0.0)
    assert [sorted(idx[0, h][sv[0, h]].tolist()) for h in range(2)] == [[0, 1, 2, 3], []]


def test_adakv_budget_all_is_token_identical():
    model = tiny_model("llama")
    ids = torch.randint(3, 512, (1, 50), generator=torch.Generator().manual_seed(1))
    gen = {"max_new_tokens": 32, "min_new_tokens": 32, "do_sample": False}
    ref = model.generate(ids, **gen)
    with kvaccel.patched(model, "adakv", budget=10_000):
        assert torch.equal(model.generate(ids, **gen), ref)


def test_adakv_ragged_heads_keep_average_budget_and_save_bytes():
    model = tiny_model("llama")
    ids = torch.randint(3, 512, (2, 256), generator=torch.Generator().manual_seed(2))
    with kvaccel.patched(model, "adakv(budget=32, alpha_safeguard=0.25)"), torch.no_grad():
        cache = KVAccelCache(model)
        model(ids, past_key_values=cache, use_cache=True)
        for layer in cache.layers:
            kept = layer.kept_per_head()  # (B, H)
            assert (kept.sum(-1) == 32 * kept.shape[1]).all()  # H x budget slots per sequence
            assert (kept >= 8).all()  # the safeguard
            assert layer.keys.shape[2] == int(kept.max()) < 256  # padded to the longest head only
        r = kvaccel.report(model)
        assert r["kv_bytes"] == cache.nbytes() < 0.3 * r["kv_bytes_full"]
        tok = ids[:, -1:]
        for _ in range(5):  # decode over the ragged cache
            tok = model(tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        assert cache.get_seq_length() == 261


def test_adakv_bad_input():
    with pytest.raises(ValueError, match="inner"):
        AdaKV(inner="h2o")
    with pytest.raises(ValueError, match="alpha_safeguard"):
        AdaKV(alpha_safeguard=1.5)
    with pytest.raises(ValueError, match="budget"):
        AdaKV(budget=0)
