"""KVzip: reconstruction scores against a naive computation, global / per-layer allocation, bytes = budget, exact
with budget = all, clear refusals."""

from __future__ import annotations

import pytest
import torch

import kvaccel
import kvaccel.patches.evict.kvzip as kvzip_module
from kvaccel.cache import KVAccelCache
from kvaccel.patches.evict.kvzip import KVzip, allocate, reconstruction_max_attention
from kvaccel.varlen_cache import VarlenLayer

from conftest import tiny_model

PROMPT = (7, 8, 9, 10)  # stands for the tokenizer's "Repeat the previous context exactly." + "\n" in tiny models


@pytest.mark.parametrize("include_own", [False, True])
@pytest.mark.parametrize("row_block", [64, 3])
def test_reconstruction_max_attention_matches_naive(monkeypatch, include_own, row_block):
    """Per scored key: max over queries and the group of softmax over [sinks, chunk, reconstruction keys]; with
    ``include_own`` the reconstruction keys' own scores follow. ``row_block=3``: three blocks of queries (the last
    ragged) on the worker threads, their maxima merged."""
    monkeypatch.setattr(kvzip_module, "ROW_BLOCK", row_block)
    g = torch.Generator().manual_seed(0)
    B, Hkv, G, D, T, Q = 2, 2, 3, 8, 30, 7
    keys = torch.randn(B, Hkv, T, D, generator=g)
    query = torch.randn(B, Hkv * G, Q, D, generator=g)
    scored, n_sink, scale = slice(6, 20), 2, 0.35
    got = reconstruction_max_attention(query, keys, scale, scored, n_sink, include_own=include_own)
    cols = list(range(n_sink)) + list(range(scored.start, scored.stop)) + list(range(T - Q, T))
    out_cols = list(range(scored.start, scored.stop)) + (list(range(T - Q, T)) if include_own else [])
    want = torch.zeros(B, Hkv, len(out_cols))
    for b in range(B):
        for h in range(Hq := Hkv * G):
            kv = h // G
            for i in range(Q):
                visible = [c for c in cols if c < T - Q or c <= T - Q + i]
                logits = torch.stack([query[b, h, i] @ keys[b, kv, c] * scale for c in visible])
                p = torch.softmax(logits, 0)
                for j, c in enumerate(visible):
                    if c in out_cols:
                        o = out_cols.index(c)
                        want[b, kv, o] = max(want[b, kv, o], p[j])
    assert Hq == 6
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_kvzip_budget_all_is_token_identical():
    model = tiny_model("llama")
    ids = torch.randint(11, 512, (1, 40), generator=torch.Generator().manual_seed(1))
    gen = {"max_new_tokens": 16, "min_new_tokens": 16, "do_sample": False}
    ref = model.generate(ids, **gen)
    with kvaccel.patched(model, KVzip(budget=1.0, prompt_ids=PROMPT)):
        assert torch.equal(model.generate(ids, **gen), ref)


def _kept_positions(layer: VarlenLayer, keys: torch.Tensor, b: int, h: int) -> list[int]:
    """Prompt positions of the tokens segment ``(b, h)`` of ``layer`` holds (found by their keys)."""
    start, n = int(layer.seg_start[b, h]), int(layer.seg_len[b, h])
    held = layer.key_buffer[start : start + n]
    hit = (held[:, None] == keys[b, h][None]).all(-1)  # (n, L)
    assert (hit.sum(-1) == 1).all()
    return hit.float().argmax(-1).tolist()


def _naive_top(values: dict[tuple, float], k: int) -> set[tuple]:
    """The ``k`` keys of the highest values, by sorting (the k-th and (k+1)-th values must differ)."""
    ranked = sorted(values, key=values.__getitem__, reverse=True)
    assert k < len(ranked) and values[ranked[k - 1]] > values[ranked[k]]
    return set(ranked[:k])


