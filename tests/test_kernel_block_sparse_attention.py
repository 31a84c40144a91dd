"""Tests for kvaccel.kernels.block_sparse_attention: PyTorch path and Triton kernel against the float64 reference.

Triton cases are marked ``triton`` and run only with CUDA or under ``TRITON_INTERPRET=1`` (set before triton is
imported): ``TRITON_INTERPRET=1 python -m pytest tests/test_kernel_block_sparse_attention.py -m triton``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kvaccel.kernels.block_sparse_attention as bsa
from kvaccel.kernels import cpu_ops
from kvaccel.kernels.block_sparse_attention import (
    block_sparse_attention,
    block_sparse_attention_reference,
    block_sparse_csr,
    causal_block_mask,
    num_blocks,
)

from conftest import TRITON_DEVICE, TRITON_INTERPRET, requires_triton


def _inputs(
    B: int = 2,
    Hkv: int = 2,
    group: int = 3,
    L: int = 200,
    D: int = 16,
    *,
    block_m: int = 32,
    block_n: int = 32,
    density: float = 0.3,
    mask_heads: str = "per_head",
    perm: str = "none",
    valid: str = "none",
    Dv: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
) -> dict:
    gen = torch.Generator().manual_seed(seed)
    Hq = Hkv * group

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    nqb, nkb = num_blocks(L, block_m), num_blocks(L, block_n)
    H = {"per_head": Hq, "shared": 1, "per_kv": Hkv}[mask_heads]
    if mask_heads == "per_kv":  # the G heads of a kv head select the same tiles (the stacked path)
        mask = (torch.rand(B, Hkv, nqb, nkb, generator=gen) < density).repeat_interleave(group, 1)
    else:
        mask = torch.rand(B, H, nqb, nkb, generator=gen) < density
    key_perm = None
    if perm == "segment":  # PBS-style: a random permutation within each segment of 128 keys
        key_perm = torch.stack(
            [
                torch.cat([s + torch.randperm(min(128, L - s), generator=gen) for s in range(0, L, 128)])
                for _ in range(B * Hkv)
            ]
        ).view(B, Hkv, L)
    elif perm == "any":
        key_perm = torch.stack([torch.randperm(L, generator=gen) for _ in range(B * Hkv)]).view(B, Hkv, L)
    key_valid = None
    if valid != "none":
        n_pad = torch.tensor([L // 3, 0] + [7] * (B - 2))[:B]
        idx = torch.arange(L)[None, :]
        key_valid = idx >= n_pad[:, None] if valid == "left" else idx < (L - n_pad)[:, None]
    kw = {
        "q": rnd(B, Hq, L, D),
        "k": rnd(B, Hkv, L, D),
        "v": rnd(B, Hkv, L, Dv or D),
        "block_mask": mask,
        "scale": D**-0.5,
        "block_m": block_m,
        "block_n": block_n,
        "key_perm": key_perm,
        "key_valid": key_valid,
    }
    return {name: (t.to(device) if isinstance(t, torch.Tensor) else t) for name, t in kw.items()}


def _check(kw: dict, backend: str = "torch", atol: float = 1e-5, rtol: float = 1e-5) -> None:
    on_cpu = {name: (t.cpu() if torch.is_tensor(t) else t) for name, t in kw.items()}
    ref_out, ref_lse = block_sparse_attention_reference(**on_cpu)
    out, lse = block_sparse_attention(**kw, return_lse=True, backend=backend)
    q = kw["q"]
    assert out.dtype == q.dtype and out.shape == ref_out.shape and out.device == q.device
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out.double().cpu(), ref_out, atol=atol, rtol=rtol)
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse.cpu()), empty), "rows that see no key must get lse = -inf"
    assert (out.cpu()[empty] == 0).all(), "rows that see no key must be zero"
    torch.testing.assert_close(lse.double().cpu()[~empty], ref_lse[~empty], atol=atol, rtol=rtol)
    out_only = block_sparse_attention(**kw, backend=backend)
    torch.testing.assert_close(out_only, out, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# PyTorch path
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("L,block_m,block_n", [(256, 32, 32), (200, 32, 64), (173, 64, 16)])
@pytest.mark.parametrize("mask_heads", ["shared", "per_head"])
def test_all_blocks_equals_sdpa(group: int, L: int, block_m: int, block_n: int, mask_heads: str) -> None:
    kw = _inputs(group=group, L=L, block_m=block_m, block_n=block_n, mask_heads=mask_heads, density=2.0)
    out, lse = block_sparse_attention(**kw, return_lse=True)
    ref = F.scaled_dot_product_attention(kw["q"], kw["k"], kw["v"], is_causal=True, enable_gqa=True, scale=kw["scale"])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(lse).all()


def test_all_blocks_per_head_equals_sdpa() -> None:
    """Every causal tile selected, heads differing only above the diagonal (per-head units, all dense)."""
    kw = _inputs(group=3, L=150, block_m=32, block_n=32, mask_heads="per_head", density=0.5)
    kw["block_mask"] |= causal_block_mask(150, 32, 32)
    out = block_sparse_attention(**kw)
    ref = F.scaled_dot_product_attention(kw["q"], kw["k"], kw["v"], is_causal=True, enable_gqa=True, scale=kw["scale"])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("perm", ["none", "segment", "any"])
@pytest.mark.parametrize("valid", ["none", "left", "right"])
@pytest.mark.parametrize(
    "group,L,block_m,block_n,mask_heads",
    [
        (3, 128, 32, 32, "per_kv"),
        (3, 150, 16, 64, "per_head"),
        (1, 209, 64, 32, "shared"),
        (1, 100, 16, 16, "per_head"),
    ],
)
def test_torch_matches_reference(perm, valid, group, L, block_m, block_n, mask_heads) -> None:
    kw = _inputs(
        group=group, L=L, block_m=block_m, block_n=block_n, mask_heads=mask_heads, perm=perm, valid=valid, Dv=24
    )
    _check(kw)


def test_mixed_dense_and_sparse_heads() -> None:
    """Heads that select every causal tile run as one causal call; the others are gathered: both exact."""
    kw = _inputs(B=2, group=3, L=190, block_m=32, block_n=32, mask_heads="per_head", density=0.2)
    kw["block_mask"][0, :3] = True  # kv head 0 of batch 0: all of its query heads dense (stacked)
    kw["block_mask"][1, 4] = True  # one query head of batch 1 dense, its group-mates sparse
    _check(kw)


def test_rows_that_see_nothing() -> None:
    """Left padding: the padded query rows see no valid key; a query block with no tile sees nothing."""
    kw = _inputs(B=2, group=3, L=160, block_m=32, block_n=32, valid="left", density=0.5)
    kw["block_mask"][:, :, 3] = False
    ref_out, ref_lse = block_sparse_attention_reference(**kw)
    assert torch.isneginf(ref_lse).any()
    _check(kw)
    _, lse = block_sparse_attention(**kw, return_lse=True)
    assert torch.isneginf(lse[:, :, 96:128]).all()


def test_small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny gather budget forces one work item per chunk (bounded memory); the result does not change."""
    kw = _inputs(B=1, group=3, L=150, block_m=32, block_n=32, mask_heads="per_kv", perm="segment", valid="right")
    expected = block_sparse_attention(**kw)
    monkeypatch.setattr(bsa, "GATHER_BYTES", 1)
    torch.testing.assert_close(block_sparse_attention(**kw), expected, atol=1e-6, rtol=1e-6)
    _check(kw)


