"""Quantized KV storage (kv_int8 / kv_int4 / kv_fp8, issue 22): KL vs full, bytes held, decode ms/step.

KL (the ``fidelity`` protocol of ``benchmarks/peers/``): ``--samples`` windows of prose at seeded offsets; the
``--context`` tokens are prefilled (compressed, then quantized), the next ``--tokens`` tokens are fed teacher-forced in
one forward under ``kvaccel.paused`` (no further eviction; the storage stage stays on), and each position's next-token
distribution is compared with the stock model's: ``KL(full || method)`` averaged over positions, then samples. Bytes
are counted from the cache's tensors after the prefill (``report()["kv_storage_bytes"]``)::

    .venv/bin/python benchmarks/kv_quant.py kl --context 2048 --samples 4

Decode speed: per configuration a cache is prefilled with the same ``--batch`` x ``--context`` prompt, then decode
steps are timed one at a time, the configurations interleaved step by step in one process (full attention = the
stock model with a DynamicCache); wall clock, or ``--clock cpu`` (the process's CPU time: with ``--threads 1`` the
steady figure on a shared machine)::

    .venv/bin/python benchmarks/kv_quant.py speed --context 2048 --batch 1 --steps 32

The attention operator alone (one layer of the default model's shape: 9 query / 3 KV heads, head size 64; a window of
128 tokens, the rest quantized in groups of 32), thread CPU time per call on one thread (other processes on a shared
machine disturb it less than wall clock; ``--threads 2``: wall clock on 2 threads, where the numba kernel splits its
work over worker threads): full attention as the stock model runs it (SDPA over the whole cache, plus the
``torch.cat`` of the new token into ``DynamicCache``) beside ``quantized_decode_attention``'s numba and torch
backends for each code format::

    .venv/bin/python benchmarks/kv_quant.py op --context 2048 --batch 1

The numba kernel's first-use cost (a fresh process with an empty ``NUMBA_CACHE_DIR``, then one that loads the cache;
``--src`` runs a checkout of another revision instead)::

    .venv/bin/python benchmarks/kv_quant.py compile --format fp8

Bytes held after the prompt (no decode step), per storage spec alone and on the tokens a budget of 0.25 keeps, from
the tensors of a layer built from random keys and values of the default model's shape::

    .venv/bin/python benchmarks/kv_quant.py held --context 8192 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch

import kvaccel

DEFAULT_SPECS = (
    "kv_int8",
    "kv_int4(group_size=32,residual=128)",
    "kv_int4",
    "kv_int4(bits=2,group_size=32,residual=128)",
    "kv_fp8",
    "snapkv(budget=0.25)",
    "snapkv(budget=0.25)+kv_int4(group_size=32,residual=128)",
    "expected_attention(budget=0.25)",
    "expected_attention(budget=0.25)+kv_int4(group_size=32,residual=128)",
)


def _windows(tok, n: int, samples: int, seed: int) -> list[list[int]]:
    from kvaccel.compare import prose

    ids = tok(prose(400_000), add_special_tokens=False)["input_ids"]
    starts = sorted(random.Random(seed).sample(range(0, len(ids) - n), samples))
    return [ids[s : s + n] for s in starts]


def _storage(rep: dict) -> dict:
    parts = rep.get("kv_storage_bytes")
    if not parts:
        return {}
    q = parts["codes"] + parts["scales"] + parts["zeros"]
    return dict(quantized_bytes=q, window_bytes=parts["window"], other_bytes=parts["other"],
                bytes_per_element=q / parts["quantized_elements"] if parts["quantized_elements"] else None)


def kl(args) -> None:
    model, tok = kvaccel.load_model(dtype=getattr(torch, args.dtype))
    windows = _windows(tok, args.context + args.tokens, args.samples, args.seed)
    specs = args.specs.split(";") if args.specs else DEFAULT_SPECS
    rows: dict[str, list[dict]] = {s: [] for s in specs}
    with torch.inference_mode():
        for ids in windows:
            ctx, tgt = torch.tensor([ids[: args.context]]), torch.tensor([ids[args.context :]])
            from transformers import DynamicCache

            cache = DynamicCache()
            model(ctx, cache=cache, use_cache=True)
            ref = torch.log_softmax(model(tgt, cache=cache, use_cache=True).logits[0].double(), -1)
            for spec in specs:
                with kvaccel.patched(model, spec):
                    cache = kvaccel.KVAccelCache(model)
                    model(ctx, cache=cache)
                    rep = kvaccel.report(model)
                    with kvaccel.paused(model):
                        lp = torch.log_softmax(model(tgt, cache=cache).logits[0].double(), -1)
                kl_pos = (ref.exp() * (ref - lp)).sum(-1)
                rows[spec].append(dict(kl=float(kl_pos.mean()), kv_bytes=rep["kv_bytes"],
                                       kv_bytes_full=rep["kv_bytes_full"], **_storage(rep)))
    print(f"KL vs full, {args.samples} samples x {args.context} + {args.tokens} tokens, {args.dtype}, "
          f"threads {torch.get_num_threads()}")
    print(f"{'spec':72s} {'KL':>9s} {'held/full':>9s} {'B/elem':>7s} {'window MB':>9s}")
    for spec, rs in rows.items():
        bpe = [r["bytes_per_element"] for r in rs if r.get("bytes_per_element")]
        print(f"{spec:72s} {statistics.mean(r['kl'] for r in rs):9.5f} "
              f"{statistics.mean(r['kv_bytes'] / r['kv_bytes_full'] for r in rs):9.3f} "
              f"{(statistics.mean(bpe) if bpe else float('nan')):7.3f} "
              f"{statistics.mean(r.get('window_bytes', 0) for r in rs) / 1e6:9.2f}")


def speed(args) -> None:
    from transformers import DynamicCache

    model, tok = kvaccel.load_model(dtype=getattr(torch, args.dtype))
    ids = torch.tensor(_windows(tok, args.context + args.steps + 1, args.batch, args.seed))
    specs = ["full", *(args.specs.split(";") if args.specs else DEFAULT_SPECS)]
    caches, times = {}, {s: [] for s in specs}
    clock = time.process_time if args.clock == "cpu" else time.perf_counter  # cpu: the process's CPU time
    load0 = os.getloadavg()[0]
    with torch.inference_mode():
        for spec in specs:  # prefill every configuration (not timed)
            if spec == "full":
                caches[spec] = DynamicCache()
                model(ids[:, : args.context], cache=caches[spec], use_cache=True)
            else:
                with kvaccel.patched(model, spec):
                    caches[spec] = kvaccel.KVAccelCache(model)
                    model(ids[:, : args.context], cache=caches[spec])
        for t in range(args.steps):  # one step of every configuration in turn
            step = ids[:, args.context + t : args.context + t + 1]
            for spec in specs:
                if spec == "full":
                    t0 = clock()
                    model(step, cache=caches[spec], use_cache=True)
                    times[spec].append(clock() - t0)
                    continue
                with kvaccel.patched(model, spec):
                    t0 = clock()
                    model(step, cache=caches[spec])
                    times[spec].append(clock() - t0)
    skip = min(2, args.steps - 1)  # first steps: warm-up
    base = statistics.median(times["full"][skip:])
    print(f"decode ms/step (median of steps {skip}..{args.steps - 1}, {args.clock} clock), batch {args.batch} x "
          f"{args.context}, {args.dtype}, threads {torch.get_num_threads()}, interleaved step by step, load average "
          f"{load0:.1f} -> {os.getloadavg()[0]:.1f}")
    for spec in specs:
        med = statistics.median(times[spec][skip:])
        print(f"{spec:72s} {med * 1e3:8.2f} ms  speed vs full {base / med:5.2f}x")


def op(args) -> None:
    from kvaccel.kernels.quantized_decode_attention import quantized_decode_attention

    threads = args.threads or 1
    torch.set_num_threads(threads)
    clock = time.thread_time if threads == 1 else time.perf_counter  # more threads: wall clock (workers' time too)
    B, T = args.batch, args.context

    def cpu_ms(fn) -> float:
        fn()
        ts = []
        for _ in range(args.repeats):
            t0 = clock()
            fn()
            ts.append(clock() - t0)
        return statistics.median(ts) * 1e3

    q, k, v = _layer_tensors(B, T, args.seed)

    def full() -> None:
        torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.125, enable_gqa=True)
        torch.cat([k, k[:, :, :1]], 2), torch.cat([v, v[:, :, :1]], 2)

    base = cpu_ms(full)
    what = "thread CPU" if threads == 1 else "wall-clock"
    print(f"attention operator, batch {B} x {T} tokens, {what} ms per call (median of {args.repeats}), "
          f"{threads} thread(s), load average {os.getloadavg()[0]:.1f}")
    print(f"{'full (SDPA + DynamicCache cat)':34s} {base:8.3f} ms")
    for name, fmt in (("int8", "int8"), ("int4", "int4"), ("int2", "int2"), ("fp8 e4m3", "fp8")):
        case = _quantized_case(B, T, fmt, args.seed)  # (q, quant, window k, window v)
        row = [f"{name:34s}"]
        for backend in ("numba", "torch"):
            ms = cpu_ms(lambda b=backend, c=case: quantized_decode_attention(*c, scale=0.125, backend=b))
            row.append(f"{backend} {ms:8.3f} ms ({base / ms:4.2f}x)")
        print("  ".join(row))


def _layer_tensors(B: int, T: int, seed: int = 0) -> tuple:
    """``(q, k, v)`` of one decode step of one layer of the default model's shape (9 / 3 heads, head size 64) over
    ``T`` tokens, float32, seeded."""
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(B, 3, T, 64, generator=g), torch.randn(B, 3, T, 64, generator=g)
    return torch.randn(B, 9, 1, 64, generator=g), k, v


def _quantized_case(B: int, T: int, fmt: str, seed: int = 0) -> tuple:
    """``(q, quant, window k, window v)``: :func:`_layer_tensors` with the last 128 tokens in the window and the rest
    quantized in groups of 32 (``fmt``: int8 / int4 / int2 / fp8)."""
    from kvaccel.kernels.kv_quant import QuantizedKV, fp8_dtype, quantize_fp8, quantize_keys, quantize_values

    G, R = 32, 128
    q, k, v = _layer_tensors(B, T, seed)
    Tq = (T - R) // G * G
    if fmt == "fp8":
        (kc, ks), (vc, vs) = (quantize_fp8(x[:, :, :Tq], fp8_dtype("e4m3")) for x in (k, v))
        quant = QuantizedKV(8, kc, ks, None, vc, vs, None)
    else:
        bits = {"int8": 8, "int4": 4, "int2": 2}[fmt]
        quant = QuantizedKV(bits, *quantize_keys(k[:, :, :Tq], bits, G), *quantize_values(v[:, :, :Tq], bits, G))
    return q, quant, k[:, :, Tq:], v[:, :, Tq:]


def first_call(args) -> None:
    """(A child of ``compile``.) Seconds of this process's first and second ``quantized_decode_attention`` calls."""
    from kvaccel.kernels.quantized_decode_attention import quantized_decode_attention

    q, quant, k, v = _quantized_case(args.batch, args.context, args.format)
    times = []
    for _ in range(2):
        w, c = time.perf_counter(), time.process_time()
        quantized_decode_attention(q, quant, k, v, scale=0.125)
        times.append((time.perf_counter() - w, time.process_time() - c))
    print(f"{args.format}: first call {times[0][0]:.2f} s wall, {times[0][1]:.2f} s CPU; second "
          f"{times[1][0] * 1e3:.2f} ms ({quantized_decode_attention.__module__} from {kvaccel.__file__})")


