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


def _reference_keep(model, ids, budget, n_future=512, n_sink=4):
    """Independent reference: pre-RoPE queries from ``q_proj``, explicit per-position RoPE of the mean and
    covariance (mean of rotation matrices), post-RoPE keys from a stock DynamicCache; returns kept ids per layer."""
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
        model(ids, past_key_values=cache, use_cache=True)
    for h in hooks:
        h.remove()
    cos, sin = _rope(model, n_future, start=L)
    eye = torch.eye(D, dtype=torch.float64)
    rots = []
    for p in range(n_future):  # the RoPE matrix of position p, built column by column with HF's own function
        cols = eye[None, None]  # (1, 1, D, D) rows = basis vectors
        r = apply_rotary_pos_emb(cols, cols, cos[:, p:p + 1].double(), sin[:, p:p + 1].double())[0][0, 0]
        rots.append(r.T)  # column j = RoPE(e_j)
    R = torch.stack(rots).mean(0)
    kept = []
    for i in range(cfg.num_hidden_layers):
        q = qs[i].double().view(1, L, Hq, D)[0, n_sink:]  # (L', Hq, D) pre-RoPE
        K = cache.layers[i].keys[0].double()  # (Hkv, L, D) post-RoPE
        V = cache.layers[i].values[0].double()
        layer_keep = []
        for kv in range(Hkv):
            score = torch.zeros(L - n_sink, dtype=torch.float64)
            for gq in range(G):
                h = kv * G + gq
                mu = q[:, h].mean(0)
                c = q[:, h] - mu
                cov = c.T @ c / c.shape[0]
                mu_f, cov_f = R @ mu, R @ cov @ R.T
                k = K[kv, n_sink:]
                logit = k @ mu_f / math.sqrt(D) + torch.einsum("nd,de,ne->n", k, cov_f, k) / (2 * D)
                score += logit.softmax(-1) / G
            score = score * V[kv, n_sink:].norm(dim=-1)
            top = (score.topk(budget - n_sink).indices + n_sink).tolist()
            layer_keep.append(sorted(list(range(n_sink)) + top))
        kept.append(layer_keep)
    return kept


def test_kept_set_matches_independent_reference():
    model = tiny_model("llama")
    model.config.max_position_embeddings = 4096
    ids = torch.randint(3, 512, (1, 64), generator=torch.Generator().manual_seed(3))
    budget = 20
    want = _reference_keep(model, ids, budget)
    with kvaccel.patched(model, ExpectedAttention(budget=budget)):
        cache = kvaccel.KVAccelCache(model)
        with torch.no_grad():
            model(ids, past_key_values=cache, use_cache=True)
    ref_cache = DynamicCache()
    with torch.no_grad():
        model(ids, past_key_values=ref_cache, use_cache=True)
    for i, layer in enumerate(cache.layers):
        full_k = ref_cache.layers[i].keys[0]
        for h in range(layer.keys.shape[1]):
            # identify kept tokens by their post-RoPE keys (unique per position, even for repeated token ids)
            got = [int((full_k[h] - k).abs().sum(-1).argmin()) for k in layer.keys[0, h]]
            assert got == want[i][h], (i, h)


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
])
def test_bad_input_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ExpectedAttention(**kwargs)