@pytest.mark.parametrize("mask_heads,perm,valid", [("per_head", "none", "none"), ("per_kv", "segment", "left")])
def test_worker_threads(monkeypatch: pytest.MonkeyPatch, mask_heads: str, perm: str, valid: str) -> None:
    """With 2 intra-op threads the chunks run on 2 worker threads (each single-threaded): same result as the
    reference, inference mode carried into the workers, the caller's thread count restored."""
    kw = _inputs(B=2, group=3, L=300, block_m=32, block_n=32, mask_heads=mask_heads, perm=perm, valid=valid)
    monkeypatch.setattr(bsa, "GATHER_BYTES", 1 << 14)  # many small chunks for the two workers
    threads = torch.get_num_threads()
    seen: list[tuple[int, bool]] = []
    flash = cpu_ops.flash_cpu

    def spy(*a, **k):
        seen.append((torch.get_num_threads(), torch.is_inference_mode_enabled()))
        return flash(*a, **k)

    monkeypatch.setattr(cpu_ops, "flash_cpu", spy)
    try:
        torch.set_num_threads(2)
        assert bsa.cpu_workers("cpu") == 2
        _check(kw)
        with torch.inference_mode():
            out = block_sparse_attention(**kw)
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        torch.testing.assert_close(block_sparse_attention(**kw), out, atol=1e-6, rtol=1e-6)
    finally:
        torch.set_num_threads(threads)
    assert len(seen) > 4 and all(n == 1 for n, _ in seen)  # the workers' ops run single-threaded
    assert any(inf for _, inf in seen) and not all(inf for _, inf in seen)


