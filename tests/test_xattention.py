"""XAttention (prefill): antidiagonal block scores and the cumulative block rule against naive float64 references built
from the full attention matrix, identity at threshold 1, density, chunked prefill, padded batches, bad input."""

from __future__ import annotations

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
from kvaccel.patches.prefill import XAttention, xattention
from kvaccel.patches.prefill.xattention import antidiagonal_block_scores, cumulative_selection

from conftest import FAMILIES, tiny_model

SPARSE = dict(threshold=0.6, stride=4, block_size=32, min_length=16)


def qkv(L: int, seed: int = 0, dtype=torch.float64, Hq: int = 6, Hkv: int = 2, D: int = 8):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, h, L, D, generator=g, dtype=torch.float64) for h in (Hq, Hkv, Hkv))
    k[:, :, 5:9] += 1.5 * q.mean((1, 2))  # keys that draw attention: rows differ from uniform
    return q.to(dtype), k.to(dtype), v.to(dtype)


def naive_scores(q, k, scale, S, block, Lq):
    """Block scores from the full ``q kᵀ`` (float64, loops): per ``S x S`` sub-tile the antidiagonal sum over real
    (query in the last ``Lq`` positions, key in range) pairs, scaled by ``scale / S``, softmax over key groups
    ``j <= g``, summed into blocks of query and key groups."""
    Hq, L = q.shape[1], k.shape[2]
    G = Hq // k.shape[1]
    n = -(-L // block)
    i0 = (L - Lq) // block
    ng = -(-L // S)
    out = torch.zeros(Hq, n - i0, n, dtype=torch.float64)
    for h in range(Hq):
        A = q[0, h].double() @ k[0, h // G].double().T  # (Lq, L): row r is position L - Lq + r
        for g in range(i0 * block // S, ng):
            anti = torch.zeros(g + 1, dtype=torch.float64)
            has_query = False
            for j in range(g + 1):
                for t in range(S):
                    qi, kj = g * S + S - 1 - t, j * S + t
                    if L - Lq <= qi < L and kj < L:
                        anti[j] += A[qi - (L - Lq), kj]
                        has_query = True
            if not has_query:
                continue
            p = torch.softmax(anti * scale / S, 0)
            for j in range(g + 1):
                out[h, g * S // block - i0, j * S // block] += p[j]
    return out


def naive_rule(scores, i0, tau):
    """The cumulative rule by loops: block 0 and the diagonal, then others by descending score while the kept mass is
    below ``tau`` times the row's."""
    H, nq, n = scores.shape
    mask = torch.zeros(H, nq, n, dtype=torch.bool)
    for h in range(H):
        for r in range(nq):
            i = i0 + r
            row = scores[h, r, : i + 1].tolist()
            kept = {0, i}
            mass = sum(row[j] for j in kept)
            for j in sorted(set(range(i + 1)) - kept, key=lambda j: -row[j]):
                if mass >= tau * sum(row):
                    break
                kept.add(j)
                mass += row[j]
            mask[h, r, sorted(kept)] = True
    return mask


# ------------------------------------------------------------------------------------------------ the estimate


@pytest.mark.parametrize("L,Lq,S,block", [(100, 100, 4, 16), (96, 96, 8, 32), (130, 37, 4, 16), (130, 50, 2, 32)])
def test_antidiagonal_scores_equal_the_naive_sums_of_the_full_matrix(L, Lq, S, block):
    q, k, _ = qkv(L, seed=L + Lq)
    got = antidiagonal_block_scores(q[:, :, L - Lq :], k, 0.3, S, block)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got[0], naive_scores(q[:, :, L - Lq :], k, 0.3, S, block, Lq), rtol=1e-12, atol=1e-12)


def test_estimate_in_small_chunks_is_the_same_and_float32_for_low_precision_inputs(monkeypatch):
    q, k, _ = qkv(200, seed=3)
    whole = antidiagonal_block_scores(q, k, 0.3, 4, 16)
    monkeypatch.setattr(xattention, "_CHUNK_ELEMS", 1)  # one query block per chunk
    torch.testing.assert_close(antidiagonal_block_scores(q, k, 0.3, 4, 16), whole, rtol=1e-12, atol=1e-12)
    low = antidiagonal_block_scores(q.bfloat16(), k.bfloat16(), 0.3, 4, 16)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low.double(), whole, atol=0.05, rtol=0.05)


def test_stride_one_scores_are_the_exact_block_sums_of_causal_attention():
    q, k, _ = qkv(70, seed=4)
    got = antidiagonal_block_scores(q, k, 0.3, 1, 16)[0]
    p = (0.3 * q[0] @ k[0].repeat_interleave(3, 0).transpose(-1, -2))
    p = p.masked_fill(torch.ones(70, 70, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    want = torch.nn.functional.pad(p, (0, 10, 0, 10)).view(6, 5, 16, 5, 16).sum((2, 4))
    torch.testing.assert_close(got, want)


# ------------------------------------------------------------------------------------------------ the selection


def test_cumulative_selection_by_hand():
    s = torch.tensor([[0.1, 0.4, 0.2, 0.3, 0.0]])
    valid = torch.tensor([[True, True, True, True, False]])
    forced = torch.tensor([[True, False, False, False, False]])
    # forced 0.1; 0.4 -> 0.5; 0.3 -> 0.8; 0.2 only while the mass before is below the need
    assert cumulative_selection(s, valid, 0.5, forced).tolist() == [[True, True, False, False, False]]
    assert cumulative_selection(s, valid, 0.51, forced).tolist() == [[True, True, False, True, False]]
    assert cumulative_selection(s, valid, 0.81, forced).tolist() == [[True, True, True, True, False]]
    assert cumulative_selection(s, valid, 0.05, forced).tolist() == [[True, False, False, False, False]]
    assert cumulative_selection(s, valid, 0.05, forced, min_count=3).tolist() == [[True, True, False, True, False]]
    assert cumulative_selection(s, valid, 1.0).tolist() == valid.tolist()


@pytest.mark.parametrize("tau", [0.3, 0.7, 0.95])
@pytest.mark.parametrize("L,Lq", [(200, 200), (200, 90)])
def test_selected_blocks_are_exactly_the_naive_cumulative_rule(tau, L, Lq):
    q, k, v = qkv(L, seed=7)
    method = XAttention(threshold=tau, stride=4, block_size=16)
    sel = method.select(q[:, :, L - Lq :], k, v, 0.3, 0)
    i0 = (L - Lq) // 16
    want = naive_rule(naive_scores(q[:, :, L - Lq :], k, 0.3, 4, 16, Lq), i0, tau)
    assert torch.equal(sel.mask[0], want)
    assert (sel.block_m, sel.block_n) == (16, 16)
    assert not want.all() and want[:, :, 0].all()


def test_threshold_one_selects_every_causal_block():
    q, k, v = qkv(150, seed=8, dtype=torch.float32)
    sel = XAttention(threshold=1.0, stride=2, block_size=16).select(q, k, v, 0.3, 0)
    assert torch.equal(sel.mask, causal_block_mask(150, 16, 16).expand_as(sel.mask))


# ------------------------------------------------------------------------------------------------ through the model


@pytest.mark.parametrize("family", FAMILIES)
def test_threshold_one_matches_stock(family):
    spec = "xattention(threshold=1.0,stride=4,block_size=32,min_length=16)"
    assert_dense_setting_matches_stock(tiny_model(family), spec)


def test_report_density_is_the_computed_tiles_and_output_changes():
    assert_density_is_the_computed_tiles(tiny_model("qwen2"), XAttention(**SPARSE))


def test_chunked_prefill_selects_and_computes_the_unchunked_rows():
    """A prompt in two forwards (the second chunk starts on a block boundary): every layer of the second chunk runs
    sparse, selects the unchunked rows, and the logits equal the unchunked prefill's."""
    model = tiny_model("llama")
    L, P = 320, 192
    ids = torch.randint(3, 500, (1, L), generator=torch.Generator().manual_seed(3))
    method = XAttention(**SPARSE)
    nl = model.config.num_hidden_layers
    with torch.no_grad(), kvaccel.patched(model, method):
        calls = recording(model._kvaccel_state.methods["prefill"])
        ref = model(ids, cache=kvaccel.KVAccelCache(model), use_cache=True).logits
        whole = list(calls)
        calls.clear()
        cache = kvaccel.KVAccelCache(model)
        out = torch.cat([model(ids[:, a:b], cache=cache, use_cache=True).logits for a, b in ((0, P), (P, L))], 1)
        rep = kvaccel.report(model)
    assert len(calls) == 2 * nl and not any("densely" in n for n in rep["notes"]), rep["notes"]
    for w, c in zip(whole, calls[nl:], strict=True):
        assert torch.equal(c.mask, w.mask[:, :, P // 32 :])
    assert not whole[0].mask[:, :, P // 32 :].all()
    assert all(0 < d < 1 for d in rep["prefill_density"])
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_padded_batch_equals_each_row_alone():
    model = tiny_model("llama")
    seqs = [torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(n)) for n in (260, 201)]
    dens, batched, single = padded_batch_and_alone(model, XAttention(**SPARSE), seqs)
    for b, s in zip(batched, single, strict=True):
        torch.testing.assert_close(b, s, atol=2e-5, rtol=1e-4)
    assert all(d < 1 for d in dens), dens


@pytest.mark.parametrize("kwargs,field", [
    ({"threshold": 0.0}, "threshold"), ({"threshold": 1.2}, "threshold"), ({"threshold": True}, "threshold"),
    ({"stride": 0}, "stride"), ({"stride": 3}, "stride"), ({"stride": 256}, "stride"), ({"stride": 2.0}, "stride"),
    ({"block_size": 100}, "block_size"), ({"min_length": -1}, "min_length"), ({"backend": "cuda"}, "backend"),
])
def test_bad_config_values_raise(kwargs, field):
    with pytest.raises(ValueError, match=field):
        XAttention(**kwargs)
