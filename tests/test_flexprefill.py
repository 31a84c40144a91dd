"""FlexPrefill (prefill): the estimate and the per-head pattern against naive float64 references built from the full
attention matrix, the JS distance without NaN, identity at gamma 1, density, chunked prefill, padded batches, bad
input."""

from __future__ import annotations

import math

import pytest
import torch
from prefill_helpers import (
    assert_dense_setting_matches_stock,
    assert_density_is_the_computed_tiles,
    padded_batch_and_alone,
    recording,
)

import kvaccel
from kvaccel.kernels.block_sparse_attention import causal_block_mask
from kvaccel.patches.prefill import FlexPrefill
from kvaccel.patches.prefill.base import _diagonal_tiles
from kvaccel.patches.prefill.flexprefill import js_distance
from kvaccel.patches.prefill.vertical_slash import last_query_attention

from conftest import FAMILIES, tiny_model

SPARSE = dict(gamma=0.6, tau=0.3, min_budget=32, block_size=32, min_length=16)


def qkv(L: int, seed: int = 0, dtype=torch.float64, Hq: int = 6, Hkv: int = 2, D: int = 8):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, h, L, D, generator=g, dtype=torch.float64) for h in (Hq, Hkv, Hkv))
    k[:, :, 5:9] += 1.5 * q.mean((1, 2))  # a vertical line
    q[:, :3] *= 0.2  # flat heads (near the pooled estimate) next to peaked ones
    return q.to(dtype), k.to(dtype), v.to(dtype)