def test_run_parallel_raises_from_workers() -> None:
    """An error in a worker reaches the caller, and the thread count is restored."""
    threads = torch.get_num_threads()
    done: list[int] = []

    def task(i: int) -> None:
        if i == 3:
            raise ValueError("task 3")
        done.append(i)

    try:
        torch.set_num_threads(2)
        with pytest.raises(ValueError, match="task 3"):
            bsa.run_parallel(task, [(i,) for i in range(8)], workers=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert 3 not in done


@pytest.mark.parametrize("perm,valid", [("none", "none"), ("any", "left")])
def test_matmul_attend_matches_reference(monkeypatch: pytest.MonkeyPatch, perm: str, valid: str) -> None:
    """The PyTorch path off CPU attends by matmul + softmax instead of the CPU flash kernel: same results."""
    monkeypatch.setattr(cpu_ops, "flash_cpu", bsa._attend_matmul)
    kw = _inputs(group=3, L=150, block_m=32, block_n=16, perm=perm, valid=valid)
    kw["block_mask"][0, 0] = True  # a dense head (causal call)
    _check(kw)


@pytest.mark.parametrize("perm", ["none", "segment"])
def test_bf16(perm: str) -> None:
    kw = _inputs(group=3, L=200, block_m=32, block_n=16, perm=perm, valid="left", dtype=torch.bfloat16)
    _check(kw, atol=2e-2, rtol=2e-2)


def test_plan_then_run() -> None:
    kw = _inputs(group=3, L=150, block_m=32, block_n=16, perm="segment", valid="left")
    q, k, v = kw["q"], kw["k"], kw["v"]
    plan = bsa.plan_block_sparse(
        kw["block_mask"], 150, q.shape[1], k.shape[1], block_m=32, block_n=16, key_perm=kw["key_perm"],
        key_valid=kw["key_valid"],
    )
    out, lse = bsa.run_block_sparse(plan, q, k, v, scale=kw["scale"], return_lse=True)
    ref_out, ref_lse = block_sparse_attention(**kw, return_lse=True)
    torch.testing.assert_close(out, ref_out, atol=0, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=0, rtol=0)
    with pytest.raises(ValueError, match="do not match the plan"):
        bsa.run_block_sparse(plan, q[:, :, :100], k[:, :, :100], v[:, :, :100], scale=kw["scale"])


def test_csr_lists_full_then_partial() -> None:
    L, bm, bn = 96, 32, 32
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    indptr, nfull, indices = block_sparse_csr(mask, L, 2, 1, block_m=bm, block_n=bn)
    # per head: block 0 -> [0] partial; block 1 -> [0] full, [1] partial; block 2 -> [0, 1] full, [2] partial
    assert indptr.tolist() == [0, 1, 3, 6, 7, 9, 12]
    assert nfull.tolist() == [0, 1, 2, 0, 1, 2]
    assert indices.tolist() == [0, 0, 1, 0, 1, 2] * 2


def test_tiles_above_the_diagonal_are_ignored() -> None:
    kw = _inputs(group=1, L=128, block_m=32, block_n=32, density=0.5)
    upper = ~causal_block_mask(128, 32, 32)
    with_upper = dict(kw, block_mask=kw["block_mask"] | upper)
    torch.testing.assert_close(block_sparse_attention(**with_upper), block_sparse_attention(**kw), atol=0, rtol=0)


@pytest.mark.parametrize("field,value", [("block_m", 48), ("block_n", 8), ("block_m", True)])
def test_bad_block_size(field: str, value: int) -> None:
    kw = _inputs(L=64, block_m=16, block_n=16)
    kw[field] = value
    with pytest.raises(ValueError, match=rf"{field} \({value!r}\)"):
        block_sparse_attention(**kw)


@pytest.mark.parametrize(
    "mask",
    [
        torch.ones(2, 6, 7, 6, dtype=torch.bool),  # wrong number of query blocks
        torch.ones(2, 2, 7, 7, dtype=torch.bool),  # kv heads instead of query heads
        torch.ones(2, 6, 7, 7, dtype=torch.int64),  # not bool
        torch.ones(6, 7, 7, dtype=torch.bool),  # 3-D
    ],
)
def test_bad_mask(mask: torch.Tensor) -> None:
    kw = _inputs(L=200, block_m=32, block_n=32)
    kw["block_mask"] = mask
    with pytest.raises(ValueError, match="block_mask must be bool"):
        block_sparse_attention(**kw)


def test_bad_perm_and_valid() -> None:
    kw = _inputs(L=64, block_m=16, block_n=16)
    with pytest.raises(ValueError, match="key_perm"):
        block_sparse_attention(**dict(kw, key_perm=torch.zeros(2, 6, 64, dtype=torch.int64)))
    with pytest.raises(ValueError, match="key_valid"):
        block_sparse_attention(**dict(kw, key_valid=torch.ones(2, 64, dtype=torch.int64)))


def test_triton_on_cpu_without_interpreter_raises(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # read at call time: CPU tensors without the interpreter
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        block_sparse_attention(**_inputs(L=64, block_m=16, block_n=16), backend="triton")


# --------------------------------------------------------------------------------------------------------------
# Triton kernel (interpreter on CPU: small shapes)
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.triton
@requires_triton
@pytest.mark.parametrize("perm,valid", [("none", "none"), ("segment", "left"), ("any", "right")])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("L,block_m,block_n", [(77, 16, 32), (96, 32, 16)])
def test_triton_matches_reference(perm: str, valid: str, group: int, L: int, block_m: int, block_n: int) -> None:
    kw = _inputs(
        B=2, Hkv=1, group=group, L=L, block_m=block_m, block_n=block_n, perm=perm, valid=valid, Dv=24,
        density=0.5, device=TRITON_DEVICE,
    )
    _check(kw, backend="triton")


@pytest.mark.triton
@requires_triton
def test_triton_all_blocks_equals_sdpa() -> None:
    kw = _inputs(B=1, Hkv=1, group=3, L=80, block_m=16, block_n=32, density=2.0, device=TRITON_DEVICE)
    out = block_sparse_attention(**kw, backend="triton")
    ref = F.scaled_dot_product_attention(kw["q"], kw["k"], kw["v"], is_causal=True, enable_gqa=True, scale=kw["scale"])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.triton
@requires_triton
def test_triton_empty_rows() -> None:
    kw = _inputs(B=2, Hkv=1, group=3, L=64, block_m=16, block_n=16, valid="left", device=TRITON_DEVICE)
    kw["block_mask"][:, :, 2] = False
    _check(kw, backend="triton")


@pytest.mark.triton
@requires_triton
@pytest.mark.skipif(
    TRITON_INTERPRET,
    reason="the Triton interpreter returns garbage for bf16 outputs (decode_attention's kernel too); CUDA only",
)
def test_triton_bf16() -> None:
    kw = _inputs(
        B=2, Hkv=2, group=3, L=200, block_m=32, block_n=64, valid="left", perm="segment", dtype=torch.bfloat16,
        device=TRITON_DEVICE,
    )
    _check(kw, backend="triton", atol=2e-2, rtol=2e-2)


# --------------------------------------------------------------------------------------------------------------
# A later prompt chunk: the queries are the last positions of the keys
# --------------------------------------------------------------------------------------------------------------
def _chunk(kw: dict, start: int) -> dict:
    """The same problem for the queries at positions ``[start, L)`` only: their rows of the mask (query blocks on the
    grid of the key positions, from the block holding ``start``)."""
    out = dict(kw)
    out["q"] = kw["q"][:, :, start:]
    out["block_mask"] = kw["block_mask"][:, :, start // kw["block_m"] :]
    return out


def _check_chunk(kw: dict, start: int, backend: str) -> None:
    """A chunk's output and lse equal the whole prompt's rows ``[start, L)`` and the reference."""
    full, full_lse = block_sparse_attention(**kw, return_lse=True, backend=backend)
    ch = _chunk(kw, start)
    out, lse = block_sparse_attention(**ch, return_lse=True, backend=backend)
    assert out.shape == ch["q"].shape[:3] + (kw["v"].shape[-1],)
    torch.testing.assert_close(out, full[:, :, start:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, full_lse[:, :, start:], atol=1e-5, rtol=1e-5)
    _check(ch, backend=backend)


@pytest.mark.parametrize("start", [64, 77, 190])
@pytest.mark.parametrize("perm,valid", [("none", "none"), ("segment", "left"), ("any", "right")])
@pytest.mark.parametrize("mask_heads", ["per_kv", "per_head"])
def test_chunk_equals_the_whole_prompts_rows(start: int, perm: str, valid: str, mask_heads: str) -> None:
    kw = _inputs(L=200, block_m=32, block_n=16, perm=perm, valid=valid, mask_heads=mask_heads, density=0.4, Dv=24)
    _check_chunk(kw, start, "torch")


@pytest.mark.parametrize("start", [64, 77])
@pytest.mark.parametrize("mask_heads", ["shared", "per_head"])
def test_chunk_with_every_tile_equals_sdpa_rows(start: int, mask_heads: str) -> None:
    """Every causal tile of the chunk's blocks: the dense fused path (earlier keys + a causal square)."""
    kw = _inputs(L=200, block_m=32, block_n=32, mask_heads=mask_heads, density=2.0)
    ch = _chunk(kw, start)
    out = block_sparse_attention(**ch)
    ref = F.scaled_dot_product_attention(kw["q"], kw["k"], kw["v"], is_causal=True, enable_gqa=True, scale=kw["scale"])
    torch.testing.assert_close(out, ref[:, :, start:], atol=1e-5, rtol=1e-5)


def test_chunk_mask_rows_must_match_the_chunks_blocks() -> None:
    kw = _inputs(L=200, block_m=32, block_n=32)
    ch = _chunk(kw, 77)
    ch["block_mask"] = kw["block_mask"]  # every block row of the prompt, not the chunk's (from block 2)
    with pytest.raises(ValueError, match=r"block_mask must be bool \(2, 6 or 1, 5, 7\) for 123 queries over L=200"):
        block_sparse_attention(**ch)
    assert causal_block_mask(200, 32, 32, q_len=123).shape == (5, 7)


@pytest.mark.triton
@requires_triton
@pytest.mark.parametrize("start", [32, 45])
@pytest.mark.parametrize("perm,valid", [("none", "none"), ("segment", "left")])
def test_triton_chunk_equals_the_whole_prompts_rows(start: int, perm: str, valid: str) -> None:
    kw = _inputs(B=2, Hkv=1, group=3, L=77, block_m=16, block_n=32, perm=perm, valid=valid, Dv=24, density=0.5,
                 device=TRITON_DEVICE)
    _check_chunk(kw, start, "triton")
