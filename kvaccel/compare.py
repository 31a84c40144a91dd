"""Side-by-side run of methods against full attention on one prompt: speed, memory and fidelity.

This is the main job of ``make demo`` (``kvaccel compare``). The baseline is the stock model (sdpa, DynamicCache);
every method runs on the same prompt in the same process, interleaved over repetitions.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from kvaccel.api import patch, report, unpatch


def prose(n_chars: int) -> str:
    """Long natural English text that exists offline on every Python install (``pydoc_data.topics``)."""
    from pydoc_data.topics import topics

    text = " ".join(" ".join(topics[k].split()) for k in sorted(topics))
    while len(text) < n_chars:
        text = text + " " + text
    return text[:n_chars]


def input_device(model) -> torch.device:
    """Where a model's inputs go: its embedding's device (accelerate offload: the first hook's execution device)."""
    device = model.get_input_embeddings().weight.device
    if device.type == "meta":  # offloaded to disk/CPU by accelerate: its hooks move inputs from here
        hook = getattr(model, "_hf_hook", None)
        device = torch.device(getattr(hook, "execution_device", None) or "cpu")
    return device


def prompt_ids(tokenizer, length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``(1, length)`` token ids of prose (on ``device``, default CPU)."""
    ids = tokenizer(prose(length * 8), return_tensors="pt", add_special_tokens=False)["input_ids"]
    if ids.shape[1] < length:
        raise ValueError(f"could not build a {length}-token prompt")
    return ids[:, :length].to(device) if device is not None else ids[:, :length]


@dataclass
class RunResult:
    method: str
    prefill_s: list[float] = field(default_factory=list)
    decode_tok_s: list[float] = field(default_factory=list)
    kv_bytes: int = 0
    kv_bytes_full: int = 0
    tokens: list[int] = field(default_factory=list)
    step_logits: torch.Tensor | None = None  # (new_tokens, V) logits that chose each new token


def run_once(
    model, ids: torch.Tensor, new_tokens: int, res: RunResult, patched: bool, forced: list[int] | None = None
) -> None:
    """Greedy prefill + ``new_tokens`` decode steps with explicit timing of each phase.

    With ``forced`` the tokens fed back are those (teacher forcing on the baseline's continuation), so the
    per-step logits are comparable with the baseline's; otherwise the run is free (greedy) and timed.
    """
    from transformers import DynamicCache

    from kvaccel.cache import KVAccelCache

    with torch.inference_mode():
        cache = KVAccelCache(model) if patched else DynamicCache(config=model.config)
        t0 = time.perf_counter()
        out = model(ids, past_key_values=cache, use_cache=True)
        t1 = time.perf_counter()
        logits = [out.logits[0, -1].float()]
        toks = [int(logits[-1].argmax())]
        for step in range(new_tokens - 1):
            fed = toks[-1] if forced is None else forced[step]
            out = model(torch.tensor([[fed]], device=ids.device), past_key_values=cache, use_cache=True)
            logits.append(out.logits[0, -1].float())
            toks.append(int(logits[-1].argmax()))
        t2 = time.perf_counter()
    res.step_logits = torch.stack(logits)
    if forced is not None:
        return
    res.prefill_s.append(t1 - t0)
    res.decode_tok_s.append((new_tokens - 1) / (t2 - t1) if new_tokens > 1 else float("nan"))
    res.tokens = toks
    if patched:
        r = report(model)
        res.kv_bytes, res.kv_bytes_full = r["kv_bytes"], r["kv_bytes_full"]
    else:
        res.kv_bytes = res.kv_bytes_full = sum(
            layer.keys.nbytes + layer.values.nbytes for layer in cache.layers
        )


def compare(model, tokenizer, specs: list[str], length: int = 2048, new_tokens: int = 32, repeats: int = 2):
    """Run stock full attention and each method spec; returns a list of row dicts (first row = full)."""
    ids = prompt_ids(tokenizer, length, input_device(model))
    results = {"full (stock)": RunResult("full (stock)")} | {s: RunResult(s) for s in specs}
    run_once(model, ids[:, :64], 2, RunResult("warmup"), patched=False)  # warm-up
    for _ in range(repeats):  # interleaved so machine noise hits every method alike
        for name, res in results.items():
            if name == "full (stock)":
                run_once(model, ids, new_tokens, res, patched=False)
            else:
                patch(model, name)
                try:
                    run_once(model, ids, new_tokens, res, patched=True)
                finally:
                    unpatch(model)
    base = results["full (stock)"]
    rows = []
    for name, res in results.items():
        if name != "full (stock)":  # fidelity: teacher-forced on the baseline's continuation
            patch(model, name)
            try:
                run_once(model, ids, new_tokens, res, patched=True, forced=base.tokens)
            finally:
                unpatch(model)
        p_ref = torch.log_softmax(base.step_logits.double(), -1)
        p = torch.log_softmax(res.step_logits.double(), -1)
        kl = float((p_ref.exp() * (p_ref - p)).sum(-1).mean())
        top1 = float((base.step_logits.argmax(-1) == res.step_logits.argmax(-1)).double().mean())
        match = sum(a == b for a, b in zip(base.tokens, res.tokens, strict=True)) / len(base.tokens)
        prefill, tps = statistics.median(res.prefill_s), statistics.median(res.decode_tok_s)
        rows.append(
            {
                "method": name,
                "prefill_s": prefill,
                "prefill_speedup": statistics.median(base.prefill_s) / prefill,
                "decode_tok_s": tps,
                "decode_speedup": tps / statistics.median(base.decode_tok_s),
                "kv_mib": res.kv_bytes / 2**20,
                "kv_ratio": res.kv_bytes / base.kv_bytes_full if base.kv_bytes_full else float("nan"),
                "next_token_kl": kl,
                "top1_agreement": top1,
                "greedy_match": match,
            }
        )
    return rows
