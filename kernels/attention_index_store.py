"""How the attention index (:mod:`kvaccel.kernels.attention_index`) holds its host keys and values: float32 rows, or
quantized rows (retrieval stacked with ``kv_int8`` / ``kv_int4``), read by the same compiled kernels.

A quantized row stores every token alone (tokens arrive in spills of any length, so no group spans tokens): per
token, groups of ``group`` channels with an asymmetric ``bits``-bit grid (KIVI's value layout,
:func:`~kvaccel.kernels.kv_quant.quantize_values`: 16-bit scale ``s`` and zero ``z``) around a per-row channel
offset ``μ`` (the mean of the row's first stored tokens, float32):
``x̂[c] = μ[c] + z + s · code[c]``. The offset takes out channels with a large constant part (Qwen2's key bias puts
one near 355), which would otherwise set every token's step. Codes are packed ``per = 8 // bits`` a byte in planes:
byte ``j`` of a token holds channel ``j + p · D / per`` in bits ``[p · bits, (p + 1) · bits)``, so decoding a plane
is one contiguous loop of shifts (KIVI's order, channels ``per · j + p`` in byte ``j``, decoded ~1.6x slower per
element at 4 bits in a loop measured alone).

Kernels see a store through two functions, resolved when numba compiles them (:func:`row_of`, :func:`row_vector`):
a float32 store is an array ``(rows, capacity, D)``; a quantized one the tuple ``(codes, scale, zero, mu, table,
bits)`` (:meth:`QuantizedRows.kernel_arg`), whose tokens are decoded into a ``D``-float buffer as they are read
(no float32 copy of the store exists). The index's graph edits (build, linking new keys) run on a float32 copy of
the rows they touch, made for the call and dropped after it.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba.core import types
from numba.extending import overload

from kvaccel.kernels.attention_index_heap import _FM
from kvaccel.kernels.attention_index_jit import kernel
from kvaccel.kernels.kv_quant import check_bits, quantize_values, unpack_codes
from kvaccel.kernels.quantized_decode_attention_numba import scale_table

__all__ = ["QuantizedRows", "check_layout", "row_of", "row_vector"]

#: 16-bit dtype of the scales and zero points
SCALE_DTYPE = torch.float16


def row_of(store, g):
    """Row ``g`` of a store (kernels only): ``store[g]`` of a float32 array, the row's parts of a quantized one."""
    raise NotImplementedError("row_of is compiled inside numba kernels only")


def row_vector(row, i, buf):
    """Token ``i`` of a row as float32 ``(D,)`` (kernels only): a view of a float32 row, else decoded into ``buf``."""
    raise NotImplementedError("row_vector is compiled inside numba kernels only")


@overload(row_of, inline="always")
def _row_of(store, g):
    if isinstance(store, types.Array):
        return lambda store, g: store[g]
    return lambda store, g: (store[0][g], store[1][g], store[2][g], store[3][g], store[4], store[5])


@kernel(fastmath=_FM, inline="always")
def _decode8(codes, mu, s, z, out):
    """``out[j] = μ[j] + z + s · code[j]`` over 1-D slices from 0 (the loop vectorises)."""
    for j in range(out.shape[0]):
        out[j] = mu[j] + z + s * np.float32(codes[j])


@kernel(fastmath=_FM, inline="always")
def _decode_plane(codes, shift, mask, mu, s, z, out):
    """``out[j] = μ[j] + z + s · ((code[j] >> shift) & mask)`` over 1-D slices from 0."""
    for j in range(out.shape[0]):
        out[j] = mu[j] + z + s * np.float32(np.uint8((codes[j] >> shift) & mask))


