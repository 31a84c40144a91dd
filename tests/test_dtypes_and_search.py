"""bf16 end to end on the default model against fp32, and beam search under eviction checked for content."""

from __future__ import annotations

import copy

import pytest
import torch

import kvaccel
from kvaccel.compare import prompt_ids

from conftest import tiny_model

# Methods at settings that really compress a 1.1k-token prompt (prefill methods run sparse: above min_length).
BF16_METHODS = [
    "streaming(budget=0.25)", "snapkv(budget=0.25)", "h2o(budget=0.25)", "keyformer(budget=0.25)",
    "expected_attention(budget=0.25)", "adakv(budget=0.25)", "snapkv(budget=0.25)+think(ratio=0.4)",
    "a_shape(local_blocks=4)", "pbs", "vertical_slash", "sale", "seer",
]


@pytest.fixture(scope="module")
def bf16_model(default_model):
    model, tok = default_model
    return copy.deepcopy(model).to(torch.bfloat16).eval(), tok


@pytest.mark.real_model
def test_bf16_identity_with_no_method(bf16_model):
    model, tok = bf16_model
    ids = prompt_ids(tok, 400)
    with torch.no_grad():
        stock = model.generate(ids, max_new_tokens=16, do_sample=False)
        with kvaccel.patched(model):
            ours = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(stock, ours)


EVICTING = ("streaming", "snapkv", "h2o", "keyformer", "expected_attention", "adakv")
DECODE_STEPS = 4
# bf16 against fp32 on this prompt, measured (SmolLM2-135M, CPU, torch 2.x): the stock model's next-token KL is at
# most 1e-3 over the prefill and 4 decode steps; a method's at most 1.4e-2 (snapkv + think, first decode step: ThinK
# keeps 0.9 of the same key channels per head at worst, SnapKV 0.85 of the same tokens); kept-token overlap per layer
# and head >= 0.85, mean >= 0.97; prefill density within 0.0012 on the mean over layers, 0.042 on one layer (sale),
# 0.005 for the other methods. The tolerances below leave about 2x room or more for rounding, not for a wrong path.
KL_TOL = 3e-2
# keyformer re-ranks its held tokens at every decode step (scores plus fixed Gumbel noise): a near tie that bf16
# rounding flips evicts another token for a step. On an AMD EPYC VM (AVX2, 2026-12-06) decode step 3 measured 0.058
# (the other steps <= 0.0084; kept tokens and overlap within the bounds below); on the VM the bounds came from, <= 0.014
KEYFORMER_KL_TOL = 1e-1
MIN_OVERLAP, MEAN_OVERLAP = 0.7, 0.94
DENSITY_MEAN_TOL, DENSITY_LAYER_TOL = 0.005, 0.08


@pytest.fixture(scope="module")
def bf16_reference(default_model, bf16_model):
    """The prompt, the fp32 stock model's greedy continuation, and per dtype the stock per-layer values."""
    model, tok = default_model
    ids = prompt_ids(tok, 1100)
    with torch.no_grad():
        cont = model.generate(ids, max_new_tokens=DECODE_STEPS, do_sample=False)[0, ids.shape[1]:].tolist()
        values = {m.dtype: [la.values.float() for la in m(ids, use_cache=True).cache.layers]
                  for m in (model, bf16_model[0])}
    return ids, cont, values


def _patched_run(model, spec: str, ids: torch.Tensor, cont: list[int]):
    """Prefill then ``cont`` token by token under ``spec``: last-position logits of each forward ``(1 + n, V)``
    float32, the report after the prefill and what each layer held then (``(shape, dtype)`` of every tensor; the
    values of each head's held tokens)."""
    with torch.no_grad(), kvaccel.patched(model, spec):
        out = model(ids, use_cache=True, logits_to_keep=1)
        rep, cache = kvaccel.report(model), out.cache
        held = [([(tuple(t.shape), t.dtype) for t in la.tensors()], _held_values(la)) for la in cache.layers]
        dtypes = {out.logits.dtype} | {t.dtype for la in cache.layers for t in (la.keys, la.values) if t is not None}
        logits = [out.logits[0, -1].float()]
        for t in cont:
            logits.append(model(torch.tensor([[t]]), cache=cache, use_cache=True).logits[0, -1].float())
    return torch.stack(logits), rep, held, dtypes