def naive_estimate(q, k, scale, bs, L):
    """From the full causal attention of the chunk ``q`` (its last rows are positions ``L - Lq ..``), by loops."""
    Hq, Lq, D = q.shape[1:]
    G, n = Hq // k.shape[1], -(-L // bs)
    i0, nl = (L - Lq) // bs, min(bs, Lq)
    pos = torch.arange(L - Lq, L)
    vert, slash, pooled = (torch.zeros(Hq, n, dtype=torch.float64) for _ in range(3))
    dist = torch.zeros(Hq, dtype=torch.float64)
    blocks = torch.zeros(Hq, n - i0, n, dtype=torch.float64)
    for h in range(Hq):
        kk = k[0, h // G].double()
        A = (scale * q[0, h].double() @ kk.T).masked_fill(torch.arange(L)[None, :] > pos[:, None], -math.inf)
        A = A.softmax(-1)[Lq - nl :]  # the last nl rows
        for r in range(nl):
            i = L - nl + r
            for j in range(i + 1):
                vert[h, j // bs] += A[r, j] / nl
                slash[h, (i - j) // bs] += A[r, j] / nl
        kbar = torch.stack([kk[c * bs : (c + 1) * bs].mean(0) for c in range(n)])
        pooled[h] = (scale * kbar @ q[0, h, Lq - nl :].double().mean(0)).softmax(-1)
        p, m = pooled[h], (pooled[h] + vert[h]) / 2
        dist[h] = math.sqrt(sum(0.5 * a * math.log(a / c) for a, c in zip(p.tolist(), m.tolist(), strict=True) if a > 0)
                            + sum(0.5 * b * math.log(b / c) for b, c in zip(vert[h].tolist(), m.tolist(), strict=True)
                                  if b > 0))
        for i in range(i0, n):
            rows = q[0, h, max(i * bs, L - Lq) - (L - Lq) : min((i + 1) * bs, L) - (L - Lq)].double()
            logit = scale * kbar[: i + 1] @ rows.mean(0)
            blocks[h, i - i0, : i + 1] = logit.softmax(-1)
    return vert, slash, pooled, dist, blocks


def naive_keep(scores, candidates, gamma, forced=(), least=0):
    """Forced first, then candidates by descending score while the kept mass is below gamma of the total or fewer
    than ``least`` are kept."""
    kept = list(forced)
    total = sum(scores[c] for c in candidates)
    for c in sorted(set(candidates) - set(kept), key=lambda c: -scores[c]):
        if sum(scores[x] for x in kept) < gamma * total or len(kept) < least:
            kept.append(c)
    return set(kept)


def naive_pattern(est, method, L):
    vert, slash, _, dist, blocks = est
    Hq, nq, n = blocks.shape
    bs, i0 = method.block_size, n - nq
    least = -(-method.min_budget // bs)
    mask = torch.zeros(Hq, nq, n, dtype=torch.bool)
    for h in range(Hq):
        qa = float(dist[h]) < method.tau
        g = 0.0 if qa else method.gamma
        cols = naive_keep(vert[h].tolist(), range(n), g, [0], least)
        offs = naive_keep(slash[h].tolist(), range(n), g, [0], least)
        for i in range(i0, n):
            for j in range(i + 1):
                if j in cols:
                    mask[h, i - i0, j] = True
            for p in range(i * bs, min((i + 1) * bs, L)):  # tiles a chosen diagonal crosses
                for j in range(p + 1):
                    if (p - j) // bs in offs:
                        mask[h, i - i0, j // bs] = True
        if qa:
            flat = {(i, j): float(blocks[h, i - i0, j]) for i in range(i0, n) for j in range(i + 1)}
            for i, j in naive_keep(flat, list(flat), method.gamma):
                mask[h, i - i0, j] = True
    return mask


# ------------------------------------------------------------------------------------------------ the estimate


@pytest.mark.parametrize("L,Lq,bs", [(200, 200, 32), (330, 150, 32), (150, 20, 16)])
def test_estimate_equals_the_naive_reference_from_the_full_matrix(L, Lq, bs):
    q, k, _ = qkv(L, seed=L)
    est = FlexPrefill(block_size=bs).estimate(q[:, :, L - Lq :], k, 0.3)
    want = naive_estimate(q[:, :, L - Lq :], k, 0.3, bs, L)
    for got, ref in zip(est, want, strict=True):
        torch.testing.assert_close(got[0].double(), ref, rtol=1e-5, atol=1e-6)  # pooled means are float32
    torch.testing.assert_close(est.vertical.sum(-1), torch.ones_like(est.distance))
    torch.testing.assert_close(est.slash.sum(-1), torch.ones_like(est.distance))


def test_js_distance_has_no_nan_on_zero_probabilities():
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.7, 0.1, 0.1, 0.1]])
    d = js_distance(p, q)
    m = (p + q) / 2
    naive_nan = (0.5 * (p * torch.log(p / m)).sum(-1) + 0.5 * (q * torch.log(q / m)).sum(-1)).sqrt()
    assert naive_nan[:2].isnan().all()  # FlexPrefill's formula on the same inputs
    assert d[0] == 0 and d[1] == pytest.approx(math.sqrt(math.log(2)))  # identical; disjoint: the maximum
    third = 0.5 * sum(a * math.log(a / c) + b * math.log(b / c)
                      for a, b, c in zip(p[2].tolist(), q[2].tolist(), m[2].tolist(), strict=True))
    assert d[2] == pytest.approx(math.sqrt(third))


def test_non_finite_queries_raise_instead_of_choosing_a_pattern():
    q, k, _ = qkv(100)
    q[0, 2, -1] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite Jensen-Shannon"):
        FlexPrefill(block_size=16).estimate(q, k, 0.3)


# ------------------------------------------------------------------------------------------------ the pattern


@pytest.mark.parametrize("L,Lq", [(200, 200), (330, 150)])
# gamma * (block rows) is never whole: a query-aware head whose rows each put their mass in one block would tie it
@pytest.mark.parametrize("gamma,min_budget", [(0.55, 0), (0.8, 64), (0.95, 32)])
def test_pattern_is_exactly_the_naive_rule_per_head(L, Lq, gamma, min_budget):
    q, k, _ = qkv(L, seed=L + 1)
    probe = FlexPrefill(block_size=32).estimate(q[:, :, L - Lq :], k, 0.3).distance[0].sort().values
    tau = float(probe[2] + probe[3]) / 2  # between two heads: both patterns occur
    method = FlexPrefill(gamma=gamma, tau=tau, min_budget=min_budget, block_size=32)
    est = method.estimate(q[:, :, L - Lq :], k, 0.3)
    got = method.pattern(est, L)[0]
    want = naive_pattern([t[0] for t in est], method, L)
    causal = causal_block_mask(L, 32, 32, q_len=Lq)
    assert torch.equal(got & causal, want)
    assert 0 < int((est.distance < tau).sum()) < 6
    assert not want.all()


def test_gamma_one_selects_every_causal_tile():
    q, k, v = qkv(150, seed=9, dtype=torch.float32)
    for tau in (0.0, 1.0):  # every head vertical-slash, then every head query-aware
        sel = FlexPrefill(gamma=1.0, tau=tau, block_size=16).select(q, k, v, 0.3, 0)
        causal = causal_block_mask(150, 16, 16)
        assert torch.equal(sel.mask & causal, causal.expand_as(sel.mask))


def test_last_query_attention_keeps_float64():
    """FlexPrefill's exact tests need float64 estimates (last_query_attention used to compute in float32 always)."""
    q, k, _ = qkv(40)
    assert last_query_attention(q, k, 0.3, 7).dtype == torch.float64


# ------------------------------------------------------------------------------------------------ through the model


@pytest.mark.parametrize("family", FAMILIES)
def test_gamma_one_matches_stock(family):
    assert_dense_setting_matches_stock(tiny_model(family), "flexprefill(gamma=1.0,block_size=32,min_length=16)")


def test_report_density_is_the_computed_tiles_and_output_changes():
    assert_density_is_the_computed_tiles(tiny_model("qwen2"), FlexPrefill(**SPARSE))


def test_last_chunk_selects_the_unchunked_rows_of_vertical_slash_heads():
    """The queries [P, L) over every key (tau=0: every head vertical-slash): the unchunked tiles and output rows."""
    L, P = 320, 192
    q, k, v = qkv(L, seed=5, dtype=torch.float32)
    method = FlexPrefill(gamma=0.6, tau=0.0, min_budget=32, block_size=32)
    stats = dict(prefill_estimate_s=0, prefill_attention_s=0, _tiles=0, _causal_tiles=0)
    calls = recording(method)
    full = method.sparse_attention(q, k, v, 0.3, 0, stats)
    chunk = method.sparse_attention(q[:, :, P:], k, v, 0.3, 0, stats)
    whole, part = calls
    assert torch.equal(part.mask, whole.mask[:, :, P // 32 :])
    assert not (whole.mask & causal_block_mask(L, 32, 32)).equal(causal_block_mask(L, 32, 32).expand_as(whole.mask))
    torch.testing.assert_close(chunk, full[:, P:], atol=1e-5, rtol=1e-5)


def test_chunked_prefill_is_sparse_in_every_layer_and_counted():
    model = tiny_model("llama")
    L, P = 320, 192
    ids = torch.randint(3, 500, (1, L), generator=torch.Generator().manual_seed(3))
    method = FlexPrefill(**SPARSE)
    nl, H = model.config.num_hidden_layers, model.config.num_attention_heads
    with torch.no_grad(), kvaccel.patched(model, method):
        calls = recording(model._kvaccel_state.methods["prefill"])
        cache = kvaccel.KVAccelCache(model)
        out = torch.cat([model(ids[:, a:b], cache=cache, use_cache=True).logits for a, b in ((0, P), (P, L))], 1)
        rep = kvaccel.report(model)
    assert torch.isfinite(out).all()
    assert len(calls) == 2 * nl and not any("densely" in n for n in rep["notes"]), rep["notes"]
    want = []
    for a, b in zip(calls[:nl], calls[nl:], strict=True):
        tiles = ((a.mask | _diagonal_tiles(P, 32, 32, None)) & causal_block_mask(P, 32, 32)).sum()
        tiles += ((b.mask | _diagonal_tiles(L, 32, 32, None, q_len=L - P)) & causal_block_mask(L, 32, 32, q_len=L - P)
                  ).sum()
        causal = causal_block_mask(P, 32, 32).sum() + causal_block_mask(L, 32, 32, q_len=L - P).sum()
        want.append(float(tiles / (causal * H)))
    assert rep["prefill_density"] == pytest.approx(want)
    assert all(d < 1 for d in want), want


def test_padded_batch_equals_each_row_alone():
    model = tiny_model("llama")
    seqs = [torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(n)) for n in (260, 201)]
    dens, batched, single = padded_batch_and_alone(model, FlexPrefill(**SPARSE), seqs)
    for b, s in zip(batched, single, strict=True):
        torch.testing.assert_close(b, s, atol=2e-5, rtol=1e-4)
    assert all(d < 1 for d in dens), dens


@pytest.mark.parametrize("kwargs,field", [
    ({"gamma": 0.0}, "gamma"), ({"gamma": 1.5}, "gamma"), ({"gamma": float("nan")}, "gamma"),
    ({"tau": -0.1}, "tau"), ({"tau": 2.0}, "tau"), ({"tau": None}, "tau"),
    ({"min_budget": -1}, "min_budget"), ({"min_budget": 1.5}, "min_budget"),
    ({"block_size": 48}, "block_size"), ({"min_length": -1}, "min_length"), ({"backend": "gpu"}, "backend"),
])
def test_bad_config_values_raise(kwargs, field):
    with pytest.raises(ValueError, match=field):
        FlexPrefill(**kwargs)
