"""TOVA, KNorm, KeyDiff: scores against naive references of their formulas, kept = top scores, decode budgets,
bytes freed, bf16, composition with a prefill method and ThinK, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from test_evict_methods import D, decode_step, kept_ids, make_ctx, make_layer, queries

import kvaccel
from kvaccel.cache import KVAccelCache
from kvaccel.patches.evict import tova as tova_module
from kvaccel.patches.evict.keydiff import KeyDiff, keydiff_scores
from kvaccel.patches.evict.knorm import KNorm, knorm_scores
from kvaccel.patches.evict.tova import TOVA

from conftest import tiny_model

Hq, Hkv = 4, 2


# ----------------------------------------------------------------------------------------------- naive references
def naive_knorm(keys):
    return torch.stack([torch.stack([-torch.sqrt(sum(x * x for x in k.double())) for k in head]) for head in keys[0]])


def naive_keydiff(keys, valid=None):
    """Per head: anchor = mean of unit keys over the real tokens, score = -(k . a) / (|k| |a|), in float64."""
    out = []
    for h, head in enumerate(keys[0].double()):
        real = [j for j in range(head.shape[0]) if valid is None or bool(valid[0, min(h, valid.shape[1] - 1), j])]
        a = sum(head[j] / head[j].norm() for j in real) / len(real)
        out.append(torch.stack([-(k @ a) / (k.norm() * a.norm()) for k in head]))
    return torch.stack(out)


def naive_tova(q_last, keys):
    """Mean over every query head of the last query's softmax over all keys (float64, explicit logits); the last
    token gets +inf (always kept)."""
    G = q_last.shape[1] // keys.shape[1]
    rows = []
    for h in range(q_last.shape[1]):
        logits = torch.stack([q_last[0, h, -1].double() @ k.double() for k in keys[0, h // G]]) / math.sqrt(D)
        rows.append(torch.exp(logits - logits.max()) / torch.exp(logits - logits.max()).sum())
    s = torch.stack(rows).mean(0)
    s[-1] = math.inf
    return s


def top_set(scores, k):
    return set(scores.topk(k).indices.tolist())


# ----------------------------------------------------------------------------------------------- formulas
def test_knorm_score_is_minus_the_key_l2_norm():
    layer = make_layer(40, Hkv, seed=1)
    got = KNorm(budget=8).score(make_ctx(layer, queries(Hq, 40)))
    assert got.shape == (1, Hkv, 40) and got.dtype == torch.float32
    torch.testing.assert_close(got[0].double(), naive_knorm(layer.keys), atol=1e-5, rtol=1e-6)
    assert torch.equal(got, knorm_scores(layer.keys))


def test_keydiff_score_is_minus_cosine_to_the_mean_unit_key():
    layer = make_layer(40, Hkv, seed=2)
    got = KeyDiff(budget=8).score(make_ctx(layer, queries(Hq, 40)))
    assert got.shape == (1, Hkv, 40)
    torch.testing.assert_close(got[0].double(), naive_keydiff(layer.keys), atol=1e-6, rtol=1e-6)
    # padding slots stay out of the anchor
    valid = torch.ones(1, 1, 40, dtype=torch.bool)
    valid[..., :7] = False
    torch.testing.assert_close(keydiff_scores(layer.keys, valid)[0].double(), naive_keydiff(layer.keys, valid),
                               atol=1e-6, rtol=1e-6)
    assert not torch.allclose(keydiff_scores(layer.keys, valid), keydiff_scores(layer.keys))


def test_tova_score_is_the_last_query_attention_averaged_over_all_heads(monkeypatch):
    layer = make_layer(40, Hkv, seed=3)
    q = queries(Hq, 40, seed=4)
    rows = []
    real = tova_module.held_attention_probs
    monkeypatch.setattr(tova_module, "held_attention_probs",
                        lambda layer, query, scale: rows.append(query.shape[2]) or real(layer, query, scale))
    got = TOVA(budget=8).score(make_ctx(layer, q))
    assert rows == [1]  # one query row: no attention matrix
    assert got.shape == (1, 1, 40)  # one score for every kv head of the layer
    want = naive_tova(q[:, :, -1:], layer.keys)
    assert got[0, 0, -1] == torch.finfo(torch.float32).max
    torch.testing.assert_close(got[0, 0, :-1].double(), want[:-1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cls", [TOVA, KNorm, KeyDiff])
def test_kept_tokens_are_exactly_the_top_scores(cls):
    T, cap = 64, 12
    layer, q = make_layer(T, Hkv, seed=5), queries(Hq, T, seed=6)
    if cls is TOVA:
        naive = naive_tova(q[:, :, -1:], layer.keys).expand(Hkv, T)
    elif cls is KNorm:
        naive = naive_knorm(layer.keys)
    else:
        naive = naive_keydiff(layer.keys)
    ctx = make_ctx(layer, q)
    cls(budget=cap).after_prefill(ctx)
    assert ctx.caps == [cap] and layer.length == cap
    ids = kept_ids(layer)
    for h in range(Hkv):
        assert set(ids[0, h].tolist()) == top_set(naive[h], cap)
        assert ids[0, h].tolist() == sorted(ids[0, h].tolist())  # kept in order


def test_chunked_selection_keeps_whole_chunks():
    T, cap, chunk = 64, 16, 4
    layer = make_layer(T, Hkv, seed=7)
    naive = naive_knorm(layer.keys)
    KNorm(budget=cap, chunk=chunk).after_prefill(make_ctx(layer, queries(Hq, T)))
    for h in range(Hkv):
        sums = naive[h].view(T // chunk, chunk).sum(-1)
        want = {c * chunk + i for c in sums.topk(cap // chunk).indices.tolist() for i in range(chunk)}
        assert set(kept_ids(layer)[0, h].tolist()) == want


# ----------------------------------------------------------------------------------------------- decoding
def test_tova_decode_evicts_the_token_the_current_query_attends_to_least():
    """The paper's loop (decode_budget, slack=1): each step drops the held token with the lowest mean attention
    of the new query (never the new token itself)."""
    T, cap = 48, 16
    layer = make_layer(T, Hkv, seed=8)
    method = TOVA(budget=cap, decode_budget=cap, slack=1)
    method.after_prefill(make_ctx(layer, queries(Hq, T, seed=9)))
    assert layer.length == cap
    for step in range(5):
        q = decode_step(layer, Hq, seed=20 + step)
        before = kept_ids(layer)[0, 0].tolist()
        naive = naive_tova(q, layer.keys)
        method.after_decode(make_ctx(layer, q, phase="decode"))
        after = kept_ids(layer)[0, 0].tolist()
        dropped = set(before) - set(after)
        assert len(after) == cap and dropped == {before[int(naive.argmin())]}
        assert before[-1] in after  # the new token
        assert torch.equal(kept_ids(layer)[0, 0], kept_ids(layer)[0, 1])  # same tokens in every kv head


@pytest.mark.parametrize("cls", [KNorm, KeyDiff])
def test_key_scorers_decode_budget_keeps_the_top_held_keys(cls):
    T, cap, slack = 48, 16, 4
    layer = make_layer(T, Hkv, seed=10)
    method = cls(budget=24, decode_budget=cap, slack=slack)
    method.after_prefill(make_ctx(layer, queries(Hq, T)))
    assert layer.length == 24
    q = decode_step(layer, Hq, seed=30)  # 25 slots >= decode_budget + slack: cut back to decode_budget
    held = kept_ids(layer)
    naive = naive_knorm(layer.keys) if cls is KNorm else naive_keydiff(layer.keys)
    method.after_decode(make_ctx(layer, q, phase="decode"))
    assert layer.length == cap
    for h in range(Hkv):
        assert set(kept_ids(layer)[0, h].tolist()) == {int(held[0, h, j]) for j in top_set(naive[h], cap)}
    for step in range(slack - 1):  # then it grows until it holds decode_budget + slack slots again
        q = decode_step(layer, Hq, seed=31 + step)
        method.after_decode(make_ctx(layer, q, phase="decode"))
        assert layer.length == cap + 1 + step


# ----------------------------------------------------------------------------------------------- end to end
SPECS = ["tova(budget=32)", "knorm(budget=32)", "keydiff(budget=32)", "tova(budget=32, decode_budget=32)",
         "knorm(budget=32, decode_budget=32, chunk=4)", "keydiff(budget=32, decode_budget=32)"]


@pytest.mark.parametrize("spec", SPECS)
def test_bytes_are_really_freed(spec):
    model = tiny_model("llama")
    cfg = model.config
    Dh = cfg.hidden_size // cfg.num_attention_heads
    ids = torch.randint(3, 512, (1, 256), generator=torch.Generator().manual_seed(3))
    with kvaccel.patched(model, spec):
        cache = KVAccelCache(model)
        model.generate(ids, max_new_tokens=21, do_sample=False, cache=cache)  # prefill + 20 decode steps
        rep = kvaccel.report(model)
        bounded = "decode_budget" in spec
        assert rep["capacity"] == [32] * cfg.num_hidden_layers
        assert rep["kept_tokens"] == [[[32 if bounded else 52] * cfg.num_key_value_heads]] * cfg.num_hidden_layers
        per_slot = cfg.num_key_value_heads * 2 * Dh * 4  # fp32 K and V, no per-token method state
        for layer in cache.layers:
            slots = layer.nbytes() / per_slot
            if bounded:
                assert slots == 32 + 1  # capacity + the decode slack (max(1, 32 // 32))
            else:  # grown by 20 tokens: spare slots of the last reallocation, max(4, n / 32)
                assert 52 <= slots <= 52 + 4
        assert rep["kv_bytes"] == cache.nbytes() < 0.25 * rep["kv_bytes_full"]


@pytest.mark.parametrize("name", ["tova", "knorm", "keydiff"])
def test_budget_all_is_token_identical(name):
    model = tiny_model("llama")
    ids = torch.randint(3, 512, (1, 50), generator=torch.Generator().manual_seed(2))
    gen = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False)
    ref = model.generate(ids, **gen)
    with kvaccel.patched(model, name, budget=10_000, decode_budget=10_000):
        assert torch.equal(model.generate(ids, **gen), ref)


@pytest.mark.parametrize("name", ["tova", "knorm", "keydiff"])
def test_bf16_keeps_the_dtype_and_the_kept_set(name):
    model = tiny_model("llama").to(torch.bfloat16)
    ids = torch.randint(3, 512, (1, 96), generator=torch.Generator().manual_seed(11))
    with kvaccel.patched(model), torch.no_grad():  # no eviction: the keys the scorer sees
        full = KVAccelCache(model)
        model(ids, cache=full, use_cache=True)
    with kvaccel.patched(model, f"{name}(budget=24)"), torch.no_grad():
        cache = KVAccelCache(model)
        logits = model(ids, cache=cache, use_cache=True).logits
        assert logits.dtype == torch.bfloat16 and bool(torch.isfinite(logits).all())
        for ref, layer in zip(full.layers, cache.layers, strict=True):
            assert layer.keys.dtype == layer.values.dtype == torch.bfloat16 and layer.length == 24
            if name == "tova":
                continue  # its query is not in the cache; the formula is checked above
            scores = knorm_scores(ref.keys) if name == "knorm" else keydiff_scores(ref.keys)
            want = scores.topk(24, dim=-1).indices.sort(-1).values
            assert torch.equal(layer.keys, ref.keys.gather(2, want[..., None].expand(-1, -1, -1, ref.keys.shape[-1])))


def test_compose_with_a_sparse_prefill_and_think():
    """a_shape prefill + TOVA (decode budget) + ThinK: the prefill is sparse, the scores come from the same queries
    and keys (same kept set as a dense prefill), ThinK prunes channels of the kept keys, decoding re-scores the
    [narrow, full] axis and holds the budget."""
    model = tiny_model("llama")
    ids = torch.randint(3, 512, (1, 160), generator=torch.Generator().manual_seed(12))
    a_shape = "a_shape(sink_blocks=1,local_blocks=2,block_size=32,min_length=16)"
    first = {}
    for prefill in ("", a_shape + "+"):
        with kvaccel.patched(model, f"{prefill}tova(budget=32, decode_budget=32, slack=1)+think(ratio=0.4)"), \
                torch.no_grad():
            cache = KVAccelCache(model)
            tok = model(ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            rep = kvaccel.report(model)
            assert all(layer.narrow is not None for layer in cache.layers)
            first[prefill] = (cache.layers[0].narrow.keys.clone(), cache.layers[0].keys.clone())
            for _ in range(6):
                tok = model(tok, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            assert kvaccel.report(model)["kept_tokens"] == [[[32, 32]]] * model.config.num_hidden_layers
        if prefill:
            assert max(rep["prefill_density"]) < 1
    # layer 0's queries and keys come before any attention: the sparse prefill keeps the same tokens there
    for a, b in zip(first[""], first[a_shape + "+"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["knorm", "keydiff"])
def test_key_scorers_with_think(name):
    """Prompt-time eviction runs before ThinK prunes channels: composes. Rescoring pruned keys is refused."""
    model = tiny_model("llama")
    ids = torch.randint(3, 512, (1, 140), generator=torch.Generator().manual_seed(13))
    with kvaccel.patched(model, f"{name}(budget=24)+think(ratio=0.4)"), torch.no_grad():
        cache = KVAccelCache(model)
        tok = model(ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        assert all(layer.narrow is not None for layer in cache.layers)
        for _ in range(4):
            tok = model(tok, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        assert kvaccel.report(model)["kept_tokens"][0][0] == [28, 28]
        cache = KVAccelCache(model)
        model(ids[:, :120], cache=cache, use_cache=True)
        with pytest.raises(NotImplementedError, match=f"{name} scores a key by all its channels"):
            model(ids[:, 120:], cache=cache, use_cache=True)  # a later prompt chunk would rescore pruned keys
    with pytest.raises(ValueError, match="drop decode_budget"):
        kvaccel.patch(model, f"{name}(budget=24, decode_budget=24)+think")
    assert not kvaccel.is_patched(model)


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("cls", [TOVA, KNorm, KeyDiff])
@pytest.mark.parametrize("kwargs,field", [({"budget": 0}, "budget"), ({"decode_budget": 1.5}, "decode_budget"),
                                          ({"decode_budget": 0}, "decode_budget"), ({"chunk": -1}, "chunk"),
                                          ({"slack": 0}, "slack")])
def test_bad_input_names_the_field(cls, kwargs, field):
    with pytest.raises(ValueError, match=field):
        cls(**kwargs)


def test_spec_strings_round_trip():
    for spec in ("tova(budget=0.25)", "knorm(budget=64, chunk=8)", "keydiff(decode_budget=128, slack=1)"):
        (m,) = kvaccel.parse_spec(spec)
        assert kvaccel.parse_spec(m.spec())[0] == m


def test_tova_decode_probs_from_the_attention_equal_a_separate_pass(monkeypatch):
    """With slack=1 TOVA takes each step's probabilities from the decode attention (one pass over the keys): the
    same kept tokens and outputs as scoring them in a second pass."""
    import kvaccel.patches.attention as attention

    model = tiny_model("llama")
    ids = torch.randint(3, 512, (1, 96), generator=torch.Generator().manual_seed(6))
    runs, calls = [], []
    real = tova_module.step_attention_probs
    monkeypatch.setattr(tova_module, "step_attention_probs",
                        lambda ctx: calls.append(getattr(ctx, "decode_probs", None) is not None) or real(ctx))
    for fuse in (True, False):
        calls.clear()
        if not fuse:
            monkeypatch.setattr(attention, "_fuse_decode_probs", lambda ctx: False)
        with kvaccel.patched(model, "tova(budget=24, decode_budget=24, slack=1)"):
            cache = KVAccelCache(model)
            out = model.generate(ids, cache=cache, max_new_tokens=12, do_sample=False)
            runs.append((out, [layer.values.clone() for layer in cache.layers]))
        assert calls and all(c == fuse for c in calls)
    assert torch.equal(runs[0][0], runs[1][0])
    for a, b in zip(runs[0][1], runs[1][1], strict=True):  # same tokens held (the two attention paths round
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)  # differently in the last bits)


@pytest.mark.parametrize("name", ["tova", "knorm", "keydiff"])
def test_chunked_prompt_is_compressed_after_each_chunk(name):
    model = tiny_model("llama")
    ids = torch.randint(3, 512, (1, 160), generator=torch.Generator().manual_seed(8))
    with kvaccel.patched(model, name, budget=24), torch.no_grad():
        cache = KVAccelCache(model)
        model(ids[:, :100], cache=cache, use_cache=True)
        assert [layer.kept_per_head().tolist() for layer in cache.layers] == [[[24, 24]]] * 3
        model(ids[:, 100:], cache=cache, use_cache=True)  # phase "extend": held 24 + 60 new, cut back to 24
        assert [layer.kept_per_head().tolist() for layer in cache.layers] == [[[24, 24]]] * 3
        assert cache.get_seq_length() == 160
