"""ThinK: channel scores, narrow storage (real bytes), composition with eviction, keep() over a narrow segment."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AttentionInterface

import kvaccel
from kvaccel.cache import KVAccelCache, KVAccelLayer
from kvaccel.patches.channels.think import ThinK, channel_scores, value_channel_scores
from kvaccel.patches.evict.d2o import D2O, dense_view
from kvaccel.patches.evict.streaming import Streaming

from conftest import tiny_model


def _ids(n, seed=0):
    return torch.randint(3, 512, (1, n), generator=torch.Generator().manual_seed(seed))


def test_channel_scores_by_hand():
    q = torch.tensor([[[[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]], [[2.0, 0.0, 0.0], [0.0, 3.0, 1.0]]]])  # (1, 2, 2, 3)
    k = torch.tensor([[[[1.0, 2.0, 0.0], [2.0, 0.0, 1.0], [2.0, 1.0, 0.0]]]])  # (1, 1, 3, 3), G = 2
    qn = [math.sqrt(1 + 4), math.sqrt(1 + 9), math.sqrt(4 + 1)]  # both query heads of the group pooled
    kn = [math.sqrt(1 + 4 + 4), math.sqrt(4 + 1), math.sqrt(1)]
    want = [a * b for a, b in zip(qn, kn, strict=True)]
    assert channel_scores(q, k)[0, 0].tolist() == pytest.approx(want, rel=1e-6)
    valid = torch.tensor([[[True, False, True]]])
    kn2 = [math.sqrt(1 + 4), math.sqrt(4 + 1), 0.0]
    want2 = [a * b for a, b in zip(qn, kn2, strict=True)]
    assert channel_scores(q, k, valid)[0, 0].tolist() == pytest.approx(want2, rel=1e-6)
    with pytest.raises(ValueError, match="ratio"):
        ThinK(ratio=1.0)


def test_value_channel_scores_by_hand():
    """score_c = ‖softmax(scale · Q_obs Kᵀ) V[:, c]‖ with causal window rows and an evicted slot, written out."""
    q = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]], [[0.5, 1.0], [1.0, 1.0]]]])  # (1, 2, W=2, 2): G = 2
    k = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]]]])  # (1, 1, T=4, 2)
    v = torch.tensor([[[[1.0, 0.0, 2.0], [0.0, 3.0, 1.0], [1.0, 1.0, 0.0], [4.0, 0.0, 1.0]]]])
    valid = torch.tensor([[[True, False, True, True]]])
    scale = 0.5
    rows = []
    for head in range(2):
        for i in range(2):  # window row i sees slots 0 .. T - W + i
            seen = [t for t in range(4) if t <= 2 + i and bool(valid[0, 0, t])]
            logits = torch.tensor([scale * float(q[0, head, i] @ k[0, 0, t]) for t in seen])
            p = torch.softmax(logits, 0)
            rows.append(sum(p[j] * v[0, 0, t] for j, t in enumerate(seen)))
    want = torch.stack(rows).norm(dim=0)
    torch.testing.assert_close(value_channel_scores(q, k, v, scale, valid)[0, 0], want)
    with pytest.raises(ValueError, match="value_ratio"):
        ThinK(value_ratio=1.0)
    with pytest.raises(ValueError, match="value_ratio"):
        ThinK(value_ratio=-0.1)


B, Hkv, G, T, D, W = 2, 2, 3, 50, 16, 8  # the prefill of the two byte-saving tests


def _prefilled_layer(seed: int) -> tuple[KVAccelLayer, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """A layer holding T random tokens, the prompt's queries, its keys/values and its bytes before pruning."""
    g = torch.Generator().manual_seed(seed)
    layer = KVAccelLayer()
    layer.reserve = 0  # no spare slots: the byte counts below are of the tokens alone
    k, v = torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    layer.update(k, v)
    return layer, torch.randn(B, Hkv * G, T, D, generator=g), k, v, layer.nbytes()


