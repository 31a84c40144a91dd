"""Quantized KV storage (kv_int8 / kv_int4, issue 22): codes, the attention over them, the cache layer, composition."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch

import kvaccel
from kvaccel.cache import KVAccelCache
from kvaccel.kernels.kv_quant import (
    QuantizedKV,
    dequantize_keys,
    dequantize_values,
    fp8_dtype,
    key_offset,
    pack_codes,
    quantize_fp8,
    quantize_fp8_keys,
    quantize_fp8_kv,
    quantize_keys,
    quantize_values,
    scale_dtype_for,
    unpack_codes,
)
from kvaccel.kernels.quantized_decode_attention import (
    quantized_decode_attention,
    quantized_decode_attention_reference,
)
from kvaccel.patches.evict import KVzip
from kvaccel.patches.storage import KVInt4, KVInt8
from kvaccel.patches.storage.quantized_layer import QuantizedLayer

from conftest import TRITON_DEVICE, requires_triton, tiny_model


def _outliers(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[..., 3] *= 20  # an outlier channel, as keys have
    return x.to(dtype)


# ------------------------------------------------------------------------------------------ codes


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip(bits):
    codes = torch.randint(0, 2**bits, (3, 5, 64), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (3, 5, 64 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_round_trip_within_half_a_step(bits, dtype):
    """Every element is within half a step (its group's stored scale) of its dequantized value."""
    G = 32
    k = _outliers((2, 3, 4 * G, 64), dtype)
    v = _outliers((2, 3, 4 * G, 64), dtype, seed=1)
    kc, ks, kz = quantize_keys(k, bits, G)
    vc, vs, vz = quantize_values(v, bits, G)
    assert kc.dtype == torch.uint8 and kc.shape[-1] == 64 * bits // 8
    assert ks.shape == (2, 3, 4, 64) and vs.shape == (2, 3, 4 * G, 2)
    k_hat, v_hat = dequantize_keys(kc, ks, kz, bits), dequantize_values(vc, vs, vz, bits)
    k_step = ks.float().repeat_interleave(G, dim=2)
    v_step = vs.float().repeat_interleave(G, dim=3)
    rounding = 1e-6  # float32 arithmetic of z + q*s, relative to the magnitude
    assert ((k.float() - k_hat).abs() <= k_step / 2 + rounding * (k.float().abs() + 1)).all()
    assert ((v.float() - v_hat).abs() <= v_step / 2 + rounding * (v.float().abs() + 1)).all()
    # the grid is not looser than needed: the scale is (max - min) / (2^bits - 1) up to the 16-bit rounding
    kg = k.float().view(2, 3, 4, G, 64)
    tight = (kg.amax(3) - kg.amin(3)) / (2**bits - 1)
    assert (ks.float() <= tight * (1 + 2**-6) + torch.finfo(ks.dtype).tiny).all()


@pytest.mark.parametrize("fmt,mantissa,min_exp", [("e4m3", 3, -9), ("e5m2", 2, -16)])
def test_fp8_round_trip_within_half_an_ulp(fmt, mantissa, min_exp):
    """float8 codes with a per-token scale: relative error <= 2^-(mantissa+1), absolute <= half the smallest
    subnormal times the scale near zero."""
    x = _outliers((2, 3, 40, 64))
    codes, s = quantize_fp8(x, fp8_dtype(fmt))
    assert codes.dtype == fp8_dtype(fmt) and s.shape == (2, 3, 40, 1) and s.dtype == torch.float16
    x_hat = dequantize_keys(codes, s, None, 8)
    torch.testing.assert_close(dequantize_values(codes, s, None, 8), x_hat)
    bound = x.abs() * 2.0 ** -(mantissa + 1) + s.float() * 2.0 ** (min_exp - 1) + 1e-6 * x.abs()
    assert ((x - x_hat).abs() <= bound).all()
    assert (x_hat.abs().amax(-1) >= x.abs().amax(-1) * (1 - 2.0 ** -(mantissa + 1))).all()  # no clipping


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("sdtype", [torch.float16, torch.bfloat16])
def test_compiled_fp8_quantizer_is_bit_for_bit_torch(fmt, sdtype):
    """``kv_fp8``'s compiled CPU quantizer (decode steps' flushes) gives torch's codes and scales bit for bit: rows
    across 9 decades and three input dtypes, every float8 value, midpoint and its neighbours (scale exactly 1), scales
    next to 16-bit rounding boundaries, zeros and float32 subnormals; scales that overflow raise the same error."""
    from kvaccel.kernels.kv_quant_numba import quantize_fp8_pair

    f8 = fp8_dtype(fmt)
    g = torch.Generator().manual_seed(1)

    def same(x):
        vals = -x[..., : x.shape[-1] // 2 + 1]  # values of another width
        (kc, ks), (vc, vs) = quantize_fp8_pair(x, vals, f8, sdtype)
        for (c, sc), y in (((kc, ks), x), ((vc, vs), vals)):
            rc, rs = quantize_fp8(y, f8, sdtype)
            assert c.dtype == f8 and sc.dtype == sdtype and c.shape == rc.shape and sc.shape == rs.shape
            assert torch.equal(c.view(torch.uint8), rc.view(torch.uint8))
            assert torch.equal(sc.view(torch.int16), rs.view(torch.int16))

    mags = 10 ** torch.linspace(-6, 3, 24)
    x = torch.randn(2, 24, 5, 64, generator=g) * mags[:, None, None] * torch.randn(2, 24, 5, 1, generator=g).exp()
    x[0, 0, 0], x[0, 0, 1, :7] = 0.0, 1e-40
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        same(x.to(dtype) if dtype != torch.float16 else x.clamp(-6e4, 6e4).to(dtype))
    vals = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(f8).float()
    vals = vals[torch.isfinite(vals)].unique()
    mids = (vals[1:] + vals[:-1]) / 2
    grid = torch.cat([vals, mids, torch.nextafter(mids, vals[1:]), torch.nextafter(mids, vals[:-1])])
    rows = torch.nn.functional.pad(grid, (0, -grid.numel() % 63)).view(-1, 63)
    same(torch.cat([rows, torch.full((rows.shape[0], 1), torch.finfo(f8).max)], 1)[None, None])  # max -> scale 1
    s16 = torch.arange(1, 1 << 15, 5, dtype=torch.int32).to(torch.int16).view(sdtype).float()
    s16 = s16[torch.isfinite(s16) & (s16 > 0) & (s16 < 1e30)]
    amax = torch.cat([s16, torch.nextafter(s16, s16 * 2), torch.nextafter(s16, s16 / 2)]) * torch.finfo(f8).max
    same(torch.stack([amax, -amax / 3, amax / 7], -1)[None, None])
    nan = torch.zeros(1, 1, 1, 4)
    nan[..., 1] = float("nan")
    for bad in (lambda: quantize_fp8_pair(nan, nan, f8, sdtype), lambda: quantize_fp8(nan, f8, sdtype)):
        with pytest.raises(ValueError, match="do not fit"):
            bad()
    big = torch.full((1, 1, 1, 4), 3e38)
    if sdtype == torch.float16:
        with pytest.raises(ValueError, match="do not fit the torch.float16 scales"):
            quantize_fp8_pair(big, big, f8, sdtype)
        with pytest.raises(ValueError, match="do not fit the torch.float16 scales"):
            quantize_fp8(big, f8, sdtype)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("sdtype", [torch.float16, torch.bfloat16])
def test_fp8_keys_keep_the_better_of_centred_and_plain_codes(fmt, sdtype):
    """``quantize_fp8_keys``: per token, the codes of ``k - μ`` or of ``k``, whichever has the smaller squared error
    (the plain ones with a negative scale), and the compiled quantizer gives the same bits. Keys with a channel near
    300 whose largest element is sometimes elsewhere: both kinds of token occur."""
    from kvaccel.kernels.kv_quant_numba import quantize_fp8_pair

    f8 = fp8_dtype(fmt)
    g = torch.Generator().manual_seed(2)
    k = torch.randn(2, 3, 40, 64, generator=g)
    k[..., 7] += 300 + 20 * torch.randn(2, 3, 40, generator=g)
    k[:, :, ::3, 11] = 400 * torch.rand(2, 3, 14, generator=g)  # every third token: its largest element elsewhere
    mu = key_offset(k, None, sdtype)
    codes, s = quantize_fp8_keys(k, mu, f8, sdtype)
    plain, centred = quantize_fp8(k, f8, sdtype), quantize_fp8(k - mu.float(), f8, sdtype)
    err_plain = (plain[0].float() * plain[1].float() - k).square().sum(-1)
    err_centred = (centred[0].float() * centred[1].float() - (k - mu.float())).square().sum(-1)
    keep = err_centred <= err_plain
    assert 0 < int(keep.sum()) < keep.numel()  # both kinds
    assert torch.equal(s[..., 0] > 0, keep) and torch.equal(s.abs(), torch.where(keep[..., None], centred[1],
                                                                                      plain[1]))
    deq = QuantizedKV(8, codes, s, mu, codes, s.abs(), None).keys()
    torch.testing.assert_close((deq - k).square().sum(-1), torch.minimum(err_plain, err_centred), rtol=1e-4,
                               atol=1e-6)
    (kc, ks), (vc, vs) = quantize_fp8_pair(k, -k, f8, sdtype, mu)
    assert torch.equal(kc.view(torch.uint8), codes.view(torch.uint8)) and torch.equal(ks.view(torch.int16),
                                                                                        s.view(torch.int16))
    rc, rs = quantize_fp8(-k, f8, sdtype)  # values: never centred
    assert torch.equal(vc.view(torch.uint8), rc.view(torch.uint8)) and torch.equal(vs, rs)


def test_fp8_format_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"fp8 format \('e3m4'\) must be one of \['e4m3', 'e5m2'\]"):
        kvaccel.config.parse_spec("kv_fp8(format='e3m4')")
    monkeypatch.delattr(torch, "float8_e5m2")
    with pytest.raises(ValueError, match=r"needs torch.float8_e5m2, which torch .* does not have"):
        kvaccel.config.parse_spec("kv_fp8(format='e5m2')")


def test_constant_group_and_padding():
    """A constant group gets the epsilon scale (no 0/0); padding slots do not widen a key group's range."""
    k = torch.full((1, 1, 32, 32), 1.5)
    kc, ks, kz = quantize_keys(k, 4, 32)
    assert torch.isfinite(ks).all() and (ks > 0).all()
    assert torch.equal(dequantize_keys(kc, ks, kz, 4), k)
    k2 = _outliers((1, 1, 32, 32))
    valid = torch.ones(1, 1, 32, dtype=torch.bool)
    valid[..., :4] = False
    k2[:, :, :4] = 1e4  # garbage in padding slots
    _, s_masked, _ = quantize_keys(k2, 4, 32, valid)
    _, s_all, _ = quantize_keys(k2, 4, 32)
    assert (s_masked.float() * 100 < s_all.float()).all()


def test_scale_overflow_names_the_values():
    k = torch.full((1, 1, 32, 32), 1e6)
    k[:, :, 0] = -1e6
    with pytest.raises(ValueError, match="do not fit the torch.float16 scales"):
        quantize_keys(k, 8, 32)


# ------------------------------------------------------------------------------------------ attention kernel


def _case(B, Hq, Hkv, Tq, Tw, Q, bits, G=32, D=64, ragged=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Q, D, generator=g)
    kq, vq = _outliers((B, Hkv, Tq, D), seed=seed + 1), torch.randn(B, Hkv, Tq, D, generator=g)
    k, v = torch.randn(B, Hkv, Tw, D, generator=g), torch.randn(B, Hkv, Tw, D, generator=g)
    qvalid = wvalid = None
    if ragged:
        qvalid = torch.rand(B, Hkv, Tq, generator=g) > 0.3
        wvalid = torch.rand(B, 1, Tw, generator=g) > 0.2
        wvalid[..., -Q:] = True
    quant = QuantizedKV(bits, *quantize_keys(kq, bits, G, qvalid), *quantize_values(vq, bits, G), valid=qvalid)
    return q, quant, k, v, wvalid


CPU_BACKENDS = ["numba", "torch"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (6, 2)])
@pytest.mark.parametrize("Q", [1, 3])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("ragged", [False, True])
def test_kernel_matches_float64_reference(Hq, Hkv, Q, bits, ragged, backend):
    q, quant, k, v, valid = _case(2, Hq, Hkv, 160, 40, Q, bits, ragged=ragged)
    ref = quantized_decode_attention_reference(q, quant, k, v, scale=0.125, valid=valid)
    for block in (32, 64, 512):  # torch: tiles smaller than, not dividing, and larger than the quantized part
        out = quantized_decode_attention(q, quant, k, v, scale=0.125, valid=valid, block=block, backend=backend)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)


