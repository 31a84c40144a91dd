"""Key re-rotation (``rerotate=True``): cache slot s holds RoPE position s; generation runs past the context window."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import kvaccel
from kvaccel.cache import KVAccelCache
from kvaccel.rope import RopeShift

from conftest import tiny_model


def _rope(model, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The model's own RoPE of ``x`` (B, H, T, D) at ``positions`` (T,)."""
    cos, sin = model.model.rotary_emb(x, positions[None])
    return apply_rotary_pos_emb(x, x, cos, sin)[0]


def test_rotation_by_a_delta_equals_rope_at_the_shifted_position():
    model = tiny_model("llama")
    shift = RopeShift.from_model(model)
    D = model.config.hidden_size // model.config.num_attention_heads
    x = torch.randn(2, 3, 7, D, generator=torch.Generator().manual_seed(0))
    pos = torch.tensor([0, 5, 9, 100, 2000, 3000, 4095])
    delta = torch.tensor([[[3, -5, 0, -90, 7, -2999, 1]]]).expand(2, 3, 7)
    got = shift.rotate(_rope(model, x, pos), delta)
    for t in range(7):  # each token against the model's RoPE at its new position
        want = _rope(model, x[:, :, t : t + 1], pos[t : t + 1] + delta[0, 0, t])
        torch.testing.assert_close(got[:, :, t : t + 1], want, atol=2e-4, rtol=1e-4)


def test_generation_past_the_context_window_keeps_slots_at_their_positions():
    """Streaming with rerotate generates 4x past max_position_embeddings: the cached keys are exactly the tokens'
    pre-RoPE keys rotated to slot positions 0..n-1, and the next token's logits equal the stock model's on that
    cache with the query at position n (so every position attention saw was < the cache size)."""
    model = tiny_model("llama", max_position_embeddings=64)
    Hkv = model.config.num_key_value_heads
    raw = []  # pre-RoPE keys of every token of layer 0, in order
    model.model.layers[0].self_attn.k_proj.register_forward_hook(lambda m, a, out: raw.append(out))
    ids = torch.randint(3, 500, (1, 40), generator=torch.Generator().manual_seed(1))
    with kvaccel.patched(model, "streaming(budget=16,slack=1,rerotate=True)"):
        cache = KVAccelCache(model)
        out = model.generate(ids, cache=cache, max_new_tokens=200, do_sample=False)
        assert out.shape[1] == 240 and cache.get_seq_length() == 239  # 4x past the 64-position window
        keys = cache.layers[0].keys  # (1, Hkv, 16, D), slots 0..15
        assert keys.shape[2] == 16
        k_raw = torch.cat(raw, dim=1)  # (1, 239, Hkv * D)
        k_raw = k_raw.view(1, 239, Hkv, -1).transpose(1, 2)
        kept = torch.tensor(list(range(4)) + list(range(239 - 12, 239)))  # 4 sinks + the 12 most recent
        torch.testing.assert_close(keys, _rope(model, k_raw[:, :, kept], torch.arange(16)), atol=1e-4, rtol=1e-4)

        # stock model, a DynamicCache holding the same 16 tokens at positions 0..15, the new token at position 16
        stock = DynamicCache(config=model.config)
        for i, layer in enumerate(cache.layers):
            stock.update(layer.keys.clone(), layer.values.clone(), i)
        with torch.no_grad():  # one more step, patched: the query lands in slot 16
            nxt = out[:, -1:]
            got = model(nxt, cache=cache, use_cache=True).logits[0, -1]
    with torch.no_grad():
        want = model(nxt, cache=stock, position_ids=torch.tensor([[16]]), use_cache=True).logits[0, -1]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(got).all()


def test_rerotate_changes_nothing_while_nothing_is_evicted():
    model = tiny_model("qwen3")
    ids = torch.randint(3, 500, (2, 30), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding: slot positions differ from the model's positions by a constant per row
    gen = dict(max_new_tokens=12, do_sample=False, attention_mask=mask)
    ref = model.generate(ids, **gen)
    with kvaccel.patched(model, "h2o(budget=500,rerotate=True)"):
        assert torch.equal(model.generate(ids, **gen), ref)


def test_rerotate_refusals():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="rerotate.*think|think.*rerotate|cannot be combined"):
        kvaccel.patch(model, "streaming(rerotate=True)+think")
    with pytest.raises(ValueError, match="rerotate"):
        kvaccel.patch(model, "streaming(rerotate=1)")
    dyn = tiny_model("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="dynamic"):
        kvaccel.patch(dyn, "streaming(rerotate=True)")
    assert not kvaccel.is_patched(dyn)
