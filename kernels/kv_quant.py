"""KIVI-style KV quantization primitives: asymmetric min/max codes in groups, packed into bytes.

https://arxiv.org/abs/2402.02750 (jy-yuan/KIVI ``quant/new_pack.py``): ``q = round((x - z) / s)``, ``x̂ = z + q·s``,
``z = min``, ``s = (max - min) / (2^bits - 1)``. Keys are quantized **per channel** (a group = ``G`` consecutive
tokens of one channel), values **per token** (a group = ``G`` consecutive channels of one token).

Scales and zero points are stored in a 16-bit dtype (``scale_dtype``: bfloat16 for a bfloat16 model, float16
otherwise), rounded so that the stored grid still covers the group: ``z`` is rounded down and ``s`` up, and ``s`` is
at least the dtype's smallest normal number (the epsilon that keeps a constant group from dividing 0 by 0). So every
element is within half a step of its code: ``|x - x̂| <= s / 2`` (plus float32 rounding of ``z + q·s``).

``kv_fp8`` stores float8 codes (``e4m3`` = ``torch.float8_e4m3fn``, ``e5m2`` = ``torch.float8_e5m2``) with one
scale per token (:func:`quantize_fp8`): ``x̂ = code · s``, ``s = max|x| / fp8_max`` rounded up, so a token's largest
element is (nearly) exact and the others keep ~3 significant bits. Keys may also be centred on a per-channel offset
``μ`` shared by every token of a row (:func:`key_offset`, the mean of the prompt's keys): ``k̂ = μ + code · s``.
Each key token keeps whichever of the two has the smaller squared error (:func:`quantize_fp8_keys`; the scale's sign
bit marks an uncentred token). Centring saves channels with a large, nearly constant offset (Qwen2's key bias puts
some near 355: a token whose largest element is elsewhere lost several units of logit there); not centring keeps an
outlier channel exact where it is the token's largest (the default model's keys do better that way). Values: no
offset.

Codes are packed along the channel axis, ``8 // bits`` codes per byte (code ``i`` of a byte in bits
``[bits·i, bits·(i+1))``), so a token's codes are one contiguous row: eviction gathers rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "FP8_FORMATS",
    "SUPPORTED_BITS",
    "check_bits",
    "fp8_dtype",
    "key_offset",
    "quantize_fp8",
    "quantize_fp8_keys",
    "dequantize_keys",
    "dequantize_values",
    "pack_codes",
    "quantize_keys",
    "quantize_values",
    "scale_dtype_for",
    "unpack_codes",
]

SUPPORTED_BITS = (2, 4, 8)


def check_bits(bits: int) -> None:
    """Raise ``ValueError`` unless ``bits`` is one of :data:`SUPPORTED_BITS`."""
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits ({bits!r}) must be one of {SUPPORTED_BITS}: codes are packed 8 // bits per byte")


#: ``kv_fp8`` formats and the torch dtype names they need
FP8_FORMATS = {"e4m3": "float8_e4m3fn", "e5m2": "float8_e5m2"}


def fp8_dtype(fmt: str) -> torch.dtype:
    """The torch float8 dtype of format ``fmt`` (``"e4m3"`` / ``"e5m2"``); ``ValueError`` naming it when unknown or
    when the installed torch lacks the dtype."""
    if fmt not in FP8_FORMATS:
        raise ValueError(f"fp8 format ({fmt!r}) must be one of {sorted(FP8_FORMATS)}")
    dtype = getattr(torch, FP8_FORMATS[fmt], None)
    if dtype is None:
        raise ValueError(
            f"fp8 format {fmt!r} needs torch.{FP8_FORMATS[fmt]}, which torch {torch.__version__} does not have; "
            "upgrade torch (>= 2.1) or use kv_int8"
        )
    return dtype


def quantize_fp8(x: Tensor, fp8: torch.dtype, sdtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Per-token float8 quantization of ``x`` ``(B, H, T, C)``: ``(codes (B, H, T, C) fp8, scale (B, H, T, 1))`` with
    ``scale = max_c |x| / fp8_max`` rounded up in ``sdtype`` (so no code overflows), at least the smallest normal."""
    sdtype = sdtype or scale_dtype_for(x.dtype)
    xf = x.float()
    s32 = xf.abs().amax(-1, keepdim=True) / torch.finfo(fp8).max
    s = s32.to(sdtype)
    s = torch.where(s.float() < s32, torch.nextafter(s, torch.full_like(s, float("inf"))), s)
    s = s.clamp_min(torch.finfo(sdtype).tiny)
    if not bool(torch.isfinite(s).all()):
        raise ValueError(f"KV values up to {float(xf.abs().max()):.3g} do not fit the {sdtype} scales of the fp8 cache")
    return (xf / s.float()).to(fp8), s