def _narrow_case(Q, Tq=64, seed=5):
    """ThinK's narrow keys (an odd number of kept channels: the last code byte is half used) before the full part."""
    q, quant, k, v, valid = _case(2, 6, 2, Tq, 16, Q, 4, ragged=True)
    g = torch.Generator().manual_seed(seed)
    cidx = torch.stack([torch.randperm(64, generator=g)[:39].sort().values for _ in range(4)]).view(2, 2, 39)
    kn, vn = _outliers((2, 2, 96, 39), seed=7), torch.randn(2, 2, 96, 64, generator=g)
    nvalid = torch.rand(2, 1, 96, generator=g) > 0.2
    narrow = QuantizedKV(4, *quantize_keys(kn, 4, 32, nvalid), *quantize_values(vn, 4, 32), valid=nvalid)
    assert narrow.k_codes.shape[-1] == 20  # ceil(39 * 4 / 8)
    return q, quant, k, v, valid, narrow, cidx


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("Q,Tq", [(1, 64), (2, 64), (1, 0)])
def test_kernel_with_narrow_segment_matches_reference(Q, Tq, backend):
    """Narrow keys before the full part; ``Tq = 0``: everything older than the window is narrow (the key group then
    comes from the narrow part)."""
    q, quant, k, v, valid, narrow, cidx = _narrow_case(Q, Tq)
    ref = quantized_decode_attention_reference(q, quant, k, v, scale=0.125, valid=valid, narrow=narrow,
                                               channel_idx=cidx)
    out = quantized_decode_attention(q, quant, k, v, scale=0.125, valid=valid, narrow=narrow, channel_idx=cidx,
                                     block=32, backend=backend)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kernel_probs_and_empty_quantized_part(backend):
    q, quant, k, v, valid = _case(1, 4, 2, 96, 20, 1, 4, ragged=True)
    out, probs = quantized_decode_attention(q, quant, k, v, scale=0.2, valid=valid, return_probs=True, backend=backend)
    K = torch.cat([quant.keys(torch.float64), k.double()], 2)
    logits = (q.double().view(1, 2, 2, 64) @ K.transpose(-1, -2)).view(1, 4, -1) * 0.2
    mask = torch.cat([quant.valid.expand(1, 2, -1), valid.expand(1, 2, -1)], -1).repeat_interleave(2, 1)
    ref = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1)
    torch.testing.assert_close(probs.double(), ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.double(), quantized_decode_attention_reference(q, quant, k, v, scale=0.2,
                                                                                  valid=valid), atol=2e-5, rtol=0)
    q0, quant0, k0, v0, _ = _case(1, 4, 2, 0, 8, 1, 4)  # nothing quantized yet: plain attention over the window
    expect = torch.nn.functional.scaled_dot_product_attention(q0, k0.repeat_interleave(2, 1),
                                                              v0.repeat_interleave(2, 1), scale=0.2)
    torch.testing.assert_close(quantized_decode_attention(q0, quant0, k0, v0, scale=0.2, backend=backend), expect)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Tq", [72, 71])
