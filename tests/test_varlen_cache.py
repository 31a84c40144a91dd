"""VarlenLayer: per-head segments packed in one buffer — contents, growth slack, bytes, beam ops, attention."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

import kvaccel
from kvaccel.cache import KVAccelCache, KVAccelLayer
from kvaccel.kernels.decode_attention import decode_attention
from kvaccel.patches.attention import grouped_attention
from kvaccel.patches.evict.adakv import ada_select
from kvaccel.varlen_cache import VarlenLayer

from conftest import tiny_model

B, H, G, T, D, DV = 2, 3, 2, 40, 16, 24


def _padded_layer(seed: int = 0, pad_first: int = 0) -> KVAccelLayer:
    """A KVAccelLayer holding T random tokens; the first ``pad_first`` tokens of sequence 0 are padding."""
    gen = torch.Generator().manual_seed(seed)
    layer = KVAccelLayer()
    layer.update(torch.randn(B, H, T, D, generator=gen), torch.randn(B, H, T, DV, generator=gen))
    if pad_first:
        valid = torch.ones(B, T, dtype=torch.bool)
        valid[0, :pad_first] = False
        layer.mark_padding(valid)
    layer.prompt_len = T
    return layer


def _ragged_selection(layer: KVAccelLayer, capacity: int = 10, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.rand(B, H, T, generator=torch.Generator().manual_seed(seed)) ** 4  # uneven across heads
    scores = scores.masked_fill(~layer.token_valid(), float("-inf"))
    return ada_select(scores, capacity, alpha=0.2)


def _expected_tokens(layer: KVAccelLayer, idx: torch.Tensor, sv: torch.Tensor) -> list[list[torch.Tensor]]:
    """Per (b, h): the selected real tokens' keys, in order."""
    valid = layer.token_valid().expand(B, H, T)
    out = []
    for b in range(B):
        row = []
        for h in range(H):
            t = idx[b, h][sv[b, h] & valid[b, h].gather(0, idx[b, h])]
            row.append(layer.keys[b, h, t])
        out.append(row)
    return out


def _held_tokens(layer: VarlenLayer) -> list[list[torch.Tensor]]:
    keys, valid = layer.dense_keys()
    return [[keys[b, h][valid[b, h]] for h in range(keys.shape[1])] for b in range(keys.shape[0])]


def _storage_bytes(obj) -> int:
    """Bytes of every distinct storage reachable from the object's tensor attributes (views counted once, whole)."""
    seen, total = set(), 0
    for value in vars(obj).values():
        if isinstance(value, torch.Tensor):
            st = value.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes()
    return total


def test_from_selection_holds_exactly_the_selected_tokens_and_bytes():
    src = _padded_layer(pad_first=5)
    idx, sv = _ragged_selection(src)
    layer = VarlenLayer.from_selection(src, idx, sv)
    want = _expected_tokens(src, idx, sv)
    got = _held_tokens(layer)
    for b in range(B):
        for h in range(H):
            assert torch.equal(got[b][h], want[b][h])
    counts = torch.tensor([[len(want[b][h]) for h in range(H)] for b in range(B)])
    assert torch.equal(layer.kept_per_head(), counts) and len(set(counts.flatten().tolist())) > 1  # ragged
    tokens = int(counts.sum())
    meta = 2 * B * H * 8  # seg_start, seg_len (int64)
    assert layer.nbytes() == tokens * (D + DV) * 4 + meta == _storage_bytes(layer)  # no padding, no hidden storage
    assert layer.slack_tokens == 0 and layer.length == int(counts.max())
    assert (layer.seen, layer.prompt_len) == (T, T)


def test_update_grows_with_bounded_slack_and_keeps_tokens():
    src = _padded_layer()
    idx, sv = _ragged_selection(src)
    layer = VarlenLayer.from_selection(src, idx, sv)
    want = _expected_tokens(src, idx, sv)
    gen = torch.Generator().manual_seed(3)
    for step in range(200):
        n = 3 if step == 0 else 1  # a 3-token extend, then decode steps
        k, v = torch.randn(B, H, n, D, generator=gen), torch.randn(B, H, n, DV, generator=gen)
        layer.update(k, v)
        want = [[torch.cat([want[b][h], k[b, h]]) for h in range(H)] for b in range(B)]
        mean = layer.total_len / (B * H)
        assert layer.free <= max(VarlenLayer.MIN_SLACK, VarlenLayer.SLACK_FRACTION * mean + 2)
        assert layer.nbytes() == _storage_bytes(layer)
        assert layer.nbytes() - layer.slack_nbytes() == layer.total_len * (D + DV) * 4 + 2 * B * H * 8
    got = _held_tokens(layer)
    assert all(torch.equal(got[b][h], want[b][h]) for b in range(B) for h in range(H))
    assert layer.seen == T + 202 and layer.get_seq_length() == T + 202
    assert layer.repacks <= 200 // VarlenLayer.MIN_SLACK + 1  # a repack buys >= MIN_SLACK steps


def _ctx(q: torch.Tensor, n_new: int) -> SimpleNamespace:
    return SimpleNamespace(query=q, key=torch.empty(B, H, n_new, D), scaling=D**-0.5)