@pytest.mark.parametrize("allocation", ["global", "layer"])
@pytest.mark.parametrize("expected_weight", [0.0, 0.5])
@pytest.mark.parametrize("observation_window", [0, 16])
def test_kvzip_keeps_the_top_scores_of_the_budget(monkeypatch, allocation, expected_weight, observation_window):
    """Each (sequence, layer, head) holds exactly the tokens a naive top-k (by sorting) keeps: over every layer and
    head of a sequence, ``budget * L * H_kv * layers`` of them (``global``), or ``budget * L * H_kv`` per layer
    (``layer``); sinks included. With ``expected_weight = 0`` the ranked score is KVzip's: the reconstruction
    score, maxed with the observation window's. The cache drops the reconstruction tokens and decoding goes on."""
    model = tiny_model("llama")
    B, L, cap, n_sink = 2, 96, 24, 4
    ids = torch.randint(11, 512, (B, L), generator=torch.Generator().manual_seed(3))
    method = KVzip(budget=cap, prompt_ids=PROMPT, allocation=allocation, expected_weight=expected_weight,
                   observation_window=observation_window, chunk_size=40, n_sink=n_sink)  # 3 reconstruction chunks
    seen = {}
    mixed_scores = KVzip._mixed_scores

    def spy(self, pending, scores, L):
        seen.update(pending=pending, scores=[z.clone() for z in scores], mixed=mixed_scores(self, pending, scores, L))
        return seen["mixed"]

    monkeypatch.setattr(KVzip, "_mixed_scores", spy)
    with kvaccel.patched(model, method), torch.no_grad():
        cache = KVAccelCache(model)
        model(ids, cache=cache, use_cache=True)
        layers = cache.layers
        assert all(isinstance(layer, VarlenLayer) for layer in layers)
        assert all(layer.seen == L and layer.get_seq_length() == L for layer in layers)
        H, nl = model.config.num_key_value_heads, len(layers)
        prompt_keys = [seen["pending"][i]["layer"].keys for i in range(nl)]
        kept = {(i, b, h): _kept_positions(layers[i], prompt_keys[i], b, h)
                for i in range(nl) for b in range(B) for h in range(H)}
        out = model(ids[:, :1], cache=cache, use_cache=True)  # decoding continues over the packed layers
        assert out.logits.shape == (B, 1, model.config.vocab_size) and torch.isfinite(out.logits).all()
        assert all(layer.seen == L + 1 for layer in cache.layers)
    mixed = seen["mixed"]
    if expected_weight == 0:
        for i, (z, s) in enumerate(zip(seen["scores"], mixed, strict=True)):
            window = seen["pending"][i]["window"]
            want = z if window is None else torch.maximum(z, window)
            want[..., :n_sink] = float("inf")
            assert torch.equal(s, want)
    for b in range(B):
        groups = [range(nl)] if allocation == "global" else [[i] for i in range(nl)]
        for group in groups:
            values = {(i, h, t): float(mixed[i][b, h, t]) for i in group for h in range(H) for t in range(L)}
            keep = _naive_top(values, cap * H * len(group))
            for i in group:
                for h in range(H):
                    got = kept[i, b, h]
                    assert got == sorted(t for (j, hh, t) in keep if (j, hh) == (i, h))
                    assert got[:n_sink] == list(range(n_sink))


def test_allocate_keeps_the_global_top_scores():
    """``allocate`` against a naive global top-k over every layer and head (and per layer for ``"layer"``)."""
    g = torch.Generator().manual_seed(7)
    B, H, L, layers, cap = 2, 3, 20, 4, 5
    mixed = [torch.rand(B, H, L, generator=g) * (i + 1) for i in range(layers)]  # layers on different scales
    masks = allocate(mixed, cap, "global")
    for b in range(B):
        values = {(i, h, t): float(mixed[i][b, h, t]) for i in range(layers) for h in range(H) for t in range(L)}
        keep = _naive_top(values, cap * H * layers)
        got = {(i, h, t) for i in range(layers) for h, t in masks[i][b].nonzero().tolist()}
        assert got == keep
        per_layer = [int(m[b].sum()) for m in masks]
        assert sum(per_layer) == cap * H * layers and len(set(per_layer)) > 1  # layers compete: lengths differ
    for i, m in enumerate(allocate(mixed, cap, "layer")):
        for b in range(B):
            values = {(h, t): float(mixed[i][b, h, t]) for h in range(H) for t in range(L)}
            assert {tuple(x) for x in m[b].nonzero().tolist()} == _naive_top(values, cap * H)
    with pytest.raises(ValueError, match="allocation"):
        allocate(mixed, cap, "heads")


