"""Eval sweeps on a Ray cluster (optional extra ``kvaccel[ray]``): the grid's cells run on actors.

    kvaccel eval --method "snapkv(budget=0.25)" --tasks passkey,niah_single --lengths 1024,2048 --ray local
    kvaccel eval ... --ray auto                  # join the cluster this node belongs to (``ray start`` was run)
    kvaccel eval ... --ray ray://head:10001      # Ray client

A cell is one (task, length): full attention and every method on its samples. Each actor loads the model once
and runs cells with the serial harness's own code (``runner.run_eval`` restricted to that cell, with the rows
already on disk handed over so they are skipped), so the rows are the serial run's rows. The driver appends them
to the same resumable ``results.jsonl``; the caller then finishes the report with a serial ``run_eval`` that finds
everything done. Timing columns (prefill_s, decode_s) come from whichever node ran the cell: time on one machine
(``kvaccel bench``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

INSTALL_HINT = "pip install 'kvaccel[ray]'"


def require_ray():
    try:
        import ray
    except ImportError as e:
        raise ImportError(f"--ray needs Ray, an optional extra of kvaccel: {INSTALL_HINT}") from e
    return ray


def connect(address: str, num_cpus: int | None = None):
    """``local``: start a local cluster (``num_cpus``, default 2, no dashboard); anything else is passed to
    ``ray.init(address=...)`` (``auto``, ``host:6379``, ``ray://host:10001``). Returns the ``ray`` module."""
    ray = require_ray()
    if not address:
        raise ValueError("--ray needs an address: 'local', 'auto', 'host:port' or 'ray://host:10001'")
    if ray.is_initialized():
        return ray
    if address == "local":
        ray.init(num_cpus=num_cpus or 2, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    return ray


class EvalWorker:
    """One Ray actor: loads the model once, then runs any number of (task, length) cells."""

    def __init__(self, model: str | None, dtype: str, device: str, threads: int = 1):
        import torch

        import kvaccel

        torch.set_num_threads(threads)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.model, self.tok = kvaccel.load_model(model, dtype=dtype, device=device)

    def run_cell(self, cell: dict[str, Any], done_rows: list[dict]) -> list[dict]:
        """The serial harness on one cell; ``done_rows`` (already on disk) are skipped, new rows returned."""
        from .runner import _append, read_results, result_key, run_eval

        with tempfile.TemporaryDirectory(prefix="kvaccel-ray-") as d:
            for r in done_rows:
                _append(Path(d) / "results.jsonl", r)
            before = {result_key(r) for r in done_rows}
            run_eval(self.model, self.tok, cell["methods"], [cell["task"]], [cell["length"]], cell["samples"], d,
                     seed=cell["seed"], new_tokens=cell["new_tokens"], haystack=cell["haystack"],
                     question_aware=cell["question_aware"], progress=False, model_id=cell["model_id"], write=False)
            return [r for r in read_results(Path(d) / "results.jsonl") if result_key(r) not in before]


def run_eval_ray(
    address: str,
    model: str | None,
    methods: list[str],
    tasks: list[str],
    lengths: list[int],
    samples: int,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    new_tokens: int | dict | None = None,
    haystack: str = "noise",
    question_aware: bool = False,
    dtype: str = "float32",
    device: str = "cpu",
    actors: int | None = None,
    num_cpus: int | None = None,
    progress: bool = True,
    on_result: Callable[[dict], None] | None = None,
    model_id: str | None = None,
) -> int:
    """Run the eval grid's cells on Ray actors and append their rows to ``out_dir/results.jsonl``.

    ``model`` is what each actor passes to ``kvaccel.load_model`` (None: the default model); ``model_id`` is the
    run config's model name (default: ``model``). ``actors`` defaults to the cluster's CPU count (one CPU each,
    torch on one thread), at most one per cell. Returns the number of rows computed. Finish with
    ``runner.run_eval`` on the same arguments to write the reports.
    """
    from .runner import FULL, _append, _drop_torn_tail, check_out_dir, check_resume, read_results

    ray = require_ray()
    model_id = model_id or model
    out = check_out_dir(out_dir)
    cfg = {"model": model_id, "seed": seed, "haystack": haystack, "question_aware": question_aware}
    check_resume(out, cfg)
    jsonl = out / "results.jsonl"
    _drop_torn_tail(jsonl)
    rows_by_cell: dict[tuple, list[dict]] = {}
    for r in read_results(jsonl):
        rows_by_cell.setdefault((r["task"], int(r["length"])), []).append(r)
    all_methods = {FULL, *methods}
    cells = []
    for task in tasks:
        for length in lengths:
            done = [r for r in rows_by_cell.get((task, length), []) if r["method"] in all_methods]
            if len({(r["method"], str(r["sample"])) for r in done}) >= len(all_methods) * int(samples):
                continue  # complete (a shorter local file may leave a cell short: then it reruns and adds nothing)
            cells.append(({"task": task, "length": length, "methods": list(methods), "samples": int(samples),
                           "seed": seed, "new_tokens": new_tokens, "haystack": haystack,
                           "question_aware": question_aware, "model_id": model_id}, done))
    if not cells:
        return 0
    connect(address, num_cpus=num_cpus)
    n_actors = actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
    n_actors = min(n_actors, len(cells))
    Worker = ray.remote(num_cpus=1)(EvalWorker)
    workers = [Worker.remote(model, dtype, device) for _ in range(n_actors)]
    from ray.util import ActorPool

    pool = ActorPool(workers)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cells), desc=f"eval cells on {n_actors} Ray actors", unit="cell", dynamic_ncols=True)
    computed = 0
    try:
        for rows in pool.map_unordered(lambda w, c: w.run_cell.remote(*c), cells):
            for row in rows:
                _append(jsonl, row)
                computed += 1
                if on_result is not None:
                    on_result(row)
            if bar:
                bar.update(1)
    finally:
        if bar:
            bar.close()
        for w in workers:
            ray.kill(w)
    return computed
