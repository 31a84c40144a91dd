"""Side-by-side run of methods against full attention on one prompt: speed, memory and fidelity.

This is the main job of ``make demo`` (``kvaccel compare``). The baseline is the stock model (sdpa, DynamicCache);
every method runs on the same prompt in the same process, interleaved over repetitions.
"""

from __future__ import annotations

import statistics

import torch

FULL_NAME = "full (stock)"


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


def compare(model, tokenizer, specs: list[str], length: int = 2048, new_tokens: int = 32, repeats: int = 2):
    """Run stock full attention and each method spec; returns a list of row dicts (first row = full).

    Timing: ``repeats`` free greedy runs per method, interleaved, through the harness's one loop
    (``kvaccel.evals.loop.prefill_decode``); medians. KV bytes: the cache after the last decode step. Fidelity:
    ``kvaccel.evals.loop.fidelity`` of each method teacher-forced on the stock model's ``new_tokens``-token greedy
    continuation (``greedy_match`` = exact greedy prefix / ``new_tokens``; definitions in ``evals/loop.py``).
    """
    from kvaccel.evals.loop import FULL, fidelity, forced_run, method, prefill_decode, reference

    ids = prompt_ids(tokenizer, length, input_device(model))
    names = [FULL_NAME] + list(specs)
    runs: dict[str, list] = {name: [] for name in names}
    prefill_decode(model, ids[:, :64], 2, patched=False)  # warm-up
    for _ in range(repeats):  # interleaved so machine noise hits every method alike
        for name in names:
            with method(model, FULL if name == FULL_NAME else name) as patched:
                runs[name].append(prefill_decode(model, ids, new_tokens, patched))
    ref = reference(model, ids, new_tokens)
    base_prefill = statistics.median(r.prefill_s for r in runs[FULL_NAME])
    base_tps = statistics.median(r.decode_steps / r.decode_s for r in runs[FULL_NAME])
    base_kv_full = runs[FULL_NAME][-1].kv_bytes_full_end
    rows = []
    for name in names:
        with method(model, FULL if name == FULL_NAME else name) as patched:
            fid = fidelity(ref, forced_run(model, ids, ref, patched) if patched else ref)
        rs = runs[name]
        prefill = statistics.median(r.prefill_s for r in rs)
        tps = statistics.median(r.decode_steps / r.decode_s for r in rs)
        kv = rs[-1].kv_bytes_end
        rows.append(
            {
                "method": name,
                "prefill_s": prefill,
                "prefill_speedup": base_prefill / prefill,
                "decode_tok_s": tps,
                "decode_speedup": tps / base_tps,
                "kv_mib": kv / 2**20,
                "kv_ratio": kv / base_kv_full if base_kv_full else float("nan"),
                "next_token_kl": fid["kl"],
                "kl_max": fid["kl_max"],
                "top1_agreement": fid["top1_agreement"],
                "greedy_match": fid["greedy_match"],
                "greedy_prefix": fid["greedy_prefix"],
                "prefill_s_runs": [r.prefill_s for r in rs],
                "decode_tok_s_runs": [r.decode_steps / r.decode_s for r in rs],
                "tokens": rs[-1].tokens[0],
            }
        )
    return rows
