"""H2O, SnapKV, PyramidKV, Keyformer: identity at full budget, bounded caches, hand-computed scores, invariants."""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import kvaccel
from kvaccel.cache import KVAccelCache, KVAccelLayer
from kvaccel.patches.evict.h2o import H2O
from kvaccel.patches.evict.keyformer import Keyformer, gumbel_noise, noisy_scores, step_seed
from kvaccel.patches.evict.pyramidkv import PyramidKV, pyramid_capacities
from kvaccel.patches.evict.snapkv import SnapKV, pool_scores

from conftest import tiny_model

GEN = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False)
D = 8


# ----------------------------------------------------------------------------------------------- helpers
def make_layer(T: int, Hkv: int = 2, seed: int = 0):
    """A cache layer holding ``T`` random tokens; ``values[..., 0]`` is the token's position (its id)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, Hkv, T, D, generator=g) * 2
    v = torch.randn(1, Hkv, T, D, generator=g)
    v[..., 0] = torch.arange(T, dtype=torch.float32)
    layer = KVAccelLayer()
    layer.update(k, v)
    layer.prompt_len = T
    return layer


def make_ctx(layer, q, phase="prefill", layer_idx=0, num_layers=1):
    caps = []
    return SimpleNamespace(
        layer=layer,
        query=q,
        key=layer.keys,
        value=layer.values,
        scaling=1 / math.sqrt(D),
        phase=phase,
        layer_idx=layer_idx,
        num_layers=num_layers,
        record_capacity=caps.append,
        caps=caps,
    )


def queries(Hq: int, n: int, seed: int = 1):
    return torch.randn(1, Hq, n, D, generator=torch.Generator().manual_seed(seed)) * 2


def decode_step(layer, Hq=4, seed=7):
    g = torch.Generator().manual_seed(seed)
    k, v = (
        torch.randn(1, layer.keys.shape[1], 1, D, generator=g),
        torch.randn(1, layer.keys.shape[1], 1, D, generator=g),
    )
    v[..., 0] = float(layer.seen)
    layer.update(k, v)
    layer.decode_steps += 1
    return torch.randn(1, Hq, 1, D, generator=g)


def kept_ids(layer):
    return layer.values[..., 0].round().long()  # (B, H, K)


def explicit_probs(q, k, scale, causal=True):
    """``(B, H_q, W, T)`` softmax probabilities, float64, with the full (W, T) matrix (tiny tensors only)."""
    G = q.shape[1] // k.shape[1]
    W, T = q.shape[2], k.shape[2]
    logits = scale * q.double() @ k.double().repeat_interleave(G, 1).transpose(-1, -2)
    if causal:
        logits = logits.masked_fill(torch.arange(T)[None, :] > torch.arange(T - W, T)[:, None], float("-inf"))
    return logits.softmax(-1)


def group_mean(x, Hkv):
    return x.view(x.shape[0], Hkv, -1, x.shape[-1]).mean(2)


# ----------------------------------------------------------------------------------------------- end to end
METHODS = [
    ("h2o", {}),
    ("snapkv", {}),
    ("snapkv", {"decode_budget": 10_000}),
    ("pyramidkv", {"window": 8}),
    ("keyformer", {}),
    ("expected_attention", {}),
    ("expected_attention", {"chunk": 8, "decode_budget": 10_000}),
    ("snapkv", {"chunk": 10}),
    ("h2o", {"chunk": 4}),
]


@functools.cache
def _reference(family: str):
    ids = torch.randint(3, 512, (1, 50), generator=torch.Generator().manual_seed(2))
    return ids, tiny_model(family).generate(ids, **GEN)


@pytest.mark.parametrize(
    "family,name,kwargs",
    [("llama", n, kw) for n, kw in METHODS] + [("qwen3", n, kw) for n, kw in (METHODS[0], METHODS[1], METHODS[4])],
)
def test_budget_all_is_token_identical(family, name, kwargs):
    model = tiny_model(family)
    ids, ref = _reference(family)
    with kvaccel.patched(model, name, budget=10_000, **kwargs):
        assert torch.equal(model.generate(ids, **GEN), ref)
        assert kvaccel.report(model)["kept_tokens"][0][0] == [50 + 63] * 2


BOUNDED = [  # (name, kwargs, extra tokens per head after 20 decode steps, bytes of method state per token)
    ("h2o", {}, 0, 4),
    ("keyformer", {}, 0, 4),
    ("snapkv", {}, 20, 0),  # the paper: the cache grows while decoding
    ("snapkv", {"decode_budget": 32}, 0, 4),
    ("pyramidkv", {"window": 8}, 20, 0),
    ("pyramidkv", {"window": 8, "decode_budget": 32}, 0, 4),
]


@pytest.mark.parametrize("name,kwargs,extra,state_bytes", BOUNDED)
def test_budget_32_cache_is_bounded_and_bytes_shrink(name, kwargs, extra, state_bytes):
    model = tiny_model("llama")
    cfg = model.config
    Hkv, Dh = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    ids = torch.randint(3, 512, (1, 256), generator=torch.Generator().manual_seed(3))
    with kvaccel.patched(model, name, budget=32, **kwargs):
        model.generate(ids, max_new_tokens=1, do_sample=False)
        rep = kvaccel.report(model)
        caps = rep["capacity"]
        if name == "pyramidkv":
            assert caps == pyramid_capacities(32, 256, 8, cfg.num_hidden_layers, 20) == [55, 32, 9]
        else:
            assert caps == [32] * cfg.num_hidden_layers
        assert rep["kept_tokens"] == [[[c] * Hkv] for c in caps]
        cache = KVAccelCache(model)
        model.generate(ids, max_new_tokens=21, do_sample=False, cache=cache)  # prefill + 20 decode steps
        rep = kvaccel.report(model)
        assert rep["seen_tokens"] == 276
        assert rep["kept_tokens"] == [[[c + extra] * Hkv] for c in caps]
        per_slot = Hkv * (2 * Dh * 4 + state_bytes)
        for layer, c in zip(cache.layers, caps, strict=True):
            slots = layer.nbytes() / per_slot  # tokens held + spare slots (bytes counted by report())
            if extra:  # growing: spare slots of the last reallocation, max(4, n / 32)
                assert c + extra <= slots <= c + extra + max(4, (c + extra) // 32)
            else:  # bounded: capacity + the decode slack (max(1, c // 32) slots), evicted whenever full
                assert slots == c + max(1, c // 32)
        assert rep["kv_bytes"] == cache.nbytes()
        assert rep["kv_bytes"] < rep["kv_bytes_full"] * 0.3


def test_left_padded_batch_keeps_real_tokens_within_budget():
    model = tiny_model("qwen3")
    ids = torch.randint(3, 512, (2, 80), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :30] = 0
    for name in ("h2o", "keyformer", "snapkv"):
        with kvaccel.patched(model, name, budget=16):
            out = model.generate(ids.masked_fill(mask == 0, 0), attention_mask=mask, max_new_tokens=5, do_sample=False)
            assert out.shape == (2, 85)
            kept = kvaccel.report(model)["kept_tokens"]
            assert all(max(h) <= 16 + (4 if name == "snapkv" else 0) for layer in kept for h in layer)


# ----------------------------------------------------------------------------------------------- H2O
def test_h2o_scores_are_column_sums_and_accumulate_at_decode():
    layer, q = make_layer(6), queries(4, 6)
    method = H2O(budget=100)
    ctx = make_ctx(layer, q)
    method.after_prefill(ctx)
    want = group_mean(explicit_probs(q, layer.keys, ctx.scaling).sum(2), 2)
    torch.testing.assert_close(layer.token_state["h2o"].double(), want, rtol=1e-5, atol=1e-6)
    assert torch.allclose(layer.token_state["h2o"].sum(-1), torch.full((1, 2), 6.0))  # 6 queries x mass 1
    q1 = decode_step(layer)
    method.after_decode(make_ctx(layer, q1, "decode"))
    want = F.pad(want, (0, 1)) + group_mean(explicit_probs(q1, layer.keys, ctx.scaling).sum(2), 2)
    torch.testing.assert_close(layer.token_state["h2o"].double(), want, rtol=1e-5, atol=1e-6)


def test_h2o_keeps_recent_half_and_top_heavy_hitters_and_drops_evicted_scores():
    layer, q = make_layer(12), queries(4, 12)
    before = group_mean(explicit_probs(q, layer.keys, 1 / math.sqrt(D)).sum(2), 2).float()
    H2O(budget=6).after_prefill(make_ctx(layer, q))  # 3 recent + 3 heavy hitters
    ids = kept_ids(layer)
    for h in range(2):
        heavy = before[0, h, :9].topk(3).indices.sort().values
        assert ids[0, h].tolist() == heavy.tolist() + [9, 10, 11]
    torch.testing.assert_close(layer.token_state["h2o"], before.gather(-1, ids), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------- SnapKV
def test_pooling_by_hand():
    x = torch.tensor([[[0.0, 0, 5, 0, 0, 0, 0, 1]]])
    assert pool_scores(x, 3, "max").tolist() == [[[0.0, 5, 5, 5, 0, 0, 1, 1]]]
    torch.testing.assert_close(pool_scores(x, 3, "avg"), torch.tensor([[[0, 5, 5, 5, 0, 0, 1, 1]]]) / 3.0)
    assert torch.equal(pool_scores(x, 1, "max"), x)


@pytest.mark.parametrize("pooling", ("max", "avg"))
def test_snapkv_pooled_window_scores_and_window_always_kept(pooling):
    layer, q = make_layer(20), queries(4, 20)
    method = SnapKV(budget=7, window=3, kernel_size=3, pooling=pooling)
    scale = 1 / math.sqrt(D)
    obs = group_mean(explicit_probs(q[:, :, -3:], layer.keys, scale).sum(2), 2)[..., :17].float()
    pooled = pool_scores(obs, 3, pooling)
    ctx = make_ctx(layer, q)
    method.after_prefill(ctx)
    assert ctx.caps == [7]
    ids = kept_ids(layer)
    for h in range(2):
        assert ids[0, h, -3:].tolist() == [17, 18, 19]
        kept = torch.zeros(17, dtype=torch.bool)
        kept[ids[0, h, :4]] = True
        assert pooled[0, h, kept].min() >= pooled[0, h, ~kept].max()  # max pooling makes plateaus: ties
    assert "snapkv" not in layer.token_state  # prompt-only: no per-token state


def test_snapkv_short_prompt_and_growing_decode():
    layer, q = make_layer(10), queries(4, 10)
    method = SnapKV(budget=10, window=4)
    method.after_prefill(make_ctx(layer, q))
    assert layer.length == 10 and kept_ids(layer)[0, 0].tolist() == list(range(10))
    method.after_decode(make_ctx(layer, decode_step(layer), "decode"))
    assert layer.length == 11


def test_snapkv_decode_budget_keeps_window_and_accumulates():
    layer, q = make_layer(20), queries(4, 20)
    method = SnapKV(budget=8, window=3, kernel_size=1, decode_budget=8)
    method.after_prefill(make_ctx(layer, q))
    state = layer.token_state["snapkv"].clone()
    q1 = decode_step(layer)
    add = group_mean(explicit_probs(q1, layer.keys, 1 / math.sqrt(D)).sum(2), 2).float()
    acc = F.pad(state, (0, 1)) + add
    method.after_decode(make_ctx(layer, q1, "decode"))
    assert layer.length == 8
    for h in range(2):
        top = acc[0, h, :6].topk(5).indices.sort().values
        assert layer.token_state["snapkv"][0, h].tolist() == pytest.approx(
            acc[0, h, torch.cat([top, torch.arange(6, 9)])].tolist(), rel=1e-5
        )


# ----------------------------------------------------------------------------------------------- PyramidKV
@pytest.mark.parametrize(
    "budget,T,window,L,beta", [(100, 1000, 32, 32, 20), (64, 4096, 8, 7, 20), (300, 320, 32, 12, 5)]
)
def test_pyramid_capacities_average_budget_and_decrease(budget, T, window, L, beta):
    caps = pyramid_capacities(budget, T, window, L, beta)
    assert sum(caps) == L * budget
    assert all(a >= b for a, b in zip(caps, caps[1:], strict=False)) and caps[0] > caps[-1]
    assert all(window <= c <= T for c in caps)
    P = budget - window
    if 2 * P - P // beta < T - window:  # not clipped: the reference's ends
        assert caps[0] - window == 2 * P - P // beta and caps[-1] - window == P // beta
    else:
        assert caps[0] == T


def test_pyramid_capacity_per_layer_and_degenerate_cases():
    assert pyramid_capacities(16, 100, 32, 4, 20) == [16] * 4  # budget <= window: uniform
    assert pyramid_capacities(50, 100, 10, 1, 20) == [50]
    m = PyramidKV(budget=40, window=8)
    layer = make_layer(200)
    assert [m.capacity(make_ctx(layer, None, layer_idx=i, num_layers=4)) for i in range(4)] == pyramid_capacities(
        40, 200, 8, 4, 20
    )
    assert m.capacity(make_ctx(make_layer(30), None, layer_idx=3, num_layers=4)) == 40  # short prompt: no eviction


# ----------------------------------------------------------------------------------------------- Keyformer
def test_keyformer_gumbel_noise_and_noisy_softmax_by_hand():
    layer, q = make_layer(9), queries(4, 3)
    scale, tau = 1 / math.sqrt(D), 1.5
    got = noisy_scores(q, layer.keys, scale=scale, tau=tau, generator=torch.Generator().manual_seed(step_seed(0, 2, 5)))
    g = torch.Generator().manual_seed(step_seed(0, 2, 5))
    u = torch.rand(1, 2, 2 * 3, 9, generator=g)  # rows: (G=2 heads x W=3 queries) per kv head
    zeta = -torch.log(-torch.log(u))
    logits = (scale * q.reshape(1, 2, 6, D) @ layer.keys.transpose(-1, -2) + zeta) / tau
    pos_q = torch.tensor([6, 7, 8]).repeat(2)
    logits = logits.masked_fill(torch.arange(9)[None, :] > pos_q[:, None], float("-inf"))
    torch.testing.assert_close(got, logits.softmax(-1).sum(2) / 2, rtol=1e-5, atol=1e-6)
    # the noise is a standard Gumbel: mean ~ 0.5772 (Euler-Mascheroni), reproducible for a seed
    z = gumbel_noise((20000,), torch.Generator().manual_seed(0))
    assert abs(z.mean().item() - 0.5772) < 0.03
    assert torch.equal(z, gumbel_noise((20000,), torch.Generator().manual_seed(0)))
    assert step_seed(0, 1, 0) != step_seed(0, 0, 1) != step_seed(1, 0, 1)


def test_keyformer_tau_schedule():
    m = Keyformer(tau_init=1.0, tau_end=2.0, max_new_tokens=128)
    assert [m.tau(t) for t in (0, 64, 128, 500)] == [1.0, 1.5, 2.0, 2.0]
    assert Keyformer(tau_init=0.5, tau_end=3.0, max_new_tokens=10).tau(4) == pytest.approx(1.5)


def test_keyformer_prompt_selection_decode_eviction_and_dropped_scores():
    layer, q = make_layer(40), queries(4, 40)
    m = Keyformer(budget=10, window=4, seed=3)  # recent = round(0.3 * 10) = 3, key tokens = 7
    gen = torch.Generator().manual_seed(step_seed(3, 0, 0))
    before = noisy_scores(q[:, :, -4:], layer.keys, scale=1 / math.sqrt(D), tau=1.0, generator=gen)
    m.after_prefill(make_ctx(layer, q))
    ids = kept_ids(layer)
    for h in range(2):
        assert ids[0, h, -3:].tolist() == [37, 38, 39]
        assert ids[0, h, :7].tolist() == before[0, h, :37].topk(7).indices.sort().values.tolist()
    torch.testing.assert_close(layer.token_state["keyformer"], before.gather(-1, ids))
    for step in range(1, 6):
        state = layer.token_state["keyformer"].clone()
        q1 = decode_step(layer, seed=step)
        gen = torch.Generator().manual_seed(step_seed(3, 0, step))
        acc = F.pad(state, (0, 1)) + noisy_scores(
            q1, layer.keys, scale=1 / math.sqrt(D), tau=m.tau(step), generator=gen
        )
        old_ids = kept_ids(layer)
        m.after_decode(make_ctx(layer, q1, "decode"))
        assert layer.length == 10
        new_ids = kept_ids(layer)
        pos = (old_ids[..., :, None] == new_ids[..., None, :]).float().argmax(-2)  # slot of each kept token
        torch.testing.assert_close(layer.token_state["keyformer"], acc.gather(-1, pos))
        assert new_ids[0, 0, -3:].tolist() == [40 + step - 3 + i for i in (0, 1, 2)]


def naive_keyformer_evict(ids: list[int], score: dict[int, float], cap: int, recent: int) -> list[int]:
    """Keyformer's rule on one head: the last ``recent`` ids + the ``cap - recent`` best-scored others, in order."""
    rest = sorted(ids[:-recent], key=lambda i: -score[i])[: cap - recent]
    return sorted(rest) + ids[-recent:]


