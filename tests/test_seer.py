"""SeerAttention: AttnGate shapes, pre-RoPE recovery, pooled target, gate files, and the ``seer`` prefill method."""

from __future__ import annotations

import json
import math

import pytest
import torch
from prefill_helpers import padded_batch_and_alone, recording

import kvaccel
from kvaccel.patches.prefill.seer import Seer
from kvaccel.patches.prefill.seer_gate import (
    AttnGate,
    SeerGate,
    pool_blocks,
    pooled_attention_target,
    shipped_gate_dir,
    unrotate,
)
from kvaccel.training import _seer_target

from conftest import tiny_model

GQA_FAMILIES = ("llama", "qwen3", "mistral")


def _ids(n: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 500, (batch, n), generator=g)


def naive_pooled_target(q, k, scale, bs):
    """Dense (L, L) softmax, max-pooled to blocks, rows renormalised (the test oracle)."""
    B, Hq, L, D = q.shape
    kk = k.repeat_interleave(Hq // k.shape[1], dim=1)
    logits = (q.double() @ kk.double().transpose(-1, -2)) * scale
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    p = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
    n = -(-L // bs)
    out = torch.zeros(B, Hq, n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            out[..., i, j] = p[..., i * bs : (i + 1) * bs, j * bs : (j + 1) * bs].amax(dim=(-1, -2))
    return out / out.sum(-1, keepdim=True)


# ------------------------------------------------------------------------------------------ building blocks


def test_unrotate_inverts_transformers_rope(family):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = tiny_model(family)
    rot = model.model.rotary_emb
    q, k = torch.randn(2, 6, 70, 16), torch.randn(2, 2, 70, 16)
    pos = torch.tensor([list(range(70)), list(range(5, 75))])  # two sequences at different offsets
    cos, sin = rot(q, pos)
    qr, kr = apply_rotary_pos_emb(q, k, cos, sin)
    assert not torch.allclose(qr, q)
    torch.testing.assert_close(unrotate(qr, cos, sin), q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unrotate(kr, cos, sin), k, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_captured_features_are_pre_rope(family):
    """Features from the patched attention equal pooling of q/k read before RoPE (Qwen3: after q_norm/k_norm)."""
    model = tiny_model(family)
    attn = model.model.layers[1].self_attn
    seen = {}
    q_src, k_src = (attn.q_norm, attn.k_norm) if family == "qwen3" else (attn.q_proj, attn.k_proj)
    hd = model.config.head_dim if family == "qwen3" else model.config.hidden_size // model.config.num_attention_heads
    hooks = [
        q_src.register_forward_hook(lambda m, a, o: seen.__setitem__("q", o)),
        k_src.register_forward_hook(lambda m, a, o: seen.__setitem__("k", o)),
    ]
    try:
        records = _seer_target(model, _ids(150), block_size=32)
    finally:
        for h in hooks:
            h.remove()
    q = seen["q"].reshape(1, 150, -1, hd).transpose(1, 2)
    k = seen["k"].reshape(1, 150, -1, hd).transpose(1, 2)
    qf, kf, tgt = records[1]
    torch.testing.assert_close(qf, pool_blocks(q, 32, ("avg",)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kf, pool_blocks(k, 32, ("max", "min", "avg")), atol=1e-5, rtol=1e-5)
    assert tgt.shape == (1, 6, 5, 5)


def test_pool_blocks_ragged():
    x = torch.randn(1, 2, 10, 3)
    out = pool_blocks(x, 4, ("max", "min", "avg"))
    assert out.shape == (1, 2, 3, 9)
    last = x[:, :, 8:]
    torch.testing.assert_close(out[:, :, 2], torch.cat([last.amax(2), last.amin(2), last.mean(2)], -1))
    with pytest.raises(ValueError, match="pooling kind"):
        pool_blocks(x, 4, ("median",))


@pytest.mark.parametrize("L,chunk", [(200, 1), (256, 3), (64, 4), (70, 2)])
def test_pooled_target_matches_naive(L, chunk):
    torch.manual_seed(L)
    q, k = torch.randn(1, 6, L, 16) * 2, torch.randn(1, 2, L, 16) * 2
    got = pooled_attention_target(q, k, 0.25, 64, chunk_blocks=chunk)
    want = naive_pooled_target(q, k, 0.25, 64)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
    n = want.shape[-1]
    assert torch.all(got[..., torch.ones(n, n, dtype=torch.bool).triu(1)] == 0)


@pytest.mark.parametrize("family", GQA_FAMILIES)
def test_gate_shapes(family):
    model = tiny_model(family)
    gate = SeerGate.for_model(model, hidden=32, block_size=32)
    cfg = model.config
    assert len(gate.layers) == cfg.num_hidden_layers
    layer = gate.layers[0]
    assert layer.q_weight.shape == (cfg.num_attention_heads, layer.head_dim, 32)
    assert layer.k_weight.shape == (cfg.num_key_value_heads, 3 * layer.head_dim, 32)
    records = _seer_target(model, _ids(100), block_size=32)
    qf, kf, tgt = records[0]
    scores = torch.softmax(layer(qf, kf), -1)
    assert scores.shape == tgt.shape == (1, cfg.num_attention_heads, 4, 4)
    torch.testing.assert_close(scores.sum(-1), torch.ones(1, cfg.num_attention_heads, 4))
    assert float(scores.detach()[..., torch.ones(4, 4, dtype=torch.bool).triu(1)].max()) == 0.0


def test_gate_gqa_shares_key_projection():
    """Query heads of one kv group read the same projected keys: equal q weights give equal rows."""
    g = AttnGate(4, 2, 8, hidden=16, block_size=8)
    with torch.no_grad():
        g.q_weight[1] = g.q_weight[0]
        g.q_weight[3] = g.q_weight[2]
    qf = torch.randn(1, 1, 5, 8).expand(1, 4, 5, 8)
    kf = torch.randn(1, 2, 5, 24)
    out = g(qf, kf)
    torch.testing.assert_close(out[:, 0], out[:, 1])
    assert not torch.allclose(out[:, 0], out[:, 2])


# ------------------------------------------------------------------------------------------ files


def test_save_load_round_trip(tmp_path):
    model = tiny_model("qwen3")
    gate = SeerGate.for_model(model, hidden=16, recipe={"steps": 3})
    gate.save(tmp_path)
    meta = json.loads((tmp_path / "gate.json").read_text())
    assert meta["model_name"] == kvaccel.models.model_name(model)
    assert meta["model_fingerprint"] == kvaccel.models.model_fingerprint(model)
    assert meta["recipe"] == {"steps": 3}
    loaded = SeerGate.load(tmp_path)
    for (n1, a), (n2, b) in zip(gate.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert n1 == n2
        assert torch.equal(a, b)
    loaded.check_model(model)
    assert not any(p.suffix in (".pt", ".bin", ".pkl") for p in tmp_path.iterdir())


def test_gate_for_another_model_refused(tmp_path):
    SeerGate.for_model(tiny_model("llama"), hidden=16).save(tmp_path)
    other = tiny_model("qwen3")
    with pytest.raises(ValueError, match=r"trained for model 'llama'.*not for 'qwen3'"):
        kvaccel.patch(other, Seer(weights=str(tmp_path), min_length=0))
    assert not kvaccel.is_patched(other)


def test_truncated_or_corrupt_files_are_clear_errors(tmp_path):
    SeerGate.for_model(tiny_model("llama"), hidden=16).save(tmp_path)
    w = tmp_path / "gate.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"gate\.safetensors are corrupted or truncated"):
        SeerGate.load(tmp_path)
    w.write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match="corrupted or truncated"):
        SeerGate.load(tmp_path)
    w.write_bytes(data)
    (tmp_path / "gate.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"gate\.json is not valid JSON"):
        SeerGate.load(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        SeerGate.load(tmp_path / "missing")


# ------------------------------------------------------------------------------------------ the method


@pytest.mark.parametrize("family", GQA_FAMILIES)
def test_oracle_threshold_zero_equals_dense(family):
    model = tiny_model(family)
    ids = _ids(300)
    with torch.no_grad():
        ref = model(ids).logits
        kvaccel.patch(model, Seer(mode="oracle", threshold=0.0, min_length=0))
        out = model(ids).logits
    r = kvaccel.report(model)
    kvaccel.unpatch(model)
    assert r["prefill_density"] == [1.0] * model.config.num_hidden_layers
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_oracle_sparse_keeps_the_heavy_blocks():
    """Queries that attend one far key block: the oracle keeps it at 30 % density and the output stays exact."""
    torch.manual_seed(0)
    L, D = 512, 16
    u = torch.randn(D)
    q = (6 * u + 0.1 * torch.randn(1, 2, L, D)).contiguous()
    k = 0.1 * torch.randn(1, 1, L, D)
    k[:, :, 64:128] = 6 * u  # key block 1 dominates every later row
    v = torch.randn(1, 1, L, D)
    m = Seer(mode="oracle", density=0.3, dense_last_rows=0, min_length=0)
    stats = dict(prefill_estimate_s=0, prefill_attention_s=0, _tiles=0, _causal_tiles=0)
    out = m.sparse_attention(q, k, v, D**-0.5, 0, stats).transpose(1, 2)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.expand(1, 2, L, D), v.expand(1, 2, L, D),
                                                           is_causal=True)
    assert stats["_tiles"] / stats["_causal_tiles"] < 0.6
    assert (out - ref).norm() / ref.norm() < 1e-3
    mask = m.select(q, k, v, D**-0.5, 0).mask
    assert mask[0, :, 2:, 1].all()


def seer_tiles(scores: torch.Tensor, density: float, dense_last_rows: int) -> int:
    """Tiles seer's density mode computes, counted row by row from the block scores ``(B, H, n, n)``: the
    ``ceil(density·(i+1))`` highest-scoring causal blocks of row ``i`` plus its diagonal block when they miss it,
    or all ``i + 1`` causal blocks in the last ``dense_last_rows`` rows."""
    B, H, n, _ = scores.shape
    total = 0
    for b in range(B):
        for h in range(H):
            for i in range(n):
                if i >= n - dense_last_rows:
                    total += i + 1
                    continue
                k = max(1, math.ceil(density * (i + 1)))
                top = scores[b, h, i, : i + 1].topk(k).indices.tolist()
                total += k + (i not in top)
    return total


def test_gate_mode_runs_and_pads(tmp_path):
    model = tiny_model("llama")
    SeerGate.for_model(model, hidden=16).save(tmp_path)
    ids = _ids(260, batch=2)
    mask = torch.ones_like(ids)
    mask[0, :40] = 0  # left padding
    sparse_method = Seer(weights=str(tmp_path), density=0.2, dense_last_rows=0, min_length=0)
    with torch.no_grad():
        kvaccel.patch(model, Seer(weights=str(tmp_path), threshold=0.0, min_length=0))
        out = model(ids, attention_mask=mask).logits
        kvaccel.patch(model, sparse_method)
        calls = recording(sparse_method, "block_scores")
        sparse = model(ids, attention_mask=mask).logits
        d_sparse = kvaccel.report(model)["prefill_density"]
        kvaccel.unpatch(model)
        ref = model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=2e-5, rtol=1e-4)
    H = model.config.num_attention_heads
    causal = H * (10 + 15)  # 220 real tokens: 4 blocks (10 causal tiles); 260: 5 blocks (15)
    assert [c.shape[-1] for c in calls] == [4, 5] * model.config.num_hidden_layers  # per sequence, per layer
    want = [(seer_tiles(calls[2 * i], 0.2, 0) + seer_tiles(calls[2 * i + 1], 0.2, 0)) / causal
            for i in range(model.config.num_hidden_layers)]
    assert d_sparse == pytest.approx(want)
    assert torch.isfinite(sparse[real]).all()


def test_mask_from_scores_density_and_last_rows():
    n = 10
    scores = torch.softmax(torch.randn(1, 2, n, n).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -1e9), -1)
    m = Seer(mode="oracle", density=0.5, dense_last_rows=0).mask_from_scores(scores)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    kept = (m & causal).sum(-1)[0, 0]
    want = torch.ceil(0.5 * torch.arange(1, n + 1)).long()
    assert torch.equal(kept, want)
    top = scores[0, 0, 9].argsort(descending=True)[:5]
    assert m[0, 0, 9, top].all()
    m2 = Seer(mode="oracle", threshold=0.9, dense_last_rows=2).mask_from_scores(scores)
    assert m2[..., -2:, :].all() and not m2[..., 3, :3].all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(threshold=0.01, density=0.1), "exclusive"),
        (dict(threshold=1.5), r"threshold \(1.5\)"),
        (dict(threshold=-0.1), "threshold"),
        (dict(density=0.0), r"density \(0.0\)"),
        (dict(mode="magic"), r"mode \('magic'\)"),
        (dict(dense_last_rows=-1), "dense_last_rows"),
        (dict(mode="oracle", weights="x"), "unused"),
        (dict(min_length=-1), "min_length"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Seer(**kwargs)


def test_no_shipped_gate_for_a_random_model():
    model = tiny_model("mistral")
    assert not shipped_gate_dir(kvaccel.models.model_name(model)).exists()
    with pytest.raises(ValueError, match="seer: nothing trained ships for model 'mistral'.*"
                       "train-gate seer.*mode='oracle'"):
        kvaccel.patch(model, "seer")


def test_short_prompt_falls_back_to_dense(tmp_path):
    model = tiny_model("llama")
    SeerGate.for_model(model, hidden=16).save(tmp_path)
    ids = _ids(100)
    with torch.no_grad():
        ref = model(ids).logits
        kvaccel.patch(model, Seer(weights=str(tmp_path), density=0.1))
        out = model(ids).logits
    notes = kvaccel.report(model)["notes"]
    kvaccel.unpatch(model)
    torch.testing.assert_close(out, ref)
    assert any("min_length" in n for n in notes)


@pytest.mark.real_model
def test_default_model_finds_shipped_gate(default_model):
    model, tok = default_model
    ids = tok("The quick brown fox. " * 300, return_tensors="pt")["input_ids"][:, :1100]
    assert ids.shape[1] == 1100  # above min_length (1024)
    with torch.no_grad():
        ref = model(ids).logits[:, -1]
        with kvaccel.patched(model, "seer(density=0.5)"):  # the shipped gate, found by bind()
            calls = recording(model._kvaccel_state.methods["prefill"], "block_scores")
            out = model(ids).logits[:, -1]
            dens = kvaccel.report(model)["prefill_density"]
    n = 18  # ceil(1100 / 64) blocks, the last 2 rows dense (the default dense_last_rows)
    H = model.config.num_attention_heads
    assert dens == pytest.approx([seer_tiles(c, 0.5, 2) / (H * n * (n + 1) // 2) for c in calls])
    assert int(out.argmax()) == int(ref.argmax())


def test_sparse_gate_left_padded_batch_equals_each_prompt_alone(tmp_path):
    """A left-padded batch of two prompts of different lengths gives, per row, the logits of each prompt alone
    (sparse: threshold 0.3 on a random gate drops blocks)."""
    model = tiny_model("llama")
    SeerGate.for_model(model, hidden=16).save(tmp_path)
    seqs = [_ids(n, seed=30 + i)[0] for i, n in enumerate((300, 233))]
    method = Seer(weights=str(tmp_path), threshold=0.3, dense_last_rows=0, min_length=0)
    dens, batched, single = padded_batch_and_alone(model, method, seqs)
    assert all(d < 0.7 for d in dens), dens  # sparse (0.6 measured): not dense vs dense
    for row, alone in zip(batched, single, strict=True):
        torch.testing.assert_close(row, alone, atol=2e-5, rtol=1e-4)
