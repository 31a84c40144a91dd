"""accelerate-dispatched models: patch wraps accelerate's forward, unpatch gives it back (CPU + disk offload)."""

from __future__ import annotations

import pytest
import torch

import kvaccel

from conftest import tiny_model

accelerate = pytest.importorskip("accelerate")

GEN = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False)
DEVICE_MAP = {  # layer 1 lives on disk (weights on "meta" until accelerate's hook loads them for its forward)
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "cpu",
    "model.norm": "cpu",
    "lm_head": "cpu",
}


@pytest.fixture
def dispatched(tmp_path):
    model = tiny_model("llama")
    ids = torch.randint(3, 512, (1, 60), generator=torch.Generator().manual_seed(0))
    ref = model.generate(ids, **GEN)  # stock, before dispatch
    model = accelerate.dispatch_model(model, device_map=DEVICE_MAP, offload_dir=str(tmp_path / "offload"))
    assert model.model.layers[1].self_attn.q_proj.weight.device.type == "meta"  # really offloaded
    return model, ids, ref


def test_dispatched_model_patches_evicts_and_unpatches(dispatched):
    model, ids, ref = dispatched
    acc_forward = model.__dict__["forward"]  # accelerate's functools.partial around the stock forward
    assert hasattr(model, "_hf_hook") and model.__dict__.get("generate") is None
    assert torch.equal(model.generate(ids, **GEN), ref)

    kvaccel.patch(model)
    assert model.__dict__["forward"] is not acc_forward
    assert torch.equal(model.generate(ids, **GEN), ref)  # identical tokens with no method

    kvaccel.patch(model, "streaming(budget=16, sink=4)")
    out = model.generate(ids, **GEN)
    rep = kvaccel.report(model)
    assert out.shape == ref.shape
    assert rep["seen_tokens"] == ids.shape[1] + GEN["max_new_tokens"] - 1
    assert all(max(max(h) for h in layer) == 16 for layer in rep["kept_tokens"])  # evicted in every layer
    assert rep["kv_bytes"] < 0.5 * rep["kv_bytes_full"]
    cache = model._kvaccel_state.cache
    for layer, module in zip(cache.layers, model.model.layers, strict=True):
        device = module._hf_hook.execution_device  # where accelerate runs this layer
        assert all(t.device == torch.device(device) for t in layer.tensors())

    kvaccel.unpatch(model)
    assert model.__dict__["forward"] is acc_forward  # exactly accelerate's wrapper back
    assert "generate" not in model.__dict__
    assert torch.equal(model.generate(ids, **GEN), ref)


def test_patched_context_on_dispatched_model_restores_accelerate(dispatched):
    model, ids, ref = dispatched
    acc_forward = model.forward
    with kvaccel.patched(model, "streaming(budget=16)"):
        model.generate(ids, **GEN)
    assert model.__dict__["forward"] is acc_forward
    assert not kvaccel.is_patched(model)


def test_wrapper_applied_after_patch_survives_unpatch():
    """Someone wrapping forward after patch() keeps its wrapper; ours inside it turns into a pass-through."""
    model = tiny_model("llama")
    ids = torch.randint(3, 512, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    kvaccel.patch(model, "streaming(budget=8)")
    ours = model.forward
    calls = []

    def outer(*args, **kwargs):
        calls.append(1)
        return ours(*args, **kwargs)

    model.forward = outer
    kvaccel.unpatch(model)
    assert model.__dict__["forward"] is outer
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)  # no KVAccelCache created, stock attention
    assert calls == [1]
