"""Span-preserving (ChunkKV-style) selection of ScoredEviction: whole chunks, exact budget, identity at full budget."""

from __future__ import annotations

import pytest
import torch

import kvaccel
from kvaccel.cache import KVAccelCache, KVAccelLayer
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
        model(ids, cache=cache, use_cache=True)
        rep = kvaccel.report(model)
        assert rep["kept_tokens"] == [[[40, 40]]] * 3
        # kept positions: recover them from the RoPE'd keys of an uncompressed run
        ref = kvaccel.KVAccelCache(model)
    kvaccel.patch(model)
    with torch.no_grad():
        model(ids, cache=ref, use_cache=True)
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


# ---------------------------------------------------------------------------------------------- sliding spans
from kvaccel.patches.evict.spans import sliding_span_select  # noqa: E402


def test_sliding_spans_keep_a_span_the_grid_cuts():
    s = torch.tensor([[[0.0, 0, 0, 0, 0, 5, 5, 5, 5, 0, 0, 0]]])
    assert sorted(sliding_span_select(s, 4, 4)[0, 0].tolist()) == [5, 6, 7, 8]
    assert sorted(chunk_select(s, 4, 4)[0, 0].tolist()) == [4, 5, 6, 7]  # the grid keeps the span in part
    # a second window completes a partly kept span before starting a weaker one
    s = torch.tensor([[[0.0, 9, 9, 9, 9, 9, 9, 0, 0, 0, 1, 1, 1, 0]]])
    assert sorted(sliding_span_select(s, 6, 4)[0, 0].tolist()) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("width", [2, 5, 16])
@pytest.mark.parametrize("capacity", [3, 20, 40])
def test_sliding_spans_exact_budget_forced_first_invalid_never(width, capacity):
    g = torch.Generator().manual_seed(width * 7 + capacity)
    s = torch.rand(2, 3, 50, generator=g)
    s[0, :, 10:14] = float("-inf")  # not tokens
    s[1, 1, :2] = KEEP_SCORE  # forced
    idx = sliding_span_select(s, capacity, width)
    assert idx.shape == (2, 3, capacity)
    for b in range(2):
        for h in range(3):
            ids = idx[b, h].tolist()
            assert len(set(ids)) == capacity
            assert not any(10 <= i < 14 for i in ids) or b == 1
            if b == 1 and h == 1:
                assert {0, 1} <= set(ids)


def test_sliding_spans_with_room_for_everything_keep_every_real_token():
    s = torch.rand(1, 2, 10)
    s[0, 0, 3] = float("-inf")
    idx = sliding_span_select(s, 10, 4)
    assert set(idx[0, 1].tolist()) == set(range(10))
    assert set(idx[0, 0, :9].tolist()) == set(range(10)) - {3}


def test_sliding_spans_rejects_width_below_two():
    with pytest.raises(ValueError, match="width"):
        sliding_span_select(torch.rand(1, 1, 5), 2, 1)


def test_expected_attention_sliding_spans_budget_and_identity():
    model = tiny_model("llama")
    ids = torch.randint(3, 512, (1, 60), generator=torch.Generator().manual_seed(8))
    spec = "expected_attention(budget=20, chunk=6, span_rule='sliding', observation_weight=0.5)"
    with kvaccel.patched(model, spec), torch.no_grad():
        model.generate(ids, max_new_tokens=3, do_sample=False)
        Hkv = model.config.num_key_value_heads
        assert kvaccel.report(model)["kept_tokens"][0][0] == [20 + 2] * Hkv
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=6, do_sample=False)
    with kvaccel.patched(model, "expected_attention(budget=60, chunk=6, span_rule='sliding')"), torch.no_grad():
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), want)


def test_sliding_span_rule_is_an_option_of_every_scorer(monkeypatch):
    """span_rule='sliding' lives on ScoredEviction: snapkv / h2o keep exactly the budget through the sliding rule."""
    from kvaccel.patches.evict import spans
    from kvaccel.patches.evict.spans import sliding_span_select

    g = torch.Generator().manual_seed(11)
    layer = KVAccelLayer()
    layer.update(torch.randn(1, 2, 40, 8, generator=g), torch.randn(1, 2, 40, 8, generator=g))
    scores = torch.rand(1, 2, 40, generator=g)
    want = sliding_span_select(scores, 12, 5).sort(dim=-1).values
    keep_top(layer, scores, 12, chunk=5, span_rule="sliding")
    kept = layer.keys
    full = torch.randn(1, 2, 40, 8, generator=torch.Generator().manual_seed(11))  # the same draw as the keys above
    torch.testing.assert_close(kept, full.gather(2, want[..., None].expand(1, 2, 12, 8)))
    model = tiny_model("llama")
    ids = torch.randint(3, 512, (1, 90), generator=g)
    calls = []
    monkeypatch.setattr(spans, "sliding_span_select", lambda *a: calls.append(1) or sliding_span_select(*a))
    for spec in ("snapkv(budget=20,chunk=6,span_rule='sliding')", "h2o(budget=20,chunk=6,span_rule='sliding')"):
        calls.clear()
        with kvaccel.patched(model, spec), torch.no_grad():
            model(ids, use_cache=True, cache=KVAccelCache(model))
            assert kvaccel.report(model)["kept_tokens"][0] == [[20, 20]]
        assert len(calls) == model.config.num_hidden_layers  # every layer selected through the sliding rule
    with pytest.raises(ValueError, match="span_rule"):
        kvaccel.parse_spec("snapkv(span_rule='x')")
