"""cpu_ops: what the kernels' PyTorch (CPU) paths share.

- :func:`run_parallel` / :func:`cpu_workers`: independent chunks of a kernel on Python worker threads, each running
  its ops single-threaded, instead of every op splitting over OpenMP threads;
- :func:`workspace` / :func:`array_workspace` / :func:`release_workspace`: scratch buffers per thread (and
  device), reused between calls;
- :data:`flash_cpu`: PyTorch's fused CPU flash-attention op, which also returns the row log-sum-exp;
- :func:`single_thread`: a block of small ops on one intra-op thread in the calling thread only.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

__all__ = ["array_workspace", "cpu_workers", "flash_cpu", "release_workspace", "run_parallel", "single_thread",
           "workspace"]

#: ``flash_cpu(q, k, v, attn_mask=None, scale=..., is_causal=False) -> (out, lse, ...)``: fused, float32 accumulation
flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

# --------------------------------------------------------------------------------------------------------------
# Scratch buffers
# --------------------------------------------------------------------------------------------------------------
_scratch: dict[tuple[int, torch.device], Tensor] = {}  # (thread id, device) -> byte buffer
_scratch_lock = threading.Lock()


def workspace(device: torch.device, parts: list[tuple[int, torch.dtype]]) -> list[Tensor]:
    """Flat scratch tensors of ``parts`` (``(numel, dtype)`` each) carved from one byte buffer per thread and
    device, kept between calls.

    A kernel calls this once per chunk with similar sizes layer after layer; reusing the buffer saves the page
    faults of fresh allocations, which dominate a gather on CPU. Each thread's buffer grows to its largest request;
    :func:`release_workspace` frees them.
    """
    align = 64
    sizes = [-(-n * dt.itemsize // align) * align for n, dt in parts]
    need = sum(sizes)
    key = (threading.get_ident(), device if isinstance(device, torch.device) else torch.device(device))
    buf = _scratch.get(key)  # only this thread replaces its own entry: no lock to read it
    if buf is None or buf.numel() < need:
        with _scratch_lock:
            buf = _scratch[key] = torch.empty(need, dtype=torch.uint8, device=device)
    out, off = [], 0
    for (n, dt), size in zip(parts, sizes, strict=True):
        out.append(buf[off : off + size].view(dt)[:n])
        off += size
    return out


_arrays: dict[int, np.ndarray] = {}  # thread id -> byte buffer (host memory, for compiled kernels)


def array_workspace(n: int, dtype: type[np.generic]) -> np.ndarray:
    """A flat scratch array of ``n`` items of ``dtype``, from one byte buffer per thread kept between calls (as
    :func:`workspace`, for a compiled kernel's host arrays: numpy slicing costs ~0.2 us where a tensor's costs
    several)."""
    need = n * np.dtype(dtype).itemsize
    key = threading.get_ident()
    buf = _arrays.get(key)  # only this thread replaces its own entry: no lock to read it
    if buf is None or buf.shape[0] < need:
        with _scratch_lock:
            buf = _arrays[key] = np.empty(need, np.uint8)
    return buf[:need].view(dtype)


def release_workspace() -> None:
    """Free the scratch buffers of every thread."""
    with _scratch_lock:
        _scratch.clear()
        _arrays.clear()


# --------------------------------------------------------------------------------------------------------------
# Worker threads
# --------------------------------------------------------------------------------------------------------------
_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def cpu_workers(device: torch.device | str) -> int:
    """Worker threads :func:`run_parallel` uses for ops on ``device``: ``torch.get_num_threads()`` on CPU, else 1
    (also 1, with a one-time warning, when this torch build offers no per-thread thread count: see
    :func:`run_parallel`)."""
    if torch.device(device).type != "cpu":
        return 1
    workers = max(1, torch.get_num_threads())
    if workers > 1 and _per_thread_setters() is None:
        _warn_no_workers()
        return 1
    return workers


@functools.cache
def _per_thread_setters() -> tuple[Callable[[int], int], ...] | None:
    """The C functions that set the *calling thread's* intra-op thread count without touching torch's process-wide
    default: OpenMP's ``omp_set_num_threads`` (a per-thread setting) and, when torch uses MKL,
    ``mkl_set_num_threads_local`` (``MKL_Set_Num_Threads_Local``: the lower-case symbol is the Fortran entry, which
    takes a pointer); both resolved in the libraries torch's extension module links. ``None`` when the
    parallel backend is not OpenMP or a function is missing (then :func:`cpu_workers` returns 1)."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        lib = ctypes.CDLL(torch._C.__file__)
        setters = [lib.omp_set_num_threads]
        if torch.backends.mkl.is_available():
            setters.append(lib.MKL_Set_Num_Threads_Local)  # the C entry (by value)
    except (OSError, AttributeError):
        return None
    return tuple(setters)


