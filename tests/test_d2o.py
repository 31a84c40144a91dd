"""D2O: layer allocation from attention density, layers 0/1/last full, merge compensation, budget = all is exact."""

from __future__ import annotations

import math

import pytest
import torch

import kvaccel
from kvaccel.cache import KVAccelCache
from kvaccel.patches.evict.d2o import D2O, allocate_ratios, layer_sigma, merge_evicted

from conftest import tiny_model


def _ids(n, seed=0):
    return torch.randint(3, 512, (1, n), generator=torch.Generator().manual_seed(seed))


def test_budget_covering_everything_is_token_identical():
    model = tiny_model("llama", num_hidden_layers=6)
    ids = _ids(96)
    ref = model.generate(ids, max_new_tokens=64, do_sample=False)
    with kvaccel.patched(model, "d2o(budget=1.0)"):
        out = model.generate(ids, max_new_tokens=64, do_sample=False)
    assert torch.equal(out, ref)


def test_layer_sigma_and_softmax_allocation_by_hand():
    S = torch.tensor([[[1.0, 2.0, 3.0, 6.0], [2.0, 2.0, 2.0, 2.0], [0.0, 4.0, 0.0, 4.0]]])  # (B=1, H=3, T=4)

    def pvar(xs):
        m = sum(xs) / len(xs)
        return sum((x - m) ** 2 for x in xs) / len(xs)

    v = [pvar(row) for row in S[0].tolist()]  # 3.5, 0, 4
    lo, hi = min(v), max(v)
    expected = sum((x - lo) / (hi - lo) for x in v) / 3
    assert layer_sigma(S).item() == pytest.approx(expected, abs=1e-6)
    # validity: token 3 of every head is padding
    valid = torch.tensor([[[True, True, True, False]]])
    v2 = [pvar(row[:3]) for row in S[0].tolist()]
    lo, hi = min(v2), max(v2)
    assert layer_sigma(S, valid).item() == pytest.approx(sum((x - lo) / (hi - lo) for x in v2) / 3, abs=1e-6)

    sig, rho = [0.2, 0.5, 0.9, 0.0], 0.3
    e = [math.exp(-s) for s in sig]
    want = [min(1.0, max(0.01, x / sum(e) * len(sig) * rho)) for x in e]
    assert allocate_ratios(torch.tensor(sig), rho).tolist() == pytest.approx(want, abs=1e-6)
    assert allocate_ratios(torch.tensor(sig), 0.9).max().item() == 1.0  # clamped
    assert allocate_ratios(torch.tensor(sig), 0.001).min().item() == pytest.approx(0.01)  # floor
    assert allocate_ratios(torch.tensor(sig), 1.0).tolist() == [1.0] * 4


def test_merge_into_nearest_kept_with_ema_threshold():
    K = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [3.0, 1.0]]]])  # (1, 1, 3, 2); tokens 0, 1 kept, 2 evicted
    V = torch.tensor([[[[10.0], [20.0], [30.0]]]])
    kept = torch.tensor([[[True, True, False]]])
    evicted = ~kept
    s = 3 / math.sqrt(10)  # cos(K2, K0) > cos(K2, K1) = 1/sqrt(10)
    # the reference's rule: scatter_reduce(mean) of s_e K_e with K_t
    K2, V2, tau, merged = merge_evicted(K, V, kept, evicted, None, 0.5, 0.5, normalize=False, per_head=False)
    assert tau.item() == pytest.approx(s)  # tau_0 = mean(s); s >= tau -> merged
    assert merged.tolist() == [[[False, False, True]]]
    torch.testing.assert_close(K2[0, 0, 0], (K[0, 0, 0] + s * K[0, 0, 2]) / 2)
    torch.testing.assert_close(V2[0, 0, 0], (V[0, 0, 0] + s * V[0, 0, 2]) / 2)
    torch.testing.assert_close(K2[0, 0, 1], K[0, 0, 1])  # the other kept token is untouched
    # the default: a convex combination
    K2, V2, tau, merged = merge_evicted(K, V, kept, evicted, None, 0.5, 0.5)
    assert merged.tolist() == [[[False, False, True]]]
    torch.testing.assert_close(K2[0, 0, 0], (K[0, 0, 0] + s * K[0, 0, 2]) / (1 + s))
    torch.testing.assert_close(V2[0, 0, 0], (V[0, 0, 0] + s * V[0, 0, 2]) / (1 + s))
    # a higher previous threshold: tau = 0.5 * 1.0 + 0.5 * s > s -> no merge
    K3, V3, tau, merged = merge_evicted(K, V, kept, evicted, torch.tensor([1.0]), 0.5, 0.5)
    assert tau.item() == pytest.approx(0.5 + 0.5 * s) and not merged.any()
    torch.testing.assert_close(K3, K)
    torch.testing.assert_close(V3, V)