def test_keyformer_keeps_what_a_naive_reference_keeps():
    """Kept tokens and scores over a prompt and 40 decode steps (prompt cut + two decode evictions) equal a naive
    re-implementation (one ``torch.log`` per noise block, per-head id lists); every noise block has more than
    ATen's 2048-element log grain, so a threaded log would show here if its values differed."""
    T0, Hkv, Hq, W, cap, steps, seed = 600, 2, 8, 8, 500, 40, 5
    G, scale, fi = Hq // Hkv, 1 / math.sqrt(D), torch.finfo(torch.float32)
    layer, q = make_layer(T0, Hkv), queries(Hq, W)
    m = Keyformer(budget=cap, window=W, seed=seed, max_new_tokens=64)
    recent, slack = round(0.3 * cap), cap // 32

    def noise(shape, step):
        u = torch.rand(shape, generator=torch.Generator().manual_seed(step_seed(seed, 0, step))).clamp(fi.tiny,
                                                                                                      1 - fi.eps)
        return -torch.log(-torch.log(u))

    keys = layer.keys.clone()  # every token's key, by id
    logits = (q.reshape(1, Hkv, G * W, D) @ keys.transpose(-1, -2)) * scale + noise((1, Hkv, G * W, T0), 0)
    rows = (T0 - W + torch.arange(W)).repeat(G)
    logits = (logits / m.tau(0)).masked_fill(torch.arange(T0)[None] > rows[:, None], float("-inf"))
    prompt = logits.softmax(-1).sum(2) / G
    scores = [dict(enumerate(prompt[0, h].tolist())) for h in range(Hkv)]
    kept = [naive_keyformer_evict(list(range(T0)), scores[h], cap, recent) for h in range(Hkv)]
    m.after_prefill(make_ctx(layer, q))
    evictions = 1
    for step in range(1, steps + 1):
        q1 = decode_step(layer, Hq=Hq, seed=step)
        keys = torch.cat([keys, layer.keys[:, :, -1:]], dim=2)
        new_id = keys.shape[2] - 1
        z = noise((1, Hkv, G, len(kept[0]) + 1), step)
        for h in range(Hkv):
            kept[h].append(new_id)
            scores[h][new_id] = 0.0
            lg = (q1[0, h * G : (h + 1) * G, 0] @ keys[0, h, kept[h]].T) * scale + z[0, h]
            add = (lg / m.tau(step)).softmax(-1).sum(0) / G
            for i, a in zip(kept[h], add.tolist(), strict=True):
                scores[h][i] += a
            if len(kept[h]) >= cap + slack:
                kept[h] = naive_keyformer_evict(kept[h], scores[h], cap, recent)
                evictions += h == 0
        m.after_decode(make_ctx(layer, q1, "decode"))
        assert kept_ids(layer)[0].tolist() == kept, f"step {step}"
        want = torch.tensor([[scores[h][i] for i in kept[h]] for h in range(Hkv)])
        torch.testing.assert_close(layer.token_state["keyformer"][0], want, rtol=1e-5, atol=1e-6)
    assert evictions == 3


