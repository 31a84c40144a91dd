"""quest decode method: stock tokens at full budget, a decode step equal to a float64 loop of the paper's formula
(padding, ThinK's narrow segment, GQA per query head), a left-padded batch equal to each row alone, page bounds kept
up to date during decode, report(), refused combinations and bad options."""

from __future__ import annotations

import math

import pytest
import torch

import kvaccel
from kvaccel.cache import KVAccelCache, KVAccelLayer
from kvaccel.kernels.page_bounds import page_bounds_reference
from kvaccel.patches.attention import AttentionContext, PatchState
from kvaccel.patches.channels.think import ThinK
from kvaccel.patches.decode.quest import STATE_ATTR, Quest

from conftest import tiny_model


def _batch(B=2, L=90, pads=(0, 23), seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 512, (B, L), generator=g)
    mask = torch.ones_like(ids)
    for b, p in enumerate(pads[:B]):
        mask[b, :p] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _generate(model, ids, mask, steps, cache=None):
    kw = {} if cache is None else {"cache": cache}
    out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize(("family", "B"), [("llama", 1), ("llama", 2), ("qwen3", 2)])
@pytest.mark.parametrize("budget", [1.0, 4096])
def test_budget_covering_the_cache_decodes_stock_tokens(family, B, budget):
    """Same tokens as stock; logits bit-identical to kvaccel's dense decode (a padded prompt's prefill runs per
    sequence there, so stock's logits differ in the last bits)."""
    model = tiny_model(family)
    ids, mask = _batch(B)
    ref_seq, ref_logits = _generate(model, ids, mask, 10)
    with kvaccel.patched(model):
        _, dense_logits = _generate(model, ids, mask, 10)
    with kvaccel.patched(model, Quest(budget=budget, dense_layers=0)):
        cache = KVAccelCache(model)
        seq, logits = _generate(model, ids, mask, 10, cache)
        rep = kvaccel.report(model)
    assert torch.equal(seq, ref_seq)
    assert torch.equal(logits, dense_logits)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert rep["quest_sparse_steps"] == [0] * 3 and rep["quest_dense_steps"] == [9] * 3


