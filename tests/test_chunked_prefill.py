"""Sparse prefill of a prompt fed in chunks (phase ``extend``): a later chunk is computed sparsely against the cache,
selects what the unchunked prompt selects for its rows, and ``report()`` counts its tiles."""

from __future__ import annotations

import pytest
import torch
from prefill_helpers import left_padded, recording
from transformers import DynamicCache

import kvaccel
from kvaccel.kernels.block_sparse_attention import causal_block_mask
from kvaccel.patches.prefill import PBS, SALE, AShape, Seer, VerticalSlash
from kvaccel.patches.prefill.base import _diagonal_tiles, _permuted_tiles
from kvaccel.patches.prefill.seer_gate import SeerGate

from conftest import tiny_model

L, P = 320, 192  # prompt length; the second chunk starts at P (a multiple of every block size below)


def methods(gate_dir) -> dict:
    """Sparse settings of every block-sparse method for short prompts (min_length small)."""
    return {
        "a_shape": AShape(sink_blocks=1, local_blocks=2, block_size=32, min_length=16),
        "vertical_slash": VerticalSlash(vertical_size=31, slash_size=50, block_size=32, min_length=16),
        "pbs": PBS(tau=0.5, block_size=32, segment_size=64, min_length=16),
        "sale": SALE(threshold=0.2, local_window=32, min_length=100, dense_above=1.0),
        "seer": Seer(weights=str(gate_dir), threshold=0.3, dense_last_rows=0, min_length=0),
    }


NAMES = ["a_shape", "vertical_slash", "pbs", "sale", "seer"]


@pytest.fixture(scope="module")
def gate_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("seer_gate")
    SeerGate.for_model(tiny_model("llama"), hidden=16).save(path)
    return path


def computed_tiles(sel, L: int, Lq: int, H: int) -> int:
    """Tiles the base computes for a selection of the last ``Lq`` of ``L`` positions (diagonal / own tiles added)."""
    bm, bn = sel.block_m, sel.block_n
    if sel.key_perm is None:
        mask = (sel.mask | _diagonal_tiles(L, bm, bn, None, q_len=Lq)) & causal_block_mask(L, bm, bn, q_len=Lq)
        return int(mask.expand(1, H, -1, -1).sum())
    own, reach = _permuted_tiles(sel.key_perm, L, bm, bn, H, q_len=Lq)
    return int(((sel.mask | own) & reach).sum())


# ------------------------------------------------------------------------------------------- the op level