@functools.cache
def _warn_no_workers() -> None:
    warnings.warn(
        "kvaccel's CPU kernels run their chunks in the calling thread (with torch's intra-op threads) instead of on "
        "worker threads: this torch build has no per-thread thread count kvaccel can set (it needs the OpenMP "
        "parallel backend); results are the same, the kernels may be slower on a loaded machine",
        RuntimeWarning,
        stacklevel=3,
    )


def _single_threaded_worker() -> None:
    """Pool initializer: this worker thread's own ops run on 1 thread; torch's process-wide default is untouched."""
    torch.get_num_threads()  # torch's per-thread lazy init (which copies the process default) must run first
    for setter in _per_thread_setters():
        setter(1)
    if torch.get_num_threads() != 1:
        raise RuntimeError(
            f"kvaccel could not make its CPU worker thread single-threaded (it reports {torch.get_num_threads()} "
            "threads): set torch.set_num_threads(1) to run the kernels without worker threads"
        )


def run_parallel(fn: Callable[..., None], tasks: Sequence[tuple], workers: int) -> None:
    """``fn(*task)`` for every task; with ``workers > 1``, on that many Python worker threads whose own PyTorch ops
    run single-threaded.

    Why: the CPU path is a few dozen mid-sized ops per chunk. With ``w`` OpenMP threads every op ends in a barrier
    that waits for the slowest thread; on a shared machine one descheduled thread stalls all of them, and the path
    ran ~3x slower than with 1 thread (``benchmarks/block_sparse_kernel.py``). Independent chunks on ``w`` threads
    (ATen releases the GIL inside ops) never wait for each other; tasks are taken in order as workers free up, so
    the largest (first) chunks spread over the workers. Tasks must write disjoint outputs.

    No shared state changes: each pool thread sets its own OpenMP (and MKL) thread count to 1 once, when it starts
    (:func:`_per_thread_setters`); ``torch.set_num_threads`` would also set the process-wide default that every
    thread started later inherits, so concurrent callers could leave it at 1. Safe to call from several threads at
    once. The caller's inference and grad modes apply inside the tasks.
    """
    if workers <= 1 or len(tasks) <= 1:
        for t in tasks:
            fn(*t)
        return
    if _per_thread_setters() is None:
        raise RuntimeError(
            f"run_parallel(workers={workers}) needs a per-thread thread count, which this torch build does not offer "
            "(it needs the OpenMP parallel backend): pass workers=cpu_workers(device), which is 1 here"
        )
    with _pools_lock:
        pool = _pools.get(workers)
        if pool is None:
            pool = _pools[workers] = ThreadPoolExecutor(
                workers, thread_name_prefix="kvaccel-cpu", initializer=_single_threaded_worker
            )
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()  # thread-local modes

    def call(task: tuple) -> None:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            fn(*task)

    for _ in pool.map(call, tasks):
        pass


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run the block's torch ops on one intra-op thread in the *calling* thread only, its count restored after.

    For small per-step work (a decode step's scoring: a few thousand elements), where waking the other OpenMP threads
    costs more than the work. Uses the per-thread setters (:func:`_per_thread_setters`), so other Python threads and
    torch's process-wide default are untouched; on a build without them the block runs unchanged (same results)."""
    setters = _per_thread_setters()
    n = torch.get_num_threads()
    if setters is None or n == 1:
        yield
        return
    for setter in setters:
        setter(1)
    try:
        yield
    finally:
        for setter in setters:
            setter(n)
