"""KVzip: reconstruction scores against a naive computation, global / per-layer allocation, bytes = budget, exact
with budget = all, clear refusals."""

from __future__ import annotations

import pytest
import torch

import kvaccel
from kvaccel.cache import KVAccelCache
from kvaccel.patches.evict.kvzip import KVzip, reconstruction_max_attention
from kvaccel.varlen_cache import VarlenLayer

from conftest import tiny_model

PROMPT = (7, 8, 9, 10)  # stands for the tokenizer's "Repeat the previous context exactly." + "\n" in tiny models


@pytest.mark.parametrize("include_own", [False, True])
def test_reconstruction_max_attention_matches_naive(include_own):
    """Per scored key: max over queries and the group of softmax over [sinks, chunk, reconstruction keys]; with
    ``include_own`` the reconstruction keys' own scores follow."""
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


def _held(cache: KVAccelCache) -> list[torch.Tensor]:
    return [layer.kept_per_head() if not isinstance(layer, VarlenLayer) else layer.seg_len for layer in cache.layers]


@pytest.mark.parametrize("allocation", ["global", "layer"])
@pytest.mark.parametrize("expected_weight", [0.0, 0.5])
@pytest.mark.parametrize("observation_window", [0, 16])
def test_kvzip_keeps_the_budget(allocation, expected_weight, observation_window):
    """Every sequence keeps budget * L * H_kv tokens per layer on average (global) or per layer (layer), each
    (layer, head) its sinks; the cache drops the reconstruction tokens and counts the prompt as seen."""
    model = tiny_model("llama")
    B, L, cap = 2, 96, 24
    ids = torch.randint(11, 512, (B, L), generator=torch.Generator().manual_seed(3))
    method = KVzip(budget=cap, prompt_ids=PROMPT, allocation=allocation, expected_weight=expected_weight,
                   observation_window=observation_window, chunk_size=40)  # 3 reconstruction chunks
    with kvaccel.patched(model, method), torch.no_grad():
        cache = KVAccelCache(model)
        model(ids, past_key_values=cache, use_cache=True)
        layers = cache.layers
        assert all(isinstance(layer, VarlenLayer) for layer in layers)
        assert all(layer.seen == L and layer.get_seq_length() == L for layer in layers)
        H = model.config.num_key_value_heads
        per_layer = torch.stack([layer.seg_len.view(B, H).sum(-1) for layer in layers])  # (layers, B)
        if allocation == "layer":
            assert (per_layer == cap * H).all()
        else:
            assert (per_layer.sum(0) == cap * H * len(layers)).all()
        assert all((layer.seg_len >= method.n_sink).all() for layer in layers)
        # decoding continues over the packed layers
        out = model(ids[:, :1], past_key_values=cache, use_cache=True)
        assert torch.isfinite(out.logits).all()
        assert all(layer.seen == L + 1 for layer in cache.layers)


def test_kvzip_first_chunk_scores_equal_a_dense_recomputation():
    """The scores the reconstruction forward records equal a naive recomputation from the stock model's own
    attention over [prompt, repeat prompt, prompt] (one chunk, no sinks excluded: chunk starts at 0)."""
    model = tiny_model("llama")
    L = 20
    ids = torch.randint(11, 512, (1, L), generator=torch.Generator().manual_seed(4))
    method = KVzip(budget=0.5, prompt_ids=PROMPT)
    with kvaccel.patched(model, method), torch.no_grad():
        cache = KVAccelCache(model)
        model(ids, past_key_values=cache, use_cache=True)
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
            model(ids, attention_mask=mask, past_key_values=KVAccelCache(model), use_cache=True)
        cache = KVAccelCache(model)
        model(ids[:1], past_key_values=cache, use_cache=True)
        held = [layer.seg_len.clone() for layer in cache.layers]
        model(ids[:1, :5], past_key_values=cache, use_cache=True)  # a question after the compressed context: kept
        assert all(torch.equal(layer.seg_len, h + 5) for layer, h in zip(cache.layers, held, strict=True))
        assert any("kept uncompressed" in n for n in kvaccel.report(model)["notes"])
