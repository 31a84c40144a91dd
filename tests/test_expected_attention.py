"""ExpectedAttention: RoPE algebra, the Gaussian expectation, and the kept set against an independent reference."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import kvaccel
from kvaccel.patches.evict.expected_attention import (
    ExpectedAttention,
    average_rotation,
    expected_logits,
    forward_max_pool,
    future_offsets,
    query_statistics,
    unrotate,
)

from conftest import tiny_model


def _rope(model, L, start=0):
    pos = torch.arange(start, start + L)[None]
    return model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), pos)


def test_unrotate_inverts_hf_rope_and_average_rotation_is_the_mean_rotation():
    model = tiny_model("llama")
    D = model.config.hidden_size // model.config.num_attention_heads
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 3, 20, D, generator=g, dtype=torch.float64)
    cos, sin = _rope(model, 20, start=100)
    cos, sin = cos.double(), sin.double()
    q_rot, _ = apply_rotary_pos_emb(q, q, cos, sin)
    assert not torch.allclose(q_rot, q)
    torch.testing.assert_close(unrotate(q_rot, cos[:, None], sin[:, None]), q, atol=1e-12, rtol=0)
    # R̄ x == mean over positions of RoPE(x, p)
    x = torch.randn(D, generator=g, dtype=torch.float64)
    xs = x.expand(1, 1, 20, D)
    want = apply_rotary_pos_emb(xs, xs, cos, sin)[0][0, 0].mean(0)
    R = average_rotation(cos, sin)[0].double()
    torch.testing.assert_close(R @ x, want, atol=1e-6, rtol=0)


def test_expected_logits_is_the_gaussian_expectation():
    g = torch.Generator().manual_seed(1)
    B, Hkv, G, N, D = 1, 2, 3, 5, 4
    mu = torch.randn(B, Hkv * G, D, generator=g) * 0.5
    A = torch.randn(B, Hkv * G, D, D, generator=g) * 0.3
    cov = A @ A.transpose(-1, -2)
    k = torch.randn(B, Hkv, N, D, generator=g)
    s = 0.5
    out = expected_logits(mu, cov, k, s)
    # by hand, one head and key at a time
    for h in range(Hkv * G):
        for n in range(N):
            kk = k[0, h // G, n].double()
            want = s * mu[0, h].double() @ kk + 0.5 * s * s * kk @ cov[0, h].double() @ kk
            assert out[0, h // G, h % G, n].item() == pytest.approx(want.item(), abs=1e-5)
    # and it is log E[exp(s q.k)] for q ~ N(mu, cov): Monte Carlo on one head
    L = torch.linalg.cholesky(cov[0, 0].double() + 1e-9 * torch.eye(D))
    z = torch.randn(400_000, D, generator=g, dtype=torch.float64)
    qs = mu[0, 0].double() + z @ L.T
    mc = torch.log(torch.exp(s * qs @ k[0, 0].double().T).mean(0))
    torch.testing.assert_close(out[0, 0, 0].double(), mc, atol=2e-2, rtol=0)
    # without covariance: the mean term only
    torch.testing.assert_close(expected_logits(mu, None, k, s)[0, 0, 0],
                               s * k[0, 0] @ mu[0, 0], atol=1e-5, rtol=0)


def test_query_statistics_masked_mean_and_population_covariance():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 10, 3, generator=g)
    mask = torch.tensor([[False] * 4 + [True] * 6])
    mu, cov = query_statistics(q, mask, True)
    sel = q[:, :, 4:].double()
    torch.testing.assert_close(mu.double(), sel.mean(2), atol=1e-6, rtol=0)
    c = sel - sel.mean(2, keepdim=True)
    torch.testing.assert_close(cov.double(), c.transpose(-1, -2) @ c / 6, atol=1e-6, rtol=0)


def _rope_matrix(cos, sin, p, D):
    """The RoPE matrix of position ``p`` (index into ``cos``/``sin``), built column by column with HF's function."""
    cols = torch.eye(D, dtype=torch.float64)[None, None]  # (1, 1, D, D) rows = basis vectors
    r = apply_rotary_pos_emb(cols, cols, cos[:, p:p + 1].double(), sin[:, p:p + 1].double())[0][0, 0]
    return r.T  # column j = RoPE(e_j)


