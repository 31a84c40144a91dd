"""DuoAttention: streaming heads equal attention over sink + recent, retrieval heads full attention (a hand-written
reference), sparsity 0 is stock, padded batches, the bytes really held, bad input, and the trainer."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface

import kvaccel
from kvaccel.cache import KVAccelCache
from kvaccel.duo_attention_training import passkey_sequences, streaming_mask
from kvaccel.patches.evict.duo_attention import DuoAttention, DuoLayer, DuoPatterns
from kvaccel.training import train_gate

from conftest import tiny_model

SINK, RECENT = 3, 8


def _patterns(model, tmp_path, alpha: list[list[float]], sink: int = SINK, recent: int = RECENT) -> str:
    pats = DuoPatterns.for_model(model, sink=sink, recent=recent)
    with torch.no_grad():
        pats.alpha.copy_(torch.tensor(alpha))
    return str(pats.save(tmp_path / "pats"))


# layer x kv head gates of the tiny models (3 layers, 2 kv heads): sparsity 0.5 streams the three lowest
ALPHA = [[0.9, 0.1], [0.2, 0.8], [0.7, 0.05]]
STREAMING = torch.tensor([[False, True], [True, False], [False, True]])


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Full causal attention; after the prompt (``module._ref_prompt`` tokens), streaming heads' queries see only the
    first SINK and the last RECENT earlier tokens (and themselves). A prompt fed in two chunks (the first
    ``module._ref_chunk`` tokens, then the rest): the second chunk's streaming queries see the first SINK tokens, the
    last RECENT of the first chunk and the second chunk."""
    G = query.shape[1] // key.shape[1]
    L, P, C = query.shape[2], module._ref_prompt, module._ref_chunk
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    second = (i >= C) & (i < P) & (j >= C - RECENT)
    window = causal & ((j < SINK) | (i < C) | second | ((i >= P) & (i - j <= RECENT)))
    mask = torch.where(module._ref_streaming[:, None, None], window, causal).repeat_interleave(G, 0)
    k, v = key.repeat_interleave(G, 1), value.repeat_interleave(G, 1)
    out = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=mask[None], scale=scaling)
    return out.transpose(1, 2), None


def _reference_logits(model, ids: torch.Tensor, prompt: int, chunk: int | None = None) -> torch.Tensor:
    AttentionInterface.register("duo_reference", _reference_attention)
    for layer in model.model.layers:
        layer.self_attn._ref_prompt, layer.self_attn._ref_chunk = prompt, prompt if chunk is None else chunk
        layer.self_attn._ref_streaming = STREAMING[layer.self_attn.layer_idx]
    model.set_attn_implementation("duo_reference")
    try:
        with torch.no_grad():
            return model(ids, use_cache=False).logits[:, prompt - 1 :]
    finally:
        model.set_attn_implementation("sdpa")


def _teacher_forced(model, ids: torch.Tensor, prompt: int, spec, chunk: int | None = None):
    with kvaccel.patched(model, spec), torch.no_grad():
        cache = KVAccelCache(model)
        if chunk is not None:
            model(ids[:, :chunk], cache=cache, use_cache=True)
        logits = [model(ids[:, chunk or 0 : prompt], cache=cache, use_cache=True).logits[:, -1]]
        for t in range(prompt, ids.shape[1]):
            logits.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits[:, -1])
    return torch.stack(logits, 1), cache


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_matches_the_hand_written_reference(family, tmp_path):
    """Prompt dense in every head; each decode query of a streaming head reads the first SINK tokens and the last
    RECENT ones (slack=1: cut back after every step), a retrieval head every token."""
    model = tiny_model(family)
    ids = torch.randint(3, 512, (1, 40 + 12), generator=torch.Generator().manual_seed(0))
    spec = DuoAttention(sparsity=0.5, patterns=_patterns(model, tmp_path, ALPHA), slack=1)
    got, cache = _teacher_forced(model, ids, 40, spec)
    ref = _reference_logits(model, ids, 40)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    for i, layer in enumerate(cache.layers):
        assert isinstance(layer, DuoLayer)
        torch.testing.assert_close(layer.streaming, STREAMING[i])
    with torch.no_grad():
        plain = model(ids, use_cache=False).logits[:, 39:]
    assert (plain - ref).abs().max() > 1e-3  # the streaming heads change the decode logits