def _naive_quest(q, keys, valid, values, P, pages, scale, group=False):
    """Quest in float64 loops over the token axis of zero-filled keys: per row, pages of P real-token positions from
    its first real slot; per query head U = Σ max(q m, q M) (``group``: summed over the kv head's query heads); the
    newest page plus the best others; softmax over the chosen pages' real slots."""
    B, Hq, _, D = q.shape
    Hkv, N = keys.shape[1], keys.shape[2]
    G = Hq // Hkv
    out = torch.zeros(B, Hq, values.shape[-1], dtype=torch.float64)
    for b in range(B):
        real = [s for s in range(N) if valid is None or bool(valid[b, 0, s])]
        first = real[0]
        npages = math.ceil((N - first) / P)
        for h in range(Hq):
            kk = keys[b, h // G].double()
            scores = []
            for j in range(npages):
                sl = [s for s in range(first + j * P, min(first + (j + 1) * P, N)) if s in real]
                m, M = kk[sl].amin(0), kk[sl].amax(0)
                heads = range(h // G * G, h // G * G + G) if group else [h]
                scores.append(sum(float(torch.maximum(q[b, g, 0].double() * m, q[b, g, 0].double() * M).sum())
                                  for g in heads))
            last = npages - 1
            rest = sorted((j for j in range(npages) if j != last), key=lambda j: -scores[j])
            chosen = [last, *rest[: pages - 1]]
            sl = [s for j in chosen for s in range(first + j * P, min(first + (j + 1) * P, N)) if s in real]
            p = torch.softmax(kk[sl] @ q[b, h, 0].double() * scale, -1)
            out[b, h] = p @ values[b, h // G, sl].double()
    return out


@pytest.mark.parametrize(("narrow", "gqa"), [(False, "head"), (True, "head"), (False, "group"), (True, "group")])
def test_decode_step_equals_naive_quest(narrow, gqa):
    """A decode step through Quest.attention on a left-padded layer (optionally with ThinK's narrow segment, whose
    pruned channels count as zero) equals the float64 loop; the page bounds then equal a build over every token."""
    g = torch.Generator().manual_seed(2)
    B, Hkv, G, T, D, P = 2, 2, 3, 61, 16, 8
    layer = KVAccelLayer()
    layer.update(torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g))
    pad = torch.ones(B, T, dtype=torch.bool)
    pad[1, :13] = False
    layer.mark_padding(pad)
    if narrow:
        cidx = torch.stack([torch.randperm(D, generator=g)[:10].sort().values for _ in range(B * Hkv)])
        ThinK.prune(layer, cidx.view(B, Hkv, 10), 40)
    method = Quest(page_size=P, budget=3 * P, dense_layers=0, gqa=gqa)
    module = torch.nn.Module()
    module.layer_idx, module.num_key_value_groups = 0, G
    state = PatchState(methods={"decode": method}, num_layers=1, original_attn="sdpa")

    def ctx(q, phase):
        return AttentionContext(module, state, layer, q, layer.keys, layer.values, None, D**-0.5, phase, {})

    method.after_prefill(ctx(torch.randn(B, Hkv * G, T, D, generator=g), "prefill"))
    for step in range(5):  # tokens join the last page, then open a new one
        layer.update(torch.randn(B, Hkv, 1, D, generator=g), torch.randn(B, Hkv, 1, D, generator=g))
        q = torch.randn(B, Hkv * G, 1, D, generator=g)
        out = method.attention(ctx(q, "decode"))
        keys, valid = layer.dense_keys()
        values = torch.cat([layer.narrow.values, layer.values], 2) if narrow else layer.values
        ref = _naive_quest(q, keys, valid, values, P, 3, D**-0.5, group=gqa == "group")
        torch.testing.assert_close(out[:, 0].double(), ref, atol=1e-5, rtol=1e-5, msg=f"step {step}")
    st = getattr(layer, STATE_ATTR)
    assert st.sparse_steps == 5 and st.n == T + 5
    rmin, rmax, rcount = page_bounds_reference(keys, P, valid, st.offset)
    assert st.pages == rmin.shape[2] and st.offset.tolist() == [0, 13]
    torch.testing.assert_close(st.kmin[:, :, : st.pages].double(), rmin, atol=0, rtol=0)
    torch.testing.assert_close(st.kmax[:, :, : st.pages].double(), rmax, atol=0, rtol=0)


def test_left_padded_batch_decodes_each_row_alone():
    """Pages selected per row (aligned at its first real token, budget of its own tokens): a left-padded batch's
    greedy tokens and logits are those of each prompt decoded alone, with pages really skipped."""
    model = tiny_model("llama")
    lengths, steps = (90, 67), 12
    ids, mask = _batch(2, L=max(lengths), pads=[max(lengths) - n for n in lengths], seed=7)
    method = Quest(page_size=8, budget=0.25, dense_layers=1)
    with kvaccel.patched(model, method):
        seq, both = _generate(model, ids, mask, steps)
        rep = kvaccel.report(model)
        assert rep["quest_sparse_steps"][:2] == [None, steps - 1]
        assert rep["quest_attended_tokens"][1] < 0.4 * max(lengths)
        for b, n in enumerate(lengths):
            real = ids[b : b + 1, max(lengths) - n :]
            alone_seq, alone = _generate(model, real, torch.ones_like(real), steps)
            assert torch.equal(seq[b, max(lengths):], alone_seq[0, n:]), b
            torch.testing.assert_close(both[b], alone[0], atol=1e-4, rtol=1e-4)
    _, ref = _generate(model, ids, mask, steps)
    assert (both - ref).abs().max() > 1e-3  # pages were skipped: not stock attention


def test_report_metadata_bytes_are_two_over_page_size_of_the_keys():
    model = tiny_model("llama")
    ids, mask = _batch(1, L=96)
    with kvaccel.patched(model, Quest(page_size=16, budget=32, dense_layers=1)):
        cache = KVAccelCache(model)
        _generate(model, ids, mask, 4, cache)
        rep = kvaccel.report(model)
    layer = cache.layers[1]
    B, H, N, D = layer.keys.shape  # 99 tokens: 7 pages
    assert N == 99
    # min and max per page and channel in the keys' dtype (2/16 of the keys, last page partial) + int32 page counts
    assert rep["quest_metadata_bytes"][1] == 2 * B * H * 7 * D * layer.keys.element_size() + B * 7 * 4
    assert rep["quest_metadata_bytes"][0] is None  # dense layer: no metadata
    assert rep["kept_tokens"][1] == [[99] * H]  # nothing evicted


def test_composes_with_prefill_methods_and_think():
    model = tiny_model("llama")
    ids, mask = _batch(1, L=200)
    for spec in ("a_shape+quest(budget=1.0,dense_layers=0)", "think(ratio=0.5)+quest(budget=1.0,dense_layers=0)"):
        without = spec.split("+")[0]
        with kvaccel.patched(model, without):
            ref_seq, ref = _generate(model, ids, mask, 6)
        with kvaccel.patched(model, spec):
            seq, logits = _generate(model, ids, mask, 6)
        assert torch.equal(seq, ref_seq), spec  # full budget: the other stage's decoding, unchanged
        torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    with kvaccel.patched(model, "think(ratio=0.5)+quest(budget=48,page_size=8,dense_layers=0)"):
        cache = KVAccelCache(model)
        _generate(model, ids, mask, 6, cache)
        assert kvaccel.report(model)["quest_sparse_steps"][2] == 5
        assert cache.layers[2].narrow is not None


def test_refused_combinations_and_bad_options():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="eviction method 'snapkv'"):
        kvaccel.patch(model, "snapkv", "quest")
    assert not kvaccel.is_patched(model)
    with pytest.raises(ValueError, match="dense_layers"):
        kvaccel.patch(model, Quest(dense_layers=3))  # 3 layers: none would select pages
    for kwargs, field in [({"budget": 0}, "budget"), ({"budget": 1.5}, "budget"), ({"budget": "x"}, "budget"),
                          ({"budget": True}, "budget"), ({"page_size": 0}, "page_size"),
                          ({"dense_layers": -1}, "dense_layers"), ({"backend": "cuda"}, "backend"),
                          ({"gqa": "union"}, "gqa")]:
        with pytest.raises(ValueError, match=field):
            Quest(**kwargs)
    assert Quest(budget=0.125).budget == 0.125


def test_prompt_in_chunks_decodes_like_one_prefill():
    """A later prompt chunk attends densely and the page bounds then cover every prompt token: decoding after a
    chunked prompt selects the same pages as after a one-pass prefill."""
    model = tiny_model("llama")
    ids, _ = _batch(1, L=120)
    method = Quest(page_size=8, budget=24, dense_layers=0)

    def decode(chunks):
        cache = KVAccelCache(model)
        with torch.no_grad():
            for c in chunks:
                out = model(c, cache=cache, use_cache=True)
            logits = []
            nxt = out.logits[:, -1:].argmax(-1)
            for _ in range(4):
                out = model(nxt, cache=cache, use_cache=True)
                logits.append(out.logits[:, -1])
                nxt = out.logits[:, -1:].argmax(-1)
        return torch.stack(logits, 1), kvaccel.report(model)

    with kvaccel.patched(model, method):
        one, _ = decode([ids])
        chunked, rep = decode([ids[:, :70], ids[:, 70:]])
    assert rep["quest_sparse_steps"] == [4, 4, 4]
    torch.testing.assert_close(chunked, one, atol=1e-4, rtol=1e-4)
    with kvaccel.patched(model):
        dense, _ = decode([ids])
    assert (dense - one).abs().max() > 1e-3  # pages were skipped


def test_reordered_cache_rebuilds_its_page_bounds():
    """Beam search reorders the cache's rows (new storage): the next step rebuilds the bounds from what it holds."""
    g = torch.Generator().manual_seed(3)
    B, Hkv, G, T, D, P = 2, 2, 3, 45, 16, 8
    layer = KVAccelLayer()
    layer.update(torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g))
    pad = torch.ones(B, T, dtype=torch.bool)
    pad[1, :13] = False
    layer.mark_padding(pad)
    method = Quest(page_size=P, budget=2 * P, dense_layers=0)
    module = torch.nn.Module()
    module.layer_idx, module.num_key_value_groups = 0, G
    state = PatchState(methods={"decode": method}, num_layers=1, original_attn="sdpa")

    def ctx(q, phase):
        return AttentionContext(module, state, layer, q, layer.keys, layer.values, None, D**-0.5, phase, {})

    method.after_prefill(ctx(torch.randn(B, Hkv * G, T, D, generator=g), "prefill"))
    layer.reorder_cache(torch.tensor([1, 0]))
    layer.update(torch.randn(B, Hkv, 1, D, generator=g), torch.randn(B, Hkv, 1, D, generator=g))
    q = torch.randn(B, Hkv * G, 1, D, generator=g)
    out = method.attention(ctx(q, "decode"))
    st = getattr(layer, STATE_ATTR)
    assert st.offset.tolist() == [13, 0]
    keys, valid = layer.dense_keys()
    rmin, _, _ = page_bounds_reference(keys, P, valid, st.offset)
    torch.testing.assert_close(st.kmin[:, :, : st.pages].double(), rmin, atol=0, rtol=0)
    torch.testing.assert_close(out[:, 0].double(), _naive_quest(q, keys, valid, layer.values, P, 2, D**-0.5),
                               atol=1e-5, rtol=1e-5)
