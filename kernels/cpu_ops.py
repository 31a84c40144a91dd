"""cpu_ops: what the kernels' PyTorch (CPU) paths share.

- :func:`run_parallel` / :func:`cpu_workers`: independent chunks of a kernel on Python worker threads, each running
  its ops single-threaded, instead of every op splitting over OpenMP threads;
- :func:`workspace` / :func:`release_workspace`: scratch buffers per thread and device, reused between calls;
- :data:`flash_cpu`: PyTorch's fused CPU flash-attention op, which also returns the row log-sum-exp.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

__all__ = ["cpu_workers", "flash_cpu", "release_workspace", "run_parallel", "workspace"]

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
    sizes = [-(-n * torch.empty(0, dtype=dt).element_size() // align) * align for n, dt in parts]
    need = sum(sizes)
    key = (threading.get_ident(), torch.device(device))
    with _scratch_lock:
        buf = _scratch.get(key)
        if buf is None or buf.numel() < need:
            buf = _scratch[key] = torch.empty(need, dtype=torch.uint8, device=device)
    out, off = [], 0
    for (n, dt), size in zip(parts, sizes, strict=True):
        out.append(buf[off : off + size].view(dt)[:n])
        off += size
    return out


def release_workspace() -> None:
    """Free the scratch buffers of every thread."""
    with _scratch_lock:
        _scratch.clear()


# --------------------------------------------------------------------------------------------------------------
# Worker threads
# --------------------------------------------------------------------------------------------------------------
_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def cpu_workers(device: torch.device | str) -> int:
    """Worker threads :func:`run_parallel` uses for ops on ``device``: ``torch.get_num_threads()`` on CPU, else 1."""
    return max(1, torch.get_num_threads()) if torch.device(device).type == "cpu" else 1


def run_parallel(fn: Callable[..., None], tasks: Sequence[tuple], workers: int) -> None:
    """``fn(*task)`` for every task; with ``workers > 1``, on that many Python threads, each running its PyTorch ops
    single-threaded (intra-op threads set to 1 for the duration, restored after).

    Why: the CPU path is a few dozen mid-sized ops per chunk. With ``w`` OpenMP threads every op ends in a barrier
    that waits for the slowest thread; on a shared machine one descheduled thread stalls all of them, and the path
    ran ~3x slower than with 1 thread (``benchmarks/block_sparse_kernel.py``). Independent chunks on ``w`` threads
    (ATen releases the GIL inside ops) never wait for each other; tasks are taken in order as workers free up, so
    the largest (first) chunks spread over the workers. Tasks must write disjoint outputs.
    """
    if workers <= 1 or len(tasks) <= 1:
        for t in tasks:
            fn(*t)
        return
    with _pools_lock:
        pool = _pools.get(workers)
        if pool is None:
            pool = _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="kvaccel-cpu")
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()  # thread-local modes

    def call(task: tuple) -> None:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            fn(*task)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # global: the workers' ops run single-threaded
    try:
        for _ in pool.map(call, tasks):
            pass
    finally:
        torch.set_num_threads(threads)
