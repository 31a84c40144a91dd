"""critical(...): projected value norms and the two-stage selection against naive references, over several inner
scorers (prompt and decode), bytes freed, bf16, composition, spec strings and refused wrappings."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from test_evict_methods import D, decode_step, kept_ids, make_ctx, make_layer, queries

import kvaccel
from kvaccel.cache import KVAccelCache
from kvaccel.patches.evict import critical as critical_module
from kvaccel.patches.evict.critical import Critical, critical_scores, projected_value_norms
from kvaccel.patches.evict.expected_attention import ExpectedAttention
from kvaccel.patches.evict.h2o import H2O
from kvaccel.patches.evict.snapkv import SnapKV
from kvaccel.patches.evict.streaming import Streaming
from kvaccel.patches.evict.tova import TOVA

from conftest import tiny_model

Hq, Hkv, HIDDEN = 6, 2, 20
KEEP = torch.finfo(torch.float32).max


# ----------------------------------------------------------------------------------------------- naive references
def naive_norms(values, weight):
    """``n[g, j] = mean over the G query heads h of kv head g of sum_o |sum_d v[g, j, d] W[o, h*Dv + d]|``."""
    _, H, N, Dv = values.shape
    G = weight.shape[1] // Dv // H
    out = torch.zeros(H, N, dtype=torch.float64)
    for g in range(H):
        for h in range(g * G, (g + 1) * G):
            W = weight[:, h * Dv:(h + 1) * Dv].double()
            for j in range(N):
                out[g, j] += (W @ values[0, g, j].double()).abs().sum() / G
    return out


def naive_critical_keep(scores, norms, cap, ratio=0.5, eps=1e-4):
    """Per head: the top ``int(cap * ratio)`` by score, then the best ``(s + eps) * n`` of the rest up to ``cap``
    (a score of float32 max is +inf: always kept)."""
    s = scores.double().masked_fill(scores >= KEEP, float("inf"))
    kept = []
    for h in range(norms.shape[0]):
        sh = s[min(h, s.shape[0] - 1)]
        first = set(sh.topk(int(cap * ratio)).indices.tolist())
        second = ((sh + eps) * norms[h]).tolist()
        rest = sorted((j for j in range(len(second)) if j not in first), key=lambda j: -second[j])
        kept.append(first | set(rest[:cap - len(first)]))
    return kept


def fake_module(seed=0):
    o_proj = torch.nn.Linear(Hq * D, HIDDEN, bias=False)
    with torch.no_grad():
        o_proj.weight.copy_(torch.randn(HIDDEN, Hq * D, generator=torch.Generator().manual_seed(seed)))
    return SimpleNamespace(o_proj=o_proj)


def critical_ctx(layer, q, phase="prefill", module=None):
    ctx = make_ctx(layer, q, phase=phase)
    ctx.module = module or fake_module()
    return ctx


# ----------------------------------------------------------------------------------------------- formulas
def test_projected_value_norms_by_hand(monkeypatch):
    g = torch.Generator().manual_seed(1)
    values = torch.randn(1, Hkv, 11, D, generator=g)
    weight = torch.randn(HIDDEN, Hq * D, generator=g)
    got = projected_value_norms(values, weight)
    assert got.shape == (1, Hkv, 11) and got.dtype == torch.float32
    torch.testing.assert_close(got[0].double(), naive_norms(values, weight), atol=1e-4, rtol=1e-5)
    monkeypatch.setattr(critical_module, "NORM_BLOCK", 3)  # token blocks give the same norms
    torch.testing.assert_close(projected_value_norms(values, weight), got, atol=1e-5, rtol=1e-6)
    with pytest.raises(ValueError, match="o_proj takes 47 input features"):
        projected_value_norms(values, weight[:, :47])


def test_critical_scores_rank_like_the_two_stage_rule():
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(1, Hkv, 30, generator=g)
    scores[0, 0, 5] = KEEP  # a token the inner scorer always keeps
    norms = torch.rand(1, Hkv, 30, generator=g) * 3
    valid = torch.ones(1, 1, 30, dtype=torch.bool)
    valid[..., :2] = False  # padding
    merged = critical_scores(scores, norms, valid, 10, 0.5, 1e-4)
    assert bool((merged[..., :2] == float("-inf")).all())
    naive = naive_critical_keep(scores[0].masked_fill(~valid[0], float("-inf")), norms[0].double(), 10)
    for h in range(Hkv):
        assert set(merged[0, h].topk(10).indices.tolist()) == naive[h]


INNER = [
    SnapKV(window=4, kernel_size=3),
    H2O(),
    TOVA(),
    Streaming(sink=2),
]


@pytest.mark.parametrize("inner", INNER, ids=lambda m: m.name)
def test_prompt_selection_is_critical_over_the_inner_scores(inner):
    """Every scorer's own hooks run (H2O accumulates, SnapKV pools): its scores, the projected norms of the held
    values and the two stages give exactly the kept set, different from the inner method alone."""
    T, cap = 64, 16
    q = queries(Hq, T, seed=3)
    module = fake_module(seed=4)
    probe = dataclasses.replace(inner, budget=cap)
    pctx = make_ctx(make_layer(T, Hkv, seed=5), q)
    if hasattr(probe, "accumulate"):
        probe.accumulate(pctx)
    scores = probe.score(pctx)
    norms = naive_norms(pctx.layer.values, module.o_proj.weight)
    alone = make_layer(T, Hkv, seed=5)
    probe.after_prefill(make_ctx(alone, q))

    layer = make_layer(T, Hkv, seed=5)
    ctx = critical_ctx(layer, q, module=module)
    Critical(scorer=inner, budget=cap).after_prefill(ctx)
    assert ctx.caps == [cap] and layer.length == cap
    want = naive_critical_keep(scores[0].expand(Hkv, T), norms, cap)
    for h in range(Hkv):
        assert set(kept_ids(layer)[0, h].tolist()) == want[h]
    if inner.name != "streaming":  # positions x norms still favour the most recent tokens here
        assert not torch.equal(kept_ids(layer), kept_ids(alone))


def test_decode_evictions_go_through_critical():
    """critical(scorer=tova(decode_budget, slack=1)): each decode eviction is the two-stage rule on TOVA's score
    of the current query."""
    T, cap = 48, 16
    module = fake_module(seed=6)
    layer = make_layer(T, Hkv, seed=7)
    method = Critical(scorer="tova(decode_budget=16, slack=1)", budget=cap)
    method.after_prefill(critical_ctx(layer, queries(Hq, T, seed=8), module=module))
    for step in range(3):
        q = decode_step(layer, Hq, seed=40 + step)
        held = kept_ids(layer)
        pctx = make_ctx(layer, q, phase="decode")
        scores = TOVA(budget=cap).score(pctx)
        want = naive_critical_keep(scores[0].expand(Hkv, -1), naive_norms(layer.values, module.o_proj.weight), cap)
        method.after_decode(critical_ctx(layer, q, phase="decode", module=module))
        assert layer.length == cap
        for h in range(Hkv):
            assert set(kept_ids(layer)[0, h].tolist()) == {int(held[0, h, j]) for j in want[h]}


def test_first_stage_ratio_one_is_the_inner_method():
    T, cap = 64, 16
    q = queries(Hq, T, seed=9)
    alone, wrapped = make_layer(T, Hkv, seed=10), make_layer(T, Hkv, seed=10)
    SnapKV(budget=cap, window=4).after_prefill(make_ctx(alone, q))
    Critical(scorer=SnapKV(window=4), budget=cap, first_stage_ratio=1.0).after_prefill(critical_ctx(wrapped, q))
    assert torch.equal(kept_ids(alone), kept_ids(wrapped))


# ----------------------------------------------------------------------------------------------- real model
@pytest.mark.parametrize("scorer,alone", [("snapkv", "snapkv(budget=24)"),
                                          ("expected_attention(use_vnorm=False)",
                                           "expected_attention(use_vnorm=False, budget=24)")])
def test_on_a_model_the_kept_set_is_critical_over_the_inner_scores(scorer, alone, monkeypatch):
    """Through the patched model: the inner method alone is run first with its selection recorded (its scores and
    the values it held); critical keeps the two-stage set of those, with the model's o_proj."""
    model = tiny_model("llama")
    ids = torch.randint(3, 512, (1, 96), generator=torch.Generator().manual_seed(11))
    recorded = []
    inner_cls = type(kvaccel.parse_spec(alone)[0])
    real_keep = inner_cls.keep
    monkeypatch.setattr(inner_cls, "keep", lambda self, layer, scores, cap: recorded.append(
        (scores.clone(), layer.values.clone())) or real_keep(self, layer, scores, cap))
    with kvaccel.patched(model, alone), torch.no_grad():
        model(ids, cache=KVAccelCache(model), use_cache=True)
    monkeypatch.undo()
    assert len(recorded) == model.config.num_hidden_layers
    with kvaccel.patched(model, f"critical(scorer={scorer}, budget=24)"), torch.no_grad():
        cache = KVAccelCache(model)
        model(ids, cache=cache, use_cache=True)
        rep = kvaccel.report(model)
    assert rep["kept_tokens"] == [[[24, 24]]] * model.config.num_hidden_layers
    for (scores, values), layer, block in zip(recorded, cache.layers, model.model.layers, strict=True):
        want = naive_critical_keep(scores[0].expand(values.shape[1], -1),
                                   naive_norms(values, block.self_attn.o_proj.weight), 24)
        for h in range(values.shape[1]):
            # the kept values are the full cache's values at the wanted positions
            assert torch.equal(layer.values[0, h], values[0, h, sorted(want[h])])


