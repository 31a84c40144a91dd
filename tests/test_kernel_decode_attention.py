"""Tests for kvaccel.kernels.decode_attention: PyTorch path and Triton kernel against the float64 reference.

Triton cases are marked ``triton`` and run only with CUDA or under ``TRITON_INTERPRET=1`` (set before
triton is imported), e.g. ``TRITON_INTERPRET=1 python -m pytest tests/test_kernel_decode_attention.py -m triton``.
"""

from __future__ import annotations

import pytest
import torch

from kvaccel.kernels.decode_attention import decode_attention, decode_attention_reference

from conftest import TRITON_DEVICE, require_triton_dtype, requires_triton

SCALE_D = {16: 16**-0.5, 64: 64**-0.5}
# Inputs are exact in their dtype and the float64 reference runs on them, so the error is the kernel's: fp32
# accumulation plus the output's rounding (bf16: 8 mantissa bits, fp16: 11). lse is fp32 in every case.
LOW_PRECISION_TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _make_valid(kind: str, B: int, Hkv: int, T: int, gen: torch.Generator) -> torch.Tensor | None:
    """Ragged per-head lengths with random evicted holes; one (batch, head) row is entirely invalid."""
    if kind == "none":
        return None
    H = Hkv if kind == "ragged" else 1  # "batch": (B, 1, T), shared by all heads
    lengths = torch.randint(0, T + 1, (B, H), generator=gen)
    lengths[-1, -1] = 0  # the all-invalid row
    valid = torch.arange(T)[None, None, :] < lengths[..., None]
    valid &= torch.rand(B, H, T, generator=gen) > 0.2
    return valid


def _make_inputs(
    B: int,
    Hkv: int,
    group: int,
    T: int,
    D: int,
    *,
    mask: str,
    narrow: bool | str,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
) -> dict:
    gen = torch.Generator().manual_seed(seed)
    Hq, Dv = Hkv * group, D + 8  # Dv != D on purpose

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    kw = {"q": rnd(B, Hq, 1, D), "k": rnd(B, Hkv, T, D), "v": rnd(B, Hkv, T, Dv), "scale": SCALE_D[D]}
    kw["valid"] = _make_valid(mask, B, Hkv, T, gen)
    if narrow:
        Tn, Dk = 37, D // 2 if D > 16 else 8  # Dk = 8 exercises the padded channel block
        kw["k_narrow"] = rnd(B, Hkv, Tn, Dk)
        kw["channel_idx"] = torch.stack([torch.randperm(D, generator=gen)[:Dk] for _ in range(B * Hkv)]).view(
            B, Hkv, Dk
        )
        if narrow == "values":  # narrow values too (ThinK value channels), Dvn = 60% of Dv
            Dvn = Dv - (2 * Dv) // 5
            kw["v_narrow"] = rnd(B, Hkv, Tn, Dvn)
            kw["value_idx"] = torch.stack(
                [torch.randperm(Dv, generator=gen)[:Dvn].sort().values for _ in range(B * Hkv)]
            ).view(B, Hkv, Dvn)
        else:
            kw["v_narrow"] = rnd(B, Hkv, Tn, Dv)
        valid_n = _make_valid(mask, B, Hkv, Tn, gen)
        kw["valid_narrow"] = valid_n  # the same (batch, head) row is empty in both segments
    return {name: (t.to(device) if isinstance(t, torch.Tensor) else t) for name, t in kw.items()}


