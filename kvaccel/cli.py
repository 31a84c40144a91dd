"""The ``kvaccel`` command line: methods, generate, compare (+ eval/bench from the harness)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="KV-cache acceleration for Hugging Face LMs.")
console = Console(width=None if sys.stdout.isatty() else 160)


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(2)


@app.command("methods")
def methods_cmd() -> None:
    """List every registered method with its stage, options and summary."""
    import kvaccel

    table = Table(title="kvaccel methods")
    for col in ("stage", "name", "options", "summary"):
        table.add_column(col)
    for m in kvaccel.methods():
        opts = ", ".join(f"{f['name']}={f['default']!r}" for f in m["fields"])
        table.add_row(m["stage"], m["name"], opts, m["summary"])
    console.print(table)


@app.command("generate")
def generate_cmd(
    prompt: str | None = typer.Option(None, help="Prompt text."),
    file: Path | None = typer.Option(None, help="Read the prompt from this file."),
    method: str = typer.Option("", help='Method spec, e.g. "streaming(budget=512)" or "snapkv+think(ratio=0.4)".'),
    model: str | None = typer.Option(None, help="Local path or hub id; default: the embedded SmolLM2-135M."),
    max_new_tokens: int = typer.Option(64, min=1),
    chat: bool = typer.Option(False, help="Wrap the prompt in the tokenizer's chat template."),
) -> None:
    """Generate greedily from a patched model and print the text and the cache report."""
    import torch

    import kvaccel

    if (prompt is None) == (file is None):
        _fail(ValueError("give exactly one of --prompt or --file"))
    text = prompt if prompt is not None else file.read_text()
    try:
        specs = kvaccel.parse_spec(method) if method else []  # bad specs fail before the model loads
        mdl, tok = kvaccel.load_model(model)
        kvaccel.patch(mdl, *specs)
    except (ValueError, ImportError, FileNotFoundError) as e:
        _fail(e)
    if chat and tok.chat_template:
        text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt")
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
    model: str | None = typer.Option(None, help="Local path or hub id; default: the embedded SmolLM2-135M."),
    length: int = typer.Option(2048, min=16, help="Prompt tokens (prose from pydoc_data)."),
    new_tokens: int = typer.Option(32, min=2),
    repeats: int = typer.Option(2, min=1),
) -> None:
    """Side-by-side: full attention vs each method on one prompt — speed, KV memory, fidelity."""
    import torch

    import kvaccel
    from kvaccel.compare import compare

    torch.manual_seed(0)
    try:
        mdl, tok = kvaccel.load_model(model)
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


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