def key_offset(k: Tensor, valid: Tensor | None, sdtype: torch.dtype) -> Tensor:
    """``kv_fp8``'s per-channel key offset ``(B, H, 1, D)`` in ``sdtype``: the mean of ``k`` ``(B, H, T, D)`` over the
    slots ``valid`` ``(B, 1|H, T)`` marks (all when ``None``; zeros for a row with none)."""
    kf = k.float()
    if valid is not None:
        w = valid.expand(*k.shape[:3]).unsqueeze(-1).float()
        mean = (kf * w).sum(2, keepdim=True) / w.sum(2, keepdim=True).clamp_min(1.0)
    else:
        mean = kf.mean(2, keepdim=True) if k.shape[2] else kf.new_zeros(*k.shape[:2], 1, k.shape[-1])
    mu = mean.to(sdtype)
    if not bool(torch.isfinite(mu).all()):
        raise ValueError(f"key channel means up to {float(mean.abs().max()):.3g} do not fit the {sdtype} offsets of "
                         "the fp8 cache; load the model in bfloat16 (bfloat16 offsets)")
    return mu


def quantize_fp8_keys(k: Tensor, offset: Tensor, fp8: torch.dtype, sdtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Per token, the :func:`quantize_fp8` codes of ``k - offset`` or of ``k`` (``offset`` ``(B, H, 1, D)``), whichever
    has the smaller squared error ``Σ_c (code·s - x)²`` (float64 sum; ties: ``k - offset``); the scale of a token
    stored without the offset is negated. Dequantized: ``code · |s| + offset · [s > 0]``."""
    kf = k.float()
    kc = kf - offset.float()
    ca, sa = quantize_fp8(kf, fp8, sdtype)
    cb, sb = quantize_fp8(kc, fp8, sdtype)

    def error(codes: Tensor, s: Tensor, x: Tensor) -> Tensor:
        return (codes.float() * s.float() - x).double().square().sum(-1, keepdim=True)

    centred = error(cb, sb, kc) <= error(ca, sa, kf)
    codes = torch.where(centred, cb.view(torch.uint8), ca.view(torch.uint8)).view(fp8)
    return codes, torch.where(centred, sb, -sa)


def quantize_fp8_kv(k: Tensor, v: Tensor, fp8: torch.dtype, sdtype: torch.dtype, k_offset: Tensor | None = None
                    ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """:func:`quantize_fp8` of keys (:func:`quantize_fp8_keys` with ``k_offset``, :func:`key_offset`, when given) and
    values: on CPU one compiled call (``kv_quant_numba.quantize_fp8_pair``, bit for bit the same; a decode step's
    flush is otherwise a dozen small ops per tensor), else the torch ops."""
    if k.device.type == "cpu":
        from .kv_quant_numba import quantize_fp8_pair  # numba: imported when first needed

        return quantize_fp8_pair(k, v, fp8, sdtype, k_offset)
    keys = quantize_fp8(k, fp8, sdtype) if k_offset is None else quantize_fp8_keys(k, k_offset, fp8, sdtype)
    return keys, quantize_fp8(v, fp8, sdtype)


def scale_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The dtype of scales and zero points for a cache of ``dtype``: bfloat16 for bfloat16, float16 otherwise."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float16


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """``codes`` ``(..., C)`` uint8 in ``[0, 2^bits)`` -> ``(..., ceil(C * bits / 8))`` uint8 (the last byte
    zero-padded when ``C`` is not a multiple of ``8 // bits``, e.g. ThinK's odd kept-channel counts)."""
    per = 8 // bits
    if per == 1:
        return codes
    if codes.shape[-1] % per:
        codes = torch.nn.functional.pad(codes, (0, -codes.shape[-1] % per))
    c = codes.view(*codes.shape[:-1], codes.shape[-1] // per, per)
    out = c[..., 0].clone()
    for i in range(1, per):
        out |= c[..., i] << (bits * i)
    return out


def unpack_codes(packed: Tensor, bits: int, channels: int | None = None) -> Tensor:
    """Inverse of :func:`pack_codes`: ``(..., ceil(C * bits / 8))`` uint8 -> ``(..., C)`` uint8 (``channels=C``;
    ``None``: every code the bytes hold)."""
    per = 8 // bits
    if per == 1:
        return packed
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * i)) & mask for i in range(per)]
    out = torch.stack(parts, dim=-1).flatten(-2)
    return out if channels is None or channels == out.shape[-1] else out[..., :channels]


