"""Compiled CPU quantizer for ``kv_fp8``'s decode steps (:func:`quantize_fp8_pair`): per-token float8 codes and 16-bit
scales of a few tokens' keys and values in one call, bit for bit what ``kv_quant.quantize_fp8`` gives (a dozen small
torch ops per tensor, the cost of a decode step's flush).

The roundings are torch's (``c10``'s): float32 to float16 / bfloat16 round to nearest even
(:func:`_f32_to_f16`, :func:`_f32_to_bf16`), float32 to float8 as ``c10::Float8_e4m3fn`` / ``Float8_e5m2`` convert
(:func:`_f32_to_fp8`: round to nearest even, subnormals by a float addition, out-of-range to NaN / inf). No fastmath:
the divisions and the addition must be IEEE's.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from kvaccel.kernels.attention_index_jit import kernel

from .quantized_decode_attention_numba import _fp8_words, fp8_decoding, scale_table

__all__ = ["offset_array", "quantize_fp8_pair", "quantize_fp8_pair_into"]

#: float8 formats: torch dtype name -> (format id for the kernel, largest finite value)
_FP8 = {"float8_e4m3fn": (0, 448.0), "float8_e5m2": (1, 57344.0)}


@kernel(inline="always")
def _f32_to_f16(w):
    """float16 bits of the float32 with bits ``w`` (uint32), round to nearest even; overflow to inf."""
    sign = (w >> np.uint32(16)) & np.uint32(0x8000)
    a = w & np.uint32(0x7FFFFFFF)
    if a > np.uint32(0x7F800000):
        return np.uint32(0x7E00) | sign
    exp = np.int64(a >> np.uint32(23))
    mant = np.int64(a & np.uint32(0x7FFFFF))
    e16 = exp - 112  # 127 - 15
    if e16 >= 31:
        return np.uint32(0x7C00) | sign
    if e16 <= 0:  # float16 subnormal (or zero): k·2^-24
        if e16 < -10:
            return sign
        m = mant | 0x800000
        shift = 14 - e16
        k = m >> shift
        rem = m & ((1 << shift) - 1)
        half = 1 << (shift - 1)
    else:
        k = (e16 << 10) | (mant >> 13)
        rem = mant & 0x1FFF
        half = 0x1000
    if rem > half or (rem == half and (k & 1)):
        k += 1
    return np.uint32(k) | sign


@kernel(inline="always")
def _f32_to_bf16(w):
    """bfloat16 bits of the float32 with bits ``w`` (uint32), round to nearest even (NaN: 0x7FC0)."""
    if (w & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint32(0x7FC0)
    return (w + np.uint32(0x7FFF) + ((w >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)


@kernel(inline="always")
def _f32_to_fp8(w, fmt, word, as_float):
    """float8 bits (``fmt`` 0: e4m3fn, 1: e5m2) of the float32 with bits ``w``, as ``c10``'s conversion; ``word`` /
    ``as_float``: a 1-element uint32 array and its float32 view (bit casts)."""
    sign = (w >> np.uint32(24)) & np.uint32(0x80)
    a = w & np.uint32(0x7FFFFFFF)
    if fmt == 0:
        if a >= np.uint32(1087 << 20):
            r = np.uint32(0x7F)
        elif a < np.uint32(121 << 23):
            word[0] = a
            as_float[0] = as_float[0] + np.float32(16384.0)  # 2^14 (c10's denorm_mask): rounds to the subnormal grid
            r = (word[0] - np.uint32(141 << 23)) & np.uint32(0xFF)
        else:
            odd = (a >> np.uint32(20)) & np.uint32(1)
            r = ((a + np.uint32((1 << 32) - (120 << 23)) + np.uint32(0x7FFFF) + odd) >> np.uint32(20)) & np.uint32(0xFF)
    else:
        if a >= np.uint32(143 << 23):
            r = np.uint32(0x7F) if a > np.uint32(0x7F800000) else np.uint32(0x7C)
        elif a < np.uint32(113 << 23):
            word[0] = a
            as_float[0] = as_float[0] + np.float32(128.0)  # 2^7 (c10's denorm_mask)
            r = (word[0] - np.uint32(134 << 23)) & np.uint32(0xFF)
        else:
            odd = (a >> np.uint32(21)) & np.uint32(1)
            r = ((a + np.uint32((1 << 32) - (112 << 23)) + np.uint32(0xFFFFF) + odd) >> np.uint32(21)) & np.uint32(0xFF)
    return r | sign


@kernel(inline="always")
def _quantize_row(row, fmt, fmax, bf16, tiny, slut, word, as_float, out):
    """One token ``row`` ``(C,)`` float32 -> float8 bits in ``out``; returns ``(scale bits, finite)``: ``s = max|x| /
    fmax`` rounded to the 16-bit dtype, up one step if that is below, at least ``tiny`` (the smallest normal's bits),
    ``code = fp8(x / s)``; not finite when the scale overflows (or ``row`` holds NaN)."""
    top = np.uint32(0x7F80) if bf16 else np.uint32(0x7C00)  # exponent bits all ones: inf or NaN
    finite = True
    amax = np.float32(0.0)
    for c in range(row.shape[0]):
        v = abs(row[c])
        if v != v:
            finite = False
        amax = max(amax, v)
    as_float[0] = amax / np.float32(fmax)
    s32 = as_float[0]
    s = _f32_to_bf16(word[0]) if bf16 else _f32_to_f16(word[0])
    if slut[s] < s32:
        s += np.uint32(1)  # nextafter towards +inf (s >= 0)
    s = max(s, np.uint32(tiny))
    if (s & top) == top:
        finite = False
    sf = slut[s]
    for c in range(row.shape[0]):
        as_float[0] = row[c] / sf
        out[c] = _f32_to_fp8(word[0], fmt, word, as_float)
    return s, finite


@kernel(inline="always")
def _row_error(x, codes, sf, shift, ratio, words):
    """``Σ_c (code_c · s − x_c)²`` in float64 (``code · s`` in float32, as torch's ``codes.float() * s.float()``);
    ``words`` uint32 scratch of ``len(x)``."""
    _fp8_words(codes, shift, words)
    as_float = words.view(np.float32)
    err = 0.0
    for c in range(x.shape[0]):
        d = np.float64(as_float[c] * np.float32(ratio) * sf - x[c])
        err += d * d
    return err


@kernel(inline="always")
def _quantize_tokens(x, mu, fmt, fmax, bf16, tiny, slut, shift, ratio, word, as_float, codes, scale):
    """Tokens ``x`` ``(B, H, T, C)`` float32 -> ``codes`` ``(B, H, T, C)`` float8 bits and ``scale`` ``(B, H, T, 1)``
    16-bit bits (:func:`_quantize_row`). With an offset ``mu`` ``(B, H, 1, C)`` (keys; ``(1, 1, 0, 1)``: none), each
    token keeps the codes of ``x - mu`` or of ``x``, whichever has the smaller squared error (ties: ``x - mu``), the
    latter with the scale's sign bit set. False when a scale is not finite."""
    finite = True
    C = x.shape[3]
    centre = mu.shape[2] > 0
    xc = np.empty(C, np.float32)
    alt = np.empty(C, np.uint8)
    words = np.empty(C, np.uint32)
    for b in range(x.shape[0]):
        for h in range(x.shape[1]):
            for t in range(x.shape[2]):
                row, out = x[b, h, t], codes[b, h, t]
                s, ok = _quantize_row(row, fmt, fmax, bf16, tiny, slut, word, as_float, out)
                finite &= ok
                if centre:
                    m = mu[b, h, 0]
                    for c in range(C):
                        xc[c] = row[c] - m[c]
                    sc, ok = _quantize_row(xc, fmt, fmax, bf16, tiny, slut, word, as_float, alt)
                    finite &= ok
                    if (_row_error(xc, alt, slut[sc], shift, ratio, words)
                            <= _row_error(row, out, slut[s], shift, ratio, words)):
                        out[:] = alt
                        s = sc
                    else:
                        s |= np.uint32(0x8000)  # the sign bit: stored without the offset
                scale[b, h, t, 0] = s
    return finite


@kernel()
def _quantize_pair(xk, mu, xv, fmt, fmax, bf16, tiny, slut, shift, ratio, kc, ks, vc, vs):
    """:func:`_quantize_tokens` of ``xk`` (with the offset ``mu``) into ``kc`` / ``ks`` and of ``xv`` into ``vc`` /
    ``vs``; False when a scale is not finite."""
    word = np.empty(1, np.uint32)
    as_float = word.view(np.float32)
    ok_k = _quantize_tokens(xk, mu, fmt, fmax, bf16, tiny, slut, shift, ratio, word, as_float, kc, ks)
    ok_v = _quantize_tokens(xv, _NO_OFFSET, fmt, fmax, bf16, tiny, slut, shift, ratio, word, as_float, vc, vs)
    return ok_k and ok_v


_NO_OFFSET = np.zeros((1, 1, 0, 1), np.float32)


@functools.cache
def _constants(fp8: torch.dtype, sdtype: torch.dtype) -> tuple:
    """``(format id, fp8 max, bfloat16 scales?, bits of the smallest normal scale, scale table)``."""
    fmt, fmax = _FP8[str(fp8).removeprefix("torch.")]
    tiny = int(torch.tensor(torch.finfo(sdtype).tiny, dtype=sdtype).view(torch.int16)) & 0xFFFF
    return fmt, fmax, sdtype == torch.bfloat16, tiny, scale_table(sdtype)


def quantize_fp8_pair(k: torch.Tensor, v: torch.Tensor, fp8: torch.dtype, sdtype: torch.dtype,
                      k_offset: torch.Tensor | None = None
                      ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``(quantize_fp8(k, fp8, sdtype), quantize_fp8(v, fp8, sdtype))`` for CPU tensors ``(B, H, T, C)``, bit for bit,
    in one compiled call (with ``k_offset`` ``(B, H, 1, C)``: ``quantize_fp8_keys(k, k_offset, fp8, sdtype)`` for the
    keys); the same ``ValueError`` for scales that overflow (or NaN input)."""
    kf, vf = k.float(), v.float()
    mu = _NO_OFFSET if k_offset is None else offset_array(k_offset, kf.shape)
    kc, vc = torch.empty(kf.shape, dtype=torch.uint8), torch.empty(vf.shape, dtype=torch.uint8)
    ks, vs = torch.empty(*kf.shape[:-1], 1, dtype=torch.int16), torch.empty(*vf.shape[:-1], 1, dtype=torch.int16)
    quantize_fp8_pair_into(kf.numpy(), mu, vf.numpy(), fp8, sdtype, kc.numpy(), ks.numpy().view(np.uint16),
                           vc.numpy(), vs.numpy().view(np.uint16))
    return (kc.view(fp8), ks.view(sdtype)), (vc.view(fp8), vs.view(sdtype))


def offset_array(k_offset: torch.Tensor, shape: torch.Size) -> np.ndarray:
    """The keys' offset ``(B|1, H|1, 1, C)`` as the float32 ``(B, H, 1, C)`` array :func:`quantize_fp8_pair_into` reads,
    for keys of ``shape`` ``(B, H, T, C)``."""
    return k_offset.float().expand(*shape[:2], 1, shape[3]).contiguous().numpy()


def quantize_fp8_pair_into(k: np.ndarray, mu: np.ndarray, v: np.ndarray, fp8: torch.dtype, sdtype: torch.dtype,
                           kc: np.ndarray, ks: np.ndarray, vc: np.ndarray, vs: np.ndarray) -> None:
    """:func:`quantize_fp8_pair` on arrays, written into given ones (a cache's spare slots: no allocation): ``k`` /
    ``v`` float32 ``(B, H, T, C)``, ``mu`` float32 ``(B, H, 1, C)`` (or ``(1, 1, 0, 1)``: no offset); codes ``kc`` /
    ``vc`` uint8 ``(B, H, T, C)``, scales ``ks`` / ``vs`` as uint16 bit patterns ``(B, H, T, 1)``, any strides.
    ``ValueError`` when a scale overflows (the outputs then hold garbage)."""
    if not _quantize_pair(k, mu, v, *_constants(fp8, sdtype), *fp8_decoding(fp8), kc, ks, vc, vs):
        big = max(float(np.abs(k).max()), float(np.abs(v).max()))
        raise ValueError(f"KV values up to {big:.3g} do not fit the {sdtype} scales of the fp8 cache")
