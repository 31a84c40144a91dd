"""Tests for kvaccel.kernels.window_scores: PyTorch path and Triton kernels against the float64 reference.

Triton cases are marked ``triton`` and run only with CUDA or under ``TRITON_INTERPRET=1`` (set before
triton is imported), e.g. ``TRITON_INTERPRET=1 python -m pytest tests/test_kernel_window_scores.py -m triton``.
"""

from __future__ import annotations

import pytest
import torch

from kvaccel.kernels.decode_attention import decode_attention_probs
from kvaccel.kernels.window_scores import window_attention_scores, window_attention_scores_reference

from conftest import TRITON_DEVICE, require_triton_dtype, requires_triton


def _make_inputs(
    B: int,
    Hkv: int,
    group: int,
    W: int | str,
    T: int,
    D: int,
    *,
    mask: str,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
) -> dict:
    """``W == "T"`` means every query of the prompt. Masks: ragged per-head lengths with evicted holes and one
    all-invalid (batch, head) row; ``"batch"`` is a ``(B, 1, T)`` mask."""
    gen = torch.Generator().manual_seed(seed)
    W = T if W == "T" else W
    valid = None
    if mask != "none":
        H = Hkv if mask == "ragged" else 1
        lengths = torch.randint(1, T + 1, (B, H), generator=gen)
        lengths[-1, -1] = 0
        valid = torch.arange(T)[None, None, :] < lengths[..., None]
        valid &= torch.rand(B, H, T, generator=gen) > 0.2
        valid = valid.to(device)
    q = torch.randn(B, Hkv * group, W, D, generator=gen).to(dtype=dtype, device=device)
    k = torch.randn(B, Hkv, T, D, generator=gen).to(dtype=dtype, device=device)
    return {"q": q, "k": k, "scale": D**-0.5, "valid": valid}


def _check(kw: dict, causal: bool, atol: float, rtol: float, **op_kwargs) -> torch.Tensor:
    ref = window_attention_scores_reference(**kw, causal=causal).cpu()
    got = window_attention_scores(**kw, causal=causal, **op_kwargs)
    B, Hq = kw["q"].shape[:2]
    assert got.dtype == torch.float32 and got.shape == (B, Hq, kw["k"].shape[2])
    assert not got.isnan().any()
    torch.testing.assert_close(got.double().cpu(), ref, atol=atol, rtol=rtol)
    return got


# ----------------------------------------------------------------------------------------------------------------
# PyTorch path
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [5, 256])  # 5: W = T is processed in many chunks
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("W", [1, 7, "T"])
@pytest.mark.parametrize("mask", ["none", "ragged", "batch"])
@pytest.mark.parametrize("group", [1, 3])
def test_torch_matches_reference(group: int, mask: str, W: int | str, causal: bool, chunk: int) -> None:
    kw = _make_inputs(2, 2, group, W, 130, 16, mask=mask)
    _check(kw, causal, atol=1e-5, rtol=1e-4, backend="torch", chunk=chunk)