def _reference_keep(model, ids, budget, n_future=512, n_sink=4, offsets=None, obs=None):
    """Independent reference: pre-RoPE queries from ``q_proj``, explicit per-position RoPE of the mean and
    covariance (mean of rotation matrices; with ``offsets`` the mean over those future offsets of the per-position
    softmax), post-RoPE keys from a stock DynamicCache; ``obs = (weight, window, kernel)`` mixes in SnapKV's window
    attention computed with the full (L, L) softmax. Returns kept ids per layer."""
    cfg = model.config
    Hq, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    D = cfg.hidden_size // Hq
    G = Hq // Hkv
    L = ids.shape[1]
    qs = {}
    hooks = [layer.self_attn.q_proj.register_forward_hook(
        lambda m, a, o, i=i: qs.__setitem__(i, o.detach())) for i, layer in enumerate(model.model.layers)]
    cache = DynamicCache()
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    for h in hooks:
        h.remove()
    cos, sin = _rope(model, n_future, start=L)
    if offsets is None:
        rotations = [torch.stack([_rope_matrix(cos, sin, p, D) for p in range(n_future)]).mean(0)]
    else:
        rotations = [_rope_matrix(cos, sin, o, D) for o in offsets]
    pcos, psin = _rope(model, L)
    kept = []
    for i in range(cfg.num_hidden_layers):
        q_all = qs[i].double().view(1, L, Hq, D)[0]  # (L, Hq, D) pre-RoPE
        q = q_all[n_sink:]
        K = cache.layers[i].keys[0].double()  # (Hkv, L, D) post-RoPE
        V = cache.layers[i].values[0].double()
        layer_keep = []
        for kv in range(Hkv):
            score = torch.zeros(L - n_sink, dtype=torch.float64)
            k = K[kv, n_sink:]
            for gq in range(G):
                h = kv * G + gq
                mu = q[:, h].mean(0)
                c = q[:, h] - mu
                cov = c.T @ c / c.shape[0]
                for R in rotations:
                    mu_f, cov_f = R @ mu, R @ cov @ R.T
                    logit = k @ mu_f / math.sqrt(D) + torch.einsum("nd,de,ne->n", k, cov_f, k) / (2 * D)
                    score += logit.softmax(-1) / G / len(rotations)
            if obs is not None:
                lam, window, kernel = obs
                qh = q_all[:, kv * G:(kv + 1) * G].transpose(0, 1)[:, None]  # (G, 1, L, D)
                q_rot = apply_rotary_pos_emb(qh, qh, pcos.double(), psin.double())[0][:, 0]  # (G, L, D)
                att = (q_rot @ K[kv].T / math.sqrt(D)).masked_fill(
                    ~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf")).softmax(-1)  # (G, L, L)
                w_score = att[:, L - window:].sum(1).mean(0)  # (L,)
                pooled = torch.nn.functional.max_pool1d(w_score[None, None], kernel, 1, kernel // 2)[0, 0]
                pooled = pooled[n_sink:] / pooled[n_sink:].sum()
                score = (1 - lam) * score + lam * pooled
            score = score * V[kv, n_sink:].norm(dim=-1)
            top = (score.topk(budget - n_sink).indices + n_sink).tolist()
            layer_keep.append(sorted(list(range(n_sink)) + top))
        kept.append(layer_keep)
    return kept


def _kept_ids(model, ids, method):
    with kvaccel.patched(model, method):
        cache = kvaccel.KVAccelCache(model)
        with torch.no_grad():
            model(ids, cache=cache, use_cache=True)
    ref_cache = DynamicCache()
    with torch.no_grad():
        model(ids, cache=ref_cache, use_cache=True)
    got = []
    for i, layer in enumerate(cache.layers):
        full_k = ref_cache.layers[i].keys[0]
        # identify kept tokens by their post-RoPE keys (unique per position, even for repeated token ids)
        got.append([[int((full_k[h] - k).abs().sum(-1).argmin()) for k in layer.keys[0, h]]
                    for h in range(layer.keys.shape[1])])
    return got


def test_kept_set_matches_independent_reference():
    model = tiny_model("llama")
    model.config.max_position_embeddings = 4096
    ids = torch.randint(3, 512, (1, 64), generator=torch.Generator().manual_seed(3))
    budget = 20
    assert _kept_ids(model, ids, ExpectedAttention(budget=budget)) == _reference_keep(model, ids, budget)


def test_future_offsets_are_log_spaced_unique_and_in_range():
    assert future_offsets(512, 8) == [0, 1, 5, 13, 34, 85, 209, 511]
    assert future_offsets(4, 8) == [0, 1, 2, 3]  # duplicates removed
    assert future_offsets(1, 3) == [0]
    offs = future_offsets(1000, 20)
    assert offs[0] == 0 and offs[-1] == 999 and offs == sorted(set(offs))


def test_mixture_and_observation_kept_sets_match_independent_reference():
    model = tiny_model("llama")
    model.config.max_position_embeddings = 4096
    ids = torch.randint(3, 512, (1, 64), generator=torch.Generator().manual_seed(5))
    budget = 20
    offsets = future_offsets(512, 8)
    mixture = ExpectedAttention(budget=budget, future_positions="mixture")
    assert _kept_ids(model, ids, mixture) == _reference_keep(model, ids, budget, offsets=offsets)
    both = ExpectedAttention(budget=budget, future_positions="mixture", observation_weight=0.3,
                             observation_window=8, observation_kernel=3)
    want = _reference_keep(model, ids, budget, offsets=offsets, obs=(0.3, 8, 3))
    assert _kept_ids(model, ids, both) == want
    # the options change the kept set (the test would not notice them otherwise)
    assert want != _reference_keep(model, ids, budget, offsets=offsets)
    assert _reference_keep(model, ids, budget, offsets=offsets) != _reference_keep(model, ids, budget)


def test_mixture_and_observation_give_full_attention_tokens_when_the_budget_covers_the_prompt():
    model = tiny_model("llama")
    ids = torch.randint(3, 512, (1, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=8, do_sample=False)
    spec = "expected_attention(budget=40, future_positions='mixture', observation_weight=0.3, chunk=4)"
    with kvaccel.patched(model, spec), torch.no_grad():
        assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), want)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_decode_budget_bounds_the_cache_and_keeps_sinks(family):
    model = tiny_model(family)
    ids = torch.randint(3, 512, (1, 80), generator=torch.Generator().manual_seed(4))
    with kvaccel.patched(model, "expected_attention(budget=24, decode_budget=30)"):
        model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        rep = kvaccel.report(model)
        assert rep["seen_tokens"] == 80 + 11
        Hkv = model.config.num_key_value_heads
        assert rep["kept_tokens"] == [[[30] * Hkv]] * model.config.num_hidden_layers
    with kvaccel.patched(model, "expected_attention(budget=24)"):  # kvpress: the cache grows while decoding
        model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert kvaccel.report(model)["kept_tokens"][0][0] == [24 + 11] * Hkv


@pytest.mark.parametrize("kwargs,field", [
    ({"n_future_positions": 0}, "n_future_positions"), ({"n_sink": -1}, "n_sink"), ({"window": 1.5}, "window"),
    ({"use_vnorm": 1}, "use_vnorm"), ({"decode_budget": 0}, "decode_budget"), ({"chunk": -2}, "chunk"),
    ({"future_positions": "uniform"}, "future_positions"), ({"position_samples": 0}, "position_samples"),
    ({"observation_weight": 1.5}, "observation_weight"), ({"observation_window": 0}, "observation_window"),
    ({"observation_kernel": 4}, "observation_kernel"),
    ({"observation_weight": 0.3, "decode_budget": 0.5}, "observation_weight"), ({"span_rule": "x"}, "span_rule"),
    ({"observation_pooling": "max"}, "observation_pooling"),
])
def test_bad_input_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ExpectedAttention(**kwargs)


def test_forward_max_pool_by_hand_and_against_a_loop():
    x = torch.tensor([[[0.0, 5, 0, 0, 0, 1, 0]]])
    assert forward_max_pool(x, 3).tolist() == [[[0.0, 5, 5, 5, 0, 1, 1]]]
    assert torch.equal(forward_max_pool(x, 1), x)
    y = torch.rand(2, 3, 20, generator=torch.Generator().manual_seed(9))
    want = torch.stack([y[..., max(0, j - 4):j + 1].amax(-1) for j in range(20)], -1)
    torch.testing.assert_close(forward_max_pool(y, 5), want, atol=0, rtol=0)


def test_forward_pooling_changes_the_kept_set_and_keeps_the_budget():
    model = tiny_model("llama")
    ids = torch.randint(3, 512, (1, 64), generator=torch.Generator().manual_seed(10))
    base = dict(budget=20, observation_weight=1.0, observation_kernel=7)
    centered = _kept_ids(model, ids, ExpectedAttention(**base))
    forward = _kept_ids(model, ids, ExpectedAttention(**base, observation_pooling="forward"))
    assert centered != forward
    assert all(len(h) == 20 for layer in forward for h in layer)