def _check(kw: dict, backend: str, atol: float, rtol: float) -> None:
    ref_out, ref_lse = (t.cpu() for t in decode_attention_reference(**kw))
    out, lse = decode_attention(**kw, backend=backend, return_lse=True)
    out_only = decode_attention(**kw, backend=backend)  # the torch path may take the SDPA route here
    q = kw["q"]
    assert out.dtype == q.dtype and out.shape == ref_out.shape
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out.double().cpu(), ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(out_only.double().cpu(), ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(
        lse.double().cpu(), ref_lse, atol=atol, rtol=rtol
    )  # -inf only where ref is -inf


# ----------------------------------------------------------------------------------------------------------------
# PyTorch path
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T,D", [(1, 16), (100, 64), (300, 16)])
@pytest.mark.parametrize("narrow", [False, True, "values"], ids=["full", "narrow", "narrow_values"])
@pytest.mark.parametrize("mask", ["none", "ragged", "batch"])
@pytest.mark.parametrize("group", [1, 3])
def test_torch_matches_reference(group: int, mask: str, narrow: bool | str, T: int, D: int) -> None:
    kw = _make_inputs(2, 2, group, T, D, mask=mask, narrow=narrow)
    _check(kw, "torch", atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("narrow", [False, True, "values"], ids=["full", "narrow", "narrow_values"])
@pytest.mark.parametrize("group", [1, 3])
def test_torch_low_precision(group: int, narrow: bool | str, dtype: torch.dtype) -> None:
    kw = _make_inputs(2, 2, group, 129, 64, mask="ragged", narrow=narrow, dtype=dtype)
    tol = LOW_PRECISION_TOL[dtype]
    _check(kw, "torch", atol=tol, rtol=tol)


@pytest.mark.parametrize("narrow", [False, True, "values"], ids=["full", "narrow", "narrow_values"])
@pytest.mark.parametrize("mask", ["none", "ragged"])
def test_with_probs_returns_the_reference_weights(mask: str, narrow: bool | str) -> None:
    """The probabilities an eviction scorer accumulates: softmax of the reference logits over [narrow, full]."""
    kw = _make_inputs(2, 2, 3, 50, 16, mask=mask, narrow=narrow)
    out, probs = decode_attention(**kw, backend="torch", return_probs=True)
    ref_out, ref_lse = decode_attention_reference(**kw)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-4)
    q, k, G = kw["q"].double(), kw["k"].double(), 3
    logits = kw["scale"] * torch.einsum("bhd,bhtd->bht", q[:, :, 0], k.repeat_interleave(G, 1))
    valid = kw["valid"]
    if valid is not None:
        logits = logits.masked_fill(~valid.expand(2, 2, 50).repeat_interleave(G, 1), float("-inf"))
    if narrow:
        idx = kw["channel_idx"].repeat_interleave(G, 1)
        qn = q[:, :, 0].gather(-1, idx)
        ln = kw["scale"] * torch.einsum("bhd,bhtd->bht", qn, kw["k_narrow"].double().repeat_interleave(G, 1))
        vn = kw["valid_narrow"]
        if vn is not None:
            ln = ln.masked_fill(~vn.expand(2, 2, ln.shape[-1]).repeat_interleave(G, 1), float("-inf"))
        logits = torch.cat([ln, logits], dim=-1)
    want = torch.exp(logits - ref_lse).nan_to_num(0.0)  # exp(-inf - -inf) of an empty row -> 0
    assert probs.dtype == torch.float32 and probs.shape == want.shape
    torch.testing.assert_close(probs.double(), want, atol=1e-6, rtol=1e-4)


def test_all_invalid_row_is_zero() -> None:
    kw = _make_inputs(1, 2, 3, 50, 16, mask="none", narrow=True)
    kw["valid"] = torch.zeros(1, 2, 50, dtype=torch.bool)
    kw["valid_narrow"] = torch.zeros(1, 1, 37, dtype=torch.bool)
    out, lse = decode_attention(**kw, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()
    out_full = decode_attention(kw["q"], kw["k"], kw["v"], scale=kw["scale"], valid=kw["valid"])  # SDPA route
    assert torch.equal(out_full, torch.zeros_like(out_full))


def test_out_argument_is_written() -> None:
    kw = _make_inputs(2, 2, 3, 40, 16, mask="ragged", narrow=False)
    out = torch.full((2, 6, 1, 24), float("nan"))
    res = decode_attention(**kw, out=out)
    assert res.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out.double(), decode_attention_reference(**kw)[0], atol=1e-5, rtol=1e-4)


def test_bad_shapes_raise() -> None:
    kw = _make_inputs(2, 2, 3, 40, 16, mask="none", narrow=True)
    with pytest.raises(ValueError, match=r"num query heads \(6\).*num kv heads \(4\)"):
        decode_attention(kw["q"], torch.randn(2, 4, 40, 16), torch.randn(2, 4, 40, 24), scale=1.0)
    with pytest.raises(ValueError, match=r"valid must have shape \(2, 2 or 1, 40\)"):
        decode_attention(kw["q"], kw["k"], kw["v"], scale=1.0, valid=torch.ones(2, 2, 39, dtype=torch.bool))
    with pytest.raises(ValueError, match="q must have shape"):
        decode_attention(kw["q"].expand(2, 6, 2, 16), kw["k"], kw["v"], scale=1.0)
    with pytest.raises(ValueError, match="channel_idx must be int64"):
        decode_attention(**{**kw, "channel_idx": kw["channel_idx"].int()})
    with pytest.raises(ValueError, match="must be given together"):
        decode_attention(**{**kw, "v_narrow": None})
    with pytest.raises(ValueError, match="with value_idx, v_narrow must have shape"):
        decode_attention(**kw, value_idx=torch.zeros(2, 2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="value_idx must be int64"):
        decode_attention(**kw, value_idx=torch.zeros(2, 2, 5, dtype=torch.int32))


def test_narrow_values_equal_zero_filled_values() -> None:
    """Narrow values scatter into their channels: the same as full-width narrow values zero-filled elsewhere."""
    kw = _make_inputs(2, 2, 3, 60, 16, mask="ragged", narrow="values")
    B, H, Tn, Dvn = kw["v_narrow"].shape
    dense = torch.zeros(B, H, Tn, kw["v"].shape[-1]).scatter_(
        -1, kw["value_idx"][:, :, None, :].expand(B, H, Tn, Dvn), kw["v_narrow"]
    )
    want = decode_attention(**{**kw, "v_narrow": dense, "value_idx": None}, return_lse=True)[0]
    torch.testing.assert_close(decode_attention(**kw), want, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="backend"):
        decode_attention(**kw, backend="cuda")


def test_triton_on_cpu_without_interpreter_raises(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # read at call time: CPU tensors without the interpreter
    kw = _make_inputs(1, 1, 1, 8, 16, mask="none", narrow=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        decode_attention(**kw, backend="triton")


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.triton
@requires_triton
@pytest.mark.parametrize("T,D", [(100, 64), (77, 16)])  # T not a multiple of BLOCK_N
@pytest.mark.parametrize("narrow", [False, True, "values"], ids=["full", "narrow", "narrow_values"])
@pytest.mark.parametrize("mask", ["none", "ragged"])
@pytest.mark.parametrize("group", [1, 3])
def test_triton_matches_reference(group: int, mask: str, narrow: bool | str, T: int, D: int) -> None:
    kw = _make_inputs(2, 2, group, T, D, mask=mask, narrow=narrow, device=TRITON_DEVICE)
    _check(kw, "triton", atol=1e-5, rtol=1e-4)


@pytest.mark.triton
@requires_triton
def test_triton_batch_mask_and_out() -> None:
    group = 3
    kw = _make_inputs(2, 2, group, 70, 16, mask="batch", narrow=True, device=TRITON_DEVICE)
    out = torch.empty(2, 2 * group, 1, 24, device=TRITON_DEVICE)
    res, lse = decode_attention(**kw, backend="triton", out=out, return_lse=True)
    assert res.data_ptr() == out.data_ptr()
    ref_out, ref_lse = (t.cpu() for t in decode_attention_reference(**kw))
    torch.testing.assert_close(out.double().cpu(), ref_out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lse.double().cpu(), ref_lse, atol=1e-5, rtol=1e-4)


@pytest.mark.triton
@requires_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("narrow", [False, "values"], ids=["full", "narrow_values"])
@pytest.mark.parametrize("group", [1, 3])
def test_triton_low_precision(group: int, narrow: bool | str, dtype: torch.dtype) -> None:
    require_triton_dtype(dtype)
    kw = _make_inputs(2, 2, group, 100, 64, mask="ragged", narrow=narrow, dtype=dtype, device=TRITON_DEVICE)
    tol = LOW_PRECISION_TOL[dtype]
    _check(kw, "triton", atol=tol, rtol=tol)