@pytest.mark.parametrize("offset", [False, True])
def test_kernel_over_fp8_codes_and_16bit_scales(fmt, dtype, backend, Tq, offset):
    """float8 codes (their subnormals too: the outlier channel makes the others small) with float16 or bfloat16
    scales, and a window in the model dtype; a token count the kernel's 4-token steps divide, and one they do not;
    keys centred on a per-channel offset (``key_offset``: a channel near 300, as a key bias gives) or not."""
    g = torch.Generator().manual_seed(3)
    B, Hq, Hkv, Tw, D = 2, 6, 2, 12, 64
    kq, vq = _outliers((B, Hkv, Tq, D), seed=4), _outliers((B, Hkv, Tq, D), seed=6)
    f8 = fp8_dtype(fmt)
    mu = None
    if offset:
        kq[..., 5] += 300.0
        kq[:, :, ::3, 9] = 400 * torch.rand(B, Hkv, len(range(0, Tq, 3)), generator=g)
        mu = key_offset(kq.to(dtype), None, scale_dtype_for(dtype))
    (kc, ks), (vc, vs) = quantize_fp8_kv(kq.to(dtype), vq.to(dtype), f8, scale_dtype_for(dtype), mu)
    if offset:  # tokens stored centred (positive scale) and plain (negative)
        assert bool((ks > 0).any()) and bool((ks < 0).any())
    qvalid = torch.rand(B, 1, Tq, generator=g) > 0.3
    quant = QuantizedKV(8, kc, ks, mu, vc, vs, None, valid=qvalid)
    q = torch.randn(B, Hq, 1, D, generator=g).to(dtype)
    k, v = (torch.randn(B, Hkv, Tw, D, generator=g).to(dtype) for _ in range(2))
    ref = quantized_decode_attention_reference(q, quant, k, v, scale=0.125)
    out = quantized_decode_attention(q, quant, k, v, scale=0.125, backend=backend)
    assert out.dtype == dtype
    if dtype == torch.float32:  # float32 rounds a logit to ~eps * |logit| (~175 with the offset channels), so the
        # output's error floor is eps * max|logit| * max|v|: the last bits depend on the CPU's summation order
        K = torch.cat([quant.keys(torch.float64), k.double()], 2)
        logit_max = (q.double().reshape(B, Hkv, -1, D) @ K.transpose(-1, -2) * 0.125).abs().max()
        v_max = torch.cat([quant.values(torch.float64), v.double()], 2).abs().max()
        atol, rtol = max(2e-5, float(torch.finfo(torch.float32).eps * logit_max * v_max)), 2e-5
    else:
        atol = rtol = 8e-3  # the bfloat16 output's rounding
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_numba_fp8_decoding_is_exact_for_every_byte(fmt):
    """The kernel's float8 decoding (bits placed in float32's, then rebiased) equals torch's for all 256 bytes but
    NaNs, subnormals included."""
    from numba import njit

    from kvaccel.kernels import quantized_decode_attention_numba as nk

    @njit
    def decode(row, shift, ratio, out):
        word = np.empty(row.shape[0], np.uint32)
        nk._fp8_plane(row, shift, np.float32(ratio), word, word.view(np.float32), out)

    f8 = fp8_dtype(fmt)
    byte = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    want = byte.view(f8).float()
    got = np.empty(256, np.float32)
    decode(byte.numpy(), *nk.fp8_decoding(f8), got)
    finite = torch.isfinite(want)
    assert int((~finite).sum()) in (2, 8)  # e4m3fn: 2 NaNs; e5m2: 2 infs, 6 NaNs
    assert torch.equal(torch.from_numpy(got)[finite], want[finite])
    assert float(want[finite & (want.abs() < torch.finfo(f8).tiny)].abs().max()) > 0  # subnormals were checked


def test_numba_vectorised_softmax_terms_equal_the_scalar_ones():
    """``_exp_shifted`` (a row's ``exp(x - m)`` with ``2^k`` written as float32 bits) gives the scalar
    ``_exp_nonpositive``'s values bit for bit, across the flush to zero and for ``-inf``, and its sum; where the result
    is a normal float32, both are within 3e-7 (relative) of float64's exp plus ``|x|``·1.2e-7 (the float32 rounding
    of ``x·log2 e``)."""
    from numba import njit

    from kvaccel.kernels import quantized_decode_attention_numba as nk

    @njit
    def both(row, m, pow2):
        scalar = np.empty_like(row)
        for t in range(row.shape[0]):
            scalar[t] = nk._exp_nonpositive(row[t] - m, pow2)
        vec = row.copy()
        total = nk._exp_shifted(vec, m, np.empty(row.shape[0], np.uint32))
        return scalar, vec, total

    g = np.random.default_rng(0)
    m = np.float32(0.0)  # x = row - m exactly
    row = np.concatenate([-g.exponential(8.0, 4000), -np.linspace(85.0, 90.0, 997), [-np.inf, 0.0, -87.3365]])
    row = row.astype(np.float32)
    scalar, vec, total = both(row, m, nk.pow2_table())
    assert np.array_equal(scalar.view(np.uint32), vec.view(np.uint32))
    assert (vec == 0).sum() > 100 and (vec > 0).sum() > 4000  # both sides of the flush were checked
    assert total == pytest.approx(float(vec.astype(np.float64).sum()), rel=1e-5)
    x = row.astype(np.float64)
    want = np.exp(x)
    normal = want >= np.finfo(np.float32).tiny
    assert (np.abs(vec[normal] / want[normal] - 1) <= 3e-7 + np.abs(x[normal]) * 1.2e-7).all()


