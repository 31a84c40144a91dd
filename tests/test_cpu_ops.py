"""kvaccel.kernels.cpu_ops: worker threads that leave torch's thread count alone, per-thread scratch buffers."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import kvaccel.kernels.block_sparse_attention as bsa
from kvaccel.kernels import cpu_ops
from kvaccel.kernels.block_sparse_attention import block_sparse_attention, block_sparse_attention_reference
from kvaccel.kernels.cpu_ops import array_workspace, release_workspace, run_parallel, workspace

TIMEOUT = 60  # seconds any wait of the tests below may take before the test fails instead of hanging


def _threads_of_a_new_thread() -> int:
    """``torch.get_num_threads()`` as a thread started now sees it (torch's process-wide default)."""
    seen: list[int] = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join(TIMEOUT)
    return seen[0]


def test_concurrent_calls_leave_the_thread_count_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """While one thread's ``run_parallel`` call is in flight, three more threads start (each reads its thread count)
    and run the block-sparse kernel at once: every thread, the caller, and a thread started afterwards see torch's
    count unchanged; every result equals the float64 reference; the workers' ops run single-threaded."""
    monkeypatch.setattr(bsa, "GATHER_BYTES", 1 << 14)  # many small chunks: the kernel calls run_parallel
    gen = torch.Generator().manual_seed(0)
    B, Hkv, G, L, D, blk = 1, 2, 3, 256, 16, 32
    kw = {
        "q": torch.randn(B, Hkv * G, L, D, generator=gen),
        "k": torch.randn(B, Hkv, L, D, generator=gen),
        "v": torch.randn(B, Hkv, L, D, generator=gen),
        "block_mask": torch.rand(B, Hkv * G, L // blk, L // blk, generator=gen) < 0.5,
        "scale": D**-0.5,
        "block_m": blk,
        "block_n": blk,
    }
    ref = block_sparse_attention_reference(**kw)[0].float()
    a, b = torch.randn(4, 64, 64, generator=gen), torch.randn(4, 64, 64, generator=gen)
    prod = torch.empty(4, 64, 64)
    in_flight, release = threading.Event(), threading.Event()
    started = threading.Barrier(4, timeout=TIMEOUT)  # the three kernel threads and this one
    worker_threads: list[int] = []
    seen: dict[str, int] = {}
    results: dict[str, torch.Tensor] = {}
    errors: list[BaseException] = []

    def gated(i: int) -> None:  # task 0 holds the call open until the other threads have started
        worker_threads.append(torch.get_num_threads())
        if i == 0:
            in_flight.set()
            assert release.wait(TIMEOUT)
        torch.matmul(a[i], b[i], out=prod[i])

    def caller() -> None:
        try:
            run_parallel(gated, [(i,) for i in range(4)], workers=2)
            seen["caller after"] = torch.get_num_threads()
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)

    def kernel_user(name: str) -> None:
        try:
            seen[f"{name} start"] = torch.get_num_threads()
            started.wait()
            results[name] = block_sparse_attention(**kw)
            seen[f"{name} after"] = torch.get_num_threads()
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first = threading.Thread(target=caller)
        first.start()
        assert in_flight.wait(TIMEOUT)
        users = [threading.Thread(target=kernel_user, args=(f"user {i}",)) for i in range(3)]
        for t in users:
            t.start()
        started.wait()
        release.set()
        for t in [first, *users]:
            t.join(TIMEOUT)
        assert not errors, errors
        names = ["caller after"] + [f"user {i} {when}" for i in range(3) for when in ("start", "after")]
        assert seen == dict.fromkeys(names, 2)
        assert torch.get_num_threads() == 2
        assert _threads_of_a_new_thread() == 2
    finally:
        release.set()
        torch.set_num_threads(threads)
    torch.testing.assert_close(prod, a @ b)
    for out in results.values():
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert len(results) == 3
    assert worker_threads == [1, 1, 1, 1]


def test_run_parallel_raises_from_workers_and_keeps_modes() -> None:
    """An error in a task reaches the caller; the caller's inference mode and grad mode reach the tasks."""
    modes: list[tuple[bool, bool]] = []

    def task(i: int) -> None:
        modes.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        if i == 3:
            raise ValueError("task 3")

    with pytest.raises(ValueError, match="task 3"):
        run_parallel(task, [(i,) for i in range(8)], workers=2)
    assert modes and set(modes) == {(False, True)}
    modes.clear()
    with torch.inference_mode():
        run_parallel(task, [(i,) for i in range(3)], workers=2)
    with torch.no_grad():
        run_parallel(task, [(i,) for i in range(3)], workers=2)
    assert modes.count((True, False)) == 3 and modes.count((False, False)) == 3


def test_workspace_is_per_thread_reused_and_aligned() -> None:
    """The same thread gets the same memory back for a request no larger than before; another thread gets its own;
    every part starts 64-byte aligned and has the asked size and dtype."""
    release_workspace()
    parts = [(10, torch.float32), (3, torch.int64), (7, torch.bool)]
    x, y, z = workspace(torch.device("cpu"), parts)
    assert [(t.numel(), t.dtype) for t in (x, y, z)] == [(n, dt) for n, dt in parts]
    assert all(t.data_ptr() % 64 == 0 for t in (x, y, z))
    assert workspace(torch.device("cpu"), parts[:1])[0].data_ptr() == x.data_ptr()
    other: list[int] = []
    t = threading.Thread(target=lambda: other.append(workspace(torch.device("cpu"), parts)[0].data_ptr()))
    t.start()
    t.join(TIMEOUT)
    assert other and other[0] != x.data_ptr()
    release_workspace()


def test_array_workspace_is_per_thread_reused_and_grows() -> None:
    """A host scratch array of the asked size and dtype; the same thread gets the same memory back for a request no
    larger than before and a larger buffer for a larger one; another thread gets its own; release frees them."""
    release_workspace()
    a = array_workspace(10, np.float32)
    assert a.shape == (10,) and a.dtype == np.float32
    assert array_workspace(4, np.int64).ctypes.data == a.ctypes.data  # 32 bytes fit in the 40 kept
    b = array_workspace(1000, np.float32)
    assert b.shape == (1000,) and array_workspace(10, np.float32).ctypes.data == b.ctypes.data
    other: list[int] = []
    t = threading.Thread(target=lambda: other.append(array_workspace(10, np.float32).ctypes.data))
    t.start()
    t.join(TIMEOUT)
    assert other and other[0] != b.ctypes.data
    release_workspace()
    assert cpu_ops._arrays == {}


def test_without_per_thread_counts_the_work_stays_in_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch build without per-thread thread counts: ``cpu_workers`` is 1 with a warning, and ``run_parallel``
    refuses worker threads rather than change the process-wide count."""
    monkeypatch.setattr(cpu_ops, "_per_thread_setters", lambda: None)
    cpu_ops._warn_no_workers.cache_clear()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.warns(RuntimeWarning, match="calling thread"):
            assert cpu_ops.cpu_workers("cpu") == 1
        with pytest.raises(RuntimeError, match="per-thread thread count"):
            run_parallel(lambda i: None, [(0,), (1,)], workers=2)
        run_parallel(lambda i: None, [(0,), (1,)], workers=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
        cpu_ops._warn_no_workers.cache_clear()


def test_single_thread_changes_the_calling_thread_only() -> None:
    """Inside the block the caller runs on 1 thread; a thread that reads its count meanwhile, one started meanwhile,
    and the caller afterwards all keep the process's count (torch.set_num_threads would have leaked to them)."""
    if cpu_ops._per_thread_setters() is None:
        pytest.skip("this torch build has no per-thread thread count")
    before = torch.get_num_threads()
    if before == 1:
        pytest.skip("needs more than one intra-op thread")
    seen: dict[str, int] = {}
    running = threading.Thread(target=lambda: (go.wait(), seen.__setitem__("running", torch.get_num_threads())))
    go = threading.Event()
    running.start()
    torch.get_num_threads()
    with cpu_ops.single_thread():
        seen["inside"] = torch.get_num_threads()
        go.set()
        running.join()
        started = threading.Thread(target=lambda: seen.__setitem__("started", torch.get_num_threads()))
        started.start()
        started.join()
    assert seen == {"inside": 1, "running": before, "started": before}
    assert torch.get_num_threads() == before
