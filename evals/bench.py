"""Speed and memory grid: full attention vs methods, interleaved in one process so ratios are fair.

Per (prompt length, batch size) and repetition, the baseline and each method run in turn (the order alternates
between repetitions). Each run: prefill (time to first token), ``new_tokens - 1`` greedy decode steps (time per
output token), the process RSS sampled by a background thread from ``/proc/self/statm`` (peak minus the RSS before
the run: the memory the run added, unlike ``getrusage``'s monotonic high-water mark) and ``kv_bytes``.
"""

from __future__ import annotations

import os
import statistics
import threading
from typing import Any

import torch

from kvaccel.compare import input_device

from .loop import FULL, fidelity, forced_run, method, prefill_decode, reference
from .runner import check_lengths, check_methods, method_path

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss() -> int:
    """Resident set size of this process now, in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


class RssSampler:
    """Context manager: peak RSS over the block, sampled every ``interval`` seconds by a daemon thread."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.start, self.peak = interval, 0, 0
        self._stop = threading.Event()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, current_rss())

    def __enter__(self):
        self.start = self.peak = current_rss()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss())

    @property
    def delta(self) -> int:
        return max(0, self.peak - self.start)


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in [0, 100]."""
    xs = sorted(x for x in xs if x == x)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def spread(xs: list[float]) -> dict[str, float]:
    """Median, p10 and p90 (the colleague's ``metrics.summarize`` when it offers them)."""
    try:
        from .metrics import summarize

        s = summarize(xs)
        if isinstance(s, dict) and {"median", "p10", "p90"} <= set(s):
            return {k: float(s[k]) for k in ("median", "p10", "p90")}
    except (ImportError, TypeError, ValueError, AttributeError):
        pass
    return {"median": statistics.median(xs), "p10": percentile(xs, 10), "p90": percentile(xs, 90)}


def bench_prompt(tokenizer, length: int, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
    from kvaccel.compare import prompt_ids

    return prompt_ids(tokenizer, length, device).repeat(batch, 1)


def bench_once(model, ids: torch.Tensor, new_tokens: int, patched: bool) -> dict[str, float]:
    """One timed greedy run (the harness's one loop): prefill + ``new_tokens - 1`` decode steps on a batch; a patched
    run also records what its method did (``runner.method_path``: step counters, prefill density, notes), read after
    the timed part."""
    with RssSampler() as mem:
        r = prefill_decode(model, ids, new_tokens, patched)
    out = {"ttft_s": r.prefill_s, "tpot_s": r.tpot_s, "rss_delta": mem.delta, "rss_peak": mem.peak,
           "kv_bytes": r.kv_bytes_end, "kv_bytes_full": r.kv_bytes_full_end}
    if patched:
        from kvaccel.api import report

        out["path"] = method_path(report(model))
    return out


def run_bench(
    model,
    tokenizer,
    methods: list[str],
    lengths: list[int],
    batches: list[int],
    new_tokens: int = 32,
    repeats: int = 3,
    warmup: int = 1,
    progress: bool = False,
    with_fidelity: bool = True,
) -> list[dict[str, Any]]:
    """The grid lengths × batches; one row per (method, length, batch) with medians, p10/p90 and speedups.

    Speedups are ratios of the medians (``prefill_speedup = full ttft / method ttft``, ``decode_speedup = full
    tpot / method tpot``); the raw timings are kept in ``ttft_runs`` / ``tpot_runs``. ``with_fidelity``: per length,
    ``kl``, ``top1_agreement``, ``greedy_match`` and ``greedy_prefix`` of each method teacher-forced on full's
    ``new_tokens``-token greedy continuation of the batch's first prompt (``evals.loop.fidelity``; untimed runs).
    """
    methods = [FULL] + check_methods(methods)
    lengths = check_lengths(model, lengths, margin=new_tokens)
    if not batches or any(int(b) < 1 for b in batches):
        raise ValueError(f"batch sizes must be >= 1, got {batches}")
    if new_tokens < 2 or repeats < 1 or warmup < 0:
        raise ValueError("need new_tokens >= 2, repeats >= 1, warmup >= 0")
    grid = [(n, int(b)) for n in lengths for b in batches]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(grid) * len(methods) * (repeats + warmup), desc="bench", unit="run", dynamic_ncols=True)
    rows: list[dict[str, Any]] = []
    fid_by_length: dict[int, dict[str, dict]] = {}
    try:
        for length, batch in grid:
            ids = bench_prompt(tokenizer, length, batch, input_device(model))
            runs: dict[str, list[dict]] = {m: [] for m in methods}
            for rep in range(warmup + repeats):
                order = methods if rep % 2 == 0 else methods[::-1]  # alternate so drift hits all alike
                for m in order:
                    with method(model, m) as patched:
                        r = bench_once(model, ids, new_tokens, patched)
                    if rep >= warmup:
                        runs[m].append(r)
                    if bar:
                        bar.update(1)
            if with_fidelity and length not in fid_by_length:  # the same first prompt for every batch size
                ref = reference(model, ids[:1], new_tokens)
                fid_by_length[length] = {}
                for m in methods:
                    with method(model, m) as patched:
                        run = forced_run(model, ids[:1], ref, patched) if patched else ref
                    fid_by_length[length][m] = fidelity(ref, run)
            fid = fid_by_length.get(length, {})
            base = None
            for m in methods:
                rs = runs[m]
                ttft, tpot = spread([r["ttft_s"] for r in rs]), spread([r["tpot_s"] for r in rs])
                row = {
                    "method": m, "length": length, "batch": batch, "new_tokens": new_tokens, "repeats": repeats,
                    "ttft_s": ttft["median"], "ttft_p10": ttft["p10"], "ttft_p90": ttft["p90"],
                    "tpot_s": tpot["median"], "tpot_p10": tpot["p10"], "tpot_p90": tpot["p90"],
                    "tokens_per_s": batch / tpot["median"] if tpot["median"] > 0 else float("nan"),
                    "rss_delta_mib": statistics.median(r["rss_delta"] for r in rs) / 2**20,
                    "rss_peak_mib": max(r["rss_peak"] for r in rs) / 2**20,
                    "kv_bytes": rs[-1]["kv_bytes"], "kv_bytes_full": rs[-1]["kv_bytes_full"],
                    "ttft_runs": [r["ttft_s"] for r in rs], "tpot_runs": [r["tpot_s"] for r in rs],
                    **fid.get(m, {}),
                }
                if "path" in rs[-1]:
                    row["path"] = rs[-1]["path"]
                row["kv_ratio"] = row["kv_bytes"] / row["kv_bytes_full"] if row["kv_bytes_full"] else None
                if m == FULL:
                    base = row
                row["prefill_speedup"] = base["ttft_s"] / row["ttft_s"] if row["ttft_s"] > 0 else float("nan")
                row["decode_speedup"] = base["tpot_s"] / row["tpot_s"] if row["tpot_s"] > 0 else float("nan")
                rows.append(row)
    finally:
        if bar:
            bar.close()
    return rows