def test_numba_row_blocks_on_worker_threads_match(monkeypatch):
    """A large step's row blocks split over Python worker threads (numba without an OpenMP / TBB pool; forced here on
    a small case) give the same result."""
    from kvaccel.kernels import quantized_decode_attention as qda
    from kvaccel.kernels import quantized_decode_attention_numba as nk

    q, quant, k, v, valid = _case(2, 6, 2, 160, 40, 1, 4, ragged=True)
    one = quantized_decode_attention(q, quant, k, v, scale=0.125, valid=valid, backend="numba")
    calls = []
    real = qda.run_parallel
    monkeypatch.setattr(nk, "thread_pool_ok", lambda: False)  # numba without an OpenMP / TBB thread pool
    monkeypatch.setattr(qda, "_PARALLEL_WORK", 0)
    monkeypatch.setattr(qda, "cpu_workers", lambda device: 2)
    monkeypatch.setattr(qda, "run_parallel", lambda fn, tasks, workers: calls.append(len(tasks)) or
                        real(fn, tasks, workers))
    split = quantized_decode_attention(q, quant, k, v, scale=0.125, valid=valid, backend="numba")
    assert calls == [2]  # 4 row blocks on 2 workers (whole token axes: no chunks)
    torch.testing.assert_close(split, one, atol=0, rtol=0)
    ref = quantized_decode_attention_reference(q, quant, k, v, scale=0.125, valid=valid)
    torch.testing.assert_close(split.double(), ref, atol=2e-5, rtol=1e-5)


def test_numba_batch_one_splits_the_tokens_over_workers(monkeypatch):
    """Batch 1, 3 KV heads on 2 workers: each head's token axis is cut into 2 chunks (6 units, 3 per worker) merged
    by log-sum-exp; the result matches the float64 reference (Python worker threads, as without numba's pool)."""
    from kvaccel.kernels import quantized_decode_attention as qda
    from kvaccel.kernels import quantized_decode_attention_numba as nk

    q, quant, k, v, valid = _case(1, 9, 3, 224, 40, 1, 4, ragged=True)
    tasks_seen = []
    real = qda.run_parallel
    monkeypatch.setattr(nk, "thread_pool_ok", lambda: False)  # numba without an OpenMP / TBB thread pool
    monkeypatch.setattr(qda, "_PARALLEL_WORK", 0)
    monkeypatch.setattr(qda, "cpu_workers", lambda device: 2)
    monkeypatch.setattr(qda, "run_parallel", lambda fn, tasks, workers: tasks_seen.extend(tasks) or
                        real(fn, tasks, workers))
    out, probs = quantized_decode_attention(q, quant, k, v, scale=0.125, valid=valid, return_probs=True,
                                            backend="numba")
    bounds = tasks_seen[0][-9]
    assert bounds.tolist() == [0, 128, 264] and [t[-8:-6] for t in tasks_seen] == [(0, 3), (3, 6)]
    ref = quantized_decode_attention_reference(q, quant, k, v, scale=0.125, valid=valid)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    want = quantized_decode_attention(q, quant, k, v, scale=0.125, valid=valid, return_probs=True, backend="torch")[1]
    torch.testing.assert_close(probs, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("B,Hq,Hkv,Tq,Q,bits", [(1, 9, 3, 224, 1, 4), (2, 6, 2, 160, 1, 8), (1, 6, 2, 96, 2, 2),
                                                (1, 9, 3, 200, 1, None)])
def test_numba_thread_pool_split_equals_python_threads(monkeypatch, B, Hq, Hkv, Tq, Q, bits):
    """A step split over numba's thread pool (one call, ``_attend_split``) computes the same units as the split over
    Python threads: the same bits, probabilities included; the pool is used from ``_SPLIT_WORK`` multiply-adds."""
    from kvaccel.kernels import quantized_decode_attention as qda
    from kvaccel.kernels import quantized_decode_attention_numba as nk

    if not nk.thread_pool_ok():
        pytest.skip(f"numba's threading layer here is {numba.threading_layer()}, not OpenMP or TBB")
    if bits is None:  # float8 codes
        q, quant, k, v, valid = _case(B, Hq, Hkv, Tq, 40, Q, 8, G=8, ragged=True)  # (for its masks)
        (kc, ks), (vc, vs) = (quantize_fp8(x, fp8_dtype("e4m3")) for x in (_outliers((B, Hkv, Tq, 64)),) * 2)
        quant = QuantizedKV(8, kc, ks, None, vc, vs, None, valid=quant.valid)
    else:
        q, quant, k, v, valid = _case(B, Hq, Hkv, Tq, 40, Q, bits, ragged=True)
    monkeypatch.setattr(qda, "cpu_workers", lambda device: 2)
    monkeypatch.setattr(qda, "_PARALLEL_WORK", 0)
    split_calls = []
    real = nk._attend_split
    monkeypatch.setattr(nk, "_attend_split", lambda *a: split_calls.append(a[0]) or real(*a))
    monkeypatch.setattr(qda, "_SPLIT_WORK", 0)
    pool = quantized_decode_attention(q, quant, k, v, scale=0.125, valid=valid, return_probs=Q == 1, backend="numba")
    monkeypatch.setattr(nk, "thread_pool_ok", lambda: False)
    threads = quantized_decode_attention(q, quant, k, v, scale=0.125, valid=valid, return_probs=Q == 1,
                                         backend="numba")
    assert split_calls == [2]
    pool, threads = ((x,) if Q > 1 else x for x in (pool, threads))  # (out,) or (out, probs)
    for a, b in zip(pool, threads, strict=True):
        assert torch.equal(a, b)
    ref = quantized_decode_attention_reference(q, quant, k, v, scale=0.125, valid=valid)
    torch.testing.assert_close(pool[0].double(), ref, atol=2e-5, rtol=1e-5)
    monkeypatch.setattr(qda, "_SPLIT_WORK", 1 << 40)  # below the threshold: one call on the calling thread
    quantized_decode_attention(q, quant, k, v, scale=0.125, valid=valid, backend="numba")
    assert split_calls == [2]


@pytest.mark.parametrize("chunks", [2, 3, 7])
@pytest.mark.parametrize("Tq,Tw,Q,ragged", [(160, 40, 1, True), (160, 40, 3, False), (32, 9, 1, True),
                                            (0, 24, 1, False), (96, 20, 2, True)])
def test_numba_token_chunks_match_the_reference(chunks, Tq, Tw, Q, ragged):
    """Token chunks merged by log-sum-exp (any count; bounds on whole key groups, so a chunk count that does not divide
    the cache, or more chunks than groups), over one group only (32 tokens), the window only (nothing quantized), and
    several queries: the float64 reference; probabilities too (``Q = 1``)."""
    from kvaccel.kernels.quantized_decode_attention import _quantized_decode_attention_numba

    q, quant, k, v, valid = _case(1, 6, 2, Tq, Tw, Q, 4, ragged=ragged, seed=Tq + Q)
    ref = quantized_decode_attention_reference(q, quant, k, v, scale=0.125, valid=valid)
    got = _quantized_decode_attention_numba(q, quant, k, v, 0.125, valid, Q == 1, None, None, chunks=chunks)
    out, probs = got if Q == 1 else (got, None)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    if probs is not None:
        want = quantized_decode_attention(q, quant, k, v, scale=0.125, valid=valid, return_probs=True)[1]
        torch.testing.assert_close(probs, want, atol=1e-6, rtol=1e-5)


def test_numba_token_chunk_with_nothing_valid():
    """A chunk whose slots are all invalid (its max is -inf) adds nothing; a row with nothing valid anywhere gives
    zeros (and zero probabilities)."""
    from kvaccel.kernels.quantized_decode_attention import _quantized_decode_attention_numba

    q, quant, k, v, valid = _case(2, 4, 2, 128, 16, 1, 8, ragged=True)
    quant.valid[0, :, :96] = False  # batch 0: the first chunks of both heads hold nothing valid
    quant.valid[1] = False  # batch 1: nothing valid at all
    valid[1] = False
    ref = quantized_decode_attention_reference(q, quant, k, v, scale=0.125, valid=valid)
    out, probs = _quantized_decode_attention_numba(q, quant, k, v, 0.125, valid, True, None, None, chunks=3)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(probs[1], torch.zeros_like(probs[1]))
    torch.testing.assert_close(probs[0].sum(-1), torch.ones(4), atol=1e-5, rtol=0)
    assert torch.equal(probs[0, :, :96], torch.zeros(4, 96))


def test_numba_reads_cache_buffers_in_place_under_inference_mode():
    """The kernel is handed a cache's slot buffers themselves (found from strides: inference-mode views record no
    base tensor), not a copy of the held slots per step; a tensor that is not a buffer's leading slots is copied."""
    from kvaccel.cache import SlotTensor
    from kvaccel.kernels import quantized_decode_attention as qda

    with torch.inference_mode():
        for t in (torch.randn(2, 3, 10, 8), torch.randn(1, 3, 10, 8).to(torch.float16),
                  torch.rand(2, 1, 10) > 0.5, torch.rand(1, 3, 10, 1) > 0.5):
            st = SlotTensor.spare(t, 6)
            st.append(t[:, :, :2], 0)
            view = st.view
            assert view._base is None and not view.is_contiguous()
            arr = qda._mask(view) if t.dim() == 3 else qda._rows(view)
            assert arr.ctypes.data == st.buf.data_ptr() and arr.shape[-2 if t.dim() == 4 else -1] == 16
        later = torch.randn(1, 3, 16, 8)[:, :, 6:]  # not the leading slots of a buffer: copied
        arr = qda._rows(later)
        assert arr.shape == (3, 10, 8) and np.array_equal(arr, later.reshape(3, 10, 8).numpy())


def test_numba_backend_needs_cpu_tensors():
    q, quant, k, v, _ = _case(1, 4, 2, 32, 8, 1, 4)
    with pytest.raises(ValueError, match="backend must be one of"):
        quantized_decode_attention(q, quant, k, v, scale=0.1, backend="cuda")
    with pytest.raises(ValueError, match="backend='numba' runs CPU tensors, got device meta"):
        quantized_decode_attention(q.to("meta"), quant, k, v, scale=0.1, backend="numba")


@requires_triton
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (6, 2)])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("ragged", [False, True])
def test_triton_matches_reference(Hq, Hkv, bits, ragged):
    q, quant, k, v, valid = _case(2, Hq, Hkv, 96, 24, 1, bits, ragged=ragged)
    ref = quantized_decode_attention_reference(q, quant, k, v, scale=0.125, valid=valid)

    def to(t):
        return None if t is None else t.to(TRITON_DEVICE)

    names = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")
    quant_d = QuantizedKV(bits, *(to(getattr(quant, n)) for n in names), valid=to(quant.valid))
    out = quantized_decode_attention(to(q), quant_d, to(k), to(v), scale=0.125, valid=to(valid), backend="triton")
    torch.testing.assert_close(out.cpu().double(), ref, atol=2e-5, rtol=1e-5)


