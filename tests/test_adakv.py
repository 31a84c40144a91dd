"""AdaKV: per-head adaptive budgets stored packed (bytes = budget), exact with budget = all, same outputs as the
padded layout, batch / beam search / prompt chunks."""

from __future__ import annotations

import pytest
import torch

import kvaccel
from kvaccel.cache import KVAccelCache, KVAccelLayer
from kvaccel.patches.evict.adakv import AdaKV, ada_select
from kvaccel.varlen_cache import VarlenLayer

from conftest import tiny_model


def test_ada_select_by_hand():
    inf = float("-inf")
    scores = torch.tensor([[[9.0, 8.0, 7.0, 6.0], [1.0, 0.5, 0.2, inf]]])  # head 1 has an invalid slot
    idx, sv = ada_select(scores, capacity=2, alpha=0.5)  # floor 1 per head, 4 slots in all
    kept = [sorted(idx[0, h][sv[0, h]].tolist()) for h in range(2)]
    assert kept == [[0, 1, 2], [0]]  # head 0 wins the shared slots, head 1 keeps its safeguard token
    idx, sv = ada_select(scores, capacity=2, alpha=0.0)
    assert [sorted(idx[0, h][sv[0, h]].tolist()) for h in range(2)] == [[0, 1, 2, 3], []]


@pytest.mark.parametrize("layout", ["varlen", "padded"])
def test_adakv_budget_all_is_token_identical(layout):
    model = tiny_model("llama")
    ids = torch.randint(3, 512, (1, 50), generator=torch.Generator().manual_seed(1))
    gen = {"max_new_tokens": 32, "min_new_tokens": 32, "do_sample": False}
    ref = model.generate(ids, **gen)
    with kvaccel.patched(model, "adakv", budget=10_000, layout=layout):
        assert torch.equal(model.generate(ids, **gen), ref)


def _storage_bytes(cache: KVAccelCache) -> int:
    """Bytes of every distinct tensor storage the cache's layers hold (views counted once, whole)."""
    seen, total = set(), 0
    for layer in cache.layers:
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in seen:
                seen.add(value.untyped_storage().data_ptr())
                total += value.untyped_storage().nbytes()
    return total


def _token_bytes(model, tokens_per_head: int, batch: int) -> int:
    """Keys + values of ``tokens_per_head`` tokens per kv head in every layer (fp32 tiny model)."""
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers * batch * cfg.num_key_value_heads * tokens_per_head * 2 * head_dim * 4


def test_adakv_varlen_holds_the_budget_in_bytes():
    """Ragged per-head budgets, packed: bytes = budget within 5% by report() and by the tensors held, after the
    prompt and after decoding (the growth slack is counted)."""
    model = tiny_model("llama")
    ids = torch.randint(3, 512, (2, 512), generator=torch.Generator().manual_seed(2))
    with kvaccel.patched(model, "adakv(budget=128, alpha_safeguard=0.25)"), torch.no_grad():
        cache = KVAccelCache(model)
        out = model(ids, cache=cache, use_cache=True)
        ragged = False
        for layer in cache.layers:
            assert isinstance(layer, VarlenLayer)
            kept = layer.kept_per_head()  # (B, H)
            assert (kept.sum(-1) == 128 * kept.shape[1]).all()  # H x budget slots per sequence
            assert (kept >= 32).all()  # the safeguard
            ragged |= len(set(kept.flatten().tolist())) > 1
        assert ragged
        for steps in (0, 8):
            for _ in range(steps):
                tok = out.logits[:, -1:].argmax(-1)
                out = model(tok, cache=cache, use_cache=True)
            r = kvaccel.report(model)
            budget = _token_bytes(model, 128 + steps, batch=2)
            assert r["kv_bytes"] == cache.nbytes() == _storage_bytes(cache)
            assert budget <= r["kv_bytes"] <= 1.05 * budget, (r["kv_bytes"], budget)
            assert r["kv_ratio"] < 0.3
        assert cache.get_seq_length() == 520


def test_adakv_padded_layout_pads_to_the_longest_head():
    model = tiny_model("llama")
    ids = torch.randint(3, 512, (2, 256), generator=torch.Generator().manual_seed(2))
    with kvaccel.patched(model, "adakv(budget=64, alpha_safeguard=0.25, layout='padded')"), torch.no_grad():
        cache = KVAccelCache(model)
        model(ids, cache=cache, use_cache=True)
        for layer in cache.layers:
            kept = layer.kept_per_head()
            assert type(layer) is KVAccelLayer and (kept.sum(-1) == 64 * kept.shape[1]).all()
            assert layer.keys.shape[2] == int(kept.max()) < 256  # padded to the longest head only


def _teacher_forced_logits(model, spec: str, ids: torch.Tensor, continuation: torch.Tensor) -> torch.Tensor:
    with kvaccel.patched(model, spec), torch.no_grad():
        cache = KVAccelCache(model)
        logits = [model(ids, cache=cache, use_cache=True).logits[:, -1]]
        for i in range(continuation.shape[1]):
            logits.append(model(continuation[:, i : i + 1], cache=cache, use_cache=True).logits[:, -1])
    return torch.stack(logits, 1)