def compile_cost(args) -> None:
    """The numba kernel's first-use cost: ``first-call`` in a fresh process with an empty ``NUMBA_CACHE_DIR`` (it
    compiles), then in a second one sharing that cache (it loads). ``--src DIR``: a checkout of another revision (e.g.
    ``git worktree add DIR REV``) put first on both processes' ``sys.path``, to compare side by side."""
    import subprocess
    import sys
    import tempfile

    env = dict(os.environ)
    if args.src:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.abspath(args.src), env.get("PYTHONPATH")]))
    cmd = [sys.executable, os.path.abspath(__file__), "first-call", "--context", str(args.context), "--batch",
           str(args.batch), "--format", args.format, *(["--threads", str(args.threads)] if args.threads else [])]
    with tempfile.TemporaryDirectory() as cache:
        env["NUMBA_CACHE_DIR"] = cache
        for what in ("empty cache (compiles)", "cached (loads)"):
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout.strip()
            print(f"{what:24s} {out}")


def held(args) -> None:
    """Bytes one layer holds after a ``--context``-token prompt (every slot of every buffer), times the model's layers,
    for each storage spec alone and on the tokens an eviction at budget 0.25 keeps; random keys and values of the
    default model's shape, in ``--dtype``. No decode step follows (the window holds no spare slots)."""
    from kvaccel.cache import KVAccelLayer
    from kvaccel.models import text_config
    from kvaccel.patches.storage.quantized_layer import QuantizedLayer

    model, _ = kvaccel.load_model()
    cfg = text_config(model)
    H, D, L = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads, cfg.num_hidden_layers
    dtype = getattr(torch, args.dtype)
    specs = args.specs.split(";") if args.specs else ("kv_int8", "kv_int4(group_size=32,residual=128)", "kv_int4",
                                                      "kv_fp8")
    full = args.context * H * 2 * D * torch.empty((), dtype=dtype).element_size() * L
    print(f"bytes held after a {args.context}-token prompt, {L} layers x {H} KV heads x head size {D}, {args.dtype}; "
          f"full cache {full / 2**20:.1f} MiB")
    for spec in specs:
        (method,) = kvaccel.parse_spec(spec)
        row = [f"{spec:38s}"]
        for kept in (args.context, args.context // 4):
            g = torch.Generator().manual_seed(args.seed)
            layer = KVAccelLayer()
            k, v = (torch.randn(1, H, kept, D, generator=g).to(dtype) for _ in range(2))
            layer.update(k, v)
            q = QuantizedLayer.from_layer(layer, **method.layer_options())
            parts = q.storage_nbytes()
            row.append(f"kept {kept:5d}: {q.nbytes() * L / 2**20:6.1f} MiB ({q.nbytes() * L / full:.3f}), window "
                       f"{parts['window'] * L / 2**20:4.1f} MiB")
        print("  ".join(row))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, fn in (("kl", kl), ("speed", speed), ("op", op), ("held", held), ("compile", compile_cost),
                     ("first-call", first_call)):
        s = sub.add_parser(name)
        s.add_argument("--context", type=int, default=2048)
        s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--specs", default=None, help="';'-separated method specs (default: DEFAULT_SPECS)")
        s.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
        s.set_defaults(fn=fn)
        if name == "kl":
            s.add_argument("--tokens", type=int, default=64)
            s.add_argument("--samples", type=int, default=4)
        elif name == "op":
            s.add_argument("--batch", type=int, default=1)
            s.add_argument("--repeats", type=int, default=50)
        elif name in ("compile", "first-call"):
            s.add_argument("--batch", type=int, default=1)
            s.add_argument("--format", default="int4", choices=["int8", "int4", "int2", "fp8"])
            if name == "compile":
                s.add_argument("--src", default=None, help="a checkout of another revision, first on sys.path")
        else:
            s.add_argument("--batch", type=int, default=1)
            s.add_argument("--steps", type=int, default=32)
            s.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                           help="wall clock, or the process's CPU time (less disturbed on a shared machine; with "
                                "--threads 1 it is the step's own time)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.fn(args)


if __name__ == "__main__":
    main()
