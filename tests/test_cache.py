"""KVAccelCache: real memory savings, positions after eviction, ragged heads, narrow keys, batch operations."""

from __future__ import annotations

import math

import pytest
import torch

import kvaccel
from kvaccel.cache import KVAccelCache, KVAccelLayer, NarrowSegment, SlotTensor, TokenState
from kvaccel.patches.attention import grouped_attention

from conftest import tiny_model


def _tensor_bytes(cache: KVAccelCache) -> int:
    """Independent count: every tensor attribute reachable from the cache layers."""
    total = 0
    for layer in cache.layers:
        for val in vars(layer).values():
            if isinstance(val, torch.Tensor):
                total += val.numel() * val.element_size()
            elif isinstance(val, SlotTensor):  # a buffer with spare slots: all of it is held
                total += val.buf.numel() * val.buf.element_size()
            elif isinstance(val, TokenState):
                total += sum(s.buf.numel() * s.buf.element_size() for s in val.slots().values())
            elif isinstance(val, NarrowSegment):
                total += sum(t.numel() * t.element_size() for t in val.tensors())
    return total


def test_streaming_2k_prompt_memory_positions_and_bounded_decode():
    model = tiny_model("llama", max_position_embeddings=4096)
    ids = torch.randint(3, 512, (1, 2048), generator=torch.Generator().manual_seed(0))
    positions = []
    model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda m, a, kw: positions.append(int(kw["position_ids"][0, -1])), with_kwargs=True
    )
    kvaccel.patch(model, "streaming", budget=256)
    try:
        cache = KVAccelCache(model)
        with torch.no_grad():
            out = model(ids, cache=cache, use_cache=True)
        r = kvaccel.report(model)
        assert r["kv_bytes"] == _tensor_bytes(cache) == cache.nbytes()
        full = sum(2 * 1 * 2 * 2048 * 16 * 4 for _ in cache.layers)  # K+V, B=1, Hkv=2, T, D=16, fp32
        assert r["kv_bytes_full"] == full
        assert r["kv_bytes"] <= 0.15 * r["kv_bytes_full"]
        assert r["seen_tokens"] == 2048 and r["kept_tokens"][0] == [[256, 256]]
        assert cache.get_seq_length() == 2048

        tok = out.logits[:, -1:].argmax(-1)
        sizes = []
        with torch.no_grad():
            for _ in range(1000):
                out = model(tok, cache=cache, use_cache=True)
                tok = out.logits[:, -1:].argmax(-1)
                sizes.append(cache.nbytes())
        assert positions[0] == 2047 and positions[1:] == list(range(2048, 3048))  # continue from tokens seen
        assert cache.get_seq_length() == 3048
        assert max(sizes) == min(sizes) == r["kv_bytes"]  # bounded: never grows during decode
        # the kept tokens are the 4 sinks and the 252 most recent ones
        layer = cache.layers[0]
        assert layer.keys.shape[2] == 256 and layer.valid is None
    finally:
        kvaccel.unpatch(model)


def test_streaming_generate_with_left_padding_keeps_real_sinks():
    model = tiny_model("qwen2")
    ids = torch.randint(3, 512, (2, 64), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :20] = 0
    with kvaccel.patched(model, "streaming(budget=16, sink=4)"):
        cache = KVAccelCache(model)
        model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=8, do_sample=False)
        layer = cache.layers[1]
        assert layer.keys.shape[2] == 16 and layer.valid is None  # the padding was evicted first
        assert cache.get_seq_length() == 64 + 7
    # the sinks of sequence 1 are its first real tokens: compare its keys with an unpadded run of it alone
    with kvaccel.patched(model, "streaming(budget=16, sink=4)"):
        solo = KVAccelCache(model)
        model.generate(ids[1:, 20:], cache=solo, max_new_tokens=8, do_sample=False)
    torch.testing.assert_close(cache.layers[0].keys[1, :, :4], solo.layers[0].keys[0, :, :4], atol=1e-5, rtol=1e-5)


def _reference_attention(q, k, v, scale, valid, narrow=None):
    """Float64, repeat_interleave, explicit masked softmax — the obvious way."""
    B, Hq, Q, D = q.shape
    G = Hq // k.shape[1]
    logits = torch.einsum("bhqd,bhtd->bhqt", q.double(), k.double().repeat_interleave(G, 1)) * scale
    vals, mask = v.double().repeat_interleave(G, 1), valid.expand(B, k.shape[1], -1).repeat_interleave(G, 1)
    if narrow is not None:
        idx = narrow.channel_idx.repeat_interleave(G, 1)  # (B, Hq, Dk)
        qn = q.double().gather(-1, idx[:, :, None, :].expand(B, Hq, Q, idx.shape[-1]))
        ln = torch.einsum("bhqd,bhtd->bhqt", qn, narrow.keys.double().repeat_interleave(G, 1)) * scale
        logits = torch.cat([ln, logits], -1)
        vals = torch.cat([narrow.values.double().repeat_interleave(G, 1), vals], 2)
        nv = narrow.valid.expand(B, k.shape[1], -1).repeat_interleave(G, 1)
        mask = torch.cat([nv, mask], -1)
    T = logits.shape[-1]
    causal = torch.arange(T)[None, :] <= (T - Q + torch.arange(Q))[:, None]
    logits = logits.masked_fill(~(mask[:, :, None, :] & causal), float("-inf"))
    return (torch.softmax(logits, -1) @ vals).transpose(1, 2)


