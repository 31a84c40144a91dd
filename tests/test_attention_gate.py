"""Attention-Gate eviction: gate shapes, files, inference invariants, and its training (attention_gate_training)."""

from __future__ import annotations

import json

import pytest
import torch

import kvaccel
from kvaccel import attention_gate_training as agt
from kvaccel.attention_gate_training import straight_through
from kvaccel.cache import KVAccelCache
from kvaccel.patches.evict import attention_gate as ag
from kvaccel.patches.evict.attention_gate import AttentionGate, AttentionGates

from conftest import tiny_model

FAMILIES3 = ["llama", "qwen3", "mistral"]


def _gates(model, tmp_path, bias: float | None = None, **kw):
    g = AttentionGates.for_model(model, gate_dim=4, gate_window=8, window=kw.pop("window", 4), sink=2, **kw)
    if bias is not None:
        with torch.no_grad():
            for layer in g.layers:
                layer.direct.bias.fill_(bias)
    return g.save(tmp_path / "gate")


@pytest.mark.parametrize("family", FAMILIES3)
def test_gate_shapes(family):
    model = tiny_model(family)
    g = AttentionGates.for_model(model)
    x = torch.randn(2, 37, model.config.hidden_size)
    logits, (pk, pv) = g.layers[0](x)
    hkv = model.config.num_key_value_heads
    assert logits.shape == (2, hkv, 37)
    assert pk.shape == (2, hkv, 63 if 37 >= 63 else 37, 8) and pv.shape == pk.shape
    assert len(g.layers) == model.config.num_hidden_layers


