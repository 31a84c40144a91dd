"""patch / unpatch / patched: identity with stock transformers, clean reversal, composition rules, errors."""

from __future__ import annotations

import dataclasses
import gc

import pytest
import torch
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface

import kvaccel
from kvaccel.config import Method, register
from kvaccel.patches.evict import Streaming

from conftest import FAMILIES, tiny_model

GEN = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False)


def padded_batch(seed: int = 0, B: int = 3, L: int = 40):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 512, (B, L), generator=g)
    mask = torch.ones_like(ids)
    for b, pad in enumerate((0, 7, 15)[:B]):
        mask[b, :pad] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("family", FAMILIES)
def test_no_method_is_token_identical_to_stock(family):
    model = tiny_model(family)
    ids = torch.randint(3, 512, (1, 50), generator=torch.Generator().manual_seed(1))
    pids, pmask = padded_batch()
    ref1 = model.generate(ids, **GEN)
    ref3 = model.generate(pids, attention_mask=pmask, **GEN)
    kvaccel.patch(model)
    try:
        assert model.config._attn_implementation == "kvaccel"
        assert torch.equal(model.generate(ids, **GEN), ref1)
        assert torch.equal(model.generate(pids, attention_mask=pmask, **GEN), ref3)
        assert isinstance(kvaccel.report(model)["kv_bytes"], int)
    finally:
        kvaccel.unpatch(model)


@pytest.mark.parametrize("family", ("llama", "qwen3"))
def test_budget_all_is_token_identical(family):
    model = tiny_model(family)
    ids = torch.randint(3, 512, (1, 50), generator=torch.Generator().manual_seed(2))
    ref = model.generate(ids, **GEN)
    with kvaccel.patched(model, "streaming", budget=1.0):  # the whole prompt is kept at prefill
        out = model.generate(ids, max_new_tokens=1, do_sample=False)
        assert torch.equal(out, ref[:, : ids.shape[1] + 1])
        assert any("nothing was evicted" in n for n in kvaccel.report(model)["notes"])
    with kvaccel.patched(model, "streaming", budget=10_000):
        assert torch.equal(model.generate(ids, **GEN), ref)


def test_beam_search_identical_to_stock():
    model = tiny_model("llama")
    ids = torch.randint(3, 512, (2, 20), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=12, num_beams=3, do_sample=False, early_stopping=True)
    ref = model.generate(ids, **kw)
    with kvaccel.patched(model):
        assert torch.equal(model.generate(ids, **kw), ref)
    with kvaccel.patched(model, "streaming", budget=8):  # reorders a compressed cache
        out = model.generate(ids, **kw)
        assert out.shape[0] == 2
        assert max(max(max(h) for h in layer) for layer in kvaccel.report(model)["kept_tokens"]) <= 8


def test_unpatch_restores_byte_identical_logits_and_leaves_nothing():
    model = tiny_model("qwen2")
    ids = torch.randint(3, 512, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(ids).logits
    attn = model.model.layers[0].self_attn
    hooks_before = len(attn._forward_pre_hooks)
    kvaccel.patch(model, "streaming", budget=16)
    with torch.no_grad():
        model(ids)
    kvaccel.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    assert model.config._attn_implementation == "sdpa"
    assert len(attn._forward_pre_hooks) == hooks_before
    assert not any(k.startswith("_kvaccel") for k in attn.__dict__)
    assert "generate" not in model.__dict__ and "forward" not in model.__dict__
    assert not kvaccel.is_patched(model)
    gc.collect()  # models other tests patched and dropped leave the live set once collected
    assert "kvaccel" not in AttentionInterface._global_mapping
    assert "kvaccel" not in AttentionMaskInterface._global_mapping
    kvaccel.unpatch(model)  # idempotent


def test_patch_twice_replaces_and_models_are_independent():
    a, b = tiny_model("llama"), tiny_model("llama")
    ids = torch.randint(3, 512, (1, 64), generator=torch.Generator().manual_seed(5))
    kvaccel.patch(a, "streaming", budget=32)
    kvaccel.patch(a, "streaming", budget=16)  # replaces
    kvaccel.patch(b)
    try:
        a.generate(ids, max_new_tokens=4, do_sample=False)
        b.generate(ids, max_new_tokens=4, do_sample=False)
        ra, rb = kvaccel.report(a), kvaccel.report(b)
        assert ra["methods"] == {"evict": "streaming(budget=16,sink=4)"}
        assert ra["kept_tokens"][0][0] == [16, 16]
        assert rb["methods"] == {} and rb["kept_tokens"][0][0] == [67, 67]  # 64 prompt + 3 fed back
        assert len(a.model.layers[0].self_attn._forward_pre_hooks) == 1
    finally:
        kvaccel.unpatch(a)
        assert "kvaccel" in AttentionInterface._global_mapping  # b is still patched
        kvaccel.unpatch(b)


def test_patched_context_restores_previous_patch():
    model = tiny_model("llama")
    kvaccel.patch(model, "streaming", budget=8)
    with kvaccel.patched(model, "full"):
        assert kvaccel.report(model)["methods"] == {"evict": "full"}
    assert kvaccel.report(model)["methods"] == {"evict": "streaming(budget=8,sink=4)"}
    kvaccel.unpatch(model)


def test_methods_listing_and_spec_parsing():
    listed = {m["name"]: m for m in kvaccel.methods()}
    assert listed["streaming"]["stage"] == "evict"
    fields = {f["name"] for f in listed["streaming"]["fields"]}
    assert fields == {"budget", "chunk", "sink", "slack", "rerotate", "span_rule"}
    (m,) = kvaccel.parse_spec("streaming(budget=0.25, sink=2)")
    assert m == Streaming(budget=0.25, sink=2)
    assert Streaming(budget=64).spec() == "streaming(budget=64,sink=4)"


# ------------------------------------------------------------------------------------------------ bad input


def test_unknown_method_suggests_closest():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"unknown method 'streamin'.*Did you mean 'streaming'"):
        kvaccel.patch(model, "streamin")
    with pytest.raises(ValueError, match=r"has no option\(s\) \['bugdet'\]"):
        kvaccel.patch(model, "streaming(bugdet=3)")
    with pytest.raises(ValueError, match=r"apply to none of the methods"):
        kvaccel.patch(model, "streaming", ratio=0.3)
    assert not kvaccel.is_patched(model)