def test_keyformer_decode_scoring_runs_on_one_thread(monkeypatch):
    """A decode step's noisy scores (a few thousand logits) run with one intra-op thread, the count restored after;
    the prompt's scoring keeps every thread."""
    import kvaccel.patches.evict.keyformer as kf

    threads, real = [], kf.noisy_scores
    monkeypatch.setattr(kf, "noisy_scores", lambda *a, **kw: threads.append(torch.get_num_threads()) or real(*a, **kw))
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        layer = make_layer(300, Hkv=2)
        m = Keyformer(budget=200, seed=1, max_new_tokens=8)
        m.after_prefill(make_ctx(layer, queries(8, 300)))
        m.after_decode(make_ctx(layer, decode_step(layer, Hq=8, seed=1), "decode"))
        assert threads == [2, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(n)


def test_keyformer_scores_the_prompt_with_every_query_in_blocks(monkeypatch):
    import kvaccel.patches.evict.keyformer as kf

    monkeypatch.setattr(kf, "_ROW_CHUNK", 16)  # several row blocks: G * T = 2 * 40 rows
    layer, q = make_layer(40), queries(4, 40)
    m = Keyformer(budget=40, seed=3)  # window=0: all 40 prompt queries; budget covers the prompt (scores kept)
    m.after_prefill(make_ctx(layer, q))
    g = torch.Generator().manual_seed(step_seed(3, 0, 0))
    want = torch.zeros(1, 2, 40, dtype=torch.float64)
    qg = q.reshape(1, 2, 80, D)
    rows = torch.arange(40).repeat(2)
    for r0 in range(0, 80, 16):  # the noise is drawn block by block, in order
        logits = qg[:, :, r0:r0 + 16] @ layer.keys.transpose(-1, -2) / math.sqrt(D)
        fi = torch.finfo(torch.float32)
        u = torch.rand(logits.shape, generator=g).clamp(fi.tiny, 1 - fi.eps)
        logits = (logits - torch.log(-torch.log(u))).masked_fill(torch.arange(40)[None] > rows[r0:r0 + 16, None],
                                                                float("-inf"))
        want += logits.double().softmax(-1).sum(2)
    torch.testing.assert_close(layer.token_state["keyformer"].double(), want / 2, rtol=1e-5, atol=1e-6)


def test_keyformer_temperature_follows_the_generation_length(monkeypatch):
    import kvaccel.patches.evict.keyformer as kf

    lengths = []
    real = kf.tau_at
    monkeypatch.setattr(kf, "tau_at", lambda t, a, b, n: lengths.append(n) or real(t, a, b, n))
    model = tiny_model("llama")
    ids = torch.randint(3, 512, (1, 40), generator=torch.Generator().manual_seed(2))
    with kvaccel.patched(model, "keyformer(budget=16)"):
        model.generate(ids, max_new_tokens=7, min_new_tokens=7, do_sample=False)
        assert set(lengths[3:]) == {7}  # decode steps of the 3 layers use the call's length
        lengths.clear()
        cache = kvaccel.KVAccelCache(model)  # a manual loop: no generate(), the documented default, noted
        with torch.no_grad():
            model(ids, cache=cache, use_cache=True)
            model(ids[:, :1], cache=cache, use_cache=True)
        assert set(lengths[3:]) == {128}
        assert any("generation length unknown" in n for n in kvaccel.report(model)["notes"])
    lengths.clear()
    with kvaccel.patched(model, "keyformer(budget=16, max_new_tokens=50)"):
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert set(lengths[3:]) == {50}


# ----------------------------------------------------------------------------------------------- invariants
@pytest.mark.parametrize(
    "method",
    [
        H2O(budget=9),
        SnapKV(budget=9, window=2, kernel_size=5),
        PyramidKV(budget=9, window=2, beta=2),
        Keyformer(budget=9, window=5, seed=1),
    ],
    ids=lambda m: m.name,
)
def test_kept_tokens_are_the_top_scoring_ones(method):
    layer, q = make_layer(64, seed=5), queries(4, 64, seed=6)
    ctx = make_ctx(layer, q, layer_idx=1, num_layers=3)
    probe = make_layer(64, seed=5)
    pctx = make_ctx(probe, q, layer_idx=1, num_layers=3)
    if hasattr(method, "accumulate"):
        method.accumulate(pctx)
    scores = method.score(pctx)
    cap = method.capacity(pctx)
    method.after_prefill(ctx)
    assert ctx.caps == [cap] and layer.length == cap
    ids = kept_ids(layer)
    for h in range(2):
        kept = torch.zeros(64, dtype=torch.bool)
        kept[ids[0, h]] = True
        assert scores[0, h, kept].min() >= scores[0, h, ~kept].max()


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "cls,kwargs,field",
    [
        (H2O, {"recent_ratio": 1.5}, "recent_ratio"),
        (H2O, {"recent_ratio": -0.1}, "recent_ratio"),
        (H2O, {"budget": 0}, "budget"),
        (SnapKV, {"window": 0}, "window"),
        (SnapKV, {"kernel_size": 4}, "kernel_size"),
        (SnapKV, {"kernel_size": 0}, "kernel_size"),
        (SnapKV, {"pooling": "min"}, "pooling"),
        (SnapKV, {"decode_budget": 1.5}, "decode_budget"),
        (PyramidKV, {"beta": 0.5}, "beta"),
        (PyramidKV, {"window": -3}, "window"),
        (Keyformer, {"tau_init": 0.0}, "tau_init"),
        (Keyformer, {"tau_end": -1.0}, "tau_end"),
        (Keyformer, {"recent_ratio": 2}, "recent_ratio"),
        (Keyformer, {"window": -1}, "window"),
        (Keyformer, {"max_new_tokens": 0}, "max_new_tokens"),
        (Keyformer, {"seed": 1.5}, "seed"),
    ],
)
def test_bad_input_names_the_field(cls, kwargs, field):
    with pytest.raises(ValueError, match=field):
        cls(**kwargs)