@pytest.mark.parametrize("W", [7, "T"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_torch_low_precision(W: int | str, dtype: torch.dtype) -> None:
    kw = _make_inputs(1, 2, 3, W, 90, 64, mask="ragged", dtype=dtype)
    _check(kw, True, atol=1e-4, rtol=1e-3, backend="torch", chunk=16)  # fp32 math and output on the exact inputs


def test_rows_sum_to_one() -> None:
    """Without masks, every causal query row is a distribution: the column sums add up to W."""
    kw = _make_inputs(2, 1, 3, 11, 40, 16, mask="none")
    scores = window_attention_scores(**kw, chunk=4)
    torch.testing.assert_close(scores.sum(-1), torch.full((2, 3), 11.0))


def test_causal_excludes_future_keys() -> None:
    """W = 2, T = 10: query 0 sits at position 8, so key 9 gets probability only from query 1."""
    kw = _make_inputs(1, 1, 1, 2, 10, 16, mask="none")
    both = window_attention_scores(**kw, chunk=1)
    last_only = window_attention_scores(**{**kw, "q": kw["q"][:, :, 1:]})  # query 1 alone, same position 9
    torch.testing.assert_close(both[..., 9], last_only[..., 9])
    assert not torch.allclose(both[..., :9], last_only[..., :9])


def test_bad_shapes_raise() -> None:
    kw = _make_inputs(1, 2, 3, 7, 20, 16, mask="none")
    with pytest.raises(ValueError, match=r"window W \(21\) must not exceed .* T \(20\)"):
        window_attention_scores(torch.randn(1, 6, 21, 16), kw["k"], scale=1.0)
    with pytest.raises(ValueError, match=r"num query heads \(6\).*num kv heads \(4\)"):
        window_attention_scores(kw["q"], torch.randn(1, 4, 20, 16), scale=1.0)
    with pytest.raises(ValueError, match=r"valid must have shape \(1, 2 or 1, 20\)"):
        window_attention_scores(**{**kw, "valid": torch.ones(1, 3, 20, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"chunk \(0\) must be an int >= 1"):
        window_attention_scores(**kw, chunk=0)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.triton
@requires_triton
@pytest.mark.parametrize("W", [1, 7, "T"])
@pytest.mark.parametrize("mask", ["none", "ragged"])
@pytest.mark.parametrize("group", [1, 3])
def test_triton_matches_reference(group: int, mask: str, W: int | str) -> None:
    # T = 150: not a multiple of BLOCK_N = 64 nor of BLOCK_M
    kw = _make_inputs(2, 2, group, W, 150, 64 if W == "T" else 16, mask=mask, device=TRITON_DEVICE)
    _check(kw, True, atol=1e-5, rtol=1e-4, backend="triton")


@pytest.mark.triton
@requires_triton
@pytest.mark.parametrize("W", [7, "T"])
def test_triton_non_causal_batch_mask(W: int | str) -> None:
    kw = _make_inputs(2, 1, 3, W, 100, 16, mask="batch", device=TRITON_DEVICE)
    _check(kw, False, atol=1e-5, rtol=1e-4, backend="triton")


@pytest.mark.triton
@requires_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("W", [7, "T"])
def test_triton_low_precision(W: int | str, dtype: torch.dtype) -> None:
    require_triton_dtype(dtype)
    kw = _make_inputs(2, 2, 3, W, 100, 64 if W == "T" else 16, mask="ragged", dtype=dtype, device=TRITON_DEVICE)
    _check(kw, True, atol=1e-4, rtol=1e-3, backend="triton")  # scores are fp32 whatever the input dtype


@pytest.mark.parametrize("mask", ["none", "ragged"])
def test_decode_probs_over_narrow_keys_equal_zero_filled_keys(mask: str) -> None:
    """One decode query over [narrow (ThinK-pruned) keys, full keys] = window scores over zero-filled dense keys."""
    g = torch.Generator().manual_seed(4)
    B, Hkv, G, Tn, T, D, Dk = 2, 2, 3, 20, 9, 16, 10
    q = torch.randn(B, Hkv * G, 1, D, generator=g)
    kn, k = torch.randn(B, Hkv, Tn, Dk, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    ci = torch.stack([torch.randperm(D, generator=g)[:Dk].sort().values for _ in range(B * Hkv)]).view(B, Hkv, Dk)
    vn = vf = None
    if mask == "ragged":
        vn, vf = torch.rand(B, Hkv, Tn, generator=g) > 0.3, torch.rand(B, 1, T, generator=g) > 0.3
    dense = torch.zeros(B, Hkv, Tn, D).scatter_(-1, ci[:, :, None, :].expand(B, Hkv, Tn, Dk), kn)
    keys = torch.cat([dense, k], dim=2)
    valid = None
    if mask == "ragged":
        valid = torch.cat([vn, vf.expand(B, Hkv, T)], dim=-1)
    want = window_attention_scores_reference(q, keys, scale=0.25, valid=valid)
    got = decode_attention_probs(q, k, scale=0.25, valid=vf, k_narrow=kn, channel_idx=ci, valid_narrow=vn)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