@overload(row_vector, inline="always", jit_options={"fastmath": _FM})
def _row_vector(row, i, buf):
    if isinstance(row, types.Array):
        return lambda row, i, buf: row[i]

    def decode(row, i, buf):
        codes, scale, zero, mu, table, bits = row
        D = buf.shape[0]
        group = D // scale.shape[1]
        plane = codes.shape[1]  # channels a plane (= bytes a token)
        run = min(group, plane)  # channels of one plane under one scale
        mask = (1 << bits) - 1
        c = codes[i]
        if bits == 8:  # one plane, no shift
            for g in range(scale.shape[1]):
                a = g * group
                _decode8(c[a : a + group], mu[a : a + group], table[scale[i, g]], table[zero[i, g]],
                         buf[a : a + group])
            return buf
        # planes in order, runs of `run` channels under one scale: counters, no integer division per run (a
        # division by a run-time value costs ~40 cycles, as much as decoding the run)
        per_group = group // run
        g, left = 0, per_group
        for p in range(8 // bits):
            for j in range(0, plane, run):
                a = p * plane + j
                _decode_plane(c[j : j + run], p * bits, mask, mu[a : a + run], table[scale[i, g]],
                              table[zero[i, g]], buf[a : a + run])
                left -= 1
                if left == 0:
                    g, left = g + 1, per_group
        return buf

    return decode


@kernel(parallel=True, fastmath=_FM)
def _decode_rows(store, n, out):
    """The first ``n[g]`` tokens of every row of a quantized store into ``out`` ``(rows, >= max n, D)`` (rows in
    parallel)."""
    for g in numba.prange(out.shape[0]):
        row = row_of(store, g)
        for j in range(n[g]):
            row_vector(row, j, out[g, j])


def check_layout(dim: int, bits: int, group: int) -> None:
    """Raise ``ValueError`` unless tokens of ``dim`` channels can be stored as ``bits``-bit codes in groups of
    ``group`` channels, packed in planes (the module docstring)."""
    check_bits(bits)
    if dim % group:
        raise ValueError(f"group_size ({group}) must divide the head size ({dim}): tokens are quantized in groups of "
                         "group_size channels")
    plane = dim * bits // 8  # channels a plane
    if dim % (8 // bits) or (plane % group and group % plane):
        raise ValueError(f"group_size ({group}) must divide, or be a multiple of, the {plane} channels a plane of "
                         f"{bits}-bit codes holds (head size {dim}): pick a power of two for both")


class QuantizedRows:
    """``rows`` rows of up to ``capacity`` tokens of ``dim`` channels, stored as codes (module docstring)."""

    def __init__(self, rows: int, capacity: int, dim: int, bits: int, group: int):
        check_layout(dim, bits, group)
        self.rows, self.capacity, self.dim, self.bits, self.group = rows, capacity, dim, bits, group
        self.codes = np.zeros((rows, capacity, dim * bits // 8), np.uint8)
        self.scale = np.zeros((rows, capacity, dim // group), np.uint16)
        self.zero = np.zeros((rows, capacity, dim // group), np.uint16)
        self.mu = np.zeros((rows, dim), np.float32)
        self.has_mu = np.zeros(rows, np.bool_)
        self.table = scale_table(SCALE_DTYPE)

    @property
    def nbytes(self) -> int:
        """Bytes held: codes, scales, zero points and offsets (capacity included; the shared table is not)."""
        return self.codes.nbytes + self.scale.nbytes + self.zero.nbytes + self.mu.nbytes

    def grown(self, capacity: int) -> QuantizedRows:
        """A copy with room for ``capacity`` tokens per row (new arrays: a reader of the old ones keeps them)."""
        new = QuantizedRows(self.rows, capacity, self.dim, self.bits, self.group)
        c = self.capacity
        new.codes[:, :c], new.scale[:, :c], new.zero[:, :c] = self.codes, self.scale, self.zero
        new.mu[:], new.has_mu[:] = self.mu, self.has_mu
        return new

    def put(self, g: int, a: int, x: np.ndarray) -> None:
        """Quantize the float32 tokens ``x`` ``(n, dim)`` into slots ``[a, a + n)`` of row ``g`` (the row's offset
        is set by its first tokens)."""
        if x.shape[0] == 0:
            return
        if not self.has_mu[g]:
            self.mu[g] = x.mean(0)
            self.has_mu[g] = True
        xt = torch.from_numpy(np.ascontiguousarray(x - self.mu[g], dtype=np.float32))[None, None]
        codes, s, z = quantize_values(xt, self.bits, self.group, SCALE_DTYPE)
        b = a + x.shape[0]
        self.codes[g, a:b] = self._planes(unpack_codes(codes[0, 0], self.bits, self.dim).numpy())
        self.scale[g, a:b] = s[0, 0].view(torch.int16).numpy().view(np.uint16)
        self.zero[g, a:b] = z[0, 0].view(torch.int16).numpy().view(np.uint16)

    def _planes(self, codes: np.ndarray) -> np.ndarray:
        """Codes ``(n, dim)`` in ``[0, 2^bits)`` packed in planes (module docstring): ``(n, dim * bits / 8)``."""
        per = 8 // self.bits
        planes = codes.reshape(codes.shape[0], per, -1)
        out = planes[:, 0].copy()
        for p in range(1, per):
            out |= planes[:, p] << np.uint8(p * self.bits)
        return out

    def codes_of(self, g: int, a: int, b: int) -> np.ndarray:
        """The codes of tokens ``[a, b)`` of row ``g``, unpacked: ``(b - a, dim)`` uint8."""
        c = self.codes[g, a:b]
        shifts = (np.arange(8 // self.bits, dtype=np.uint8) * self.bits)[None, :, None]
        return ((c[:, None, :] >> shifts) & ((1 << self.bits) - 1)).reshape(b - a, self.dim)

    def dequantize(self, g: int, a: int, b: int) -> np.ndarray:
        """Tokens ``[a, b)`` of row ``g`` as float32 ``(b - a, dim)``."""
        c = self.codes_of(g, a, b)
        s = self.table[self.scale[g, a:b]][:, :, None]
        z = self.table[self.zero[g, a:b]][:, :, None]
        x = z + s * c.reshape(b - a, -1, self.group).astype(np.float32)
        return x.reshape(b - a, self.dim) + self.mu[g]

    def dequantize_rows(self, n: np.ndarray) -> np.ndarray:
        """The first ``n[g]`` tokens of every row as float32 ``(rows, max n, dim)`` (zeros past a row's tokens), by
        the compiled decoding the kernels use (:meth:`dequantize` is its numpy reference)."""
        out = np.zeros((self.rows, int(n.max()), self.dim), np.float32)
        _decode_rows(self.kernel_arg(), np.ascontiguousarray(n, dtype=np.int64), out)
        return out

    def kernel_arg(self) -> tuple:
        """What the compiled kernels take (:func:`row_of`, :func:`row_vector`)."""
        return (self.codes, self.scale, self.zero, self.mu, self.table, np.int64(self.bits))