@requires_triton
def test_triton_refuses_what_it_does_not_compute():
    q, quant, k, v, valid = _case(1, 4, 2, 32, 8, 3, 4)
    with pytest.raises(ValueError, match="one query token over integer codes"):
        quantized_decode_attention(q, quant, k, v, scale=0.1, backend="triton")
    kc, ks = quantize_fp8(torch.randn(1, 2, 32, 64), torch.float8_e4m3fn)
    fp8 = QuantizedKV(8, kc, ks, None, kc, ks, None)
    with pytest.raises(ValueError, match="codes torch.float8_e4m3fn"):
        quantized_decode_attention(q[:, :, :1], fp8, k, v, scale=0.1, backend="triton")


# ------------------------------------------------------------------------------------------ the model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_model("llama", head_dim=64, hidden_size=192, num_attention_heads=3, num_key_value_heads=1).eval()


def _ids(B=2, L=300, seed=0):
    return torch.randint(3, 500, (B, L), generator=torch.Generator().manual_seed(seed))


def test_window_covering_everything_is_stock(model):
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        with kvaccel.patched(model, "kv_int4(residual=1000)"):
            cache = KVAccelCache(model)
            a = model(ids[:, :250], cache=cache).logits
            b = model(ids[:, 250:], cache=cache).logits
    assert isinstance(cache.layers[0], QuantizedLayer) and cache.layers[0].quantized_length == 0
    torch.testing.assert_close(torch.cat([a, b], 1), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec", ["kv_int8", "kv_int4", "kv_int4(bits=2,group_size=32,residual=32)", "kv_fp8",
                                  "kv_fp8(format='e5m2',residual=16)",
                                  "snapkv(budget=0.5)+think(ratio=0.4)+kv_int4(group_size=32,residual=32)",
                                  "snapkv(budget=0.5)+think(ratio=0.4)+kv_fp8"])
def test_logits_over_codes_equal_logits_over_dequantized_cache(model, spec):
    """The continuation over the quantized cache equals the same continuation over a full-precision cache holding the
    dequantized keys and values (so the only error is the codes' half step, bounded above)."""
    ids = _ids()
    with torch.no_grad(), kvaccel.patched(model, spec):
        cache = KVAccelCache(model)
        model(ids[:, :260], cache=cache)
        layers = cache.layers
        assert all(isinstance(layer, QuantizedLayer) and layer.quantized_length + layer.narrow_length >= 64
                   for layer in layers)
        plain = KVAccelCache(model)
        for dst, src in zip(plain.layers, layers, strict=True):
            keys, valid = src.dense_keys()
            dst.update(keys, src.dense_values())
            dst.valid = valid  # padding slots (ThinK's narrow part is padded to whole groups)
            dst.seen = src.seen  # positions of the continuation (eviction held fewer tokens than seen)
        with kvaccel.paused(model):  # no eviction / channel pruning of the continuation
            out_q = model(ids[:, 260:], cache=cache).logits
    with torch.no_grad(), kvaccel.patched(model):
        out_d = model(ids[:, 260:], cache=plain).logits
    torch.testing.assert_close(out_q, out_d, atol=2e-5, rtol=1e-5)