def codes_as_float(codes: Tensor, bits: int, channels: int) -> Tensor:
    """Codes ``(..., bytes)`` (packed uint8, or float8) as float32 ``(..., channels)``."""
    if codes.is_floating_point() or bits == 8:
        return codes.float()
    return unpack_codes(codes, bits, channels).float()


def _grid(mn: Tensor, mx: Tensor, bits: int, sdtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Stored ``(scale, zero)`` in ``sdtype`` for float32 group minima / maxima: zero rounded down, scale rounded up
    (at least the smallest normal number), so ``[z, z + (2^bits - 1)·s]`` covers ``[mn, mx]``."""
    z = mn.to(sdtype)
    z = torch.where(z.float() > mn, torch.nextafter(z, torch.full_like(z, float("-inf"))), z)
    s32 = (mx - z.float()) / float(2**bits - 1)
    s = s32.to(sdtype)
    s = torch.where(s.float() < s32, torch.nextafter(s, torch.full_like(s, float("inf"))), s)
    s = s.clamp_min(torch.finfo(sdtype).tiny)
    if not bool(torch.isfinite(s).all() & torch.isfinite(z).all()):
        big = float(torch.maximum(mn.abs(), mx.abs()).max())
        raise ValueError(
            f"KV values up to {big:.3g} do not fit the {sdtype} scales of the quantized cache (max "
            f"{torch.finfo(sdtype).max:.3g}); load the model in bfloat16 (bfloat16 scales) or use the model dtype"
        )
    return s, z


def _codes(x: Tensor, s: Tensor, z: Tensor, bits: int) -> Tensor:
    q = torch.round((x.float() - z.float()) / s.float())
    return q.clamp_(0, 2**bits - 1).to(torch.uint8)


def _masked_minmax(x: Tensor, valid: Tensor | None, dim: int) -> tuple[Tensor, Tensor]:
    x = x.float()
    if valid is None:
        return x.amin(dim), x.amax(dim)
    mn = x.masked_fill(~valid, float("inf")).amin(dim)
    mx = x.masked_fill(~valid, float("-inf")).amax(dim)
    empty = torch.isinf(mn)  # a group of padding slots only: any grid will do
    return mn.masked_fill(empty, 0.0), mx.masked_fill(empty, 0.0)


def quantize_keys(k: Tensor, bits: int, group: int, valid: Tensor | None = None,
                  sdtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel key quantization: ``k`` ``(B, H, T, D)`` with ``T`` a multiple of ``group``.

    Returns ``(codes (B, H, T, ceil(D * bits / 8)) uint8, scale (B, H, T / group, D), zero (B, H, T / group, D))``.
    ``valid`` ``(B, 1|H, T)`` bool excludes padding slots from the group statistics.
    """
    B, H, T, D = k.shape
    if T % group:
        raise ValueError(f"quantize_keys needs a whole number of groups: {T} tokens, group_size {group}")
    sdtype = sdtype or scale_dtype_for(k.dtype)
    kg = k.reshape(B, H, T // group, group, D)
    vg = None if valid is None else valid.expand(B, H, T).reshape(B, H, T // group, group, 1)
    mn, mx = _masked_minmax(kg, vg, 3)
    s, z = _grid(mn, mx, bits, sdtype)
    codes = _codes(kg, s[:, :, :, None], z[:, :, :, None], bits).reshape(B, H, T, D)
    return pack_codes(codes, bits), s, z


def dequantize_keys(codes: Tensor, scale: Tensor, zero: Tensor | None, bits: int, dtype: torch.dtype = torch.float32
                    ) -> Tensor:
    """``(B, H, T, D)`` keys in ``dtype`` from :func:`quantize_keys`' output (``T`` a multiple of the group)."""
    q = codes if codes.is_floating_point() else unpack_codes(codes, bits, scale.shape[-1])
    B, H, T, D = q.shape
    n = scale.shape[2]
    qg = q.reshape(B, H, n, T // n, D).to(dtype) * scale.to(dtype)[:, :, :, None]
    return (qg if zero is None else zero.to(dtype)[:, :, :, None] + qg).view(B, H, T, D)


def quantize_values(v: Tensor, bits: int, group: int, sdtype: torch.dtype | None = None
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token value quantization: ``v`` ``(B, H, T, Dv)`` in groups of ``group`` channels (``Dv % group == 0``).

    Returns ``(codes (B, H, T, Dv * bits // 8) uint8, scale (B, H, T, Dv / group), zero (B, H, T, Dv / group))``.
    """
    B, H, T, Dv = v.shape
    if Dv % group:
        raise ValueError(f"group_size ({group}) must divide the value head size ({Dv})")
    sdtype = sdtype or scale_dtype_for(v.dtype)
    vg = v.reshape(B, H, T, Dv // group, group)
    mn, mx = _masked_minmax(vg, None, 4)
    s, z = _grid(mn, mx, bits, sdtype)
    codes = _codes(vg, s[..., None], z[..., None], bits).reshape(B, H, T, Dv)
    return pack_codes(codes, bits), s, z


def dequantize_values(codes: Tensor, scale: Tensor, zero: Tensor | None, bits: int, dtype: torch.dtype = torch.float32
                      ) -> Tensor:
    """``(B, H, T, Dv)`` values in ``dtype`` from :func:`quantize_values`' output."""
    q = codes if codes.is_floating_point() else unpack_codes(codes, bits)
    B, H, T, Dv = q.shape
    n = scale.shape[-1]
    qg = q.reshape(B, H, T, n, Dv // n).to(dtype) * scale.to(dtype)[..., None]
    return (qg if zero is None else zero.to(dtype)[..., None] + qg).view(B, H, T, Dv)


class QuantizedKV:
    """The quantized tokens of one cache layer, as the attention kernels read them (views, no copies).

    ``k_codes`` ``(B, H, T, D·bits/8)``, ``k_scale`` / ``k_zero`` ``(B, H, T/G, D)`` (per channel, ``G`` tokens a
    group), ``v_codes`` ``(B, H, T, Dv·bits/8)``, ``v_scale`` / ``v_zero`` ``(B, H, T, Dv/Gv)`` (per token),
    ``valid`` ``(B, 1|H, T)`` bool or ``None``. float8 codes (``kv_fp8``): ``k_codes`` / ``v_codes`` ``(B, H, T, D)``,
    scales ``(B, H, T, 1)``, ``k_zero`` the keys' per-channel offset ``(B, H, 1, D)`` shared by the tokens whose key
    scale is positive (:func:`quantize_fp8_keys`; ``None``: no offset), ``v_zero`` ``None``.
    """

    __slots__ = ("bits", "k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "valid")

    def __init__(self, bits: int, k_codes: Tensor, k_scale: Tensor, k_zero: Tensor | None, v_codes: Tensor,
                 v_scale: Tensor, v_zero: Tensor | None, valid: Tensor | None = None):
        check_bits(bits)
        self.bits, self.valid = bits, valid
        self.k_codes, self.k_scale, self.k_zero = k_codes, k_scale, k_zero
        self.v_codes, self.v_scale, self.v_zero = v_codes, v_scale, v_zero

    @property
    def length(self) -> int:
        return self.k_codes.shape[2]

    @property
    def key_group(self) -> int:
        return self.length // self.k_scale.shape[2] if self.k_scale.shape[2] else 0

    @property
    def fp8(self) -> bool:
        """float8 codes (``kv_fp8``): a scale per token, the keys' offset per channel."""
        return self.k_codes.is_floating_point()

    def keys(self, dtype: torch.dtype = torch.float32, start: int = 0, stop: int | None = None) -> Tensor:
        """Dequantized keys of tokens ``[start, stop)`` (both multiples of the key group)."""
        stop = self.length if stop is None else stop
        if stop <= start:
            B, H = self.k_codes.shape[:2]
            return self.k_codes.new_zeros(B, H, 0, self.k_codes.shape[-1] if self.fp8 else self.k_scale.shape[-1],
                                          dtype=dtype)
        if self.fp8:  # code · |s|, plus the offset where s > 0 (quantize_fp8_keys)
            ks = self.k_scale[:, :, start:stop]
            keys = dequantize_keys(self.k_codes[:, :, start:stop], ks.abs(), None, 8, dtype)
            return keys if self.k_zero is None else keys + self.k_zero.to(dtype) * (ks > 0).to(dtype)
        g = self.key_group
        zero = None if self.k_zero is None else self.k_zero[:, :, start // g: stop // g]
        return dequantize_keys(self.k_codes[:, :, start:stop], self.k_scale[:, :, start // g: stop // g], zero,
                               self.bits, dtype)

    def key_logits(self, rows: Tensor, start: int, stop: int) -> Tensor:
        """``rows @ keys[start:stop]ᵀ`` ``(B, H, R, stop - start)`` in float32 for float32 ``rows`` ``(B, H, R, Dk)``,
        without dequantizing: per key group ``(rows · s) @ codesᵀ + rows @ z`` (float8: ``(rows @ codesᵀ) · |s| +
        (rows @ μ)·[s > 0]``)."""
        g = self.key_group
        ks = self.k_scale[:, :, start // g: stop // g].float()
        c = codes_as_float(self.k_codes[:, :, start:stop], self.bits, ks.shape[-1])
        if self.fp8:  # one scale per token, one offset per channel for the tokens stored centred
            s = ks[..., 0][:, :, None, :]
            logits = (rows @ c.transpose(-1, -2)) * s.abs()
            return logits if self.k_zero is None else logits + (rows @ self.k_zero.float().transpose(-1, -2)) * (s > 0)
        B, H, t, D = c.shape
        n = t // g
        kz = self.k_zero[:, :, start // g: stop // g].float()
        grouped = (rows[:, :, None] * ks[:, :, :, None, :]) @ c.view(B, H, n, g, D).transpose(-1, -2)
        grouped = grouped + (rows @ kz.transpose(-1, -2)).transpose(-1, -2)[..., None]  # (B, H, n, R, g)
        return grouped.permute(0, 1, 3, 2, 4).reshape(B, H, rows.shape[2], t)

    def weighted_values(self, p: Tensor, start: int, stop: int) -> Tensor:
        """``p @ values[start:stop]`` ``(B, H, R, Dv)`` in float32 for float32 weights ``p`` ``(B, H, R, t)``, without
        dequantizing: per value group ``(p · s) @ codes + p @ z``."""
        vs = self.v_scale[:, :, start:stop].float()  # (B, H, t, n)
        B, H, t, n = vs.shape
        c = codes_as_float(self.v_codes[:, :, start:stop], self.bits, self.v_codes.shape[-1] * 8 // self.bits
                           if not self.v_codes.is_floating_point() else self.v_codes.shape[-1])
        Dv = c.shape[-1]
        gv = Dv // n
        if n == 1:
            out = (p * vs[..., 0][:, :, None, :]) @ c
        else:
            ps = (p[..., None] * vs[:, :, None]).permute(0, 1, 4, 2, 3)  # (B, H, n, R, t)
            out = (ps @ c.view(B, H, t, n, gv).transpose(2, 3)).permute(0, 1, 3, 2, 4).reshape(B, H, -1, Dv)
        if self.v_zero is not None:
            bias = p @ self.v_zero[:, :, start:stop].float()  # (B, H, R, n)
            out = out + (bias if n == 1 else bias.repeat_interleave(gv, dim=-1))
        return out

    def values(self, dtype: torch.dtype = torch.float32, start: int = 0, stop: int | None = None) -> Tensor:
        """Dequantized values of tokens ``[start, stop)``."""
        zero = None if self.v_zero is None else self.v_zero[:, :, start:stop]
        return dequantize_values(self.v_codes[:, :, start:stop], self.v_scale[:, :, start:stop], zero, self.bits,
                                 dtype)