def test_normalized_merge_keeps_magnitude_and_decision_is_per_head():
    # identical kept and evicted vectors: a convex combination leaves them as they are, the reference shrinks them
    K = torch.tensor([[[[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]]])
    V = torch.tensor([[[[4.0], [4.0], [4.0]]]])
    kept = torch.tensor([[[True, False, False]]])
    K2, V2, _, merged = merge_evicted(K, V, kept, ~kept, None, 0.5, 0.5)
    assert merged.all(-1).tolist() == [[False]] and merged[..., 1:].all()
    torch.testing.assert_close(K2[0, 0, 0], K[0, 0, 0])
    torch.testing.assert_close(V2[0, 0, 0], V[0, 0, 0])
    _, V3, _, _ = merge_evicted(K, V, kept, ~kept, None, 0.5, 0.5, normalize=False)
    torch.testing.assert_close(V3[0, 0, 0], torch.tensor([4.0]))  # s = 1: (V + V + V) / 3, no shrink at s = 1
    Vs = torch.tensor([[[[4.0], [4.0], [4.0]]]])
    Ks = torch.tensor([[[[1.0, 0.0], [1.0, 0.2], [1.0, 0.2]]]])  # s < 1: the reference shrinks V
    _, V4, _, m4 = merge_evicted(Ks, Vs, kept, ~kept, None, 0.5, 0.5, normalize=False)
    assert m4[..., 1:].all() and V4[0, 0, 0].item() < 4.0
    _, V5, _, _ = merge_evicted(Ks, Vs, kept, ~kept, None, 0.5, 0.5)
    assert V5[0, 0, 0].item() == pytest.approx(4.0)
    # two heads evict token 2: head 0 finds a similar kept key (s = 3/sqrt(10)), head 1 does not (s = -1/sqrt(10))
    K = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [3.0, 1.0]], [[1.0, 0.0], [0.0, 1.0], [-1.0, -3.0]]]])
    V = torch.arange(6.0).view(1, 2, 3, 1)
    kept = torch.tensor([[[True, True, False]]]).expand(1, 2, 3)
    tau_prev = torch.tensor([0.2])  # tau = 0.1 + 0.5 * mean(s) = 0.1 + 0.5 / sqrt(10) ~ 0.258
    _, _, tau, per_head = merge_evicted(K, V, kept, ~kept, tau_prev, 0.5, 0.5)
    assert tau.item() == pytest.approx(0.1 + 0.5 / math.sqrt(10))
    assert per_head[..., 2].tolist() == [[True, False]]
    _, _, _, mean_heads = merge_evicted(K, V, kept, ~kept, tau_prev, 0.5, 0.5, per_head=False)
    assert mean_heads[..., 2].tolist() == [[True, True]]  # mean s = 1/sqrt(10) >= tau: head 1 merges a dissimilar key