def _held_values(layer) -> list[list[tuple[torch.Tensor, torch.Tensor | None]]]:
    """Per head: ``(values, value channels or None)`` of the real tokens it holds, per cache segment."""
    from kvaccel.varlen_cache import VarlenLayer

    if isinstance(layer, VarlenLayer):  # AdaKV: per-head ragged segments
        segments = [(layer.dense_values(), layer.full_valid(), None)]
    else:
        segments = [(layer.values, layer.valid, None)]
        if layer.narrow is not None:  # ThinK: older tokens with pruned channels
            segments.append((layer.narrow.values, layer.narrow.valid, layer.narrow.value_idx))
    heads = []
    for h in range(segments[0][0].shape[1]):
        per = []
        for v, valid, vidx in segments:
            rows = v[0, h] if valid is None else v[0, h][valid[0, min(h, valid.shape[1] - 1)]]
            per.append((rows.float(), None if vidx is None else vidx[0, h]))
        heads.append(per)
    return heads


def _positions(held_values, stock_values) -> list[set[int]]:
    """The prompt positions of the tokens each (layer, head) holds: the nearest stock value of that layer and head."""
    out = []
    for heads, full in zip(held_values, stock_values, strict=True):
        for h, segments in enumerate(heads):
            pos: set[int] = set()
            for rows, vidx in segments:
                ref = full[0, h] if vidx is None else full[0, h][:, vidx]
                if rows.numel():
                    pos |= set(torch.cdist(rows, ref).argmin(-1).tolist())
            out.append(pos)
    return out