def test_spec_strings_round_trip():
    for spec in ("h2o(budget=0.25)", "snapkv(budget=64,window=16)", "pyramidkv(beta=10)", "keyformer(seed=3)"):
        (m,) = kvaccel.config.parse_spec(spec)
        assert kvaccel.config.parse_spec(m.spec())[0] == m


@pytest.mark.parametrize("name", ("h2o", "snapkv", "keyformer"))
def test_chunked_prompt_is_compressed_after_each_chunk(name):
    from kvaccel.cache import KVAccelCache

    model = tiny_model("llama")
    ids = torch.randint(3, 512, (1, 160), generator=torch.Generator().manual_seed(8))
    with kvaccel.patched(model, name, budget=24), torch.no_grad():
        cache = KVAccelCache(model)
        model(ids[:, :100], cache=cache, use_cache=True)
        model(ids[:, 100:], cache=cache, use_cache=True)  # phase "extend"
        assert [layer.kept_per_head().tolist() for layer in cache.layers] == [[[24, 24]]] * 3
        assert cache.get_seq_length() == 160


@pytest.mark.parametrize(
    "spec",
    ["h2o(budget=24)", "keyformer(budget=24)", "snapkv(budget=24)", "snapkv(budget=24, decode_budget=24)",
     "pyramidkv(budget=24, window=8)"],
)
@pytest.mark.parametrize("value_ratio", [0.0, 0.4], ids=["keys", "keys_values"])
def test_every_scorer_composes_with_think(spec, value_ratio):
    """After ThinK stored keys narrow, a second prompt chunk (the question) and decoding rescore the
    [narrow, full] axis: zero-filled pruned channels give exactly ThinK's logits, and budgets hold."""
    from kvaccel.cache import KVAccelCache

    model = tiny_model("llama")
    ids = torch.randint(3, 512, (1, 140), generator=torch.Generator().manual_seed(9))
    with kvaccel.patched(model, f"{spec}+think(ratio=0.4, window=8, value_ratio={value_ratio})"), torch.no_grad():
        cache = KVAccelCache(model)
        model(ids[:, :120], cache=cache, use_cache=True)  # context
        assert any(layer.narrow is not None for layer in cache.layers)  # (a tiny top pyramid layer may not)
        model(ids[:, 120:], cache=cache, use_cache=True)  # question: phase "extend"
        tok = ids[:, -1:]
        for _ in range(6):  # decode steps
            tok = model(tok, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        assert cache.get_seq_length() == 146
        capacities = kvaccel.report(model)["capacity"]
        for layer, cap in zip(cache.layers, capacities, strict=True):
            grows = "snapkv(budget=24)" in spec or "pyramidkv" in spec  # prompt-only eviction
            assert layer.kept_per_head().max() == (cap + 6 if grows else cap)


def test_dense_keys_zero_fill_reproduces_narrow_logits():
    from kvaccel.cache import KVAccelLayer
    from kvaccel.patches.channels.think import ThinK

    g = torch.Generator().manual_seed(10)
    layer = KVAccelLayer()
    k = torch.randn(1, 2, 10, 8, generator=g)
    layer.update(k, torch.randn(1, 2, 10, 8, generator=g))
    cidx = torch.tensor([[[0, 2, 5]], [[1, 3, 7]]]).view(1, 2, 3)
    ThinK.prune(layer, cidx, 6)
    dense, valid = layer.dense_keys()
    assert dense.shape == (1, 2, 10, 8) and valid is None
    q = torch.randn(1, 2, 1, 8, generator=g)
    for h in range(2):
        want_narrow = q[0, h, 0, cidx[0, h]] @ k[0, h, :6, cidx[0, h]].T
        torch.testing.assert_close(q[0, h, 0] @ dense[0, h, :6].T, want_narrow)
        torch.testing.assert_close(q[0, h, 0] @ dense[0, h, 6:].T, q[0, h, 0] @ k[0, h, 6:].T)


@pytest.mark.parametrize("spec", ["snapkv(budget=24)", "expected_attention(budget=24, chunk=4)", "h2o(budget=24)"])
def test_paused_feeds_tokens_over_the_compressed_cache_without_compressing(spec):
    from kvaccel.cache import KVAccelCache

    model = tiny_model("llama")
    ids = torch.randint(3, 512, (1, 110), generator=torch.Generator().manual_seed(9))
    ctx_ids, q_ids = ids[:, :100], ids[:, 100:]
    with kvaccel.patched(model, spec), torch.no_grad():
        cache = KVAccelCache(model)
        model(ctx_ids, cache=cache, use_cache=True)
        assert kvaccel.report(model)["kept_tokens"][0][0] == [24, 24]
        snapshot = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
        with kvaccel.paused(model):
            assert "evict" not in kvaccel.report(model)["methods"]
            out = model(q_ids, cache=cache, use_cache=True).logits
        assert kvaccel.report(model)["kept_tokens"][0][0] == [34, 34]  # nothing evicted, the 10 tokens appended
        assert kvaccel.report(model)["methods"]["evict"] == kvaccel.parse_spec(spec)[0].spec()  # back on exit
        for (k, v), layer in zip(snapshot, cache.layers, strict=True):  # the compressed context is untouched
            assert torch.equal(layer.keys[:, :, :24], k) and torch.equal(layer.values[:, :, :24], v)
        # the same logits as feeding the 10 tokens one at a time over the kept cache, paused
        cache2 = KVAccelCache(model)
        model(ctx_ids, cache=cache2, use_cache=True)
        with kvaccel.paused(model):
            steps = [model(q_ids[:, i:i + 1], cache=cache2, use_cache=True).logits for i in range(10)]
        torch.testing.assert_close(torch.cat(steps, 1), out, atol=1e-4, rtol=1e-4)
        # without the pause, the question is compressed again (the cache is cut back to the budget)
        cache3 = KVAccelCache(model)
        model(ctx_ids, cache=cache3, use_cache=True)
        model(q_ids, cache=cache3, use_cache=True)
        assert kvaccel.report(model)["kept_tokens"][0][0] == [24, 24]
    with pytest.raises(ValueError, match="patched"):
        with kvaccel.paused(model):
            pass


@pytest.mark.parametrize(
    "spec", ["h2o(budget=24,slack=4)", "snapkv(budget=24,decode_budget=24)", "h2o(budget=24)+think"]
)
def test_decode_probs_from_the_attention_equal_a_separate_scoring_pass(spec, monkeypatch):
    """Scores accumulated from the probabilities the decode attention computed (one pass) equal a second pass."""
    import kvaccel.patches.attention as attention

    model = tiny_model("llama")
    ids = torch.randint(3, 512, (1, 96), generator=torch.Generator().manual_seed(6))
    states = []
    for fuse in (True, False):
        if not fuse:
            monkeypatch.setattr(attention, "_fuse_decode_probs", lambda ctx: False)
        with kvaccel.patched(model, spec):
            cache = KVAccelCache(model)
            out = model.generate(ids, cache=cache, max_new_tokens=12, do_sample=False)
            states.append((out, {k: v.clone() for k, v in cache.layers[1].token_state.items()}))
    assert torch.equal(states[0][0], states[1][0])
    assert states[0][1].keys() == states[1][1].keys() and states[0][1]
    for name in states[0][1]:
        torch.testing.assert_close(states[0][1][name], states[1][1][name], atol=1e-5, rtol=1e-4)