def test_prunes_lowest_channels_narrow_with_exact_byte_saving():
    layer, q, k, v, before = _prefilled_layer(0)
    m = ThinK(ratio=0.4, window=W, full_recent=W)  # the reference code's layout: last W slots full-width
    m.after_prefill(SimpleNamespace(layer=layer, query=q))
    drop = math.floor(D * 0.4)
    scores = channel_scores(q[:, :, -W:], k)
    nar = layer.narrow
    assert nar.keys.shape == (B, Hkv, T - W, D - drop) and layer.keys.shape == (B, Hkv, W, D)
    for b in range(B):
        for h in range(Hkv):
            pruned = sorted(set(range(D)) - set(nar.channel_idx[b, h].tolist()))
            assert sorted(scores[b, h].argsort()[:drop].tolist()) == pruned  # the lowest-score channels
    kept = nar.channel_idx[:, :, None].expand(-1, -1, T - W, -1)
    torch.testing.assert_close(nar.keys, k[:, :, : T - W].gather(-1, kept))
    assert torch.equal(nar.values, v[:, :, : T - W]) and torch.equal(layer.keys, k[:, :, T - W :])
    saved = B * Hkv * (T - W) * drop * 4 - nar.channel_idx.numel() * 8  # fp32 keys dropped, int64 index added
    assert before - layer.nbytes() == saved


def test_value_pruning_stores_narrow_values_with_exact_byte_saving():
    layer, q, k, v, before = _prefilled_layer(1)
    m = ThinK(ratio=0.4, window=W, value_ratio=0.25, full_recent=W)
    m.after_prefill(SimpleNamespace(layer=layer, query=q, scaling=0.25))
    nar, drop, drop_v = layer.narrow, 6, 4
    assert nar.values.shape == (B, Hkv, T - W, D - drop_v) and layer.values.shape == (B, Hkv, W, D)
    scores = value_channel_scores(q[:, :, -W:], k, v, 0.25)
    for b in range(B):
        for h in range(Hkv):
            pruned = sorted(set(range(D)) - set(nar.value_idx[b, h].tolist()))
            assert sorted(scores[b, h].argsort()[:drop_v].tolist()) == pruned
    dense = nar.dense_values(D)
    kept = torch.zeros(B, Hkv, 1, D, dtype=torch.bool).scatter_(-1, nar.value_idx[:, :, None], True)
    assert torch.equal(dense, torch.where(kept, v[:, :, : T - W], 0.0))
    idx_bytes = (nar.channel_idx.numel() + nar.value_idx.numel()) * 8
    assert before - layer.nbytes() == B * Hkv * (T - W) * (drop + drop_v) * 4 - idx_bytes


def test_default_prunes_every_prompt_slot_and_decode_tokens_stay_full():
    """full_recent=0 (kvpress' layout): all prompt keys narrow, the window only scores; new tokens full-width."""
    model = tiny_model("llama")
    with kvaccel.patched(model, "think(ratio=0.4)"), torch.no_grad():
        cache = KVAccelCache(model)
        model(_ids(100), cache=cache, use_cache=True)
        assert all(l.narrow.keys.shape[2] == 100 and l.keys.shape[2] == 0 for l in cache.layers)
        model(_ids(1, seed=3), cache=cache, use_cache=True)
        assert all(l.narrow.keys.shape[2] == 100 and l.keys.shape[2] == 1 for l in cache.layers)
    with pytest.raises(ValueError, match="full_recent"):
        ThinK(full_recent=-1)


def test_report_kv_bytes_drop_exactly_and_ratio_zero_is_identical():
    model = tiny_model("llama")  # 3 layers, Hkv=2, D=16, fp32
    ids = _ids(300)
    with kvaccel.patched(model, "think(ratio=0.4)"):
        with torch.no_grad():
            model(ids, use_cache=True)
        r = kvaccel.report(model)
    L, Hkv, Dk = 3, 2, 16 - 6
    assert r["kv_bytes"] == r["kv_bytes_full"] - L * Hkv * 300 * 6 * 4 + L * Hkv * Dk * 8  # every prompt slot
    ref = model.generate(ids[:, :100], max_new_tokens=20, do_sample=False)
    with kvaccel.patched(model, ThinK(ratio=0.0)):
        out = model.generate(ids[:, :100], max_new_tokens=20, do_sample=False)
        r = kvaccel.report(model)  # nothing pruned: the tokens + at most 4 spare slots of a growing buffer
        assert 0 <= r["kv_bytes"] - r["kv_bytes_full"] <= 3 * 2 * 4 * (16 + 16) * 4
    assert torch.equal(out, ref)