@pytest.mark.parametrize("name", NAMES)
def test_chunk_selects_and_computes_the_unchunked_rows(name, gate_dir):
    """The queries ``[P, L)`` over every key: the same tiles and the same attention output as those rows of the whole
    prompt (the whole prompt's extra inputs, e.g. SALE's query centre, sliced to the chunk)."""
    method = methods(gate_dir)[name]
    if name == "seer":
        method.bind(tiny_model("llama"))
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, h, L, 16, generator=g) for h in (6, 2, 2))  # the tiny llama's heads (seer's gate)
    k[:, :, 100:110] += 2 * q.mean((1, 2))  # keys that draw attention
    # extra inputs of the whole prompt and of the chunk: SALE's query centre (the whole prompt's, broadcast over the
    # rows), seer's pre-RoPE q and k (random here: any q/k the gate reads)
    centre = q.mean(2, keepdim=True).expand_as(q)
    extra = {"sale": (centre,), "seer": (q, k)}.get(name, ())
    chunk_extra = {"sale": (centre[:, :, P:],), "seer": (q[:, :, P:], k)}.get(name, ())
    stats = dict(prefill_estimate_s=0, prefill_attention_s=0, _tiles=0, _causal_tiles=0)
    calls = recording(method)
    full = method.sparse_attention(q, k, v, 0.25, 0, stats, *extra)
    chunk = method.sparse_attention(q[:, :, P:], k, v, 0.25, 0, stats, *chunk_extra)
    whole, part = calls
    i0 = P // whole.block_m
    assert part.mask.shape[2] == whole.mask.shape[2] - i0
    assert torch.equal(part.mask, whole.mask[:, :, i0:])
    if whole.key_perm is not None:
        assert torch.equal(part.key_perm, whole.key_perm)
    assert not whole.mask.all()  # sparse
    torch.testing.assert_close(chunk, full[:, P:], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- through the model


def chunked_run(model, method, ids, chunks):
    """Prefill ``ids`` over a KVAccelCache in forwards of the given boundaries; logits and report()."""
    cache = kvaccel.KVAccelCache(model)
    out = []
    with torch.no_grad():
        for a, b in zip((0, *chunks), (*chunks, ids.shape[1]), strict=True):
            out.append(model(ids[:, a:b], cache=cache, use_cache=True).logits)
    return torch.cat(out, 1), kvaccel.report(model)


@pytest.mark.parametrize("name", NAMES)
def test_chunked_prefill_is_sparse_and_selects_the_unchunked_rows(name, gate_dir):
    """A prompt in two forwards over the cache: every layer of the second chunk runs the sparse path (no dense
    note), its layer-0 selection (same inputs as unchunked) equals the unchunked rows, and report()'s density is the
    computed tiles of both chunks over their causal tiles. Methods whose selection of a row depends on that row and
    the keys only (a_shape, seer) give the unchunked logits on every row."""
    model = tiny_model("llama")
    nl, H = model.config.num_hidden_layers, model.config.num_attention_heads
    ids = torch.randint(3, 500, (1, L), generator=torch.Generator().manual_seed(2))
    method = methods(gate_dir)[name]
    with kvaccel.patched(model, method):
        calls = recording(model._kvaccel_state.methods["prefill"])
        ref, _ = chunked_run(model, method, ids, ())
        whole = list(calls)
        calls.clear()
        out, rep = chunked_run(model, method, ids, (P,))
    assert len(calls) == 2 * nl  # both chunks selected in every layer: the second one did not go dense
    first, second = calls[:nl], calls[nl:]
    i0 = P // second[0].block_m
    assert torch.equal(second[0].mask, whole[0].mask[:, :, i0:])
    assert not any("densely" in n for n in rep["notes"]), rep["notes"]
    want = []
    for a, b in zip(first, second, strict=True):
        tiles = computed_tiles(a, P, P, H) + computed_tiles(b, L, L - P, H)
        causal = H * (causal_block_mask(P, a.block_m, a.block_n).sum() + causal_block_mask(
            L, b.block_m, b.block_n, q_len=L - P).sum())
        want.append(tiles / float(causal))
    assert rep["prefill_density"] == pytest.approx(want)
    assert all(d < 1 for d in rep["prefill_density"]), rep["prefill_density"]
    if name in ("a_shape", "seer"):
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_generate_with_prefill_chunk_size_is_sparse():
    """transformers' prefill_chunk_size: later chunks go through the sparse path (a_shape: the unchunked tiles, so
    the same greedy tokens and the same density as an unchunked prefill)."""
    model = tiny_model("llama")
    ids = torch.randint(3, 500, (1, L), generator=torch.Generator().manual_seed(3))
    spec = "a_shape(sink_blocks=1,local_blocks=2,block_size=32,min_length=16)"
    with kvaccel.patched(model, spec), torch.no_grad():
        ref = model.generate(ids, max_new_tokens=4, do_sample=False)
        dens = kvaccel.report(model)["prefill_density"]
        out = model.generate(ids, max_new_tokens=4, do_sample=False, prefill_chunk_size=128)
        rep = kvaccel.report(model)
    assert torch.equal(out, ref)
    assert rep["prefill_density"] == pytest.approx(dens)
    assert all(d < 0.9 for d in dens), dens


def test_chunk_after_eviction_is_dense_and_said_so():
    """Eviction after the first chunk leaves the cache without every token: the next chunk is computed densely by
    the decode path, and report() says so (never silently)."""
    model = tiny_model("llama")
    ids = torch.randint(3, 500, (1, L), generator=torch.Generator().manual_seed(4))
    with kvaccel.patched(model, "a_shape(block_size=32,local_blocks=2,min_length=16)", "streaming(budget=64)"):
        out, rep = chunked_run(model, None, ids, (P,))
    assert torch.isfinite(out).all()
    assert any("a_shape computed later prompt chunks densely: the cache holds" in n for n in rep["notes"]), rep
    assert all(d > 0 for d in rep["prefill_density"])


@pytest.mark.parametrize("name", ["a_shape", "seer"])
def test_left_padded_batch_in_chunks_equals_the_unchunked_batch(name, gate_dir):
    """A left-padded batch of two prompts prefilled in two chunks: per row, the logits of the unchunked batch (each
    sequence's keys and queries sliced to its real run; seer's cached keys un-rotated at their own positions)."""
    model = tiny_model("llama")
    ids, mask, pos = left_padded([torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(5 + b))
                                  for b, n in enumerate((L, 250))])
    method = methods(gate_dir)[name]
    with kvaccel.patched(model, method), torch.no_grad():
        ref = model(ids, attention_mask=mask, position_ids=pos, cache=kvaccel.KVAccelCache(model)).logits
        cache = kvaccel.KVAccelCache(model)
        out = torch.cat([model(ids[:, a:b], attention_mask=mask[:, :b], position_ids=pos[:, a:b], cache=cache).logits
                         for a, b in ((0, P), (P, L))], 1)
        rep = kvaccel.report(model)
    assert not any("densely" in n for n in rep["notes"]), rep["notes"]
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=2e-5, rtol=1e-4)


def test_chunk_over_a_cache_that_is_not_ours_is_sparse():
    """A second forward over transformers' own cache (no KVAccelCache): the chunk runs the sparse path too."""
    model = tiny_model("llama")
    ids = torch.randint(3, 500, (1, L), generator=torch.Generator().manual_seed(6))
    method = methods(None)["a_shape"]
    with kvaccel.patched(model, method), torch.no_grad():
        calls = recording(model._kvaccel_state.methods["prefill"])
        ref = model(ids).logits
        cache = DynamicCache(config=model.config)
        first = model(ids[:, :P], cache=cache, use_cache=True).logits
        out = torch.cat([first, model(ids[:, P:], cache=cache, use_cache=True).logits], 1)
    assert len(calls) == 3 * model.config.num_hidden_layers  # unchunked, then both chunks in every layer
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