@pytest.mark.parametrize("Q", [1, 4])
def test_attend_equals_the_padded_layout_on_the_same_selection(Q: int):
    src = _padded_layer(pad_first=3)
    idx, sv = _ragged_selection(src)
    padded = copy.deepcopy(src)
    padded.keep(idx, sv)  # the previous layout: padded to the longest head with a validity mask
    layer = VarlenLayer.from_selection(src, idx, sv)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        k, v = torch.randn(B, H, Q, D, generator=gen), torch.randn(B, H, Q, DV, generator=gen)
        q = torch.randn(B, H * G, Q, D, generator=gen)
        padded.update(k, v)
        layer.update(k, v)
        if Q == 1:
            want = decode_attention(q, padded.keys, padded.values, scale=D**-0.5, valid=padded.valid).transpose(1, 2)
        else:
            want = grouped_attention(q, padded.keys, padded.values, D**-0.5, valid=padded.valid)
        torch.testing.assert_close(layer.attend(_ctx(q, Q)), want, atol=1e-6, rtol=1e-5)


def test_beam_ops_move_whole_segments():
    src = _padded_layer()
    layer = VarlenLayer.from_selection(src, *_ragged_selection(src))
    layer.update(torch.randn(B, H, 1, D), torch.randn(B, H, 1, DV))  # with slack
    before = _held_tokens(layer)
    free = layer.free
    layer.reorder_cache(torch.tensor([1, 1]))
    after = _held_tokens(layer)
    assert all(torch.equal(after[b][h], before[1][h]) for b in range(2) for h in range(H))
    assert layer.free == free and layer.nbytes() == _storage_bytes(layer)
    layer = VarlenLayer.from_selection(src, *_ragged_selection(src))
    before = _held_tokens(layer)
    layer.batch_repeat_interleave(2)
    assert layer.kept_per_head().shape == (4, H) and layer.keys.shape[:2] == (4, H)
    assert all(torch.equal(_held_tokens(layer)[b][h], before[b // 2][h]) for b in range(4) for h in range(H))
    layer.batch_select_indices(torch.tensor([False, False, True, False]))
    assert all(torch.equal(_held_tokens(layer)[0][h], before[1][h]) for h in range(H))


def test_keep_repacks_a_subset_of_the_dense_axis():
    src = _padded_layer()
    layer = VarlenLayer.from_selection(src, *_ragged_selection(src))
    before = _held_tokens(layer)
    keys, valid = layer.dense_keys()  # right-aligned: the newest token of every head is in the last slot
    assert valid[..., -1].all()
    L = keys.shape[2]
    idx = torch.arange(L - 2, L).expand(B, H, 2)  # keep the two newest tokens of every head
    layer.keep(idx)
    assert all(torch.equal(_held_tokens(layer)[b][h], before[b][h][-2:]) for b in range(B) for h in range(H))
    assert layer.nbytes() == B * H * 2 * (D + DV) * 4 + 2 * B * H * 8
    layer.keep(torch.tensor([1]).expand(B, 1, 1), reserve=5)  # the newest token, 5 slack rows per segment
    assert all(torch.equal(_held_tokens(layer)[b][h], before[b][h][-1:]) for b in range(B) for h in range(H))
    assert layer.slack_tokens == 5 * B * H and layer.nbytes() == _storage_bytes(layer)


def test_refusals_name_the_fix():
    src = _padded_layer()
    layer = VarlenLayer.from_selection(src, *_ragged_selection(src))
    bad = torch.ones(B, 1, dtype=torch.bool)
    bad[0] = False
    with pytest.raises(NotImplementedError, match="padding inside new tokens"):
        layer.mark_padding(bad)
    layer.mark_padding(torch.ones(B, 1, dtype=torch.bool))  # no padding: nothing to do
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        layer.crop(1)
    with pytest.raises(ValueError, match=r"new tokens for batch 1"):
        layer.update(torch.randn(1, H, 1, D), torch.randn(1, H, 1, DV))
    stateful = _padded_layer()
    stateful.token_state["h2o"] = torch.zeros(B, H, T)
    with pytest.raises(NotImplementedError, match="per-token method state"):
        VarlenLayer.from_selection(stateful, *_ragged_selection(stateful))
    with pytest.raises(ValueError, match="idx must have shape"):
        VarlenLayer.from_selection(src, torch.zeros(B, 2, 3, dtype=torch.int64))


def test_varlen_decode_of_every_token_is_token_identical_to_stock():
    """Every token kept, packed per head: greedy decoding over the varlen layer gives stock transformers' tokens."""
    model = tiny_model("llama")
    ids = torch.randint(3, 512, (2, 60), generator=torch.Generator().manual_seed(7))
    stock = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    with kvaccel.patched(model), torch.no_grad():
        cache = KVAccelCache(model)
        out = model(ids, cache=cache, use_cache=True)
        for i, old in enumerate(cache.layers):
            every = torch.arange(old.length).expand(old.keys.shape[0], old.keys.shape[1], old.length)
            cache.layers[i] = VarlenLayer.from_selection(old, every)
        tok, toks = out.logits[:, -1:].argmax(-1), []
        for _ in range(20):
            toks.append(tok)
            tok = model(tok, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    assert all(isinstance(layer, VarlenLayer) and layer.repacks > 0 for layer in cache.layers)
    assert torch.equal(torch.cat([ids, *toks], dim=1), stock)