class NarrowAwareStreaming(Streaming):
    """Streaming whose scores span the concatenated [narrow, full] axis (what ScoredEviction needs with ThinK)."""

    def compress(self, ctx, capacity):
        layer = ctx.layer
        valid = dense_view(layer)[2]
        pos = torch.arange(valid.shape[-1], dtype=torch.float32).expand(valid.shape)
        scores = torch.where(valid.cumsum(-1) - 1 < self.sink, torch.finfo(torch.float32).max, pos)
        idx = scores.masked_fill(~valid, float("-inf")).topk(capacity, dim=-1).indices.sort(dim=-1).values
        layer.keep(idx)


def _ref64_decode_logits(snapshot, ids_tok, position):
    """One decode step of a float64 copy of the model, attending the snapshot's zero-filled dense keys."""
    ref_model = tiny_model("llama", num_hidden_layers=6).double()

    def attn(module, query, key, value, attention_mask, scaling=None, **kw):
        K, V, valid = snapshot[module.layer_idx]
        K, V = torch.cat([K, key], 2), torch.cat([V, value], 2)
        valid = torch.cat([valid, valid.new_ones(*valid.shape[:2], 1)], -1)
        G = query.shape[1] // K.shape[1]
        logits = query @ K.repeat_interleave(G, 1).transpose(-1, -2) * scaling
        logits = logits.masked_fill(~valid.repeat_interleave(G, 1)[:, :, None, :], float("-inf"))
        out = torch.softmax(logits, -1) @ V.repeat_interleave(G, 1)
        return out.transpose(1, 2), None

    AttentionInterface.register("kvaccel_test_ref64", attn)
    try:
        ref_model.set_attn_implementation("kvaccel_test_ref64")
        with torch.no_grad():
            return ref_model(ids_tok, position_ids=torch.tensor([[position]]), use_cache=False).logits[:, -1]
    finally:
        AttentionInterface._global_mapping.pop("kvaccel_test_ref64", None)


@pytest.mark.parametrize(
    "evict,value_ratio",
    [(None, 0.0), (NarrowAwareStreaming(budget=64), 0.0), (D2O(budget=0.25), 0.0), (None, 0.4),
     (D2O(budget=0.25), 0.4)],
    ids=["think", "streaming+think", "d2o+think", "think_values", "d2o+think_values"],
)
def test_compose_generate_and_decode_matches_zero_filled_float64(evict, value_ratio):
    model = tiny_model("llama", num_hidden_layers=6)
    ids = _ids(300, seed=2)
    methods = [ThinK(ratio=0.4, value_ratio=value_ratio)] + ([evict] if evict is not None else [])
    with kvaccel.patched(model, *methods):
        cache = KVAccelCache(model)
        out = model.generate(ids, cache=cache, max_new_tokens=30, do_sample=False)
        assert out.shape[1] == 330
        r = kvaccel.report(model)
        assert r["kv_bytes"] < r["kv_bytes_full"]
        narrow = [layer.narrow is not None for layer in cache.layers]
        assert any(narrow)
        if value_ratio:  # the values of narrow tokens are narrow too: Dv - floor(0.4 * Dv) channels
            assert all(layer.narrow.values.shape[-1] == 16 - 6 for layer in cache.layers if layer.narrow is not None)
        snapshot = [tuple(t.double() if t.is_floating_point() else t for t in dense_view(l)) for l in cache.layers]
        seen = cache.get_seq_length()
        tok = out[:, -1:]
        with torch.no_grad():
            logits = model(tok, cache=cache, use_cache=True).logits[:, -1]
    ref = _ref64_decode_logits(snapshot, tok, seen)
    torch.testing.assert_close(logits.double(), ref, atol=2e-4, rtol=1e-4)