def test_bytes_freed_and_budget_all_is_token_identical():
    model = tiny_model("llama")
    cfg = model.config
    ids = torch.randint(3, 512, (1, 256), generator=torch.Generator().manual_seed(12))
    with kvaccel.patched(model, "critical(scorer=h2o, budget=32)"):
        cache = KVAccelCache(model)
        model.generate(ids, max_new_tokens=9, do_sample=False, cache=cache)
        rep = kvaccel.report(model)
        assert rep["kept_tokens"] == [[[32] * cfg.num_key_value_heads]] * cfg.num_hidden_layers  # h2o: bounded
        assert rep["kv_bytes"] == cache.nbytes() < 0.25 * rep["kv_bytes_full"]
    short = ids[:, :50]
    gen = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    ref = model.generate(short, **gen)
    with kvaccel.patched(model, "critical(scorer=snapkv, budget=10000)"):
        assert torch.equal(model.generate(short, **gen), ref)


def test_bf16_keeps_dtype():
    model = tiny_model("llama").to(torch.bfloat16)
    ids = torch.randint(3, 512, (1, 96), generator=torch.Generator().manual_seed(13))
    with kvaccel.patched(model, "critical(scorer=snapkv, budget=24)"), torch.no_grad():
        cache = KVAccelCache(model)
        logits = model(ids, cache=cache, use_cache=True).logits
        assert logits.dtype == torch.bfloat16 and bool(torch.isfinite(logits).all())
        assert all(layer.keys.dtype == layer.values.dtype == torch.bfloat16 and layer.length == 24
                   for layer in cache.layers)


