"""Behaviour checks on the real embedded default model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import pytest
import torch

import kvaccel
from kvaccel.compare import prompt_ids

pytestmark = pytest.mark.real_model
GEN = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False)


def test_default_model_loads_with_expected_shape(default_model):
    model, tok = default_model
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == ("llama", 30, 9, 3)
    assert c.max_position_embeddings == 8192
    assert getattr(c, "quantization_config", None) is None  # de-quantized copy


def test_patched_default_model_is_token_identical(default_model):
    model, tok = default_model
    ids = prompt_ids(tok, 300)
    texts = ["The capital of France is", "def fibonacci(n):", "Write a haiku about the sea."]
    batch = tok(texts, return_tensors="pt", padding=True, padding_side="left")
    assert not bool(batch["attention_mask"].all())  # really padded
    with torch.inference_mode():
        ref1 = model.generate(ids, **GEN)
        ref3 = model.generate(**batch, **GEN)
        with kvaccel.patched(model):
            assert torch.equal(model.generate(ids, **GEN), ref1)
            assert torch.equal(model.generate(**batch, **GEN), ref3)


def test_streaming_on_default_model_saves_real_memory(default_model):
    model, tok = default_model
    ids = prompt_ids(tok, 1024)
    with torch.inference_mode(), kvaccel.patched(model, "streaming", budget=128):
        out = model.generate(ids, max_new_tokens=16, do_sample=False)
        r = kvaccel.report(model)
    assert out.shape[1] == 1024 + 16
    assert r["seen_tokens"] == 1024 + 15
    # layers x (K, V) x heads x slots x dim x fp32; slots = the budget + the decode slack (128 // 32)
    assert r["kv_bytes"] == 30 * 2 * 3 * (128 + 4) * 64 * 4
    assert r["kv_bytes"] / r["kv_bytes_full"] < 0.13