def test_stock_streaming_with_think_keeps_budget_during_decode():
    """ScoredEviction scores the whole [narrow, full] axis, so streaming + think stays at its budget."""
    model = tiny_model("llama", num_hidden_layers=6)
    with kvaccel.patched(model, "streaming(budget=64)+think(ratio=0.4)"):
        cache = KVAccelCache(model)
        model.generate(_ids(300, seed=2), cache=cache, max_new_tokens=20, do_sample=False)
        for layer in cache.layers:  # at the budget, or above it by less than the decode slack (64 // 32 slots)
            assert 64 <= layer.length < 64 + 2 and layer.kept_per_head().max() == layer.length
            assert layer.narrow is not None  # the sinks and older kept tokens stay narrow
        # the 4 sinks are still the first 4 tokens (narrow), the rest the most recent ones
        assert cache.get_seq_length() == 319


def test_keep_with_narrow_segment_ragged_per_head():
    g = torch.Generator().manual_seed(5)
    B, H, T, D, Tn = 2, 3, 60, 8, 40
    layer = KVAccelLayer()
    k, v = torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
    layer.update(k, v)
    layer.token_state["s"] = torch.arange(T, dtype=torch.float32).expand(B, 1, T).clone()
    cidx = torch.stack([torch.randperm(D, generator=g)[:5].sort().values for _ in range(B * H)]).view(B, H, 5)
    ThinK.prune(layer, cidx, Tn)
    K0, V0, _ = dense_view(layer)  # (B, H, T, D), zero-filled narrow channels
    before = layer.nbytes()
    counts = torch.tensor([[10, 25, 3], [30, 12, 18]])
    Kmax = int(counts.max())
    sel = [torch.randperm(T, generator=g)[:Kmax].sort().values for _ in range(B * H)]
    idx = torch.stack(sel).view(B, H, Kmax)
    slot_valid = torch.arange(Kmax)[None, None] < counts[..., None]
    idx = torch.where(slot_valid, idx, T - 1)  # padding slots point anywhere
    layer.keep(idx, slot_valid)
    assert layer.kept_per_head().tolist() == counts.tolist()
    K1, V1, valid1 = dense_view(layer)
    state = layer.token_state["s"]
    assert state.shape[-1] == K1.shape[2]
    for b in range(B):
        for h in range(H):
            want = sorted(idx[b, h, : counts[b, h]].tolist())
            got = state[b, h][valid1[b, h]].long().tolist()
            assert got == want  # exactly the selected tokens, in order, with their state
            torch.testing.assert_close(K1[b, h][valid1[b, h]], K0[b, h, want])
            torch.testing.assert_close(V1[b, h][valid1[b, h]], V0[b, h, want])
            n_narrow = sum(t < Tn for t in want)  # narrow tokens stay narrow, full ones full
            assert int(layer.narrow.valid.expand(B, H, -1)[b, h].sum()) == n_narrow
    assert layer.narrow.keys.shape[-1] == 5 and layer.keys.shape[-1] == D
    sel_counts = [[sum(t < Tn for t in idx[b, h, : counts[b, h]].tolist()) for h in range(H)] for b in range(B)]
    n_max = max(max(r) for r in sel_counts)
    f_max = max(int(counts[b, h]) - sel_counts[b][h] for b in range(B) for h in range(H))
    assert layer.narrow.keys.shape[2] == n_max and layer.keys.shape[2] == f_max  # padded to the largest head only
    assert layer.nbytes() < before
    # one token per head; a selection without narrow tokens drops the segment
    Tn1 = layer.narrow.keys.shape[2]
    last = (valid1 * torch.arange(valid1.shape[-1])).argmax(-1, keepdim=True)  # (B, H, 1) last real token
    layer.keep(last)
    assert layer.kept_per_head().tolist() == [[1] * H] * B
    assert (layer.narrow is None) == bool((last >= Tn1).all())
    fresh = KVAccelLayer()
    fresh.update(k, v)
    ThinK.prune(fresh, cidx, Tn)
    fresh.keep(torch.arange(Tn, T).view(1, 1, -1).expand(B, 1, -1))  # full-width tokens only
    assert fresh.narrow is None and torch.equal(fresh.keys, k[:, :, Tn:])