def _next_token_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    lp, lq = torch.log_softmax(p, -1), torch.log_softmax(q, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


@pytest.mark.real_model
@pytest.mark.parametrize("spec", BF16_METHODS)
def test_bf16_every_method_matches_its_fp32_run(default_model, bf16_model, bf16_reference, spec):
    """In bf16 each method keeps what its fp32 run keeps (the same token counts and cache tensors, the same tokens
    up to near ties), computes about the same prefill tiles, and its next-token distributions over the prefill and
    4 decode steps stay within a bf16 tolerance of the fp32 run's; the cache holds bf16 keys and values."""
    ids, cont, stock_values = bf16_reference
    p32, r32, held32, _ = _patched_run(default_model[0], spec, ids, cont)
    p16, r16, held16, dtypes = _patched_run(bf16_model[0], spec, ids, cont)
    assert dtypes == {torch.bfloat16}  # logits, and the cache keeps the model's dtype
    kl = _next_token_kl(p32, p16)
    assert float(kl.max()) <= (KEYFORMER_KL_TOL if spec.startswith("keyformer") else KL_TOL), kl.tolist()
    if spec.startswith("adakv"):  # per-head budgets follow the scores; a layer's total is its budget
        assert [sum(map(sum, k)) for k in r16["kept_tokens"]] == [sum(map(sum, k)) for k in r32["kept_tokens"]]
    else:
        assert r16["kept_tokens"] == r32["kept_tokens"]
        for (t32, _), (t16, _) in zip(held32, held16, strict=True):  # the same tensors; fp32 ones (K/V) now bf16
            assert [s for s, _ in t32] == [s for s, _ in t16]
            assert all(b == a or (a, b) == (torch.float32, torch.bfloat16)
                       for (_, a), (_, b) in zip(t32, t16, strict=True))
    if spec.startswith(EVICTING):
        a = _positions([h for _, h in held32], stock_values[torch.float32])
        b = _positions([h for _, h in held16], stock_values[torch.bfloat16])
        overlap = [len(x & y) / len(x | y) for x, y in zip(a, b, strict=True)]
        assert min(overlap) >= MIN_OVERLAP and sum(overlap) / len(overlap) >= MEAN_OVERLAP, overlap
    if spec.startswith(("streaming", "snapkv(budget=0.25)", "h2o", "keyformer", "expected_attention")):
        limit = 0.25 * 1.05 if "think" not in spec else 0.25
        assert 0.2 <= r16["kv_ratio"] <= limit, r16["kv_ratio"]
    elif spec.startswith("adakv"):
        assert r16["kv_ratio"] < 0.5  # per-head budgets, each layer padded to its longest head
    else:  # prefill methods: computed fewer tiles (about as many as in fp32), cache untouched
        assert r16["kv_ratio"] == pytest.approx(1.0)
        d32, d16 = torch.tensor(r32["prefill_density"]), torch.tensor(r16["prefill_density"])
        assert float(d16.mean()) < 1.0
        assert abs(float(d16.mean() - d32.mean())) <= DENSITY_MEAN_TOL, (float(d16.mean()), float(d32.mean()))
        assert float((d16 - d32).abs().max()) <= DENSITY_LAYER_TOL, (d16 - d32).abs().max()


def _teacher_forced_logprob(model, prompt: torch.Tensor, continuation: list[int]) -> float:
    """Sum of log p(token) of ``continuation`` fed one token at a time on a fresh compressed cache."""
    with torch.no_grad():
        cache = kvaccel.KVAccelCache(model)
        out = model(prompt, cache=cache, use_cache=True)
        total = 0.0
        for tok in continuation:
            total += float(torch.log_softmax(out.logits[0, -1].float(), -1)[tok])
            out = model(torch.tensor([[tok]]), cache=cache, use_cache=True)
    return total


def test_beam_search_under_eviction_scores_what_it_returns():
    """Each returned beam's score equals its log-probability recomputed on a fresh cache with the same eviction,
    so beam reordering of an evicting cache keeps every beam's own tokens."""
    model = tiny_model("llama")
    torch.manual_seed(0)
    prompt = torch.randint(3, 500, (1, 96))
    with kvaccel.patched(model, "streaming(budget=40, sink=4)"):
        with torch.no_grad():
            res = model.generate(prompt, max_new_tokens=10, min_new_tokens=10, num_beams=3, num_return_sequences=3,
                                 do_sample=False, length_penalty=0.0, early_stopping=False,
                                 output_scores=True, return_dict_in_generate=True)
        assert kvaccel.report(model)["kv_ratio"] < 0.5  # it did evict
        seqs = res.sequences[:, prompt.shape[1]:]
        assert len({tuple(s.tolist()) for s in seqs}) == 3  # three distinct beams
        for seq, score in zip(seqs, res.sequences_scores, strict=True):
            assert _teacher_forced_logprob(model, prompt, seq.tolist()) == pytest.approx(float(score), abs=1e-3)


def test_sampling_under_eviction_draws_from_the_compressed_cache_distribution():
    """``generate(do_sample=True)`` under eviction draws exactly what a hand-written sampling loop draws from the
    compressed cache's next-token distribution with the same seed (content, not only shape)."""
    model = tiny_model("qwen2")
    torch.manual_seed(1)
    prompt = torch.randint(3, 500, (1, 80))
    with kvaccel.patched(model, "h2o(budget=32)"):
        with torch.no_grad():
            torch.manual_seed(123)
            sampled = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=True, top_k=0, top_p=1.0,
                                     temperature=1.0)[0, prompt.shape[1]:].tolist()
            torch.manual_seed(123)
            cache = kvaccel.KVAccelCache(model)
            out = model(prompt, cache=cache, use_cache=True)
            manual = []
            for _ in range(12):
                probs = torch.softmax(out.logits[:, -1].float(), -1)
                tok = int(torch.multinomial(probs, num_samples=1))
                manual.append(tok)
                out = model(torch.tensor([[tok]]), cache=cache, use_cache=True)
        assert kvaccel.report(model)["kv_ratio"] < 0.6
    assert sampled == manual
    assert len(set(sampled)) > 3  # really sampled (random tiny model: a near-uniform distribution)