def test_kvzip_first_chunk_scores_equal_a_dense_recomputation():
    """The scores the reconstruction forward records equal a naive recomputation from the stock model's own
    attention over [prompt, repeat prompt, prompt] (one chunk, no sinks excluded: chunk starts at 0)."""
    model = tiny_model("llama")
    L = 20
    ids = torch.randint(11, 512, (1, L), generator=torch.Generator().manual_seed(4))
    method = KVzip(budget=0.5, prompt_ids=PROMPT)
    with kvaccel.patched(model, method), torch.no_grad():
        cache = KVAccelCache(model)
        model(ids, cache=cache, use_cache=True)
        got = [s.clone() for s in method._scores]
    # stock eager attention over the whole sequence: rows of the repeat tokens, columns of the prompt
    full = torch.cat([ids, torch.tensor([PROMPT]), ids], dim=1)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        att = model(full, output_attentions=True).attentions
    model.set_attn_implementation("sdpa")
    G = model.config.num_attention_heads // model.config.num_key_value_heads
    for i, a in enumerate(att):  # (1, Hq, T, T)
        want = a[:, :, L:, :L].amax(2).view(1, -1, G, L).amax(2)
        torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-6)


def test_kvzip_later_chunk_scores_equal_a_dense_recomputation():
    """Chunks after the first: the recorded scores equal a naive computation from the stock model's own attention
    over [prompt, next-chunk instruction, the previous chunk's last 8 tokens, newline, chunk]: the probabilities of
    that forward renormalised (an explicit softmax) over the first ``n_sink`` keys, the chunk and the reconstruction
    keys, maxed over the reconstruction queries and the query heads of each kv head."""
    model = tiny_model("llama")
    L, chunk, n_sink = 70, 25, 4  # chunks [0, 25), [25, 50), [50, 70)
    ids = torch.randint(11, 512, (1, L), generator=torch.Generator().manual_seed(6))
    method = KVzip(budget=0.5, prompt_ids=PROMPT, chunk_size=chunk, n_sink=n_sink)
    with kvaccel.patched(model, method), torch.no_grad():
        model(ids, cache=KVAccelCache(model), use_cache=True)
        got = [s.clone() for s in method._scores]
    G = model.config.num_attention_heads // model.config.num_key_value_heads
    model.set_attn_implementation("eager")
    try:
        for c0 in (25, 50):
            c1 = min(L, c0 + chunk)
            recon = [*PROMPT[:-1], *ids[0, c0 - KVzip.OVERLAP : c0].tolist(), PROMPT[-1], *ids[0, c0:c1].tolist()]
            full = torch.cat([ids, torch.tensor([recon])], dim=1)
            with torch.no_grad():
                att = model(full, output_attentions=True).attentions
            cols = [*range(n_sink), *range(c0, c1), *range(L, full.shape[1])]
            for i, a in enumerate(att):  # (1, Hq, T, T)
                p = a[:, :, L:][..., cols].double()
                p = p / p.sum(-1, keepdim=True)  # softmax over the scored columns only
                want = p[..., n_sink : n_sink + c1 - c0].amax(2).view(1, -1, G, c1 - c0).amax(2)
                torch.testing.assert_close(got[i][..., c0:c1].double(), want, rtol=1e-4, atol=1e-6)
    finally:
        model.set_attn_implementation("sdpa")


def test_kvzip_refusals_and_later_tokens():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="allocation"):
        KVzip(allocation="heads")
    with pytest.raises(ValueError, match="expected_weight"):
        KVzip(expected_weight=1.5)
    with pytest.raises(ValueError, match="tokenizer"):
        kvaccel.patch(model, "kvzip")  # a random tiny model has no tokenizer
    kvaccel.unpatch(model)
    with pytest.raises(NotImplementedError, match="think"):
        kvaccel.patch(model, KVzip(prompt_ids=PROMPT), "think")
    kvaccel.unpatch(model)
    ids = torch.randint(11, 512, (2, 30), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with kvaccel.patched(model, KVzip(budget=8, prompt_ids=PROMPT)), torch.no_grad():
        with pytest.raises(NotImplementedError, match="padded"):
            model(ids, attention_mask=mask, cache=KVAccelCache(model), use_cache=True)
        cache = KVAccelCache(model)
        model(ids[:1], cache=cache, use_cache=True)
        held = [layer.seg_len.clone() for layer in cache.layers]
        model(ids[:1, :5], cache=cache, use_cache=True)  # a question after the compressed context: kept
        assert all(torch.equal(layer.seg_len, h + 5) for layer, h in zip(cache.layers, held, strict=True))
        assert any("kept uncompressed" in n for n in kvaccel.report(model)["notes"])