def test_adakv_varlen_decode_equals_the_padded_layout():
    """Same selection, two layouts: the packed layout's decode logits equal the padded layout's."""
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(3)
    ids, cont = torch.randint(3, 512, (2, 300), generator=gen), torch.randint(3, 512, (2, 12), generator=gen)
    varlen = _teacher_forced_logits(model, "adakv(budget=64)", ids, cont)
    padded = _teacher_forced_logits(model, "adakv(budget=64, layout='padded')", ids, cont)
    torch.testing.assert_close(varlen, padded, atol=1e-5, rtol=1e-4)


def test_adakv_varlen_prompt_in_chunks():
    """A second prompt chunk attends the packed layer (Q > 1, causal among the chunk) as the padded layout does,
    then the budget is re-applied over the whole prompt."""
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randint(3, 512, (2, 200), generator=gen), torch.randint(3, 512, (2, 40), generator=gen)
    logits = {}
    for layout in ("varlen", "padded"):
        with kvaccel.patched(model, f"adakv(budget=0.25, layout='{layout}')"), torch.no_grad():
            cache = KVAccelCache(model)
            model(a, cache=cache, use_cache=True)
            logits[layout] = model(b, cache=cache, use_cache=True).logits
            for layer in cache.layers:
                kept = layer.kept_per_head()
                assert (kept.sum(-1) == 60 * kept.shape[1]).all()  # 0.25 of the 240 prompt tokens
                assert isinstance(layer, VarlenLayer) == (layout == "varlen")
    torch.testing.assert_close(logits["varlen"], logits["padded"], atol=1e-5, rtol=1e-4)


def test_adakv_generate_batch_of_two_equals_each_alone():
    model = tiny_model("llama")
    ids = torch.randint(3, 512, (2, 200), generator=torch.Generator().manual_seed(5))
    gen = {"max_new_tokens": 12, "min_new_tokens": 12, "do_sample": False}
    with kvaccel.patched(model, "adakv(budget=48)"), torch.no_grad():
        both = model.generate(ids, **gen)
        assert kvaccel.report(model)["kv_ratio"] < 0.35
        alone = torch.cat([model.generate(ids[i : i + 1], **gen) for i in range(2)])
    assert torch.equal(both, alone)


def test_adakv_left_padded_batch_same_tokens_in_both_layouts():
    """Left padding is never stored in the packed segments; generation equals the padded layout's."""
    model = tiny_model("llama")
    ids = torch.randint(3, 512, (2, 180), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    mask[1, :30] = 0
    ids[1, :30] = 0
    gen = {"attention_mask": mask, "max_new_tokens": 10, "min_new_tokens": 10, "do_sample": False}
    out = {}
    for layout in ("varlen", "padded"):
        with kvaccel.patched(model, f"adakv(budget=40, layout='{layout}')"), torch.no_grad():
            out[layout] = model.generate(ids, **gen)
            kept = kvaccel.report(model)["kept_tokens"]
        assert all(sum(row) == (40 + 9) * len(row) for layer in kept for row in layer)  # + 9 decode forwards
    assert torch.equal(out["varlen"], out["padded"])


def test_adakv_beam_search_scores_what_it_returns():
    """Beam reordering moves whole packed segments: each beam's score equals its log-probability recomputed on a
    fresh cache with the same eviction."""
    model = tiny_model("llama")
    prompt = torch.randint(3, 500, (1, 120), generator=torch.Generator().manual_seed(6))
    with kvaccel.patched(model, "adakv(budget=40)"), torch.no_grad():
        res = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, num_beams=3, num_return_sequences=3,
                             do_sample=False, length_penalty=0.0, early_stopping=False,
                             output_scores=True, return_dict_in_generate=True)
        seqs = res.sequences[:, prompt.shape[1]:]
        assert len({tuple(s.tolist()) for s in seqs}) == 3
        for seq, score in zip(seqs, res.sequences_scores, strict=True):
            cache = KVAccelCache(model)
            out = model(prompt, cache=cache, use_cache=True)
            assert isinstance(cache.layers[0], VarlenLayer)
            total = 0.0
            for tok in seq.tolist():
                total += float(torch.log_softmax(out.logits[0, -1].float(), -1)[tok])
                out = model(torch.tensor([[tok]]), cache=cache, use_cache=True)
            assert total == pytest.approx(float(score), abs=1e-3)


def test_adakv_varlen_refuses_channel_pruning_and_names_the_fix():
    model = tiny_model("llama")
    ids = torch.randint(3, 512, (1, 200), generator=torch.Generator().manual_seed(8))
    with pytest.raises(NotImplementedError, match="layout='padded'"):  # refused by patch(), nothing installed
        kvaccel.patch(model, "adakv(budget=0.25)+think")
    assert not kvaccel.is_patched(model)
    think = kvaccel.parse_spec("think")[0]
    with pytest.raises(NotImplementedError, match="channels method 'think'"):
        AdaKV().check_stages({"evict": AdaKV(), "channels": think})  # usable at patch time
    AdaKV(layout="padded").check_stages({"evict": AdaKV(layout="padded"), "channels": think})
    with kvaccel.patched(model, "adakv(budget=0.25, layout='padded')+think"):
        assert model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False).shape == (1, 202)


def test_adakv_bad_input():
    with pytest.raises(ValueError, match="inner"):
        AdaKV(inner="h2o")
    with pytest.raises(ValueError, match="alpha_safeguard"):
        AdaKV(alpha_safeguard=1.5)
    with pytest.raises(ValueError, match="budget"):
        AdaKV(budget=0)
    with pytest.raises(ValueError, match="layout"):
        AdaKV(layout="ragged")
