"""retrieval stacked with a quantized storage method: the host store holds codes (kernels/attention_index_store.py).

The reference for every kernel and for decoding is the float32 index holding the *dequantized* keys and values: the
quantized store must give its ids, scores and outputs (the codes are decoded as they are read, nothing else
changes), with 4-8x fewer bytes."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

import kvaccel
from kvaccel.cache import KVAccelCache

from conftest import tiny_model

HAVE_DEPS = all(importlib.util.find_spec(m) is not None for m in ("faiss", "numba"))
pytestmark = pytest.mark.skipif(not HAVE_DEPS, reason="retrieval needs faiss-cpu and numba: pip install '.[retrieval]'")

BITS = (8, 4, 2)


def _rows(rng, rows, n, D, offset=0.0):
    """Keys with one channel far from zero (as Qwen2's key bias makes them) when ``offset``."""
    shift = (offset * (np.arange(D) == 3)).astype(np.float32)
    return [rng.standard_normal((n, D), dtype=np.float32) + shift for _ in range(rows)]


@pytest.mark.parametrize(("bits", "D", "G"), [(8, 64, 32), (4, 64, 32), (2, 64, 32), (4, 128, 32), (4, 64, 64),
                                          (2, 128, 64)])
def test_round_trip_is_within_half_a_step_of_the_centred_tokens(bits, D, G):
    """Every decoded element is within half a step of its token group's grid; the per-row offset takes a constant
    channel out of the range (355 in one channel costs nothing: the step is that of the centred tokens)."""
    from kvaccel.kernels.attention_index_store import QuantizedRows

    rng = np.random.default_rng(bits)
    n = 200
    x = _rows(rng, 1, n, D, offset=355.0)[0]
    store = QuantizedRows(1, n, D, bits, G)
    store.put(0, 0, x[:120])
    store.put(0, 120, x[120:])  # a later spill: the offset of the first stays
    np.testing.assert_allclose(store.mu[0], x[:120].mean(0), rtol=1e-6)
    got = store.dequantize(0, 0, n)
    centred = (x - store.mu[0]).reshape(n, D // G, G)
    step = (centred.max(-1) - centred.min(-1)) / (2**bits - 1)  # float32 grid step of each token group
    err = np.abs(got - x).reshape(n, D // G, G).max(-1)
    assert (err <= step * 0.5 * 1.01 + 1e-4).all(), float((err / step).max())
    assert err.max() < 2.0 / (2**bits - 1) * centred.std() * 8  # the 355 channel did not set the step
    np.testing.assert_allclose(store.dequantize_rows(np.array([n]))[0], got, rtol=1e-6, atol=1e-5)  # compiled
    with pytest.raises(ValueError, match=r"group_size \(32\) must divide, or be a multiple of, the 48 channels"):
        QuantizedRows(1, 8, 96, 4, 32)


@pytest.mark.parametrize("bits", BITS)
def test_quantized_index_equals_float_index_over_the_decoded_rows(bits):
    """Exact scan, graph build + grouped and per-head walks, linking new keys, the attention over retrieved keys
    (fused with a static part or not) and the exact attention while a build is pending: the quantized index returns
    what a float32 index holding its decoded keys and values returns (same ids, scores to float rounding)."""
    from kvaccel.kernels.attention_index import AttentionIndex

    rng = np.random.default_rng(1)
    rows, D, n, G = 3, 64, 1500, 3
    keys, values = _rows(rng, rows, n, D, 5.0), _rows(rng, rows, n, D)
    pos = [np.arange(n) for _ in range(rows)]
    q = rng.standard_normal((rows, G, D), dtype=np.float32)
    quant = AttentionIndex(rows, D, D, bits=bits, group=32)
    quant.store(keys, values, pos)
    ref = AttentionIndex(rows, D, D)
    ref.store([quant.float_keys(g, 0, n) for g in range(rows)], [quant.values.dequantize(g, 0, n) for g in range(rows)],
              pos)

    def same(a, b):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_allclose(a[1], b[1], rtol=1e-5, atol=1e-4)

    same(quant.scan_rows(q, 50), ref.scan_rows(q, 50))
    np.testing.assert_allclose(quant.attend_all(q, 0.125)[0], ref.attend_all(q, 0.125)[0], atol=1e-5)
    static = rng.standard_normal((rows, 5, D), dtype=np.float32)
    valid = np.ones((rows, 5), np.bool_)
    ids, scores = quant.scan_rows(q, 50)
    np.testing.assert_allclose(quant.attend_union_groups(ids, scores, 0.125, q, static, static, valid),
                               ref.attend_union_groups(ids, scores, 0.125, q, static, static, valid), atol=1e-5)
    head_rows = np.repeat(np.arange(rows), G)
    flat_ids, flat_scores = ids.reshape(rows * G, -1), scores.reshape(rows * G, -1)
    for a, b in zip(quant.attend(flat_ids, flat_scores, head_rows, 0.125),
                    ref.attend(flat_ids, flat_scores, head_rows, 0.125), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    queries = [np.repeat(q[g], 200, axis=0) + rng.standard_normal((600, D), dtype=np.float32) for g in range(rows)]
    quant.install(quant.graph_build(queries).run())
    ref.install(ref.graph_build(queries).run())
    np.testing.assert_array_equal(quant.nbrs, ref.nbrs)
    more_k, more_v = _rows(rng, rows, 300, D, 5.0), _rows(rng, rows, 300, D)
    more_pos = [np.arange(n, n + 300) for _ in range(rows)]
    quant.insert(more_k, more_v, more_pos)
    ref.insert([quant.float_keys(g, n, n + 300) for g in range(rows)],
               [quant.values.dequantize(g, n, n + 300) for g in range(rows)], more_pos)
    np.testing.assert_array_equal(quant.nbrs, ref.nbrs)
    same(quant.search_grouped(q, np.arange(rows), 50, 64)[:2], ref.search_grouped(q, np.arange(rows), 50, 64)[:2])
    same(quant.search(q.reshape(-1, D), head_rows, 50, 64)[:2], ref.search(q.reshape(-1, D), head_rows, 50, 64)[:2])
    same(quant.search_exact(q.reshape(-1, D), head_rows, 50), ref.search_exact(q.reshape(-1, D), head_rows, 50))
    with pytest.raises(ValueError, match="bf16_margin"):
        quant.scan_rows(q, 50, 16)


@pytest.mark.parametrize(("bits", "group", "most"), [(8, 64, 1.1), (4, 32, 0.63), (4, 64, 0.6), (2, 32, 0.38)])
def test_store_bytes_per_element(bits, group, most):
    """Codes + 16-bit scales and zero points + the per-row offset, per element held (capacity 4096, head size 64):
    ``bits / 8 + 4 / group`` and the offset's 4 bytes per channel a row."""
    from kvaccel.kernels.attention_index_store import QuantizedRows

    store = QuantizedRows(6, 4096, 64, bits, group)
    per = store.nbytes / (6 * 4096 * 64)
    assert per == pytest.approx(bits / 8 + 4 / group + 4 / 4096)
    assert per <= most


def _model():
    return tiny_model("llama", head_dim=64, hidden_size=192, num_attention_heads=6, num_key_value_heads=2)


def _decoded_reference(monkeypatch, bits, group):
    """Make every float32 AttentionIndex store its keys and values quantized and decoded (the same offsets and grids
    as a quantized index): the reference a quantized host store must decode exactly like."""
    from kvaccel.kernels.attention_index import AttentionIndex
    from kvaccel.kernels.attention_index_store import QuantizedRows

    store = AttentionIndex.store

    def round_trip(self, keys, values, positions):
        if not hasattr(self, "_round_trip"):
            self._round_trip = tuple(QuantizedRows(self.rows, 4096, d, bits, group) for d in (self.dim, self.dim_v))
        out = []
        for rt, xs in zip(self._round_trip, (keys, values), strict=True):
            out.append([])
            for g, x in enumerate(xs):
                a = int(self.n[g])
                rt.put(g, a, x)
                out[-1].append(rt.dequantize(g, a, a + x.shape[0]))
        store(self, out[0], out[1], positions)

    monkeypatch.setattr(AttentionIndex, "store", round_trip)


@pytest.mark.parametrize(("storage", "options"), [
    ("kv_int8", dict(top_k=512, ef=512)),  # top_k covers the host part: attention over every decoded key
    ("kv_int4(group_size=32)", dict(top_k=6, ef=16)),  # the scan selects from the decoded scores
    ("kv_int4(bits=2,group_size=32)", dict(top_k=6, ef=16, exact_below=0)),  # the graph, built from decoded keys
])
def test_decoding_equals_retrieval_over_decoded_host_tokens(monkeypatch, storage, options):
    """``retrieval+kv_int*`` on a left-padded batch: the logits of retrieval over a float32 host store holding the
    decoded tokens; the device part stays in the model dtype, the host store holds codes (fewer bytes)."""
    from kvaccel.patches.decode.retrieval import STATE_ATTR, Retrieval
    from kvaccel.patches.storage.quantized_layer import QuantizedLayer

    model = _model()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 512, (2, 70), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :11] = 0
    steps = 14
    method = dict(sink=4, window=8, spill_every=4, background_build=False, **options)

    def run(*methods):
        with kvaccel.patched(model, *methods):
            cache = KVAccelCache(model)
            out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True, cache=cache)
            return torch.stack(out.logits, 1), cache, kvaccel.report(model)

    logits, cache, rep = run(Retrieval(**method), storage)
    st = getattr(cache.layers[0], STATE_ATTR)
    assert st.index.quantized and not any(isinstance(layer, QuantizedLayer) for layer in cache.layers)
    assert cache.layers[0].keys.dtype == torch.float32
    assert (st.graph_steps > 0) == (options.get("exact_below") == 0)
    assert any(n.startswith(storage.split("(")[0] + ": retrieval's host store holds the codes") for n in rep["notes"])
    bits, group = st.index.bits, st.index.group
    plain_logits, plain_cache, plain_rep = run(Retrieval(**method))
    _decoded_reference(monkeypatch, bits, group)
    ref_logits, _, _ = run(Retrieval(**method))
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=2e-5)
    assert rep["retrieval_host_tokens"] == plain_rep["retrieval_host_tokens"]
    ratio = plain_rep["retrieval_host_kv_bytes"][0] / rep["retrieval_host_kv_bytes"][0]
    assert ratio == pytest.approx(4 / (bits / 8 + 4 / group + 4 / st.index.capacity))  # float32 / codes + grids
    assert not torch.equal(logits, plain_logits)  # the codes are what was attended


def test_refused_combinations():
    model = _model()
    with pytest.raises(NotImplementedError, match="kv_fp8 cannot hold retrieval's host store"):
        kvaccel.patch(model, "retrieval+kv_fp8")
    with pytest.raises(ValueError, match="scan_precision='bfloat16'.*kv_int8 stores them as codes"):
        kvaccel.patch(model, "retrieval(scan_precision=bfloat16)+kv_int8")
    odd = tiny_model("llama", head_dim=96, hidden_size=192, num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(ValueError, match=r"group_size \(32\) must divide, or be a multiple of, the 48 channels"):
        kvaccel.patch(odd, "retrieval+kv_int4(group_size=32)")
    assert not kvaccel.api.is_patched(model) and not kvaccel.api.is_patched(odd)