@pytest.mark.parametrize("Q", [1, 5])
@pytest.mark.parametrize("with_narrow", [False, True])
def test_grouped_attention_ragged_heads_matches_reference(Q, with_narrow):
    g = torch.Generator().manual_seed(2)
    B, Hkv, G, T, D = 2, 3, 3, 37, 16
    q = torch.randn(B, Hkv * G, Q, D, generator=g)
    k, v = torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    valid = torch.rand(B, Hkv, T, generator=g) > 0.3
    valid[..., -Q:] = True
    narrow = None
    if with_narrow:
        Tn, Dk = 11, 10
        cidx = torch.stack([torch.randperm(D, generator=g)[:Dk].sort().values for _ in range(B * Hkv)]).view(B, Hkv, Dk)
        narrow = NarrowSegment(torch.randn(B, Hkv, Tn, Dk, generator=g), torch.randn(B, Hkv, Tn, D, generator=g),
                               cidx, torch.rand(B, Hkv, Tn, generator=g) > 0.5)
    out = grouped_attention(q, k, v, 1 / math.sqrt(D), valid=valid, narrow=narrow, chunk=4)
    ref = _reference_attention(q, k, v, 1 / math.sqrt(D), valid, narrow)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_per_head_keep_is_physically_smaller_and_attends_only_kept():
    g = torch.Generator().manual_seed(3)
    layer = KVAccelLayer()
    B, H, T, D = 2, 3, 100, 8
    k, v = torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
    layer.update(k, v)
    counts = torch.tensor([[10, 25, 40], [5, 40, 12]])
    K = int(counts.max())
    idx = torch.stack([torch.randperm(T, generator=g)[:K].sort().values for _ in range(B * H)]).view(B, H, K)
    slot_valid = torch.arange(K)[None, None, :] < counts[..., None]
    layer.keep(idx, slot_valid)
    assert layer.keys.shape == (B, H, K, D)  # padded to the largest head, not to T
    assert layer.kept_per_head().tolist() == counts.tolist()
    assert layer.nbytes() < 0.5 * 2 * k.nbytes
    assert layer.seen == T
    q = torch.randn(B, H, 1, D, generator=g)
    out = grouped_attention(q, layer.keys, layer.values, 0.3, valid=layer.valid)
    for b in range(B):
        for h in range(H):
            sel = idx[b, h, : counts[b, h]]
            p = torch.softmax(q[b, h, 0] @ k[b, h, sel].T * 0.3, -1)
            torch.testing.assert_close(out[b, 0, h], p @ v[b, h, sel], atol=1e-5, rtol=1e-5)


def test_batch_operations_move_every_tensor():
    layer = KVAccelLayer()
    k = torch.arange(2 * 1 * 4 * 2, dtype=torch.float32).view(2, 1, 4, 2)
    layer.update(k, k + 100)
    layer.mark_padding(torch.tensor([[True] * 4, [False, True, True, True]]))
    layer.token_state["score"] = torch.tensor([[[1.0, 2, 3, 4]], [[5.0, 6, 7, 8]]])
    layer.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer.keys[0], k[1]) and layer.valid[0, 0, 0].item() is False
    assert layer.token_state["score"][0, 0, 0] == 5
    layer.batch_repeat_interleave(2)
    assert layer.keys.shape[0] == layer.valid.shape[0] == layer.token_state["score"].shape[0] == 4
    layer.batch_select_indices(torch.tensor([0, 3]))
    assert torch.equal(layer.keys[1], k[0]) and layer.valid.shape[0] == 2
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        layer.crop(-1)


def test_decode_step_over_ragged_cache_matches_reference():
    """A decode step of a patched model over a per-head ragged cache attends exactly the kept tokens."""
    from kvaccel.patches.attention import AttentionContext, PatchState, dense_decode

    g = torch.Generator().manual_seed(5)
    B, Hkv, G, T, D = 2, 2, 3, 50, 16
    layer = KVAccelLayer()
    layer.update(torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g))
    K = 30
    idx = torch.stack([torch.randperm(T, generator=g)[:K].sort().values for _ in range(B * Hkv)]).view(B, Hkv, K)
    slot_valid = torch.arange(K)[None, None, :] < torch.tensor([[30, 12], [7, 25]])[..., None]
    layer.keep(idx, slot_valid)
    q = torch.randn(B, Hkv * G, 1, D, generator=g)
    module = torch.nn.Module()
    module.layer_idx, module.num_key_value_groups, module.is_causal = 0, G, True
    state = PatchState(methods={}, num_layers=1, original_attn="sdpa")
    ctx = AttentionContext(module, state, layer, q, layer.keys, layer.values, None, D**-0.5, "decode", {})
    out = dense_decode(ctx)
    ref = _reference_attention(q, layer.keys, layer.values, D**-0.5, layer.valid)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