def test_layers_0_1_last_full_and_middle_layers_average_the_budget():
    model = tiny_model("llama", num_hidden_layers=6)
    ids = _ids(256, seed=1)
    with kvaccel.patched(model, D2O(budget=0.25, slack=1)):  # slack=1: evict at every decode step (the paper)
        cache = KVAccelCache(model)
        with torch.no_grad():
            out = model(ids, cache=cache, use_cache=True)
        r = kvaccel.report(model)
        caps = r["capacity"]
        assert caps[0] == caps[1] == caps[5] == 256
        for l in (0, 1, 5):
            assert r["kept_tokens"][l] == [[256, 256]] and cache.layers[l].narrow is None
        mid = caps[2:5]
        assert sum(mid) / 3 / 256 == pytest.approx(0.25, abs=2 / 256)  # ceil per layer: within 1 token each
        for l in (2, 3, 4):
            assert r["kept_tokens"][l] == [[mid[l - 2]] * 2]
            assert cache.layers[l].keys.shape[2] == mid[l - 2]  # physically small
        assert r["kv_bytes"] < 0.8 * r["kv_bytes_full"]
        # decode holds each middle layer at its capacity
        tok = out.logits[:, -1:].argmax(-1)
        with torch.no_grad():
            for _ in range(5):
                tok = model(tok, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        r = kvaccel.report(model)
        assert [r["kept_tokens"][l] for l in (2, 3, 4)] == [[[c] * 2] for c in mid]
        assert r["kept_tokens"][0] == [[261, 261]]


def test_d2o_needs_four_layers():
    with pytest.raises(ValueError, match=r"at least 4 layers.*has 3"):
        kvaccel.patch(tiny_model("llama"), D2O())
    with pytest.raises(ValueError, match="recent_ratio"):
        D2O(recent_ratio=1.5)


def test_decode_eviction_runs_on_one_thread(monkeypatch):
    """A decode step's eviction and merge (a few hundred tokens per head) run with one intra-op thread, the count
    restored after; the prompt's eviction keeps every thread."""
    import kvaccel.patches.evict.d2o as d2o

    threads, real = [], d2o.merge_evicted

    def spy(*a, **kw):
        threads.append(torch.get_num_threads())
        return real(*a, **kw)

    monkeypatch.setattr(d2o, "merge_evicted", spy)
    model = tiny_model("llama", num_hidden_layers=4)
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with kvaccel.patched(model, D2O(budget=0.25, slack=1)), torch.no_grad():
            cache = KVAccelCache(model)
            tok = model(_ids(128, seed=2), cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            assert threads == [2]  # layer 2 at the end of the prefill forward
            model(tok, cache=cache, use_cache=True)
            assert threads == [2, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(n)


def _merge_all_rows(K, V, kept, evicted, tau_prev, alpha, beta, normalize, per_head):
    """The merge computed on every row (an ``(N, N)`` similarity map per head), as before only evicted rows were
    compared: the reference the evicted-rows-only ``merge_evicted`` must equal."""
    B, H, N, D = K.shape
    kf, vf = K.float(), V.float()
    kn = torch.nn.functional.normalize(kf, dim=-1)
    s, near = (kn @ kn.transpose(-1, -2)).masked_fill(~kept[:, :, None, :], float("-inf")).max(-1)
    s = torch.where(evicted, s, torch.zeros_like(s))
    mean_s = s.sum((1, 2)) / evicted.sum((1, 2)).clamp(min=1)
    tau = mean_s if tau_prev is None else alpha * tau_prev + beta * mean_s
    if per_head:
        merged = evicted & (s >= tau[:, None, None])
    else:
        merged = evicted & (s.sum(1, keepdim=True) / evicted.sum(1, keepdim=True).clamp(min=1) >= tau[:, None, None])
    w = torch.where(merged, s, torch.zeros_like(s))
    mass = kf.new_zeros(B, H, N).scatter_add_(2, near, w if normalize else merged.float())
    k_acc = torch.zeros_like(kf).scatter_add_(2, near[..., None].expand_as(kf), w[..., None] * kf)
    v_acc = torch.zeros_like(vf).scatter_add_(2, near[..., None].expand_as(vf), w[..., None] * vf)
    denom = (1.0 + mass)[..., None]
    return ((kf + k_acc) / denom).to(K.dtype), ((vf + v_acc) / denom).to(V.dtype), tau, merged


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("per_head", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_compares_only_evicted_rows_and_equals_the_all_rows_merge(normalize, per_head, dtype):
    """Ragged evictions (a different number of evicted tokens per head and sequence, padding slots neither kept
    nor evicted, a head evicting nothing), several row chunks: same merge decisions, threshold and merged keys and
    values as comparing every row with the kept tokens."""
    g = torch.Generator().manual_seed(7)
    B, H, N, D, Dv = 2, 3, 40, 8, 6
    K = torch.randn(B, H, N, D, generator=g).to(dtype)
    V = torch.randn(B, H, N, Dv, generator=g).to(dtype)
    valid = torch.rand(B, H, N, generator=g) > 0.1
    evicted = valid & (torch.rand(B, H, N, generator=g) < torch.tensor([0.1, 0.3, 0.6])[None, :, None])
    evicted[1, 2] = False  # a head that evicts nothing
    kept = valid & ~evicted
    assert len({int(c) for c in evicted.sum(-1).flatten()}) > 2  # ragged
    for tau_prev in (None, torch.tensor([0.1, 0.4])):
        want = _merge_all_rows(K, V, kept, evicted, tau_prev, 0.5, 0.5, normalize, per_head)
        got = merge_evicted(K, V, kept, evicted, tau_prev, 0.5, 0.5, chunk=5, normalize=normalize, per_head=per_head)
        assert torch.equal(got[3], want[3]) and got[3].any()
        torch.testing.assert_close(got[2], want[2], rtol=1e-6, atol=1e-7)
        for a, b in zip(got[:2], want[:2], strict=True):  # several merges into one token: summed in another order
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