def test_two_methods_of_one_stage():
    with pytest.raises(ValueError, match=r"'streaming' and 'full' are both evict methods"):
        kvaccel.patch(tiny_model("llama"), "streaming", kvaccel.parse_spec("full")[0])
    with pytest.raises(ValueError, match=r"both evict methods"):
        kvaccel.patch(tiny_model("llama"), "streaming+full")


@pytest.mark.parametrize("budget", [0, -3, 0.0, 1.5, -0.1, True, "half"])
def test_invalid_budget(budget):
    with pytest.raises(ValueError, match="budget"):
        Streaming(budget=budget)
    with pytest.raises(ValueError, match="budget"):
        kvaccel.patch(tiny_model("llama"), "streaming", budget=budget)


def test_unsupported_and_non_causal_models():
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match=r"unsupported architecture 'gpt2'.*llama, qwen2, qwen3, mistral"):
        kvaccel.patch(gpt2)
    bert = BertModel(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                vocab_size=64))
    with pytest.raises(ValueError, match="not a causal language model"):
        kvaccel.patch(bert)
    with pytest.raises(ValueError, match="expects a transformers model"):
        kvaccel.patch(torch.nn.Linear(2, 2))


def test_missing_optional_dependency():
    @dataclasses.dataclass
    class NeedsPkg(Method):
        """NeedsPkg: test method with an optional dependency."""

        name = "needs_pkg_test"
        stage = "decode"
        requires = {"kvaccel_no_such_package": "kvaccel-no-such-package>=1"}

    register(NeedsPkg)
    with pytest.raises(ImportError, match=r"needs the optional package 'kvaccel_no_such_package'.*pip install"):
        kvaccel.patch(tiny_model("llama"), "needs_pkg_test")


def test_eviction_without_our_cache_is_an_error():
    model = tiny_model("llama")
    ids = torch.randint(3, 512, (1, 16))
    with kvaccel.patched(model, "streaming", budget=4):
        with pytest.raises(RuntimeError, match="use_cache=False"):
            model(ids, use_cache=False)
        with pytest.raises(RuntimeError, match="not a KVAccelCache"):
            model(ids, cache=DynamicCache(config=model.config))
    with kvaccel.patched(model):  # no cache method: any cache works, same logits as stock
        ref = tiny_model("llama")(ids, use_cache=False).logits
        torch.testing.assert_close(model(ids, use_cache=False).logits, ref, rtol=0, atol=0)
        torch.testing.assert_close(model(ids, cache=DynamicCache(config=model.config)).logits, ref,
                                   rtol=0, atol=0)


def test_attention_weights_are_refused_not_returned_empty():
    """Scorers compute what they need in kernels; asking for the weights is an error, not an empty tuple."""
    model = tiny_model("llama")
    ids = torch.randint(3, 512, (1, 16))
    with kvaccel.patched(model, "snapkv", budget=8):
        with pytest.raises(ValueError, match="output_attentions=True.*unpatch.*eager"):
            model(ids, output_attentions=True)
        with pytest.raises(ValueError, match="output_attentions=True"):
            model.generate(ids, max_new_tokens=2, output_attentions=True, return_dict_in_generate=True)
        assert model(ids, output_attentions=False).logits.shape == (1, 16, model.config.vocab_size)
        with pytest.raises(ValueError, match="not supported.*kvaccel"):  # transformers' own config guard
            model.config.output_attentions = True