def test_prompt_in_two_chunks_matches_the_reference(tmp_path):
    """The second chunk attends the packed first chunk (streaming heads: its sinks and last RECENT tokens)."""
    model = tiny_model("llama")
    ids = torch.randint(3, 512, (1, 40 + 6), generator=torch.Generator().manual_seed(4))
    spec = DuoAttention(sparsity=0.5, patterns=_patterns(model, tmp_path, ALPHA), slack=1)
    got, _ = _teacher_forced(model, ids, 40, spec, chunk=25)
    torch.testing.assert_close(got, _reference_logits(model, ids, 40, chunk=25), atol=1e-4, rtol=1e-4)


def test_sparsity_zero_is_stock(tmp_path):
    model = tiny_model("llama")
    ids = torch.randint(3, 512, (1, 60), generator=torch.Generator().manual_seed(1))
    gen = {"max_new_tokens": 24, "min_new_tokens": 24, "do_sample": False}
    ref = model.generate(ids, **gen)
    with kvaccel.patched(model, DuoAttention(sparsity=0.0, patterns=_patterns(model, tmp_path, ALPHA))):
        assert torch.equal(model.generate(ids, **gen), ref)
        assert kvaccel.report(model)["kv_ratio"] == pytest.approx(1.0, abs=0.05)


def test_left_padded_batch_equals_each_row_alone(tmp_path):
    """Padding is never stored: a padded row's sinks are its first real tokens, its tokens those of the row alone."""
    model = tiny_model("llama")
    ids = torch.randint(3, 512, (2, 70), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :25], ids[1, :25] = 0, 0
    gen = {"max_new_tokens": 14, "min_new_tokens": 14, "do_sample": False}
    with kvaccel.patched(model, DuoAttention(patterns=_patterns(model, tmp_path, ALPHA), slack=2)):
        both = model.generate(ids, attention_mask=mask, **gen)
        alone = [model.generate(ids[0:1], **gen), model.generate(ids[1:2, 25:], **gen)]
    assert torch.equal(both[0, 70:], alone[0][0, 70:])
    assert torch.equal(both[1, 70:], alone[1][0, 45:])


def _storage_bytes(cache: KVAccelCache) -> int:
    """Bytes of every distinct tensor storage the layers hold (views counted once, whole), but the method's shared
    ``(layers, heads)`` streaming-head mask that each layer views."""
    seen, total = set(), 0
    for layer in cache.layers:
        for name, value in vars(layer).items():
            if name == "streaming" or not isinstance(value, torch.Tensor):
                continue
            if value.untyped_storage().data_ptr() not in seen:
                seen.add(value.untyped_storage().data_ptr())
                total += value.untyped_storage().nbytes()
    return total


def test_streaming_heads_hold_sink_and_recent_keys_and_bytes_stay_bounded(tmp_path):
    """The kept rows are the stock keys of positions [0, sink) + the last `recent`; retrieval heads hold every token;
    while decoding a streaming head never holds more than sink + recent + slack tokens; report() = tensors held."""
    model = tiny_model("llama")
    ids = torch.randint(3, 512, (1, 300), generator=torch.Generator().manual_seed(3))
    sink, recent, slack = 4, 32, 3
    spec = DuoAttention(patterns=_patterns(model, tmp_path, ALPHA, sink, recent), slack=slack)
    with torch.no_grad():
        stock = model(ids, use_cache=True).cache
    with kvaccel.patched(model, spec), torch.no_grad():
        cache = KVAccelCache(model)
        out = model(ids, cache=cache, use_cache=True)
        for i, layer in enumerate(cache.layers):
            keys, valid = layer.dense_keys()
            for h in range(2):
                held = keys[0, h][valid[0, h]]
                full = stock.layers[i].keys[0, h]
                expect = torch.cat([full[:sink], full[-recent:]]) if STREAMING[i, h] else full
                torch.testing.assert_close(held, expect)
        for step in range(40):
            out = model(out.logits[:, -1:].argmax(-1), cache=cache, use_cache=True)
            for i, layer in enumerate(cache.layers):
                kept = layer.kept_per_head()[0]
                assert (kept[STREAMING[i]] <= sink + recent + slack).all()
                assert (kept[~STREAMING[i]] == 300 + step + 1).all()
        r = kvaccel.report(model)
        assert r["kv_bytes"] == cache.nbytes() == _storage_bytes(cache)
        row = 2 * model.config.hidden_size // model.config.num_attention_heads * 4  # key + value, fp32
        tokens = 3 * (340 + sink + recent)  # per layer: one retrieval head (all 340) + one streaming head
        assert tokens * row <= r["kv_bytes"] <= 1.15 * tokens * row
        assert r["kv_ratio"] < 0.6


