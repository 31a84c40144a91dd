"""Tests for kvaccel.kernels.varlen_decode_attention: PyTorch path and Triton kernel against the float64 reference.

Triton cases are marked ``triton`` and run with CUDA or under ``TRITON_INTERPRET=1`` (conftest sets it on a machine
without CUDA), e.g. ``python -m pytest tests/test_kernel_varlen_decode_attention.py -m triton``.
"""

from __future__ import annotations

import pytest
import torch

from kvaccel.kernels.decode_attention import decode_attention
from kvaccel.kernels.varlen_decode_attention import varlen_decode_attention, varlen_decode_attention_reference

from conftest import TRITON_DEVICE, require_triton_dtype, requires_triton

# Inputs are exact in their dtype and the float64 reference runs on them, so the error is the kernel's: fp32
# accumulation plus the output's rounding (bf16: 8 mantissa bits, fp16: 11).
LOW_PRECISION_TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _make_inputs(B: int, Hkv: int, group: int, Q: int, max_len: int, D: int, *, dtype=torch.float32,
                 device: str = "cpu", seed: int = 0, slack: int = 3) -> dict:
    """Ragged segments packed with ``slack`` garbage rows after each (never read), one segment empty, in a
    shuffled storage order (segments are not stored in (b, h) order)."""
    gen = torch.Generator().manual_seed(seed)
    S, Hq, Dv = B * Hkv, Hkv * group, D + 8  # Dv != D on purpose
    lengths = torch.randint(Q, max_len + 1, (S,), generator=gen)
    lengths[S // 2] = 0  # an empty segment
    order = torch.randperm(S, generator=gen)  # storage order of the segments
    start = torch.empty(S, dtype=torch.int64)
    start[order] = torch.cat([torch.zeros(1, dtype=torch.int64), (lengths[order] + slack).cumsum(0)[:-1]])
    N = int((lengths + slack).sum())

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 2).to(dtype)

    kw = dict(q=rnd(B, Hq, Q, D), k=rnd(N, D), v=rnd(N, Dv), seg_start=start.view(B, Hkv),
              seg_len=lengths.view(B, Hkv), scale=D**-0.5)
    return {n: (t.to(device) if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}


def _check(kw: dict, backend: str, atol: float, rtol: float) -> None:
    ref_out, ref_lse = varlen_decode_attention_reference(**{n: (t.cpu() if isinstance(t, torch.Tensor) else t)
                                                              for n, t in kw.items()})
    out, lse = varlen_decode_attention(**kw, backend=backend, return_lse=True)
    out_only = varlen_decode_attention(**kw, backend=backend)  # the torch path takes its SDPA route here
    q = kw["q"]
    assert out.dtype == q.dtype and out.shape == ref_out.shape and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out.double().cpu(), ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(out_only.double().cpu(), ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.double().cpu(), ref_lse, atol=atol, rtol=rtol)  # -inf only where ref is -inf


# ----------------------------------------------------------------------------------------------------------------
# PyTorch path
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("Q", [1, 4])
@pytest.mark.parametrize("B,Hkv", [(1, 2), (3, 2)])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("max_len,D", [(1, 16), (100, 64)])
def test_torch_matches_reference(group: int, B: int, Hkv: int, Q: int, max_len: int, D: int) -> None:
    kw = _make_inputs(B, Hkv, group, Q, max(max_len, Q), D)
    _check(kw, "torch", atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("Q", [1, 3])
def test_torch_low_precision(Q: int, dtype: torch.dtype) -> None:
    kw = _make_inputs(2, 2, 3, Q, 129, 64, dtype=dtype)
    tol = LOW_PRECISION_TOL[dtype]
    _check(kw, "torch", atol=tol, rtol=tol)


def test_empty_segments_give_zero_rows() -> None:
    kw = _make_inputs(2, 2, 3, 1, 30, 16)
    kw["seg_len"] = torch.zeros_like(kw["seg_len"])
    out, lse = varlen_decode_attention(**kw, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    assert torch.equal(varlen_decode_attention(**kw), torch.zeros_like(out))


def test_equals_padded_decode_attention() -> None:
    """The packed layout gives what decode_attention gives on the same tokens padded per head with a validity mask."""
    kw = _make_inputs(2, 3, 3, 1, 70, 16, seed=4)
    B, Hkv, L = 2, 3, int(kw["seg_len"].max())
    pos = torch.arange(L)
    valid = pos < kw["seg_len"][..., None]  # (B, H_kv, L)
    rows = (kw["seg_start"][..., None] + pos).clamp(max=kw["k"].shape[0] - 1)
    k_pad = torch.where(valid[..., None], kw["k"][rows], 0.0)
    v_pad = torch.where(valid[..., None], kw["v"][rows], 0.0)
    want = decode_attention(kw["q"], k_pad, v_pad, scale=kw["scale"], valid=valid)
    torch.testing.assert_close(varlen_decode_attention(**kw), want, atol=1e-6, rtol=1e-5)
    assert (B, Hkv) == tuple(valid.shape[:2])


def test_bad_inputs_raise() -> None:
    kw = _make_inputs(2, 2, 3, 1, 20, 16)
    with pytest.raises(ValueError, match=r"num query heads \(6\).*num kv heads \(4\)"):
        varlen_decode_attention(**{**kw, "seg_start": torch.zeros(2, 4, dtype=torch.int64),
                                   "seg_len": torch.zeros(2, 4, dtype=torch.int64)})
    with pytest.raises(ValueError, match="seg_len must be int64"):
        varlen_decode_attention(**{**kw, "seg_len": kw["seg_len"].int()})
    with pytest.raises(ValueError, match="k must be"):
        varlen_decode_attention(**{**kw, "k": kw["k"][None]})
    with pytest.raises(ValueError, match="inside the"):
        varlen_decode_attention(**{**kw, "seg_start": kw["seg_start"] + kw["k"].shape[0]})
    with pytest.raises(ValueError, match="backend"):
        varlen_decode_attention(**kw, backend="cuda")


def test_triton_on_cpu_without_interpreter_raises(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # read at call time: CPU tensors without the interpreter
    kw = _make_inputs(1, 1, 1, 1, 8, 16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        varlen_decode_attention(**kw, backend="triton")


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.triton
@requires_triton
@pytest.mark.parametrize("Q", [1, 3])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("max_len,D", [(100, 64), (77, 16)])  # lengths not multiples of BLOCK_N
def test_triton_matches_reference(group: int, Q: int, max_len: int, D: int) -> None:
    kw = _make_inputs(2, 2, group, Q, max_len, D, device=TRITON_DEVICE)
    _check(kw, "triton", atol=1e-5, rtol=1e-4)


@pytest.mark.triton
@requires_triton
def test_triton_many_rows_and_empty_segments() -> None:
    """G * Q = 72 rows > BLOCK_R = 64 (two row programs per segment); every segment empty gives zeros."""
    kw = _make_inputs(2, 1, 8, 9, 40, 16, device=TRITON_DEVICE, seed=2)
    _check(kw, "triton", atol=1e-5, rtol=1e-4)
    kw["seg_len"] = torch.zeros_like(kw["seg_len"])
    out, lse = varlen_decode_attention(**kw, backend="triton", return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


@pytest.mark.triton
@requires_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_triton_low_precision(dtype: torch.dtype) -> None:
    require_triton_dtype(dtype)
    kw = _make_inputs(2, 2, 3, 1, 100, 64, dtype=dtype, device=TRITON_DEVICE)
    tol = LOW_PRECISION_TOL[dtype]
    _check(kw, "triton", atol=tol, rtol=tol)