def test_decode_flushes_whole_groups(model):
    ids = _ids(B=1, L=100)
    with torch.no_grad(), kvaccel.patched(model, "kv_int4(group_size=32,residual=40)"):
        cache = KVAccelCache(model)
        model(ids, cache=cache)
        layer = cache.layers[0]
        # 100 - 40 = 60 -> two groups of 32, the second one padded with 4 invalid slots (fp32: codes cost less)
        assert (layer.quantized_length, layer.length, layer.pad_slots) == (64, 104, 4)
        assert layer.qvalid.sum().item() == 60 and not layer.qvalid[..., 60:].any() and layer.valid is None
        lengths = []
        for t in range(40):
            model(ids[:, t : t + 1], cache=cache)
            lengths.append(cache.layers[0].quantized_length)
    assert all(n % 32 == 0 for n in lengths) and lengths[-1] == 96
    assert 40 <= cache.layers[0].length - cache.layers[0].quantized_length < 40 + 32 + 1


@pytest.mark.parametrize("spec", ["kv_int4(group_size=32,residual=40)", "kv_fp8", "kv_fp8(residual=8)"])
def test_decode_flush_keeps_the_window_buffers(model, spec):
    """A decode step's flush keeps the window's buffers (no allocation per step: kv_fp8 flushes at every step), the
    remaining tokens moved to their front: the window still holds the most recent tokens' exact keys and values
    (layer 0's equal the stock cache's)."""
    from transformers import DynamicCache

    ids = _ids(B=1, L=140)
    with torch.no_grad(), kvaccel.patched(model, spec):
        cache = KVAccelCache(model)
        model(ids[:, :100], cache=cache)
        layer = cache.layers[0]
        buffers, flushed = set(), set()
        for t in range(100, 140):
            model(ids[:, t : t + 1], cache=cache)
            buffers.add((layer._k.buf.data_ptr(), layer._v.buf.data_ptr()))
            flushed.add(layer.quantized_length)
    ref = DynamicCache()
    with torch.no_grad():  # the same forwards (prompt, then one token at a time): the same float rounding
        model(ids[:, :100], cache=ref, use_cache=True)
        for t in range(100, 140):
            model(ids[:, t : t + 1], cache=ref, use_cache=True)
    assert len(flushed) > 1 and len(buffers) == 1
    Tw = layer.length - layer.quantized_length
    torch.testing.assert_close(layer.keys, ref.layers[0].keys[:, :, -Tw:], atol=0, rtol=0)
    torch.testing.assert_close(layer.values, ref.layers[0].values[:, :, -Tw:], atol=0, rtol=0)


@pytest.mark.parametrize("spec", ["kv_int4(group_size=32,residual=40)", "kv_fp8"])
def test_decode_reuses_the_kernel_arrays_exactly(model, spec, monkeypatch):
    """The numba kernel's arrays of a layer's buffers are built once and reused while the buffers stay (decode steps
    append in place), rebuilt when a flush or an eviction replaces them: every step's logits equal those of a run that
    converts the buffers at each call; an eviction drops them (no old buffer kept alive)."""
    ids = _ids(B=1, L=150)
    runs = []
    for cached in (True, False):
        if not cached:
            monkeypatch.setattr(QuantizedLayer, "_kernel_arrays", lambda self, *args: None)
        with torch.inference_mode(), kvaccel.patched(model, spec):
            cache = KVAccelCache(model)
            model(ids[:, :100], cache=cache)
            layer, built, logits = cache.layers[0], set(), []
            for t in range(100, 150):
                logits.append(model(ids[:, t : t + 1], cache=cache).logits)
                if cached:
                    built.add(id(layer._arrays[1]))
            runs.append(torch.cat(logits, 1))
            if cached:
                assert 1 < len(built) < 25  # rebuilt after some flushes, reused on most steps
                layer.keep(torch.arange(0, layer.length, 2)[None, None])
                assert layer._arrays is None
    torch.testing.assert_close(runs[0], runs[1], atol=0, rtol=0)