def test_incremental_gate_equals_full():
    """Scoring token by token with the carried gate keys/values equals scoring the whole sequence at once."""
    model = tiny_model("llama")
    torch.manual_seed(0)
    layer = AttentionGates.for_model(model, gate_window=6).layers[0]
    torch.nn.init.normal_(layer.out)
    x = torch.randn(1, 20, model.config.hidden_size)
    full, _ = layer(x)
    logits, past = layer(x[:, :11])
    parts = [logits]
    for t in range(11, 20):
        lt, past = layer(x[:, t : t + 1], past)
        parts.append(lt)
    torch.testing.assert_close(torch.cat(parts, -1), full, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip(tmp_path):
    model = tiny_model("qwen3")
    g = AttentionGates.for_model(model, recipe={"steps": 3})
    torch.nn.init.normal_(g.layers[1].out)
    g.save(tmp_path)
    h = AttentionGates.load(tmp_path / "gate.safetensors")
    assert h.meta == json.loads(json.dumps(g.meta))
    for a, b in zip(g.state_dict().values(), h.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    h.check_model(model)


def test_bad_files_are_clear_errors(tmp_path):
    model = tiny_model("llama")
    path = _gates(model, tmp_path)
    with pytest.raises(ValueError, match="trained for model"):
        AttentionGates.load(path).check_model(tiny_model("qwen3"))
    with pytest.raises(ValueError, match="trained for model"):
        kvaccel.patch(tiny_model("qwen3"), AttentionGate(weights=str(path)))
    w = path / "gate.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        AttentionGates.load(path)
    (path / "gate.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        AttentionGates.load(path)
    with pytest.raises(ValueError, match="does not exist"):
        AttentionGates.load(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="attention_gate: nothing trained ships for model 'llama'.*"
                       "train-gate attention_gate"):
        kvaccel.patch(tiny_model("llama"), "attention_gate")
    with pytest.raises(ValueError, match="threshold"):
        AttentionGate(threshold=1.5)


def test_shared_helpers_have_one_home():
    """rotate_half / unrotate live in kvaccel.rope, text_config and the shipped-gate folder in kvaccel.gate_files;
    the modules that used to define their own copies use these. unrotate takes the forward's RoPE tables with or
    without the head axis (a batch of 2 with 2 heads: a missing axis would broadcast the batch over the heads)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    import kvaccel.rope
    from kvaccel.gate_files import text_config
    from kvaccel.patches.evict import expected_attention
    from kvaccel.patches.prefill import seer_gate

    for name in ("rotate_half", "unrotate"):
        assert getattr(expected_attention, name) is getattr(kvaccel.rope, name) is getattr(seer_gate, name)
    model = tiny_model("llama")
    q = torch.randn(2, 2, 9, model.config.head_dim, dtype=torch.float64)
    pos = torch.tensor([list(range(9)), list(range(30, 39))])
    cos, sin = (t.double() for t in model.model.rotary_emb(q, pos))  # (B, L, D)
    rotated, _ = apply_rotary_pos_emb(q, q, cos, sin)
    for c, s in ((cos, sin), (cos[:, None], sin[:, None])):
        torch.testing.assert_close(kvaccel.rope.unrotate(rotated, c, s), q, atol=1e-12, rtol=0)
    assert text_config(model) is model.config
    assert AttentionGates.shipped_dir("m") == ag.DATA_DIR / "attention_gate_m"
    assert seer_gate.shipped_gate_dir("m") == seer_gate.SeerGate.shipped_dir("m") == seer_gate.DATA_DIR / "seer_gate_m"
    assert (AttentionGates.shipped_dir("SmolLM2-135M-Instruct") / "gate.safetensors").is_file()
    assert (seer_gate.shipped_gate_dir("SmolLM2-135M-Instruct") / "gate.safetensors").is_file()


def test_straight_through_gradient():
    p = torch.tensor([0.2, 0.6, 0.49, 0.9], requires_grad=True)
    f = straight_through(p, 0.5)
    assert f.tolist() == [0.0, 1.0, 0.0, 1.0]
    w = torch.tensor([1.0, -2.0, 3.0, 0.5])
    (f * w).sum().backward()
    torch.testing.assert_close(p.grad, w)  # d(hard)/dp taken as 1: the gradient reaches the probability
    x = torch.tensor([0.3, -1.0], requires_grad=True)
    straight_through(torch.sigmoid(x)).sum().backward()
    s = torch.sigmoid(x.detach())
    torch.testing.assert_close(x.grad, s * (1 - s))  # the sigmoid's gradient


def test_masked_attention_matches_reference():
    torch.manual_seed(0)
    B, Hq, Hkv, L, D = 1, 4, 2, 12, 8
    q, k, v = torch.randn(B, Hq, L, D), torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D)
    keep = (torch.rand(B, Hkv, L) > 0.5).float()
    out = agt.masked_attention(q, k, v, keep, window=3, sink=1, scaling=0.3)
    ref = torch.empty_like(out)
    for h in range(Hq):
        kh = h // (Hq // Hkv)
        for i in range(L):
            js = [j for j in range(i + 1) if i - j < 3 or j < 1 or keep[0, kh, j] > 0]
            w = torch.softmax(q[0, h, i] @ k[0, kh, js].T * 0.3, -1)
            ref[0, h, i] = w @ v[0, kh, js]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _naive_observation_feature(q, k, scale, valid=None):
    """log(n · maxpool_7(s) + 1e-3), s = attention each key receives from the last W queries (causal), averaged over
    queries and a kv head's query heads; one loop per (batch, head, query)."""
    B, Hq, W, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    G = Hq // Hkv
    s = torch.zeros(B, Hkv, T, dtype=torch.float64)
    for b in range(B):
        ok = torch.ones(T, dtype=torch.bool) if valid is None else valid[b, 0]
        for h in range(Hq):
            for i in range(W):
                js = [j for j in range(T - W + i + 1) if ok[j]]
                p = torch.softmax(q[b, h, i].double() @ k[b, h // G, js].double().T * scale, -1)
                s[b, h // G, js] += p / (W * G)
        n = float(ok.sum())
        s[b] = n * torch.nn.functional.max_pool1d(s[b][:, None], 7, 1, 3)[:, 0]
    return torch.log(s + 1e-3).float()


def test_observation_feature_matches_naive():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 23, 8)
    torch.testing.assert_close(ag.observation_feature(q, k, 0.4), _naive_observation_feature(q, k, 0.4),
                               rtol=1e-4, atol=1e-4)
    valid = torch.ones(2, 1, 23, dtype=torch.bool)
    valid[1, :, :6] = False  # left padding
    torch.testing.assert_close(ag.observation_feature(q, k, 0.4, valid), _naive_observation_feature(q, k, 0.4, valid),
                               rtol=1e-4, atol=1e-4)


def _observing_gates(model, tmp_path, window: int, seed: int):
    """Gates with the global-context term over 6 queries and random direct / term weights; ``(gates, saved path)``."""
    g = AttentionGates.for_model(model, gate_dim=4, gate_window=8, window=window, sink=2, observation_window=6)
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in g.layers:
            torch.nn.init.normal_(layer.direct.weight, std=0.4)
            layer.direct.bias.zero_()
            torch.nn.init.normal_(layer.obs_scale, std=1.0)
            torch.nn.init.normal_(layer.obs_bias, std=0.3)
    return g, g.save(tmp_path / "gate")


def test_observation_term_flags_at_prefill_and_decode(tmp_path):
    """Prompt tokens: σ(gate + a_h·g + c_h) with g from the prompt's last queries; decode tokens: σ(gate + c_h)."""
    model = tiny_model("llama")
    g, path = _observing_gates(model, tmp_path, window=64, seed=2)
    ids = _prompt(model, 30)
    nxt = [5, 9, 11, 13]
    cache = KVAccelCache(model)
    method = AttentionGate(weights=str(path))
    with kvaccel.patched(model, method):
        method._defer = False  # score decode tokens as they come (else they wait until `window` are pending)
        model(ids, cache=cache, use_cache=True)
        for t in nxt[:-1]:
            model(torch.tensor([[t]]), cache=cache, use_cache=True)
    full = torch.cat([ids, torch.tensor([nxt[:-1]])], dim=1)  # window 64: nothing evicted, so x/q/k are the stock ones
    records = agt.record_layers(model, full)
    n_flagged = 0
    for li, (x, q, k, _) in enumerate(records):
        gate = g.layers[li]
        with torch.no_grad():
            logit = gate(x)[0]
            obs = ag.observation_feature(q[:, :, 24:30], k[:, :, :30], q.shape[-1] ** -0.5)
            want = torch.cat([logit[..., :30] + gate.observation_logits(obs),
                              logit[..., 30:] + gate.observation_logits(None)], dim=-1) > 0
        want[..., :2] = True  # sinks
        got = cache.layers[li].token_state[ag.STATE_KEY]
        assert torch.equal(got, want), li
        n_flagged += int((~want).sum())
    assert n_flagged > 0


def test_removed_objectives_are_clear_errors():
    """The "lm" and "local" objectives masked the keys prompt queries see, which inference never does: refused."""
    from kvaccel.training import gate_kind

    build = gate_kind("attention_gate").build
    for objective in ("lm", "local"):
        with pytest.raises(ValueError, match=rf"objective \('{objective}'\) was removed.*prompt queries"):
            build(tiny_model("llama"), dict(objective=objective))
    with pytest.raises(ValueError, match=r"rows \(16\) is no longer a recipe key"):
        build(tiny_model("llama"), dict(rows=16))
    with pytest.raises(ValueError, match=r"objective \('kl'\) must be 'distill'"):
        build(tiny_model("llama"), dict(objective="kl"))
    assert build(tiny_model("llama"), dict(observation_window=0)).observation_window == 0


def test_training_loss_decreases(tmp_path):
    from kvaccel.training import gate_kind

    torch.manual_seed(0)
    model = tiny_model("llama").requires_grad_(False)
    gk = gate_kind("attention_gate")
    rec = dict(gate_dim=4, gate_window=8, window=4, sink=1, target_evict=0.5, continuation=16)
    gates = gk.build(model, rec)
    opt = torch.optim.AdamW(gates.parameters(), lr=2e-2)
    tgt = gk.target(model, torch.randint(3, 500, (1, 48)))
    losses = []
    for _ in range(8):
        loss = gk.loss(gates, tgt)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert min(losses[-3:]) < 0.8 * losses[0], losses
    assert model.config._attn_implementation == "sdpa"
    assert not any(m._forward_pre_hooks for m in kvaccel.api._attention_modules(model))
    out = gk.save(gates, tmp_path / "g", rec)
    assert AttentionGates.load(out).meta["recipe"]["objective"] == "distill"


def test_local_term_is_the_continuation_attention_per_layer():
    """The per-layer term of the loss is the attention-output distortion of the continuation queries, each seeing
    the prompt keys the gates keep (+ sinks + the recent window) and the continuation: the inference rule. Prompt
    queries are never masked (a naive loop over queries and keys, float64)."""
    from kvaccel.training import gate_kind

    model = tiny_model("llama").requires_grad_(False)
    gk = gate_kind("attention_gate")
    L, R, P, window, sink = 32, 16, 16, 4, 1  # P is drawn in [max(sink + 1, L // 2), L - R]: here always 16
    rec = dict(gate_dim=4, gate_window=8, window=window, sink=sink, continuation=R, observation_window=0)
    gates = gk.build(model, rec)
    torch.manual_seed(3)
    with torch.no_grad():
        for layer in gates.layers:
            torch.nn.init.normal_(layer.direct.weight, std=0.5)
            layer.direct.bias.zero_()
    ids = torch.randint(3, 500, (1, L), generator=torch.Generator().manual_seed(1))
    parts = {}
    for w in (0.0, 1.0):
        gates.meta["recipe"]["local_weight"] = w
        with torch.no_grad():
            parts[w] = agt.gate_loss(gates, gk.target(model, ids), return_parts=True)[1]["distortion"]
    errs, n_masked = [], 0
    for gate, (x, q, k, v) in zip(gates.layers, agt.record_layers(model, ids), strict=True):
        with torch.no_grad():
            flags = gate(x)[0][0, :, :P] > 0  # (H_kv, P)
        q, k, v = q[0].double(), k[0].double(), v[0].double()
        G = q.shape[0] // k.shape[0]
        num = den = 0.0
        for h in range(q.shape[0]):
            for i in range(P, P + R):
                seen = [j for j in range(i + 1) if j >= P or j < sink or i - j < window or bool(flags[h // G, j])]
                n_masked += i + 1 - len(seen)
                full = torch.softmax(q[h, i] @ k[h // G, : i + 1].T * q.shape[-1] ** -0.5, -1) @ v[h // G, : i + 1]
                gated = torch.softmax(q[h, i] @ k[h // G, seen].T * q.shape[-1] ** -0.5, -1) @ v[h // G, seen]
                num += float(((gated - full) ** 2).sum())
                den += float((full**2).sum())
        errs.append(num / den)
    assert n_masked > 0
    assert parts[1.0] - parts[0.0] == pytest.approx(sum(errs) / len(errs), rel=1e-4, abs=1e-7)


def test_train_gate_function(tmp_path):
    """The trainer (accelerate) runs the attention_gate kind end to end on a tiny model."""
    from kvaccel.training import train_gate

    class Tok:
        def __call__(self, text, add_special_tokens=False, return_tensors="pt"):
            return {"input_ids": torch.tensor([[3 + (ord(c) % 400) for c in text]])}

    model = tiny_model("llama")
    texts = ["".join(chr(97 + (i * 7 + j) % 26) for j in range(80)) for i in range(3)]
    summary = train_gate("attention_gate", model, Tok(), data=texts, steps=3, out=tmp_path / "ag", seq_len=64,
                         recipe=dict(gate_dim=4, gate_window=8, window=4), progress=False)
    gates = AttentionGates.load(summary["out"])
    gates.check_model(model)
    assert gates.meta["recipe"]["steps"] == 3 and len(summary["losses"]) == 3


def _prompt(model, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (1, n), generator=g)


@pytest.mark.parametrize("family", FAMILIES3)
def test_keep_all_equals_full_attention(family, tmp_path):
    model = tiny_model(family)
    path = _gates(model, tmp_path, bias=-20.0)  # every flag says evict ...
    ids = _prompt(model)
    ref = model.generate(ids, max_new_tokens=6, do_sample=False)
    with kvaccel.patched(model, AttentionGate(weights=str(path), threshold=0.0)):  # ... but threshold 0 keeps all
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
        rep = kvaccel.report(model)
    assert torch.equal(out, ref)
    assert rep["kv_bytes_full"] > 0 and all(k == [[ids.shape[1] + 5] * model.config.num_key_value_heads]
                                            for k in rep["kept_tokens"])


def _random_gates(model, tmp_path, window: int, seed: int, bias: float):
    """Gate files whose flags depend on the token: random direct weights (std 0.5) and a common bias."""
    path = _gates(model, tmp_path, window=window)
    gates = AttentionGates.load(path)
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in gates.layers:
            torch.nn.init.normal_(layer.direct.weight, std=0.5)
            layer.direct.bias.fill_(bias)
    gates.save(path)
    return path


def test_evicts_flagged_tokens_and_bytes_match(tmp_path):
    model = tiny_model("llama")
    path = _random_gates(model, tmp_path, window=4, seed=1, bias=0.0)
    ids = _prompt(model, 50)
    cache = KVAccelCache(model)
    with kvaccel.patched(model, AttentionGate(weights=str(path))):
        model(ids, cache=cache, use_cache=True)
        rep = kvaccel.report(model)
        nxt = torch.tensor([[7]])
        for _ in range(8):  # decode: tokens flagged evict drop out once they leave the window
            model(nxt, cache=cache, use_cache=True)
        rep2 = kvaccel.report(model)
    kept = torch.tensor(rep["kept_tokens"])  # (layers, B, H)
    assert (kept < 50).any() and (kept >= 4 + 2).all()
    # bytes: keys+values of the padded per-head storage + validity + one flag byte per slot, spare slots included
    # (cache layout: a buffer reallocated for T slots gets max(4, T / 32) more)
    for layer in cache.layers:
        B, H, T, D = layer.keys.shape
        valid_bytes = 0 if layer.valid is None else layer.valid.shape[0] * layer.valid.shape[1]
        per_slot = 2 * B * H * D * layer.keys.element_size() + B * H + valid_bytes
        slots = layer.nbytes() / per_slot
        assert T <= slots <= T + max(4, T // 32), (T, slots)
    assert rep2["kv_bytes"] == cache.nbytes()
    for li, layer in enumerate(cache.layers):
        flags = layer.token_state[ag.STATE_KEY]
        valid = layer.full_valid().expand_as(flags)
        n = valid.sum(-1)
        assert torch.equal(n, torch.tensor(rep2["kept_tokens"][li]))
        # every held token outside the recent window and the sinks is flagged keep
        from_end = valid.flip(-1).cumsum(-1).flip(-1)
        old = valid & (from_end > 4)
        assert bool(flags[old].all()), li
    assert rep2["kv_bytes"] < rep2["kv_bytes_full"]


def test_deferred_scoring_and_skipped_counts_evict_as_every_step(tmp_path):
    """Decode scores tokens in groups and skips counting droppable tokens until a head could have reached the batch
    size: the cache after every step equals the one of a run that scores and counts at every step."""
    model = tiny_model("llama")
    path = _random_gates(model, tmp_path, window=3, seed=3, bias=-0.3)
    ids = _prompt(model, 70)
    steps = torch.randint(3, 500, (40,), generator=torch.Generator().manual_seed(4))
    states, caches = [], []
    for every_step in (False, True):
        method, cache, seen = AttentionGate(weights=str(path)), KVAccelCache(model), []
        with kvaccel.patched(model, method):
            model(ids, cache=cache, use_cache=True)
            for i, t in enumerate(steps):
                if every_step:
                    method._check_at.clear()
                    method._defer = False
                if i == 21:  # tokens fed while paused, with decode tokens pending before them
                    with kvaccel.paused(model):
                        model(ids[:, :5], cache=cache, use_cache=True)
                model(t.view(1, 1), cache=cache, use_cache=True)
                seen.append([(la.keys.clone(), la.full_valid().clone(), la.kept_per_head().clone())
                             for la in cache.layers])
        states.append(seen)
        caches.append(cache)
    n_evictions = 0
    for step, (a, b) in enumerate(zip(*states, strict=True)):
        for (ka, va, na), (kb, vb, nb) in zip(a, b, strict=True):
            assert torch.equal(va, vb) and torch.equal(ka, kb) and torch.equal(na, nb), step
        n_evictions += step > 0 and bool((a[0][2] <= states[0][step - 1][0][2]).any())
    assert n_evictions > 0
    for la, lb in zip(caches[0].layers, caches[1].layers, strict=True):  # flags outside the recent window
        va = la.full_valid().expand_as(la.token_state[ag.STATE_KEY])
        old = va & (va.flip(-1).cumsum(-1).flip(-1) > 3)
        assert torch.equal(la.token_state[ag.STATE_KEY][old], lb.token_state[ag.STATE_KEY][old])


def test_left_padded_batch_equals_each_sequence_alone(tmp_path):
    """Gate context, sinks, the global-context term and the recent window count real tokens only: a left-padded
    batch keeps, per row, the tokens that row keeps alone, and gives the same logits after prefill and one step."""
    model = tiny_model("llama")
    _, path = _observing_gates(model, tmp_path, window=4, seed=5)
    ids = torch.randint(3, 500, (2, 40), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, :11] = 0
    nxt = torch.tensor([[17], [23]])

    def run(i, m, step):
        cache = KVAccelCache(model)
        with kvaccel.patched(model, AttentionGate(weights=str(path))):
            first = model(i, attention_mask=m, cache=cache, use_cache=True).logits[:, -1]
            m2 = None if m is None else torch.cat([m, torch.ones_like(m[:, :1])], dim=1)
            second = model(step, attention_mask=m2, cache=cache, use_cache=True).logits[:, -1]
            kept = torch.tensor(kvaccel.report(model)["kept_tokens"])  # (layers, B, H)
        return first, second, kept

    both = run(ids.masked_fill(mask == 0, 0), mask, nxt)
    for row in range(2):
        real = ids[row : row + 1, int((mask[row] == 0).sum()) :]
        alone = run(real, None, nxt[row : row + 1])
        assert (alone[2] < real.shape[1] + 1).any()  # something was evicted
        torch.testing.assert_close(both[0][row], alone[0][0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(both[1][row], alone[1][0], rtol=1e-4, atol=1e-4)
        assert torch.equal(both[2][:, row], alone[2][:, 0]), row


def test_tokens_fed_while_paused_are_kept(tmp_path):
    model = tiny_model("llama")
    path = _gates(model, tmp_path, bias=-20.0, window=2)  # every scored token is evicted once out of the window
    cache = KVAccelCache(model)
    with kvaccel.patched(model, AttentionGate(weights=str(path))):
        model(_prompt(model, 20), cache=cache, use_cache=True)
        with kvaccel.paused(model):
            model(_prompt(model, 10, seed=1), cache=cache, use_cache=True)
        for _ in range(4):
            model(torch.tensor([[7]]), cache=cache, use_cache=True)
    # 2 sinks + 10 paused tokens + the last 2 tokens (window)
    assert torch.equal(cache.layers[0].kept_per_head(), torch.full((1, 2), 14))


def test_hook_removed_after_unpatch(tmp_path):
    model = tiny_model("llama")
    path = _gates(model, tmp_path)
    mods = kvaccel.api._attention_modules(model)
    before = [dict(m._forward_pre_hooks) for m in mods]
    kvaccel.patch(model, AttentionGate(weights=str(path)))
    assert all(len(m._forward_pre_hooks) == len(b) + 2 for m, b in zip(mods, before, strict=True))
    kvaccel.unpatch(model)
    assert [dict(m._forward_pre_hooks) for m in mods] == before
    assert not any(k.startswith("_ag") or k.startswith("_kvaccel") for m in mods for k in m.__dict__)


@pytest.mark.real_model
def test_shipped_gates_default_model(default_model):
    model, tok = default_model
    ids = tok("The quick brown fox jumps over the lazy dog. " * 30, return_tensors="pt")["input_ids"]
    with kvaccel.patched(model, "attention_gate"):
        model(ids, use_cache=True)
        rep = kvaccel.report(model)
    assert rep["kv_ratio"] < 0.8


@pytest.mark.parametrize("family", FAMILIES3)
def test_distill_replays_the_full_model_when_everything_is_kept(family):
    """Objective "distill": with every flag *keep*, the continuation run over the recorded prompt k/v (positions
    P..P+R) reproduces the full model's next-token distributions (KL 0); with every flag *evict* it does not."""
    from kvaccel.training import gate_kind

    model = tiny_model(family).requires_grad_(False)
    gk = gate_kind("attention_gate")
    rec = dict(gate_dim=4, gate_window=8, window=4, sink=1, continuation=8, local_weight=0.0)
    gates = gk.build(model, rec)
    assert gates.observation_window == 32  # the distill default: the global-context term ...
    with torch.no_grad():
        for layer in gates.layers:
            layer.obs_scale.zero_()  # ... switched off here, so that every flag says keep
    tgt = gk.target(model, torch.randint(3, 500, (1, 64), generator=torch.Generator().manual_seed(0)))
    torch.manual_seed(0)
    _, parts = agt.gate_loss(gates, tgt, return_parts=True)
    assert abs(parts["distortion"]) < 1e-5 and parts["keep_rate"] == 1.0
    with torch.no_grad():
        for layer in gates.layers:
            layer.direct.bias.fill_(-20.0)
    _, parts = agt.gate_loss(gates, tgt, return_parts=True)
    assert parts["distortion"] > 1e-3 and parts["keep_rate"] == 0.0