def test_compose_with_a_sparse_prefill_and_think_and_rerotate():
    model = tiny_model("llama")
    ids = torch.randint(3, 512, (1, 160), generator=torch.Generator().manual_seed(14))
    spec = ("a_shape(sink_blocks=1,local_blocks=2,block_size=32,min_length=16)"
            "+critical(scorer=snapkv(decode_budget=32), budget=32)+think(ratio=0.4)")
    with kvaccel.patched(model, spec), torch.no_grad():
        cache = KVAccelCache(model)
        tok = model(ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        assert max(kvaccel.report(model)["prefill_density"]) < 1
        assert all(layer.narrow is not None for layer in cache.layers)
        for _ in range(6):  # decode evictions over the [narrow, full] axis (values of both segments)
            tok = model(tok, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        assert kvaccel.report(model)["kept_tokens"][0][0] == [32, 32]
    with kvaccel.patched(model, "critical(scorer=streaming(rerotate=True), budget=16)"):
        out = model.generate(ids[:, :40], max_new_tokens=8, do_sample=False)
        assert out.shape == (1, 48) and kvaccel.report(model)["kept_tokens"][0][0] == [16, 16]


# ----------------------------------------------------------------------------------------------- specs and errors
def test_nested_spec_parses_and_round_trips():
    (m,) = kvaccel.parse_spec("critical(scorer=snapkv(window=16, pooling='avg'), budget=0.5)+think(ratio=0.3)")[:1]
    assert isinstance(m, Critical) and m.budget == 0.5
    assert m.inner == SnapKV(budget=0.5, window=16, pooling="avg")
    assert kvaccel.parse_spec(m.spec()) == [m]
    assert Critical(scorer=SnapKV(window=16, pooling="avg"), budget=0.5) == m  # a config object, same method
    model = tiny_model("llama")
    kvaccel.patch(model, "critical(scorer=tova)", budget=0.5)  # options by name reach critical's budget
    try:
        assert kvaccel.report(model)["methods"]["evict"] == "critical(scorer='tova(decode_budget=None)',budget=0.5," \
            "first_stage_ratio=0.5,epsilon=0.0001)"
    finally:
        kvaccel.unpatch(model)
    assert isinstance(Critical().inner, ExpectedAttention) and not Critical().inner.use_vnorm


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"scorer": "adakv"}, "'adakv' is not one"),
        ({"scorer": "d2o"}, "'d2o' is not one"),
        ({"scorer": "kvzip"}, "'kvzip' is not one"),
        ({"scorer": "full"}, "'full' is not one"),
        ({"scorer": "sale"}, "'sale' is not one"),
        ({"scorer": "critical(scorer=snapkv)"}, "'critical' is not one"),
        ({"scorer": "knorm"}, "'knorm' scores are signed"),
        ({"scorer": "keydiff"}, "'keydiff' scores are signed"),
        ({"scorer": "expected_attention"}, r"wrap 'expected_attention\(use_vnorm=False\)'"),
        ({"scorer": "snapkv(budget=0.5)"}, r"give the budget to critical, e\.g\. critical\(scorer=snapkv, "
                                           r"budget=0\.5\)"),
        ({"scorer": SnapKV(budget=0.5)}, "give the budget to critical"),
        ({"scorer": "snapkv+think"}, "must be one method"),
        ({"scorer": "snapkv(windw=3)"}, r"no option\(s\) \['windw'\]"),
        ({"scorer": "snapkv(window=0)"}, "window"),
        ({"scorer": 3}, "must be a scored eviction method's name"),
        ({"first_stage_ratio": 1.5}, "first_stage_ratio"),
        ({"epsilon": -1.0}, "epsilon"),
        ({"budget": 0}, "budget"),
    ],
)
def test_bad_input_is_refused_with_the_reason(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Critical(**kwargs)


def test_positional_scorer_is_a_clear_spec_error():
    with pytest.raises(ValueError, match="argument 'snapkv' must be written key=value"):
        kvaccel.parse_spec("critical(snapkv, budget=0.25)")


def test_chunked_prompt_is_compressed_after_each_chunk():
    model = tiny_model("llama")
    ids = torch.randint(3, 512, (1, 160), generator=torch.Generator().manual_seed(15))
    with kvaccel.patched(model, "critical(scorer=h2o, budget=24)"), torch.no_grad():
        cache = KVAccelCache(model)
        model(ids[:, :100], cache=cache, use_cache=True)
        model(ids[:, 100:], cache=cache, use_cache=True)  # phase "extend"
        assert [layer.kept_per_head().tolist() for layer in cache.layers] == [[[24, 24]]] * 3
        assert cache.get_seq_length() == 160