def test_bad_input_names_the_fix(tmp_path):
    model = tiny_model("llama")
    for kw, msg in ((dict(sparsity=1.5), "sparsity"), (dict(sink=-1), "sink"), (dict(recent=0), "recent"),
                    (dict(patterns=3), "patterns"), (dict(slack=0), "slack")):
        with pytest.raises(ValueError, match=msg):
            DuoAttention(**kw)
    with pytest.raises(ValueError, match="duo_attention: nothing trained ships.*patterns=DIR"):
        kvaccel.patch(model, "duo_attention")
    other = _patterns(tiny_model("qwen2"), tmp_path, ALPHA)
    with pytest.raises(ValueError, match="trained for model.*train-gate duo_attention"):
        kvaccel.patch(model, DuoAttention(patterns=other))
    with pytest.raises(ValueError, match="does not exist"):
        kvaccel.patch(model, DuoAttention(patterns=str(tmp_path / "missing")))
    with pytest.raises(NotImplementedError, match="think"):
        kvaccel.patch(model, DuoAttention(patterns=other), "think")
    assert not kvaccel.is_patched(model)


def test_streaming_heads_pick_the_lowest_gates():
    pats = DuoPatterns({"num_layers": 3, "num_kv_heads": 2})
    with torch.no_grad():
        pats.alpha.copy_(torch.tensor(ALPHA))
    assert torch.equal(pats.streaming_heads(0.5), STREAMING)
    assert not pats.streaming_heads(0.0).any() and pats.streaming_heads(1.0).all()
    assert torch.equal(streaming_mask(5, 1, 2)[4], torch.tensor([True, False, False, True, True]))


class CharTokenizer:
    """Offline stand-in for a HF tokenizer: one token per character."""

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        ids = [3 + ord(c) % 500 for c in text]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}


def test_trainer_runs_and_writes_patterns_that_load(tmp_path):
    model = tiny_model("llama")
    texts = [("".join(chr(97 + (i * 7 + j * j) % 26) for j in range(200))) for i in range(2)]
    recipe = dict(sink=2, recent=16, answer_tokens=8)
    r = train_gate("duo_attention", model, CharTokenizer(), data=texts, steps=2, out=tmp_path, seq_len=96, lr=0.1,
                   progress=False, recipe=recipe)
    assert len(r["losses"]) == 2 and r["losses"][0] == pytest.approx(0.05)  # at alpha = 1: no distortion, L1 = 1
    pats = DuoPatterns.load(tmp_path)
    assert pats.meta["sink"] == 2 and pats.meta["recent"] == 16 and pats.meta["recipe"]["steps"] == 2
    assert (pats.alpha < 1).all() and (pats.alpha >= 0).all()  # the L1 term moved every gate down
    with kvaccel.patched(model, DuoAttention(patterns=str(tmp_path))), torch.no_grad():
        model.generate(torch.randint(3, 512, (1, 40)), max_new_tokens=2, do_sample=False)
    seqs = passkey_sequences(CharTokenizer(), 700, 2)
    assert all(s.dim() == 1 and s.numel() > 600 for s in seqs)


def test_shipped_patterns_on_the_default_model(default_model):
    """The shipped patterns load for the default model; at sparsity 0.5, 45 of its 90 KV heads hold sink + recent."""
    model, tok = default_model
    ids = torch.randint(10, 10_000, (1, 600), generator=torch.Generator().manual_seed(5))
    with kvaccel.patched(model, "duo_attention"), torch.no_grad():
        spec = kvaccel.report(model)["methods"]["evict"]
        cache = KVAccelCache(model)
        model(ids, cache=cache, use_cache=True)
        kept = torch.stack([layer.kept_per_head()[0] for layer in cache.layers])  # (layers, kv heads)
    pats = DuoPatterns.load(DuoPatterns.shipped_dir("SmolLM2-135M-Instruct"))
    cap = pats.meta["sink"] + pats.meta["recent"]
    assert "duo_attention" in spec and cap < 600
    assert torch.equal(kept, torch.where(pats.streaming_heads(0.5), cap, 600))