@pytest.mark.parametrize("spec", ["kv_fp8", "kv_fp8(format='e5m2',residual=3)"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_in_place_flush_stores_what_the_general_flush_stores(model, spec, dtype, monkeypatch):
    """kv_fp8's decode-step flush, quantizing straight into the store's spare slots, stores the same codes and scales,
    byte for byte, as the general path (quantize into new tensors, then append), and it ran on most steps."""
    ids = _ids(B=2, L=180)
    stores, calls = [], []
    in_place = QuantizedLayer._flush_fp8_in_place
    for fast in (True, False):
        def counted(self, n, fast=fast):
            done = in_place(self, n) if fast else False
            calls.append(done)
            return done
        monkeypatch.setattr(QuantizedLayer, "_flush_fp8_in_place", counted)
        with torch.inference_mode(), kvaccel.patched(model.to(dtype), spec):
            cache = KVAccelCache(model)
            model(ids[:, :120], cache=cache)
            for t in range(120, 180):
                model(ids[:, t : t + 1], cache=cache)
        stores.append([{name: st.view.view(torch.uint8 if st.view.element_size() == 1 else torch.int16).clone()
                        for name, st in layer._store.items()} for layer in cache.layers])
    model.float()
    assert sum(calls[: len(calls) // 2]) > len(calls) // 4  # the fast run flushed in place on most steps
    for a, b in zip(*stores, strict=True):
        assert a.keys() == b.keys() and a["k_codes"].shape[2] >= 170 - 3
        for name in a:
            assert torch.equal(a[name], b[name]), name


def test_bytes_per_element(model):
    ids = _ids(B=1, L=1100)
    # windows after the prompt, no spare slots: 1100 - 128 = 15 groups of 64 + 12 tokens, which kv_int4 pads and
    # quantizes (64 slots of codes hold fewer bytes than 12 fp32 tokens) and kv_int8 keeps; kv_fp8 has none (R 0)
    for spec, limit, window_slots in (("kv_int8", 1.1, 128 + 12), ("kv_int4", 0.6, 128), ("kv_fp8", 1.1, 0)):
        with torch.no_grad(), kvaccel.patched(model, spec):
            model(ids)
            parts = kvaccel.report(model)["kv_storage_bytes"]
        quantized = parts["codes"] + parts["scales"] + parts["zeros"]
        per_element = quantized / parts["quantized_elements"]
        assert per_element <= limit, (spec, per_element)
        assert parts["quantized_elements"] >= 2 * 3 * 64 * 900  # K and V, 3 layers, head 64, >= 900 tokens
        if spec == "kv_fp8":  # the keys' offset: one 16-bit value per layer, kv head and channel
            assert parts["zeros"] == 3 * 1 * 64 * 2
        else:
            assert parts["zeros"] > 0
        assert parts["window"] == 3 * window_slots * 128 * 4  # 3 layers, 1 kv head, K and V of 64, fp32


# ------------------------------------------------------------------------------------------ composition


def _kept(model, spec, ids, new=24):
    with torch.no_grad(), kvaccel.patched(model, *(spec if isinstance(spec, tuple) else (spec,))):
        model.generate(ids, max_new_tokens=new, do_sample=False, min_new_tokens=new)
        rep = kvaccel.report(model)
        cache = model._kvaccel_state.cache
        return rep["kept_tokens"], [type(layer) for layer in cache.layers], rep


@pytest.mark.parametrize("evict", [
    "snapkv(budget=0.5)", "streaming(budget=200,slack=4)", "h2o(budget=200)", "snapkv(budget=0.5,decode_budget=210)",
    "expected_attention(budget=0.5)", "expected_attention(budget=0.5,decode_budget=210,use_vnorm=False)",
    "expected_attention(budget=0.5,decode_budget=210)",  # ‖v‖ weights of every held value, codes dequantized
    "keyformer(budget=200)", "adakv(budget=0.5,layout='padded')", "adakv(budget=0.5)",
    KVzip(budget=0.5, prompt_ids=(7, 8, 9, 10)),
])
def test_composes_with_eviction(model, evict):
    """Stacked on an eviction method, the quantized cache keeps the same number of tokens per head as the eviction
    alone, and really holds codes."""
    ids = _ids(B=1, L=400)
    alone, _, _ = _kept(model, evict, ids)
    storage = KVInt4(group_size=32, residual=64)
    stacked, kinds, rep = _kept(model, (evict, storage) if isinstance(evict, KVzip) else f"{evict}+{storage.spec()}",
                                ids)
    assert stacked == alone
    assert all(k is QuantizedLayer for k in kinds)
    assert rep["kv_storage_bytes"]["quantized_elements"] > 0


def test_attention_gate_composes(model, tmp_path, monkeypatch):
    """attention_gate's flags span every held slot of a quantized layer (codes and window): stacked, it keeps the
    tokens it keeps alone, through decode-time evictions over the codes."""
    from kvaccel.patches.evict.attention_gate import AttentionGate, AttentionGates

    gates = AttentionGates.for_model(model, gate_dim=4, gate_window=8, window=4, sink=2)
    torch.manual_seed(5)
    with torch.no_grad():  # flags that depend on the token (random weights), about half of them "evict"
        for layer in gates.layers:
            torch.nn.init.normal_(layer.direct.weight, std=0.5)
            layer.direct.bias.fill_(-0.3)
    path = str(gates.save(tmp_path / "gate"))
    ids = _ids(B=1, L=400)
    alone, _, _ = _kept(model, AttentionGate(weights=path), ids, new=48)
    evictions = []
    keep = QuantizedLayer.keep
    monkeypatch.setattr(QuantizedLayer, "keep", lambda self, *a, **k: evictions.append(1) or keep(self, *a, **k))
    stacked, kinds, rep = _kept(model, (AttentionGate(weights=path), KVInt8(group_size=32, residual=32)), ids, new=48)
    assert stacked == alone and len(evictions) >= len(kinds)  # evicted over the codes at decode
    assert all(k is QuantizedLayer for k in kinds) and rep["kv_storage_bytes"]["quantized_elements"] > 0
    held = [n for layer in alone for head in layer for n in head]
    assert max(held) < 400 + 47 - 64  # tokens were evicted, after the prompt and during decode


@pytest.mark.parametrize("evict", ["expected_attention(budget=0.5)",
                                   "critical(scorer=expected_attention(use_vnorm=False), budget=0.5)"])
def test_eviction_of_a_later_chunk_scores_the_quantized_values(model, evict, monkeypatch):
    """A second multi-token forward (e.g. the answer prefix after a question-aware prefill) evicts again over the
    quantized layer: value-weighted scorers read every held value (dequantized), not only the window's, and select
    the same tokens as over a full-precision cache holding the dequantized keys and values."""
    ids = _ids(B=1, L=300)
    chosen = {}
    for cls in (QuantizedLayer, kvaccel.cache.KVAccelLayer):
        def keep(self, idx, *args, _orig=cls.keep, _cls=cls, **kwargs):
            chosen.setdefault(_cls, []).append(idx.clone())
            return _orig(self, idx, *args, **kwargs)
        monkeypatch.setattr(cls, "keep", keep)
    with torch.no_grad(), kvaccel.patched(model, f"{evict}+kv_int4(group_size=32,residual=32)"):
        cache = KVAccelCache(model)
        model(ids[:, :260], cache=cache)
        assert all(layer.quantized_length >= 64 for layer in cache.layers)
        plain = KVAccelCache(model)
        for dst, src in zip(plain.layers, cache.layers, strict=True):
            keys, valid = src.dense_keys()
            dst.update(keys, src.dense_values())
            dst.valid = valid
            dst.seen, dst.prompt_len = src.seen, src.prompt_len
        chosen.clear()
        model(ids[:, 260:], cache=cache)
    with torch.no_grad(), kvaccel.patched(model, evict):
        model(ids[:, 260:], cache=plain)
    quantized, full = chosen[QuantizedLayer], chosen[kvaccel.cache.KVAccelLayer]
    assert len(quantized) == len(full) == len(cache.layers)
    for a, b in zip(quantized, full, strict=True):
        torch.testing.assert_close(a, b)
    assert [layer.length for layer in cache.layers] == [150] * len(cache.layers)


def test_think_narrow_keys_are_quantized(model):
    """ThinK's narrow keys are stored as codes of the kept channels; eviction at decode over them is refused."""
    ids = _ids(B=1, L=400)
    kept, kinds, rep = _kept(model, "snapkv(budget=0.5)+think(ratio=0.4)", ids)
    kept_q, kinds_q, rep_q = _kept(model, "snapkv(budget=0.5)+think(ratio=0.4)+kv_int4(group_size=32,residual=32)",
                                   ids)
    assert kept_q == kept and all(k is QuantizedLayer for k in kinds_q)
    parts = rep_q["kv_storage_bytes"]
    # 200 narrow tokens padded to 224 (7 groups) of 39 key channels + 64 value channels, 3 layers, 1 kv head
    assert parts["quantized_elements"] == 3 * 224 * (39 + 64)
    with pytest.raises(NotImplementedError, match="decode-time eviction over a quantized cache with ThinK"):
        _kept(model, "streaming(budget=200)+think+kv_int4(group_size=32)", ids)


def test_sparse_prefill_then_quantized_chunks(model):
    """A sparse prefill method computes the prompt; later chunks attend the quantized layer (not the prefill method
    over only the new tokens)."""
    ids = _ids(B=1, L=300)
    with torch.no_grad(), kvaccel.patched(model, "a_shape+kv_int8"):
        cache = KVAccelCache(model)
        model(ids[:, :280], cache=cache)
        out = model(ids[:, 280:], cache=cache).logits
        plain = KVAccelCache(model)
        for dst, src in zip(plain.layers, cache.layers, strict=True):
            keys, valid = src.dense_keys()
            n = src.length - 20  # the prompt's slots (with the padding of its last key group)
            dst.update(keys[:, :, :n], src.dense_values()[:, :, :n])
            dst.valid = None if valid is None else valid[:, :, :n]
            dst.seen = 280
    with torch.no_grad(), kvaccel.patched(model):
        ref = model(ids[:, 280:], cache=plain).logits
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("spec,match", [
    ("snapkv(budget=0.5)+think(value_ratio=0.2)+kv_int4", r"value_ratio=0.2"),
    ("retrieval+kv_fp8", "kv_fp8 cannot hold retrieval's host store"),
    ("d2o+kv_int4", "'d2o'"),
])
def test_unsupported_combinations_are_refused(model, spec, match):
    with pytest.raises(NotImplementedError, match=match):
        kvaccel.patch(model, spec)
    assert not kvaccel.api.is_patched(model)


@pytest.mark.parametrize("spec,match", [
    ("kv_int4(bits=3)", r"bits \(3\) must be one of \(2, 4, 8\)"),
    ("kv_int4(bits=8)", r"kv_int4: bits \(8\) must be one of \(2, 4\)"),
    ("kv_int8(bits=4)", r"kv_int8: bits \(4\) must be one of \(8,\)"),
    ("kv_int4(group_size=16)", r"group_size \(16\) must be an int in \[32, 128\]"),
    ("kv_int4(residual=-1)", r"residual \(-1\) must be an int >= 0"),
])
def test_bad_options(spec, match):
    with pytest.raises(ValueError, match=match):
        kvaccel.config.parse_spec(spec)


def test_group_size_must_divide_head_size():
    m = tiny_model("llama", head_dim=96, hidden_size=192, num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(ValueError, match=r"group_size \(64\) must divide the head size \(96\)"):
        kvaccel.patch(m, "kv_int4")
    kvaccel.patch(m, "kv_int4(group_size=32)")
    kvaccel.unpatch(m)


def test_spec_parses_and_composes():
    ms = kvaccel.config.parse_spec("snapkv(budget=0.25)+kv_int4")
    assert [m.stage for m in ms] == ["evict", "storage"]
    assert ms[1].spec() == "kv_int4(bits=4,group_size=64,residual=128)"


def test_storage_needs_our_cache(model):
    """Without a KVAccelCache there is nothing to quantize: an error, not a silently full-precision run."""
    with kvaccel.patched(model, "kv_int8"), pytest.raises(RuntimeError, match="no cache"):
        model(_ids(B=1, L=20), use_cache=False)


def test_fp8_composes_with_decode_eviction(model):
    ids = _ids(B=1, L=400)
    alone, _, _ = _kept(model, "streaming(budget=200,slack=4)", ids)
    stacked, kinds, rep = _kept(model, "streaming(budget=200,slack=4)+kv_fp8", ids)
    assert stacked == alone and all(k is QuantizedLayer for k in kinds)
    assert rep["kv_storage_bytes"]["codes"] == rep["kv_storage_bytes"]["quantized_elements"]  # one byte each


def test_fp8_keys_are_centred_on_the_prompt_channel_means():
    """float8 keeps ~3 significant bits of what it stores. With a key channel holding a large, nearly constant offset
    (here a key bias of 300 on the slowest RoPE channels; Qwen2.5's reach ~355), every stored key, the prompt's and
    the decode steps', is at least as close (squared error) as its codes centred on the prompt's channel means
    would be: within e4m3's half ulp (1/16) of each centred element. Stored uncentred only, the error was up to ~1/16
    of the offset itself (~18 here) for a token whose largest element is elsewhere."""
    m = tiny_model("qwen2", head_dim=64, hidden_size=192, num_attention_heads=3, num_key_value_heads=1,
                   rope_theta=1e6)
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.k_proj.bias.zero_()[[31, 63]] = torch.tensor([300.0, -250.0])
    ids = _ids(B=2, L=140)
    with torch.no_grad():
        caches = []
        for spec in ("full", "kv_fp8"):
            with kvaccel.patched(m, spec):
                cache = KVAccelCache(m)
                m(ids[:, :120], cache=cache)
                for t in range(120, 140):  # decode steps: each flushes its token with the prompt's offset
                    m(ids[:, t: t + 1], cache=cache)
                caches.append(cache)
    for full, fp8 in zip(*(c.layers for c in caches), strict=True):
        assert isinstance(fp8, QuantizedLayer) and fp8.quantized_length == 139  # the last token: in the window
        keys = full.keys.float()
        mu = keys[:, :, :120].mean(2, keepdim=True).half().float()  # the prompt's channel means, as stored (float16)
        err = (fp8.dense_keys()[0].float() - keys).norm(dim=-1)
        bound = (keys - mu).norm(dim=-1) / 16
        assert bool((err <= bound * 1.001 + 1e-6).all()), float((err / bound).max())
        assert bool((mu[..., 31] > 250).all())
        torch.testing.assert_close(fp8.quant().k_zero.float(), mu, atol=0, rtol=1e-6)


def test_left_padded_batch_over_codes(model):
    """Padding slots quantized with the prompt stay masked: each row of a left-padded batch gets the logits it gets
    over the dequantized cache, and its last-token logits match the row run alone within the quantization error."""
    ids = _ids(B=2, L=280)
    mask = torch.ones_like(ids)
    mask[0, :40] = 0
    with torch.no_grad(), kvaccel.patched(model, "kv_int8(group_size=32,residual=32)"):
        cache = KVAccelCache(model)
        model(ids, attention_mask=mask, cache=cache)
        assert cache.layers[0].quantized_length == 256 and cache.layers[0].qvalid is not None  # 248 + 8 padding
        step = torch.full((2, 1), 7)
        out = model(step, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1), cache=cache).logits
        alone = model(torch.cat([ids[:1, 40:], step[:1]], 1)).logits[:, -1:]
    # int8 codes: error 7e-4 measured (logits up to 1.2; attending the padding instead: 1.0)
    torch.testing.assert_close(out[:1], alone, atol=5e-3, rtol=0)
    assert (out[:1] - alone).abs().max() > 0  # (it is quantized)


def test_bfloat16_model_keeps_its_dtype():
    m = tiny_model("llama", head_dim=64, hidden_size=192, num_attention_heads=3, num_key_value_heads=1).eval()
    m = m.to(torch.bfloat16)
    ids = _ids(B=1, L=200)
    with torch.no_grad(), kvaccel.patched(m, "kv_int4(group_size=32,residual=32)"):
        cache = KVAccelCache(m)
        m(ids, cache=cache)
        out = m(ids[:, :1], cache=cache).logits
        layer = cache.layers[0]
        s = layer.quant()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # 200 - 32 = 168 = 5 groups + 8 tokens: 8 bf16 tokens cost fewer bytes than a padded group of codes (+ 1 step)
    assert (layer.pad_slots, layer.quantized_length, layer.length) == (0, 160, 201)
    assert layer.keys.dtype == torch.bfloat16 and s.k_scale.dtype == torch.bfloat16 and s.k_codes.dtype == torch.uint8
