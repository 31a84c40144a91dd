"""Span-preserving (ChunkKV-style) selection of ScoredEviction: whole chunks, exact budget, identity at full budget."""

from __future__ import annotations

import pytest
import torch

import kvaccel
from kvaccel.cache import KVAccelLayer
from kvaccel.patches.evict.base import KEEP_SCORE, chunk_select, keep_top

from conftest import tiny_model


def _layer(T, H=2, D=4):
    k = torch.randn(1, H, T, D, generator=torch.Generator().manual_seed(0))
    v = torch.zeros(1, H, T, D)
    v[..., 0] = torch.arange(T, dtype=torch.float32)
    layer = KVAccelLayer()
    layer.update(k, v)
    return layer


def _runs(ids):
    """Split sorted ids into maximal runs of consecutive integers."""
    runs, cur = [], [ids[0]]
    for i in ids[1:]:
        if i == cur[-1] + 1:
            cur.append(i)
        else:
            runs.append(cur)
            cur = [i]
    return runs + [cur]


def test_chunk_select_by_hand():
    # 12 tokens, chunks of 4: [0-3] sum 4, [4-7] sum 40, [8-11] sum 13 (token 10 is the best single token)
    s = torch.tensor([[[1.0, 1, 1, 1, 10, 10, 10, 10, 0, 0, 13, 0]]])
    assert sorted(chunk_select(s, 4, 4)[0, 0].tolist()) == [4, 5, 6, 7]
    # budget 6: the best chunk, then the remainder (2) from the next-best chunk [8-11], its best tokens first
    got = sorted(chunk_select(s, 6, 4)[0, 0].tolist())
    assert got[:4] == [4, 5, 6, 7] and 10 in got and len(got) == 6
    # per-token top-k would have kept token 10 first; chunks keep the span
    assert 10 in s.topk(4).indices[0, 0].tolist() and 10 not in chunk_select(s, 4, 4)[0, 0].tolist()


def test_forced_tokens_stay_outside_chunks_and_invalid_slots_are_never_kept():
    s = torch.tensor([[[KEEP_SCORE, 0.0, 0, 0, 5, 5, 5, float("-inf"), 1, 1, KEEP_SCORE, KEEP_SCORE]]])
    got = sorted(chunk_select(s, 6, 3)[0, 0].tolist())
    # forced: 0, 10, 11; free tokens by rank: [1,2,3] sum 0, [4,5,6] sum 15, [8,9] sum 2
    assert got == [0, 4, 5, 6, 10, 11]


@pytest.mark.parametrize("chunk", [2, 5, 10])
@pytest.mark.parametrize("capacity", [7, 20, 33])
def test_kept_set_is_whole_chunks_plus_a_remainder_and_budget_is_exact(chunk, capacity):
    T = 60
    g = torch.Generator().manual_seed(chunk * 100 + capacity)
    layer = _layer(T)
    scores = torch.rand(1, 2, T, generator=g)
    keep_top(layer, scores, capacity, chunk)
    kept = layer.values[..., 0].round().long()
    assert kept.shape[-1] == capacity
    for h in range(2):
        ids = kept[0, h].tolist()
        by_chunk = {}
        for i in ids:
            by_chunk.setdefault(i // chunk, []).append(i)
        partial = [c for c, m in by_chunk.items() if len(m) != min(chunk, T - c * chunk)]
        assert len(partial) <= 1  # every kept chunk is whole except at most one (the budget remainder)
        assert len(ids) - sum(len(by_chunk[c]) for c in partial) == chunk * (len(by_chunk) - len(partial))
        # the whole chunks are the best ones by summed score
        sums = scores[0, h].view(-1, chunk).sum(-1)
        whole = sorted(c for c in by_chunk if c not in partial)
        assert whole == sorted(sums.topk(capacity // chunk).indices.tolist())


def test_chunk_one_and_zero_are_per_token_topk():
    scores = torch.rand(1, 2, 30, generator=torch.Generator().manual_seed(5))
    for chunk in (0, 1):
        layer = _layer(30)
        keep_top(layer, scores, 9, chunk)
        want = scores.topk(9).indices.sort(-1).values
        assert torch.equal(layer.values[..., 0].round().long(), want)


@pytest.mark.parametrize("spec", ["snapkv(budget=40, chunk=10)", "expected_attention(budget=40, chunk=10)",
                                  "h2o(budget=40, chunk=10)", "keyformer(budget=40, chunk=10)"])
def test_every_scorer_keeps_whole_spans_end_to_end(spec):
    model = tiny_model("llama")
    ids = torch.randint(3, 512, (1, 200), generator=torch.Generator().manual_seed(6))
    with kvaccel.patched(model, spec), torch.no_grad():
        cache = kvaccel.KVAccelCache(model)
        model(ids, past_key_values=cache, use_cache=True)
        rep = kvaccel.report(model)
        assert rep["kept_tokens"] == [[[40, 40]]] * 3
        # kept positions: recover them from the RoPE'd keys of an uncompressed run
        ref = kvaccel.KVAccelCache(model)
    kvaccel.patch(model)
    with torch.no_grad():
        model(ids, past_key_values=ref, use_cache=True)
    kvaccel.unpatch(model)
    for layer, full in zip(cache.layers, ref.layers, strict=True):
        for h in range(2):
            pos = sorted(int((full.keys[0, h] - k).abs().sum(-1).argmin()) for k in layer.keys[0, h])
            long_runs = [r for r in _runs(pos) if len(r) >= 10]
            # most kept tokens sit in runs of >= one chunk (the window / recent tokens and sinks are runs too)
            assert sum(len(r) for r in long_runs) >= 30, pos


@pytest.mark.parametrize("name", ["snapkv", "expected_attention", "keyformer", "h2o"])
def test_budget_all_is_token_identical_with_chunks(name):
    model = tiny_model("llama")
    ids = torch.randint(3, 512, (1, 40), generator=torch.Generator().manual_seed(2))
    gen = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False)
    ref = model.generate(ids, **gen)
    with kvaccel.patched(model, name, budget=10_000, chunk=10):
        assert torch.equal(model.generate(ids, **gen), ref)
