"""kvaccel vs NVIDIA kvpress on the same prompts, same model, same decoding loop.

kvpress 0.5.5 pins transformers < 5.3, so it runs in its own virtual environment (``setup_kvpress.sh``).
Both sides use the question-agnostic protocol of kvpress' own pipeline: the context is prefilled (and
compressed), then question + answer prefix are fed, then greedy decoding. kvpress' side calls its pipeline's
own ``generate_answer`` (explicit position ids, as kvpress needs after truncating a DynamicCache).

    .venv/bin/python benchmarks/peers/kvpress_vs_kvaccel.py export --out runs/peers/prompts.jsonl
    .venv-kvpress/bin/python benchmarks/peers/kvpress_vs_kvaccel.py run --framework kvpress \\
        --prompts runs/peers/prompts.jsonl --out runs/peers/kvpress.jsonl
    .venv/bin/python benchmarks/peers/kvpress_vs_kvaccel.py run --framework kvaccel \\
        --prompts runs/peers/prompts.jsonl --out runs/peers/kvaccel.jsonl
    .venv/bin/python benchmarks/peers/kvpress_vs_kvaccel.py report runs/peers/kvpress.jsonl runs/peers/kvaccel.jsonl

KL protocol (kvpress' fidelity test): a 1500-token prose context is compressed at prefill, then 64 following
tokens of the same text are fed teacher-forced in one forward over the compressed cache (kvaccel:
``kvaccel.paused``; kvpress: outside the press context), and each position's next-token distribution is compared
with the uncompressed model's on the same tokens: ``KL(full || method)`` averaged over the 64 positions, then over
samples. Token ids are exported once so both frameworks see identical inputs::

    .venv/bin/python benchmarks/peers/kvpress_vs_kvaccel.py export-kl --out runs/peers/kl_prompts.jsonl --samples 8
    .venv-kvpress/bin/python benchmarks/peers/kvpress_vs_kvaccel.py kl --framework kvpress \\
        --prompts runs/peers/kl_prompts.jsonl --out runs/peers/kl_kvpress.jsonl
    .venv/bin/python benchmarks/peers/kvpress_vs_kvaccel.py kl --framework kvaccel \\
        --prompts runs/peers/kl_prompts.jsonl --out runs/peers/kl_kvaccel.jsonl
    .venv/bin/python benchmarks/peers/kvpress_vs_kvaccel.py report-kl \\
        runs/peers/kl_kvpress.jsonl runs/peers/kl_kvaccel.jsonl

``export-kl --model qwen2.5-coder-1.5b`` (a ``kvaccel fetch-model`` name or a local model directory; default: the
default model) takes the token ids from that model's tokenizer and records its path in the prompts, which is what
``kl`` loads on both sides (``kl --model`` checks it). KL rows carry the model's name; ``report-kl`` refuses rows of
different models in one table.

Quantized caches (issue 22): kvpress with transformers' ``QuantizedCache`` (``--cache quanto`` or ``hqq``, ``--nbits``,
``--q-group-size``, ``--residual-length``; row names get a ``+quanto4``-style suffix; ``none`` = no press) against
kvaccel's storage stages (``kv_int4-g32``, ``snapkv+kv_int4-g32``: each ``+`` part a ``KL_KVACCEL`` name or a spec;
specs without ``{b}`` run once, at kept fraction 1.0). ``kv_bytes_held`` counts the storage of every tensor the cache
holds after the prefill *and* the continuation (quanto's packed codes, scales and shifts; the full-precision residual),
against ``kv_bytes_held_full``, a full cache of the same tokens::

    .venv-kvpress/bin/python benchmarks/peers/kvpress_vs_kvaccel.py kl --framework kvpress --cache quanto --nbits 4 \\
        --prompts runs/peers/kl_prompts.jsonl --out runs/peers/kl_quant.jsonl --methods none,snapkv --budgets 0.25
    .venv/bin/python benchmarks/peers/kvpress_vs_kvaccel.py kl --framework kvaccel --budgets 0.25 \\
        --prompts runs/peers/kl_prompts.jsonl --out runs/peers/kl_quant.jsonl --methods kv_int4-g32,snapkv+kv_int4-g32

This file must import with either environment: nothing from kvaccel or kvpress at module level.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from pathlib import Path

BUDGETS = (0.5, 0.25, 0.1)
THINK_RATIO = 0.4
NEW_TOKENS = 12


def export(args) -> None:
    import kvaccel
    from kvaccel.evals import tasks
    from kvaccel.models import default_model_path

    _, tok = kvaccel.load_model()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for task in args.tasks.split(","):
            for length in (int(x) for x in args.lengths.split(",")):
                for s in tasks.generate(task, tok, length, args.samples, seed=args.seed):
                    context, rest = s.prompt(question_aware=args.question_aware)
                    rec = {"id": s.id, "task": task, "length": length, "context": context, "question": rest,
                           "answers": s.answers, "model": str(default_model_path())}
                    f.write(json.dumps(rec) + "\n")
    print(f"wrote {out}")


def _methods(framework: str, budgets=BUDGETS, methods: str = "all"):
    """(name, budget, factory) — the same method at the same kept fraction on both sides."""
    rows = []
    if framework == "kvpress":
        from kvpress import ThinKPress
    for b in budgets if methods == "all" else ():
        if framework == "kvpress":
            from kvpress import AdaKVPress, ComposedPress, SnapKVPress, StreamingLLMPress, ThinKPress, TOVAPress

            rows += [
                ("snapkv", b, lambda b=b: SnapKVPress(compression_ratio=1 - b, window_size=32, kernel_size=7)),
                ("streaming", b, lambda b=b: StreamingLLMPress(compression_ratio=1 - b, n_sink=4)),
                ("tova", b, lambda b=b: TOVAPress(compression_ratio=1 - b)),
                ("adakv-snapkv", b, lambda b=b: AdaKVPress(
                    SnapKVPress(compression_ratio=1 - b, window_size=32, kernel_size=7), alpha_safeguard=0.2)),
                ("snapkv+think", b, lambda b=b: ComposedPress(
                    [SnapKVPress(compression_ratio=1 - b, window_size=32, kernel_size=7),
                     ThinKPress(key_channel_compression_ratio=THINK_RATIO, window_size=32)])),
            ]
        else:
            rows += [
                ("snapkv", b, lambda b=b: f"snapkv(budget={b})"),
                ("streaming", b, lambda b=b: f"streaming(budget={b})"),
                ("adakv-snapkv", b, lambda b=b: f"adakv(budget={b}, inner='snapkv', alpha_safeguard=0.2)"),
                ("snapkv+think", b, lambda b=b: f"snapkv(budget={b})+think(ratio={THINK_RATIO})"),
            ]
    # ThinK alone (no token eviction): the "kept" column is the fraction of key channels kept
    think = (ThinKPress(key_channel_compression_ratio=THINK_RATIO, window_size=32) if framework == "kvpress"
             else f"think(ratio={THINK_RATIO})")
    return [("full", 1.0, lambda: None)] + rows + [("think", 1 - THINK_RATIO, lambda: think)]


def _storages(obj, seen: dict[int, int]) -> None:
    """Record into ``seen`` (data pointer -> bytes) the storage of every tensor reachable from ``obj``: plain tensors,
    tensor subclasses through ``__tensor_flatten__`` (quanto's ``WeightQBitsTensor`` -> ``PackedTensor`` codes,
    scales, shifts), tuples, lists and dicts (HQQ's ``(codes, meta)``). A storage shared by several views counts
    once, and counts whole (what is allocated, not what a view shows)."""
    import torch

    if isinstance(obj, torch.Tensor):
        flatten = getattr(obj, "__tensor_flatten__", None)
        if flatten is not None and type(obj) not in (torch.Tensor, torch.nn.Parameter):
            for name in flatten()[0]:
                _storages(getattr(obj, name), seen)
        else:
            st = obj.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            _storages(x, seen)
    elif isinstance(obj, dict):
        for x in obj.values():
            _storages(x, seen)


def _cache_bytes(cache) -> int:
    """Bytes held by a transformers cache, counted from its tensors' storage: keys and values, and for a
    ``QuantizedCache`` its quantized keys and values and the full-precision residual."""
    if hasattr(cache, "nbytes") and callable(cache.nbytes):  # kvaccel's cache counts itself
        return cache.nbytes()
    seen: dict[int, int] = {}
    for layer in cache.layers:
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            if getattr(layer, name, None) is not None:
                _storages(getattr(layer, name), seen)
    return sum(seen.values())


def run(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    torch.set_num_threads(os.cpu_count() or 1)
    prompts = [json.loads(line) for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    model_path = prompts[0]["model"]
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa").eval()
    tok = AutoTokenizer.from_pretrained(model_path)
    out = Path(args.out)
    done = set()
    if out.exists():
        done = {(r["method"], r["budget"], r["id"]) for r in map(json.loads, out.read_text().splitlines())}
    if args.framework == "kvpress":
        import kvpress  # noqa: F401  (registers the pipeline)
        from transformers import pipeline

        pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok, device="cpu")
    else:
        import kvaccel

    with out.open("a") as f, torch.inference_mode():
        budgets = [float(b) for b in args.budgets.split(",")]
        for name, budget, factory in _methods(args.framework, budgets, args.methods):
            for p in prompts:
                if (name, budget, p["id"]) in done:
                    continue
                ctx_ids = tok(p["context"], return_tensors="pt", add_special_tokens=False)["input_ids"]
                q_ids = tok(p["question"], return_tensors="pt", add_special_tokens=False)["input_ids"]
                method = factory()
                t0 = time.perf_counter()
                if args.framework == "kvpress":
                    cache = DynamicCache()
                    import contextlib

                    with method(model) if method is not None else contextlib.nullcontext():
                        model.model(input_ids=ctx_ids, past_key_values=cache)
                    kv = _cache_bytes(cache)
                    answer = pipe.generate_answer(q_ids, cache, ctx_ids.shape[1], NEW_TOKENS)
                else:
                    if method is None:
                        kvaccel.patch(model)
                    else:
                        kvaccel.patch(model, method)
                    cache = kvaccel.KVAccelCache(model)
                    model(ctx_ids, past_key_values=cache, use_cache=True)
                    kv = cache.nbytes()
                    logits = model(q_ids, past_key_values=cache, use_cache=True).logits[0, -1]
                    gen = [int(logits.argmax())]
                    for _ in range(NEW_TOKENS - 1):
                        if gen[-1] == tok.eos_token_id:
                            break
                        logits = model(torch.tensor([[gen[-1]]]), past_key_values=cache, use_cache=True).logits[0, -1]
                        gen.append(int(logits.argmax()))
                    answer = tok.decode(gen, skip_special_tokens=True)
                    kvaccel.unpatch(model)
                seconds = time.perf_counter() - t0
                full = 2 * model.config.num_hidden_layers * model.config.num_key_value_heads * ctx_ids.shape[1] * (
                    model.config.hidden_size // model.config.num_attention_heads) * 4
                score = sum(a.lower() in answer.lower() for a in p["answers"]) / len(p["answers"])
                rec = {"framework": args.framework, "method": name, "budget": budget, "id": p["id"],
                       "task": p["task"], "length": p["length"], "score": score, "answer": answer,
                       "kv_bytes_after_prefill": kv, "kv_bytes_full": full, "seconds": seconds}
                f.write(json.dumps(rec) + "\n")
                f.flush()
                print(f"{args.framework:8s} {name:14s} {budget:<5} {p['id']:28s} score={score:.2f} "
                      f"kv={kv / full:.3f} {seconds:.1f}s", flush=True)


def report(args) -> None:
    rows = [json.loads(line) for path in args.files for line in Path(path).read_text().splitlines() if line.strip()]
    agg = defaultdict(list)
    for r in rows:
        agg[(r["method"], r["budget"], r["task"], r["length"], r["framework"])].append(r)
    keys = sorted({(m, b, t, n) for m, b, t, n, _ in agg}, key=lambda k: (k[2], k[3], k[0] != "full", k[0], -k[1]))
    print("| task | length | method | kept | kvpress acc | kvaccel acc | kvpress KV/full | kvaccel KV/full |")
    print("|---|---|---|---|---|---|---|---|")
    for m, b, t, n in keys:
        cells = []
        for fw in ("kvpress", "kvaccel"):
            rs = agg.get((m, b, t, n, fw), [])
            cells.append(f"{sum(r['score'] for r in rs) / len(rs):.2f} (n={len(rs)})" if rs else "—")
        for fw in ("kvpress", "kvaccel"):
            rs = agg.get((m, b, t, n, fw), [])
            cells.append(f"{sum(r['kv_bytes_after_prefill'] / r['kv_bytes_full'] for r in rs) / len(rs):.3f}"
                         if rs else "—")
        print(f"| {t} | {n} | {m} | {b} | " + " | ".join(cells) + " |")


# ------------------------------------------------------------------------------------------------ KL protocol
KL_CONTEXT = 1500
KL_TOKENS = 64
KL_BUDGETS = (0.5, 0.25)  # kept fractions = 1 - kvpress' compression ratio (0.5, 0.75)
#: the model of KL rows without a "model" field (before ``--model``, export-kl wrote the default model only)
LEGACY_MODEL = "SmolLM2-135M-Instruct"
#: kvaccel specs at kept fraction {b}; the name is the report's row label
KL_KVACCEL = {
    "streaming": "streaming(budget={b})",
    "snapkv": "snapkv(budget={b})",
    "snapkv-chunk10": "snapkv(budget={b}, chunk=10)",
    "h2o": "h2o(budget={b})",
    "keyformer": "keyformer(budget={b})",
    "pyramidkv": "pyramidkv(budget={b})",
    "adakv-snapkv": "adakv(budget={b}, inner='snapkv', alpha_safeguard=0.2)",
    "d2o": "d2o(budget={b})",
    "d2o-nomerge": "d2o(budget={b}, merge=False)",
    "d2o-reference-merge": "d2o(budget={b}, normalize_merge=False, per_head_merge=False)",
    "expected_attention": "expected_attention(budget={b})",
    "expected_attention-chunk5": "expected_attention(budget={b}, chunk=5)",
    "expected_attention-chunk10": "expected_attention(budget={b}, chunk=10)",
    # future_positions / observation_weight chosen on runs/kl-peers/kl_tune.jsonl (benchmarks/peers/README.md)
    "expected_attention-mixture-obs":
        "expected_attention(budget={b}, future_positions='mixture', observation_weight=0.2)",
    "kvzip": "kvzip(budget={b})",
    "kvzip-layer": "kvzip(budget={b}, allocation='layer')",
    "kvzip-expected30": "kvzip(budget={b}, expected_weight=0.3)",
    "kvzip-expected50": "kvzip(budget={b}, expected_weight=0.5)",
    "kvzip-expected70": "kvzip(budget={b}, expected_weight=0.7)",
    # observation_window chosen on 4 tuning windows (runs/kl-lab/zip3.log: 8 / 32 / 128 -> 128)
    "kvzip-window128": "kvzip(budget={b}, observation_window=128)",
    "expected_attention-mixture": "expected_attention(budget={b}, future_positions='mixture')",
    "expected_attention-mixture-obs-chunk10":
        "expected_attention(budget={b}, future_positions='mixture', observation_weight=0.2, chunk=10)",
    # the cheap scorers (issue 23): kvpress' TOVAPress, KnormPress, KeyDiffPress, CriticalKVPress
    "tova": "tova(budget={b})",
    "knorm": "knorm(budget={b})",
    "keydiff": "keydiff(budget={b})",
    "critical-expected_attention": "critical(scorer=expected_attention(use_vnorm=False), budget={b})",
    "critical-snapkv": "critical(scorer=snapkv, budget={b})",
    # quantized storage (issue 22): alone (kept fraction 1.0) or after an eviction, e.g. "snapkv+kv_int4-g32"
    "kv_int8": "kv_int8",
    "kv_int4": "kv_int4",
    "kv_int4-g32": "kv_int4(group_size=32,residual=128)",
    "kv_int2-g32": "kv_int4(bits=2,group_size=32,residual=128)",
    "kv_int2": "kv_int4(bits=2)",
    # no full-precision window: QuantizedCache quantizes the whole prompt at prefill (its residual holds decode tokens)
    "kv_int4-g32-r0": "kv_int4(group_size=32,residual=0)",
    "kv_int4-r0": "kv_int4(residual=0)",
    "kv_int2-g32-r0": "kv_int4(bits=2,group_size=32,residual=0)",
}
KL_KVPRESS = ("streaming", "snapkv", "tova", "knorm", "expected_attention", "adakv-expected_attention")


def export_kl(args) -> None:
    """``--samples`` windows of ``KL_CONTEXT + KL_TOKENS`` token ids of prose at seeded random offsets."""
    import random

    from transformers import AutoTokenizer

    from kvaccel.compare import prose
    from kvaccel.models import resolve_model

    model_path = resolve_model(args.model)
    if args.model is not None and Path(model_path).is_dir():
        model_path = os.path.abspath(model_path)  # `kl` may run from another directory
    tok = AutoTokenizer.from_pretrained(model_path)  # the token ids only: the weights load in `kl`
    n = args.context + args.tokens
    ids = tok(prose(400_000), add_special_tokens=False)["input_ids"]
    rng = random.Random(args.seed)
    starts = sorted(rng.sample(range(0, len(ids) - n), args.samples))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for i, s0 in enumerate(starts):
            f.write(json.dumps({"id": f"prose-{i}", "start": s0, "context_ids": ids[s0:s0 + args.context],
                                "target_ids": ids[s0 + args.context:s0 + n], "model": model_path})
                    + "\n")
    print(f"wrote {out} ({args.samples} samples of {args.context} + {args.tokens} tokens of {model_path})")


def _prompts_model(prompts: list[dict], requested: str | None) -> str:
    """The model path the prompts' token ids were exported with (every row must name the same), checked against
    ``kl --model`` when given: a local directory must be that directory, a name (``qwen2.5-coder-1.5b``) its name."""
    paths = {p["model"] for p in prompts}
    if len(paths) != 1:
        raise SystemExit(f"the prompts file mixes models {sorted(paths)}; export one file per model with export-kl")
    path = paths.pop()
    if requested is not None:
        same = (Path(requested).resolve() == Path(path).resolve() if Path(requested).is_dir()
                else requested == Path(path).name)
        if not same:
            raise SystemExit(f"--model {requested}, but the prompts' token ids come from {path}'s tokenizer; export "
                             f"them for this model with: export-kl --model {requested} --out ...")
    return path


def _model_name(row: dict) -> str:
    """A KL row's model name; rows recorded before ``--model`` carry none and are the default model's."""
    return row.get("model", LEGACY_MODEL)


def _plain_text_kvzip() -> None:
    """KVzip builds its "repeat the context" prompt from the tokenizer's chat template and takes the template's
    prefix to be the first tokens of the context (never scored). Our contexts are plain prose from position 0,
    so KVzip gets the tokenizer without a chat template (its own plain-text branch: no prefix, "\n" suffix)."""
    from kvpress.presses import kvzip_press
    from transformers import AutoTokenizer

    class PlainTokenizer:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            tok = AutoTokenizer.from_pretrained(*args, **kwargs)
            tok.chat_template = None
            return tok

    kvzip_press.AutoTokenizer = PlainTokenizer


def _kl_methods(framework: str, budgets, names: list[str] | None):
    """(name, budget, factory) for the KL protocol."""
    rows = []
    if framework == "kvpress":
        from kvpress import (
            AdaKVPress,
            CriticalKVPress,
            ExpectedAttentionPress,
            KeyDiffPress,
            KnormPress,
            KVzipPress,
            SnapKVPress,
            StreamingLLMPress,
            TOVAPress,
        )

        make = {
            "streaming": lambda c: StreamingLLMPress(compression_ratio=c, n_sink=4),
            "snapkv": lambda c: SnapKVPress(compression_ratio=c, window_size=32, kernel_size=7),
            "tova": lambda c: TOVAPress(compression_ratio=c),
            "knorm": lambda c: KnormPress(compression_ratio=c),
            "keydiff": lambda c: KeyDiffPress(compression_ratio=c),
            "critical-expected_attention":
                lambda c: CriticalKVPress(ExpectedAttentionPress(compression_ratio=c, use_vnorm=False)),
            "critical-snapkv":
                lambda c: CriticalKVPress(SnapKVPress(compression_ratio=c, window_size=32, kernel_size=7)),
            "expected_attention": lambda c: ExpectedAttentionPress(compression_ratio=c),
            "adakv-expected_attention": lambda c: AdaKVPress(ExpectedAttentionPress(compression_ratio=c)),
            # context reconstruction (2-3x the prefill); budgets vary per layer and head (masked, not freed)
            "kvzip": lambda c: KVzipPress(compression_ratio=c),
            "kvzip-plus": lambda c: KVzipPress(compression_ratio=c, kvzip_plus_normalization=True),
        }
        make["none"] = lambda c: None  # no press (a quantized cache alone)
        _plain_text_kvzip()
        for name in names or KL_KVPRESS:
            for b in (1.0,) if name == "none" else budgets:
                rows.append((name, b, lambda name=name, b=b: make[name](1 - b)))
    else:
        for name in names or list(KL_KVACCEL):
            spec = "+".join(KL_KVACCEL.get(part, part) for part in name.split("+"))
            for b in budgets if "{b}" in spec else (1.0,):  # a storage stage alone keeps every token
                rows.append((name, b, lambda spec=spec, b=b: spec.format(b=b)))
    return rows


def _quantized_cache(args, config):
    """kvpress' quantized cache: transformers' ``QuantizedCache`` with ``--cache``'s backend (None: DynamicCache)."""
    from transformers import DynamicCache, QuantizedCache

    if args.cache == "dynamic":
        return DynamicCache()
    return QuantizedCache(backend=args.cache, config=config, nbits=args.nbits, q_group_size=args.q_group_size,
                          residual_length=args.residual_length)


def _cache_label(args) -> str:
    """Row-name suffix of ``--cache``: ``""``, ``"+quanto4"``, ``"+quanto2-g32"`` (non-default group / residual)."""
    if args.cache == "dynamic":
        return ""
    label = f"+{args.cache}{args.nbits}"
    if args.q_group_size != 64:
        label += f"-g{args.q_group_size}"
    if args.residual_length != 128:
        label += f"-r{args.residual_length}"
    return label


def _kl_logits_full(model, ctx_ids, tgt_ids):
    """Uncompressed reference: the same two forwards (context, then targets) over a stock DynamicCache."""
    from transformers import DynamicCache

    cache = DynamicCache()
    model(ctx_ids, past_key_values=cache, use_cache=True)
    return model(tgt_ids, past_key_values=cache, use_cache=True).logits[0].double()


def kl(args) -> None:
    import torch

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    prompts = [json.loads(line) for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    from transformers import AutoModelForCausalLM

    model_path = _prompts_model(prompts, args.model)
    out = Path(args.out)
    done = set()
    if out.exists():
        rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
        other = {_model_name(r) for r in rows} - {Path(model_path).name}
        if other:
            raise SystemExit(f"{out} holds rows of {sorted(other)}; write {Path(model_path).name}'s to another --out")
        done = {(r["method"], r["budget"], r["id"]) for r in rows}
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa").eval()
    budgets = [float(b) for b in args.budgets.split(",")]
    names = args.methods.split(",") if args.methods else None
    if args.framework == "kvaccel":
        import kvaccel

        if args.cache != "dynamic":
            raise SystemExit("--cache is kvpress' side; on kvaccel's, name a storage stage in --methods (kv_int4-g32)")
    refs = {}
    suffix = _cache_label(args)
    with out.open("a") as f, torch.inference_mode():
        for method_name, budget, factory in _kl_methods(args.framework, budgets, names):
            name = method_name + suffix
            for p in prompts:
                if (name, budget, p["id"]) in done:
                    continue
                ctx_ids, tgt_ids = torch.tensor([p["context_ids"]]), torch.tensor([p["target_ids"]])
                if p["id"] not in refs:
                    refs[p["id"]] = torch.log_softmax(_kl_logits_full(model, ctx_ids, tgt_ids), -1)
                ref = refs[p["id"]]
                method = factory()
                t0 = time.perf_counter()
                storage = None
                if args.framework == "kvpress":
                    import contextlib

                    cache = _quantized_cache(args, model.config)
                    with method(model) if method is not None else contextlib.nullcontext():
                        model(ctx_ids, past_key_values=cache, use_cache=True)
                    kept = _cache_bytes(cache)
                    L = ctx_ids.shape[1]
                    pos = torch.arange(L, L + tgt_ids.shape[1])[None]  # kvpress truncates: explicit positions
                    logits = model(tgt_ids, past_key_values=cache, use_cache=True, position_ids=pos).logits[0]
                    held = _cache_bytes(cache)
                else:
                    kvaccel.patch(model, method)
                    try:
                        cache = kvaccel.KVAccelCache(model)
                        model(ctx_ids, past_key_values=cache, use_cache=True)
                        kept = cache.nbytes()
                        with kvaccel.paused(model):
                            logits = model(tgt_ids, past_key_values=cache, use_cache=True).logits[0]
                        rep = kvaccel.report(model)
                        held, storage = rep["kv_bytes"], rep.get("kv_storage_bytes")
                    finally:
                        kvaccel.unpatch(model)
                seconds = time.perf_counter() - t0
                lp = torch.log_softmax(logits.double(), -1)
                kl_pos = (ref.exp() * (ref - lp)).sum(-1)
                cfg = model.config
                per_token = (2 * cfg.num_hidden_layers * cfg.num_key_value_heads
                             * (cfg.hidden_size // cfg.num_attention_heads) * 4)
                full = per_token * ctx_ids.shape[1]
                held_full = per_token * (ctx_ids.shape[1] + tgt_ids.shape[1])
                rec = {"framework": args.framework, "model": Path(model_path).name, "method": name, "budget": budget,
                       "id": p["id"], "spec": method if isinstance(method, str) else repr(method),
                       "cache": repr(cache) if args.framework == "kvpress" else type(cache).__name__,
                       "kl": float(kl_pos.mean()), "top1": float((ref.argmax(-1) == lp.argmax(-1)).double().mean()),
                       "kv_bytes_after_prefill": kept, "kv_bytes_full": full,
                       "kv_bytes_held": held, "kv_bytes_held_full": held_full, "kv_storage_bytes": storage,
                       "seconds": seconds}
                f.write(json.dumps(rec) + "\n")
                f.flush()
                print(f"{args.framework:8s} {name:28s} {budget:<5} {p['id']:10s} kl={rec['kl']:.4f} "
                      f"top1={rec['top1']:.3f} kv={kept / full:.3f} held={held / held_full:.3f} {seconds:.1f}s",
                      flush=True)


def report_kl(args) -> None:
    """Mean KL per (framework, method, kept fraction) and each framework's best, with the kvaccel/kvpress ratio."""
    import math

    rows, models = [], defaultdict(set)
    for path in args.files:
        for line in Path(path).read_text().splitlines():
            if line.strip():
                rows.append(json.loads(line))
                models[_model_name(rows[-1])].add(path)
    if len(models) > 1:
        raise SystemExit("report-kl puts one model's rows in a table, these files hold several: " + "; ".join(
            f"{m} in {', '.join(sorted(files))}" for m, files in sorted(models.items())) + ". Report each model apart.")
    print(f"model: {next(iter(models), '-')}\n")
    if args.paired:  # only the samples every (framework, method) of a kept fraction has: a paired comparison
        ids = defaultdict(lambda: defaultdict(set))
        for r in rows:
            ids[r["budget"]][(r["framework"], r["method"])].add(r["id"])
        common = {b: set.intersection(*groups.values()) for b, groups in ids.items()}
        rows = [r for r in rows if r["id"] in common[r["budget"]]]
    agg = defaultdict(list)
    for r in rows:
        agg[(r["framework"], r["method"], r["budget"])].append(r)
    print("| framework | method | kept | compression | KL (mean ± sd) | top-1 agree | KV/full | held/full | n |")
    print("|---|---|---|---|---|---|---|---|---|")
    best = {}
    for (fw, m, b), rs in sorted(agg.items(), key=lambda kv: (-kv[0][2], kv[0][0], kv[0][1])):
        ks = [r["kl"] for r in rs]
        mean = sum(ks) / len(ks)
        sd = math.sqrt(sum((k - mean) ** 2 for k in ks) / max(1, len(ks) - 1))
        top1 = sum(r["top1"] for r in rs) / len(rs)
        kv = sum(r["kv_bytes_after_prefill"] / r["kv_bytes_full"] for r in rs) / len(rs)
        # after the prefill and the continuation, counted from the tensors (rows recorded before issue 22: "—")
        held = (f"{sum(r['kv_bytes_held'] / r['kv_bytes_held_full'] for r in rs) / len(rs):.3f}"
                if all("kv_bytes_held" in r for r in rs) else "—")
        print(f"| {fw} | {m} | {b} | {1 - b:.2f} | {mean:.4f} ± {sd:.4f} | {top1:.3f} | {kv:.3f} | {held} "
              f"| {len(rs)} |")
        if (fw, b) not in best or mean < best[(fw, b)][1]:
            best[(fw, b)] = (m, mean)
    for b in sorted({b for _, b in best}, reverse=True):
        line = f"kept {b}: " + ", ".join(f"best {fw} = {best[(fw, b)][0]} ({best[(fw, b)][1]:.4f})"
                                         for fw in ("kvpress", "kvaccel") if (fw, b) in best)
        if ("kvpress", b) in best and ("kvaccel", b) in best and best[("kvpress", b)][1] > 0:
            line += f"; ratio kvaccel/kvpress = {best[('kvaccel', b)][1] / best[('kvpress', b)][1]:.2f} (target <= 0.7)"
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("--out", required=True)
    e.add_argument("--tasks", default="passkey,niah_single")
    e.add_argument("--lengths", default="1024,2048")
    e.add_argument("--samples", type=int, default=4)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--question-aware", action="store_true",
                   help="compress context + question together; only the answer prefix follows (papers' protocol)")
    r = sub.add_parser("run")
    r.add_argument("--framework", choices=("kvpress", "kvaccel"), required=True)
    r.add_argument("--prompts", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="kept fractions, e.g. 0.5,0.25,0.1")
    r.add_argument("--methods", default="all", choices=("all", "think"),
                   help="all: full + every method at each budget (+ think alone); think: full + ThinK alone")
    p = sub.add_parser("report")
    p.add_argument("files", nargs="+")
    e = sub.add_parser("export-kl", help="token ids for the KL protocol")
    e.add_argument("--out", required=True)
    e.add_argument("--samples", type=int, default=8)
    e.add_argument("--context", type=int, default=KL_CONTEXT)
    e.add_argument("--tokens", type=int, default=KL_TOKENS)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--model", default=None, help="whose tokenizer makes the token ids (and whose weights `kl` loads): "
                   "a name from `kvaccel fetch-model --list` (qwen2.5-coder-1.5b) or a local model directory; "
                   "default: the default model")
    k = sub.add_parser("kl", help="KL vs full of each method on the exported windows")
    k.add_argument("--framework", choices=("kvpress", "kvaccel"), required=True)
    k.add_argument("--prompts", required=True)
    k.add_argument("--out", required=True)
    k.add_argument("--budgets", default=",".join(map(str, KL_BUDGETS)), help="kept fractions (1 - compression)")
    k.add_argument("--methods", default="", help="comma list of row names (default: all of the framework's); "
                   "kvaccel also takes a spec template with {b} for the kept fraction")
    k.add_argument("--threads", type=int, default=0)
    k.add_argument("--model", default=None, help="the model the prompts were exported with (checked; refused "
                   "otherwise): a name (qwen2.5-coder-1.5b) or a local directory; default: the prompts' model")
    k.add_argument("--cache", choices=("dynamic", "quanto", "hqq"), default="dynamic",
                   help="kvpress' cache: DynamicCache, or transformers' QuantizedCache with this backend")
    k.add_argument("--nbits", type=int, default=4, help="QuantizedCache bits (quanto: 2 or 4)")
    k.add_argument("--q-group-size", type=int, default=64, help="QuantizedCache group size (its default 64)")
    k.add_argument("--residual-length", type=int, default=128,
                   help="QuantizedCache full-precision residual (its default 128)")
    p = sub.add_parser("report-kl")
    p.add_argument("files", nargs="+")
    p.add_argument("--paired", action="store_true", help="keep only the samples every method of a kept fraction has")
    args = ap.parse_args()
    {"export": export, "run": run, "report": report, "export-kl": export_kl, "kl": kl,
     "report-kl": report_kl}[args.cmd](args)


if __name__ == "__main__":
    main()
