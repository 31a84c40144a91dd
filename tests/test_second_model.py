"""Every method on the second model (Qwen2.5-Coder-1.5B-Instruct: qwen2, 12/2 heads, head size 128), fp32 and bf16.

Opt-in (a 1.5B model on a CPU takes ~30 minutes here): fetch it once with ``kvaccel fetch-model qwen2.5-coder-1.5b``,
then ``make test-second-model`` (``KVACCEL_SECOND_MODEL=qwen2.5-coder-1.5b pytest tests/test_second_model.py``).
Skipped otherwise. Each method runs one greedy generation of 4 tokens after a 1,100-token prompt (above the prefill
methods' ``min_length``); the test checks what the method must do on this shape (real bytes freed, sparse tiles,
host-resident keys, pages selected, codes within the bit width's bytes, finite logits) and writes, per method, KL vs
the stock model at each step while the greedy tokens agree (the prefill's next token, then each decode step) to
``runs/second_model_<dtype>.json``. Methods needing per-model data that only the default model ships with
(gates, patterns, head configurations) are checked to name the command that produces it, and that command is run on
this model (a few steps) with the method then using its output.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import kvaccel
from kvaccel.compare import prompt_ids
from kvaccel.config import parse_spec
from kvaccel.models import head_size, text_config

NAME = os.environ.get("KVACCEL_SECOND_MODEL", "")
pytestmark = [
    pytest.mark.second_model,
    pytest.mark.skipif(not NAME, reason="opt-in: KVACCEL_SECOND_MODEL=qwen2.5-coder-1.5b (make test-second-model)"),
]
PROMPT, STEPS, BUDGET = 1100, 4, 0.25
EVICTION = ["streaming", "snapkv", "h2o", "keyformer", "d2o", "pyramidkv", "adakv", "expected_attention", "kvzip",
            "tova", "knorm", "keydiff"]
PREFILL = ["a_shape(local_blocks=4)", "vertical_slash", "pbs", "sale", "seer(mode='oracle')", "xattention",
           "flexprefill"]
QUEST_BUDGET = 256  # tokens per query head and step: 16 of the ~69 pages of 16 at this length
STORAGE = ["kv_int8", "kv_int4", "kv_fp8", f"snapkv(budget={BUDGET})+kv_int4"]
SPECS = ([f"{m}(budget={BUDGET})" for m in EVICTION] + [f"critical(scorer=snapkv,budget={BUDGET})"]
         + [f"snapkv(budget={BUDGET})+think(ratio=0.4)", "think(ratio=0.4)"] + PREFILL
         + ["retrieval", "retrieval(exact_below=0)", f"quest(budget={QUEST_BUDGET})"] + STORAGE + ["full"])
GEN = dict(max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True, output_logits=True)
RESULTS: dict[str, dict] = {}
TOKENIZER: list = []  # the second model's tokenizer, set by the fixture (the training commands need it)


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def second(request):
    try:
        model, tok = kvaccel.load_model(NAME, dtype=request.param)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    ids = prompt_ids(tok, PROMPT)
    TOKENIZER[:] = [tok]
    with torch.no_grad():
        stock = model.generate(ids, **GEN)
    yield model, ids, torch.stack(stock.logits)[:, 0].float().log_softmax(-1), stock.sequences
    path = Path("runs") / f"second_model_{request.param}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"model": NAME, "dtype": request.param, "prompt": PROMPT, "results": RESULTS}, indent=1))
    RESULTS.clear()


def test_no_method_is_token_identical(second):
    model, ids, _, stock = second
    with torch.no_grad(), kvaccel.patched(model):
        assert torch.equal(model.generate(ids, max_new_tokens=STEPS, do_sample=False), stock)


@pytest.mark.parametrize("spec", SPECS)
def test_method_runs_with_real_savings(second, spec):
    model, ids, ref_logp, stock = second
    with torch.no_grad(), kvaccel.patched(model, spec):
        gen = model.generate(ids, **GEN)
        rep = kvaccel.report(model)
    logits = torch.stack(gen.logits)  # (steps, 1, vocab): the prefill's last position, then each decode step
    assert torch.isfinite(logits).all()
    assert gen.sequences.shape[1] == ids.shape[1] + STEPS
    # KL(stock || method) per step while the greedy tokens so far agree (an eviction acts from the first decode step)
    logp = logits[:, 0].float().log_softmax(-1)
    same = int((gen.sequences[0, ids.shape[1]:] == stock[0, ids.shape[1]:]).cumprod(0).sum())
    kl = [float((ref_logp[t].exp() * (ref_logp[t] - logp[t])).sum()) for t in range(min(same + 1, STEPS))]
    dens = [d for d in rep["prefill_density"] if d is not None]
    density = sum(dens) / len(dens) if dens else None
    host_tokens = sum(rep.get("retrieval_host_tokens") or [0])
    RESULTS[spec] = {"kl_per_step": kl, "same_greedy_tokens": same, "kv_ratio": rep["kv_ratio"],
                     "prefill_density": density, "retrieval_host_tokens": host_tokens, "notes": rep["notes"]}
    for key in ("kv_storage_bytes", "quest_attended_tokens"):
        if key in rep:
            RESULTS[spec][key] = rep[key]
    methods = parse_spec(spec)
    names = [m.name for m in methods]
    name = names[0]
    text = text_config(model)
    head_dim = head_size(text)
    share = 1.0  # bytes held / full's, before a channel or storage method: no eviction
    if name in EVICTION or name == "critical":  # real bytes: the budget's share (+ SnapKV-style windows / sinks)
        n = len(rep["kept_tokens"])
        share = (3 + (n - 3) * BUDGET) / n if name == "d2o" else BUDGET  # d2o keeps layers 0, 1 and the last whole
        assert rep["kv_ratio"] <= share + 0.03, rep
    if "think" in names:  # the pruned key channels' bytes really freed: keys at (D - drop) / D width, values whole
        drop = methods[names.index("think")].pruned_channels(head_dim)
        # + 0.03: a growing cache reallocates with max(4, T / 32) spare slots (kvaccel/cache.py), as an eviction's
        # windows and sinks above; without pruning this ratio would be share + 0.03
        assert rep["kv_ratio"] <= (share + 0.03) * (2 * head_dim - drop) / (2 * head_dim), rep
    if name in [p.split("(")[0] for p in PREFILL]:
        assert density is not None and density < 0.95, rep  # sparse tiles really skipped at this length
    if name == "retrieval":
        assert host_tokens > 0 and rep["kv_ratio"] < 1, rep  # the middle of the prompt lives in host memory
    if name == "quest":
        _check_quest(rep, methods[0], text, head_dim, ids.shape[1], model.dtype)
    if methods[-1].stage == "storage":
        _check_storage(rep, methods[-1], text, head_dim, model.dtype)
    if name == "full":  # the explicit baseline: every token kept, the stock model's tokens and logits
        assert all(k == rep["seen_tokens"] for layer in rep["kept_tokens"] for row in layer for k in row), rep
        assert torch.equal(gen.sequences, stock) and max(kl) < 1e-6, (kl, rep)


@pytest.mark.parametrize(("kind", "spec"), [
    ("seer", "seer(weights='{out}',density=0.5)"), ("attention_gate", "attention_gate(weights='{out}',threshold=0.99)"),
    ("duo_attention", "duo_attention(patterns='{out}',sparsity=0.5)"), ("minference", "minference(config='{out}')")])
def test_training_commands_make_data_the_method_runs_with(second, kind, spec, tmp_path):
    """What ``kvaccel train-gate KIND --model ...`` / ``kvaccel calibrate minference --model ...`` run, on this model
    (a couple of steps on one 1,024-token sequence, one 2,048-token calibration prompt: the commands work on this
    shape; the gates are not useful ones), then the method with their output: it runs and does its part (sparse
    tiles, evicted tokens, streaming heads)."""
    from kvaccel.patches.prefill.minference import calibrate
    from kvaccel.training import train_gate

    model, ids = second[0], second[1]
    if model.dtype != torch.float32:
        pytest.skip("the commands train and calibrate the fp32 model")
    out = tmp_path / kind
    if kind == "minference":
        out = tmp_path / "minference.json"
        data = calibrate(model, TOKENIZER[0], length=2048, out=out)
        assert len(data["heads"]) == text_config(model).num_hidden_layers
    else:
        summary = train_gate(kind, model, TOKENIZER[0], steps=2, seq_len=1024, num_sequences=1, out=out,
                             checkpoint_every=100, progress=False)
        assert len(summary["losses"]) == 2 and all(torch.isfinite(torch.tensor(summary["losses"])))
    with torch.no_grad(), kvaccel.patched(model, spec.format(out=out)):
        gen = model.generate(ids, **GEN)
        rep = kvaccel.report(model)
    assert torch.isfinite(torch.stack(gen.logits)).all()
    if kind in ("seer", "minference"):
        dens = [d for d in rep["prefill_density"] if d is not None]
        assert dens and sum(dens) / len(dens) < 0.95, rep  # the gate's / patterns' tiles, not a dense prefill
    else:  # an untrained gate at threshold 0.99 flags tokens; half the heads streaming hold 64 + 256 of 1,103
        assert rep["kv_ratio"] < 0.9, rep


def _check_quest(rep: dict, quest, text, head_dim: int, prompt: int, dtype: torch.dtype) -> None:
    """Quest (patches/decode/quest.py) on layers past ``dense_layers``: every decode step selected pages (none was
    covered by the budget), each query head attending ``budget / page_size`` pages: the newest (partly filled) page
    and full ones; the page bounds hold 2 / page_size of the keys' bytes (min and max per page and channel)."""
    dense, size, layers = quest.dense_layers, quest.page_size, text.num_hidden_layers
    assert rep["quest_sparse_steps"][:dense] == [None] * dense, rep
    assert rep["quest_sparse_steps"][dense:] == [STEPS - 1] * (layers - dense), rep  # the prefill then 3 decode steps
    assert rep["quest_dense_steps"][dense:] == [0] * (layers - dense), rep
    # decode step s attends a cache of prompt + s tokens: its newest page holds ((n - 1) % 16) + 1 of them
    attended = [(-(-quest.budget // size) - 1) * size + (prompt + s - 1) % size + 1 for s in range(1, STEPS)]
    want = sum(attended) / len(attended)
    assert all(a == pytest.approx(want) for a in rep["quest_attended_tokens"][dense:]), (want, rep)
    # page bounds of the prompt + STEPS - 1 tokens held: per kv head, page and channel a min and a max in the keys'
    # dtype, and an int32 token count per page (one row for every head, or one per kv head)
    pages, heads = -(-(prompt + STEPS - 1) // size), text.num_key_value_heads
    e = torch.empty(0, dtype=dtype).element_size()
    bounds = 2 * heads * pages * head_dim * e
    assert all(m in (bounds + 4 * pages, bounds + 4 * pages * heads) for m in rep["quest_metadata_bytes"][dense:]), rep


def _check_storage(rep: dict, method, text, head_dim: int, dtype: torch.dtype) -> None:
    """Quantized storage (patches/storage): the codes hold ``bits / 8`` bytes per element plus their 16-bit scales
    (and KIVI's 16-bit zero points; kv_fp8's keys one 16-bit offset per layer, kv head and channel), and the whole
    cache holds no more than those bytes for its tokens plus a full-precision window, so ``kv_ratio`` is below what
    the bit width allows."""
    spec, parts = method.spec(), rep["kv_storage_bytes"]
    e = dtype.itemsize  # bytes of a full-precision element (4 fp32, 2 bf16)
    offsets = 0
    if method.name == "kv_fp8":  # one byte per code, one 16-bit scale per token and head (keys and values)
        per_element, group, residual = 1 + 2 / head_dim, 1, method.residual
        offsets = 2 * head_dim * text.num_key_value_heads * text.num_hidden_layers  # batch 1
    else:  # KIVI: a 16-bit scale and zero point per group of group_size elements
        per_element, group, residual = method.bits / 8 + 4 / method.group_size, method.group_size, method.residual
    quantized = parts["codes"] + parts["scales"] + parts["zeros"]
    assert quantized == pytest.approx(per_element * parts["quantized_elements"] + offsets), (spec, parts)
    # Slots per (layer, kv head), tokens T = the largest count kept per head: the quantized part holds at most T tokens
    # + a padded partial group + the spare groups a flush reserves (max(G, T / 32), quantized_layer.py); the window at
    # most residual + G (it flushes whole groups before a token would exceed that). Per slot: K and V of head_dim
    # elements, at per_element bytes quantized (+ 1 validity byte) or e bytes in the window. Full: seen tokens x 2 x
    # head_dim x e.
    T = max(k for layer in rep["kept_tokens"] for row in layer for k in row)
    slots_q, slots_w = T + group + max(group, T / 32), residual + group
    bound = (slots_q * (2 * head_dim * per_element + 1) + slots_w * 2 * head_dim * e) / (rep["seen_tokens"] * 2
                                                                                          * head_dim * e)
    assert parts["window"] <= rep["kv_bytes_full"] * slots_w / rep["seen_tokens"], (spec, parts)
    assert rep["kv_ratio"] <= bound, (spec, bound, rep["kv_ratio"], parts)


@pytest.mark.parametrize(("spec", "command"), [
    ("seer", "train-gate seer"), ("attention_gate", "train-gate attention_gate"),
    ("duo_attention", "train-gate duo_attention"), ("minference", "calibrate minference")])
def test_trained_methods_name_the_training_command(second, spec, command, monkeypatch):
    """Methods whose per-model data (gates, patterns, head configurations) ships for the default model only. Gates are
    looked up in the package only; minference also beside the model and in the kvaccel cache, where a user's own
    calibration may be: only the package's files are looked at here."""
    from kvaccel.patches.prefill import minference

    monkeypatch.setattr(minference, "_candidates", lambda model, beside, prefix, data_dir: [
        data_dir / f"{kvaccel.models.model_name(model)}.json"])
    model = second[0]
    with pytest.raises(ValueError, match=f"`kvaccel {command} --model"):
        kvaccel.patch(model, spec)
