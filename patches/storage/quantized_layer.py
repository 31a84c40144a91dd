"""QuantizedLayer: a KV cache layer holding older tokens as KIVI codes and the most recent ones in full precision.

Storage of one layer (token axis ``[quantized part (Tq), window (Tw)]``, in arrival order)::

    k_codes  (B, H, Tq, D·bits/8)  uint8    keys per channel: a group = G consecutive tokens of one channel
    k_scale, k_zero  (B, H, Tq/G, D)        16-bit (``kv_quant.scale_dtype_for``)
    v_codes  (B, H, Tq, Dv·bits/8)  uint8   values per token: a group = G consecutive channels of one token
    v_scale, v_zero  (B, H, Tq, Dv/G)
    (kv_fp8: float8 codes (B, H, Tq, D), one scale per token, the keys' offset k_zero (B, H, 1, D): the mean of the
    prompt's keys, fixed when the layer is converted, for the key tokens stored centred; ``kv_quant.key_offset``)
    qvalid   (B, 1|H, Tq) bool or None      validity of the quantized slots
    keys / values / valid / token_state     the full-precision window (``KVAccelLayer``'s storage), and method
                                            state spanning the whole axis

The window keeps the ``residual`` most recent tokens: when it holds ``residual + G`` tokens before a new forward,
its oldest whole groups are quantized and moved (KIVI flushes a group at a time: per-channel statistics of one token
mean nothing). After the prompt, the partial key group before the last ``residual`` tokens is completed with
invalid slots and quantized too when that holds fewer bytes (``pad_slots``; int4 of a fp32 model: past ~G/6 tokens),
and the window holds no spare slots until the first decode step. ``update`` returns only the new tokens; attention
reads the codes through :meth:`attend`
(``kernels/quantized_decode_attention.py``: on CPU a compiled kernel reads the codes in place, scales folded into
the query and the weights; never a dequantized copy of the cache).

Eviction (``keep``) at decode: the held tokens are dequantized (a temporary full-precision copy of the layer, the
cost of one eviction: O(N·D) dequantize + gather + quantize), the kept ones gathered, and the layer re-split by rank:
the first ``floor((K - residual) / G)·G`` kept tokens are quantized again, the rest form the window. Values (per
token) come back on the same grid: their codes are unchanged. Key groups get new members (a gather breaks the
per-channel groups), so a re-quantized key can move by up to half a step of its new group per eviction; eviction
methods batch evictions (``slack``), so this happens once every ``slack`` decode steps, not at every step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from kvaccel.cache import KVAccelLayer, SlotTensor, _take
from kvaccel.kernels.cpu_ops import single_thread
from kvaccel.kernels.kv_quant import (
    QuantizedKV,
    key_offset,
    quantize_fp8_kv,
    quantize_keys,
    quantize_values,
    scale_dtype_for,
)
from kvaccel.kernels.quantized_decode_attention import (
    NumbaArrays,
    numba_arrays,
    numba_decode,
    quantized_decode_attention,
)
from kvaccel.varlen_cache import VarlenLayer

Tensor = torch.Tensor
_STORE = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")
#: elements of a flush quantized on one thread
_SMALL_FLUSH = 1 << 16


class QuantizedLayer(KVAccelLayer):
    """One layer of ``KVAccelCache`` storing tokens older than a window as ``bits``-bit KIVI codes.

    Built by :meth:`from_layer` (the storage method does it once the prompt's forward and its eviction are done);
    implements the transformers layer contract and attends itself (:meth:`attend`).
    """

    def __init__(self, bits: int = 4, group_size: int = 64, residual: int = 128, fp8: torch.dtype | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        self._init_storage(bits, group_size, residual, fp8)

    def _init_storage(self, bits: int, group_size: int, residual: int, fp8: torch.dtype | None = None) -> None:
        #: float8 dtype of ``kv_fp8`` (per-token scales, no zero points, ``group_size`` 1), else ``None``
        self.fp8 = fp8
        self.bits, self.group_size, self.residual = (8, 1, residual) if fp8 is not None else (bits, group_size,
                                                                                              residual)
        #: codes, scales and zero points by ``_STORE`` name (kv_fp8: ``k_zero`` is the keys' per-channel offset ``(B, H,
        #: 1, D)``, set from the prompt in :meth:`from_layer` and kept by every later flush and re-quantization)
        self._store: dict[str, SlotTensor] = {}
        self._qvalid: SlotTensor | None = None
        #: ThinK's narrow segment, quantized once at conversion (keys keep ``channel_idx``), padded to whole groups
        self._nstore: dict[str, Tensor] = {}
        self._nvalid: Tensor | None = None
        self.channel_idx: Tensor | None = None
        self.requantizations = 0  # evictions that re-quantized the layer
        #: (buffers, the numba kernel's arrays of them) of the last attention (:meth:`_kernel_arrays`)
        self._arrays: tuple | None = None
        #: (buffers, arrays of them) of the last in-place float8 flush (:meth:`_flush_fp8_in_place`)
        self._fp8_arrays: tuple | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_layer(cls, layer: KVAccelLayer, bits: int, group_size: int, residual: int,
                   fp8: torch.dtype | None = None) -> QuantizedLayer:
        """``layer`` with its tokens quantized but the last window. A plain ``KVAccelLayer`` becomes the quantized layer
        in place (same object, buffers reused: methods that keep per-layer state keyed by the layer still find it).

        A ``VarlenLayer`` (heads packed at their own lengths: adakv, kvzip) is stored padded to its longest head, with
        validity marking the real slots (its ``dense_keys`` layout: segments right-aligned); ``report()`` counts the
        padding codes.
        """
        if isinstance(layer, VarlenLayer):
            layer = _padded_copy(layer)
        elif type(layer) is not KVAccelLayer:
            raise NotImplementedError(f"the quantized cache cannot hold a {type(layer).__name__} layer")
        if layer.narrow is not None and layer.narrow.value_idx is not None:
            raise NotImplementedError("the quantized cache cannot hold ThinK's narrow values (value_ratio > 0) yet; "
                                      "use think(value_ratio=0)")
        if layer.rope is not None:
            raise NotImplementedError("the quantized cache cannot re-rotate keys; use rerotate=False")
        Dv = layer.values.shape[-1]
        if fp8 is None and Dv % group_size:
            raise ValueError(f"group_size ({group_size}) must divide the value head size ({Dv}): values are "
                             "quantized per token in groups of group_size channels")
        narrow = layer.narrow
        layer.narrow = None
        out = layer
        out.__class__ = cls
        out._init_storage(bits, group_size, residual, fp8)
        if fp8 is not None:
            out._store["k_zero"] = SlotTensor(key_offset(out.keys, out.valid, scale_dtype_for(out.dtype)))
        if narrow is not None:
            out._quantize_narrow(narrow)
        out._set_store(out.keys[:, :, :0], out.values[:, :, :0], None)
        out._pad_partial_group()
        out._flush()
        if out._valid is not None and bool(out.valid.all()):
            out._valid = None  # the padding went to the quantized part
        out._trim_window()
        return out

    def _trim_window(self) -> None:
        """Hold the window's tokens without spare slots (after the prompt: a decode step that follows grows it,
        and the first flush gives it its steady ``residual + group_size`` slots; memory held is what is stored)."""
        if any(st is not None and st.buf.shape[2] != st.n for st in (self._k, self._v, self._valid)):
            self._reallocate_window(0)

    def _reallocate_window(self, spare: int) -> None:
        """Copy the window's tokens (keys, values, validity) into new buffers with ``spare`` free slots."""
        for name in ("_k", "_v", "_valid"):
            st = getattr(self, name)
            if st is not None:
                setattr(self, name, SlotTensor.spare(st.view, spare))
        self._forget_arrays()

    @property
    def narrow(self) -> None:
        """Always ``None``: ThinK's narrow segment is held quantized (``nquant``), on the same token axis."""
        return None

    @narrow.setter
    def narrow(self, segment) -> None:
        if segment is not None:
            raise NotImplementedError(
                "ThinK cannot prune channels of a quantized layer (a later prompt chunk after the cache was quantized);"
                " feed the whole prompt in one forward, or drop the channels or storage method"
            )

    def _quantize_narrow(self, nar) -> None:
        """Quantize ThinK's narrow segment ``nar``: padded with invalid slots to whole key groups (the padding goes
        right after it on the token axis, and ``token_state`` gets zeros there)."""
        B, H, Tn, _ = nar.keys.shape
        G = self.group_size
        pad = -Tn % G
        valid = nar.valid if nar.valid is not None else torch.ones(B, 1, Tn, dtype=torch.bool, device=nar.keys.device)
        if pad:
            keys = torch.cat([nar.keys, nar.keys.new_zeros(B, H, pad, nar.keys.shape[-1])], dim=2)
            values = torch.cat([nar.values, nar.values.new_zeros(B, H, pad, nar.values.shape[-1])], dim=2)
            valid = torch.cat([valid, valid.new_zeros(B, valid.shape[1], pad)], dim=2)
            for name, st in self._state.slots().items():
                t = st.view
                self._state[name] = torch.cat([t[:, :, :Tn], t.new_zeros(*t.shape[:2], pad), t[:, :, Tn:]], dim=2)
        else:
            keys, values = nar.keys, nar.values
        offset = key_offset(keys, valid, scale_dtype_for(self.dtype)) if self.fp8 is not None else None
        self._nstore = self._quantize(keys, values, valid, offset)
        if offset is not None:
            self._nstore["k_zero"] = offset
        self._nvalid = None if bool(valid.all()) else valid.contiguous()
        self.channel_idx = nar.channel_idx

    def nquant(self) -> QuantizedKV | None:
        """ThinK's quantized narrow segment (keys of ``channel_idx`` only), or ``None``."""
        if not self._nstore:
            return None
        return QuantizedKV(self.bits, *(self._nstore.get(name) for name in _STORE), valid=self._nvalid)

    @property
    def narrow_length(self) -> int:
        return self._nstore["k_codes"].shape[2] if self._nstore else 0

    def quant(self) -> QuantizedKV:
        """The quantized part as the kernels read it (views of the buffers)."""
        s = self._store
        return QuantizedKV(self.bits, *(s[name].view if name in s else None for name in _STORE), valid=self.qvalid)

    @property
    def qvalid(self) -> Tensor | None:
        return None if self._qvalid is None else self._qvalid.view

    @property
    def quantized_length(self) -> int:
        return self._store["k_codes"].n if self._store else 0

    def _quantize(self, k: Tensor, v: Tensor, valid: Tensor | None, offset: Tensor | None = None) -> dict[str, Tensor]:
        """Codes, scales and zero points of ``k`` / ``v`` (float8: keys minus ``offset``, by default the layer's)."""
        sd = scale_dtype_for(self.dtype)
        if self.fp8 is not None:
            offset = self._store["k_zero"].view if offset is None else offset
            (kc, ks), (vc, vs) = quantize_fp8_kv(k, v, self.fp8, sd, offset)
            return dict(k_codes=kc, k_scale=ks, v_codes=vc, v_scale=vs)
        kc, ks, kz = quantize_keys(k, self.bits, self.group_size, valid, sd)
        vc, vs, vz = quantize_values(v, self.bits, self.group_size, sd)
        return dict(zip(_STORE, (kc, ks, kz, vc, vs, vz), strict=True))

    def _set_store(self, k: Tensor, v: Tensor, valid: Tensor | None) -> None:
        """Replace the quantized part by ``k`` / ``v`` (a whole number of groups) quantized, at their exact size."""
        self._forget_arrays()
        offset = self._store.get("k_zero") if self.fp8 is not None else None  # kv_fp8: the layer's, kept
        self._store = {name: SlotTensor(t) for name, t in self._quantize(k, v, valid).items()}
        if offset is not None:
            self._store["k_zero"] = offset
        self._qvalid = None if valid is None or bool(valid.all()) else SlotTensor(valid.contiguous())

    def _partial_pad(self, n: int) -> int:
        """Invalid slots that complete the partial key group of the ``n`` tokens before the window (``n mod G`` of
        them), when ``G`` slots of codes (with scales, zero points and validity) cost fewer bytes than those tokens in
        full precision (int4: past ~G/6 fp32 or ~G/3 16-bit tokens); else 0, and they stay in the window. Applied to
        the prompt (:meth:`from_layer`); a decode-time eviction (:meth:`keep`) leaves its partial group in the window.
        """
        G = self.group_size
        pad = -n % G
        if self.fp8 is not None or n <= 0 or pad == 0:
            return 0
        D, Dv = self.keys.shape[-1], self.values.shape[-1]
        sd = scale_dtype_for(self.dtype).itemsize
        codes = G * ((D + Dv) * self.bits / 8 + 2 * sd * Dv // G + 1) + 2 * sd * D  # + scales, zeros, validity
        return pad if (G - pad) * (D + Dv) * self.keys.element_size() > codes else 0

    def _pad_partial_group(self) -> None:
        """Insert :meth:`_partial_pad` invalid slots after the window's tokens that precede its last ``residual``
        ones (zeros in ``token_state``), so that the next flush quantizes them as whole groups."""
        n = self._k.n - self.residual
        pad = self._partial_pad(n)
        if not pad:
            return
        self.pad_slots = pad
        B, dev = self.keys.shape[0], self.keys.device
        valid = self.valid if self.valid is not None else torch.ones(B, 1, self._k.n, dtype=torch.bool, device=dev)
        # new buffers without spare slots: the flush that follows moves the window out of them
        self._k, self._v = (SlotTensor(_insert_zeros(t, n, pad)) for t in (self.keys, self.values))
        self._valid = SlotTensor(_insert_zeros(valid, n, pad))
        for name, st in self._state.slots().items():
            self._state[name] = _insert_zeros(st.view, n, pad)
        self._forget_arrays()

    def _flush(self) -> None:
        """Quantize the window's oldest whole groups while it holds ``residual + group_size`` tokens or more."""
        G, Tw = self.group_size, self._k.n
        n = (Tw - self.residual) // G * G
        if n <= 0:
            return
        if (self.fp8 is not None and self._k.buf.device.type == "cpu" and self._valid is None and self._qvalid is None
                and self._flush_fp8_in_place(n)):
            self._drop_window_head(n)
            return
        k, v, valid = self.keys, self.values, self.valid
        Tq = self.quantized_length
        # the prompt's codes at their size; later flushes get spare groups (~3% of the codes, at least one group)
        reserve = 0 if Tq == 0 else max(G, Tq // 32 // G * G)
        # a decode step's flush (kv_fp8: every step) is a dozen ops on a few thousand elements: one thread (waking the
        # others per op costs more than the ops; same results)
        small = k.device.type == "cpu" and n * k[:, :, :1].numel() <= _SMALL_FLUSH
        with single_thread() if small else contextlib.nullcontext():
            codes = self._quantize(k[:, :, :n], v[:, :, :n], None if valid is None else valid[:, :, :n])
        for name, t in codes.items():
            self._store[name].append(t, reserve // G if name in ("k_scale", "k_zero") else reserve)  # axis 2: groups
        if valid is not None or self._qvalid is not None:
            B = k.shape[0]
            moved = valid[:, :, :n] if valid is not None else torch.ones(B, 1, n, dtype=torch.bool, device=k.device)
            if self._qvalid is None:
                self._qvalid = SlotTensor.spare(torch.ones(B, 1, Tq, dtype=torch.bool, device=k.device), reserve)
            if moved.shape[1] != self._qvalid.buf.shape[1]:
                heads = max(moved.shape[1], self._qvalid.buf.shape[1])
                self._qvalid = SlotTensor.spare(self.qvalid.expand(B, heads, Tq), reserve)
                moved = moved.expand(B, heads, n)
            self._qvalid.append(moved, reserve)
        self._drop_window_head(n)

    def _flush_fp8_in_place(self, n: int) -> bool:
        """``kv_fp8``'s flush of the window's first ``n`` tokens (a decode step's, on CPU, no validity masks): one
        compiled call writes their codes and scales straight into the store's spare slots, the ones :meth:`_quantize`
        and ``append`` give, without their dozen small allocations and copies. ``False``, doing nothing, when a buffer
        has no room for them."""
        from kvaccel.kernels.kv_quant_numba import offset_array, quantize_fp8_pair_into  # numba: when first needed

        s = self._store
        parts = [s[name] for name in ("k_codes", "k_scale", "v_codes", "v_scale")]
        t0 = parts[0].n
        if any(st.buf.shape[2] < t0 + n for st in parts):
            return False
        bufs = [*(st.buf for st in parts), s["k_zero"].buf, self._k.buf, self._v.buf]

        def build() -> tuple:
            kc, ks, vc, vs, mu, kw, vw = bufs
            f32 = kw.dtype == torch.float32  # the window's own arrays; a 16-bit one is converted at each flush
            return (*(t.view(torch.uint8 if t.element_size() == 1 else torch.uint16).numpy() for t in (kc, ks, vc, vs)),
                    offset_array(mu, kc.shape), *((kw.numpy(), vw.numpy()) if f32 else (None, None)))

        self._fp8_arrays = _kept(self._fp8_arrays, bufs, build)
        kc, ks, vc, vs, mu, k, v = self._fp8_arrays[1]
        if k is None:
            k, v = (t[:, :, :n].float().numpy() for t in (self._k.buf, self._v.buf))
        else:
            k, v = k[:, :, :n], v[:, :, :n]
        at = slice(t0, t0 + n)
        quantize_fp8_pair_into(k, mu, v, self.fp8, s["k_scale"].buf.dtype, kc[:, :, at], ks[:, :, at], vc[:, :, at],
                               vs[:, :, at])
        for st in parts:
            st.n += n
        return True

    def _drop_window_head(self, n: int) -> None:
        """Forget the window's first ``n`` tokens (just quantized). Buffers of the size a new window gets are kept, the
        rest of the tokens moved to their front (a decode step's flush: no allocation); others (the prompt's) are
        replaced by buffers of that size holding the rest, so their memory is freed."""
        rest = self._k.n - n
        r = self._window_spare(rest)
        for name in ("_k", "_v", "_valid"):
            st = getattr(self, name)
            if st is None:
                continue
            if st.buf.shape[2] != rest + r:
                setattr(self, name, SlotTensor.spare(st.view[:, :, n:], r))
                self._forget_arrays()
                continue
            if rest:
                src = st.buf[:, :, n: n + rest]
                st.buf[:, :, :rest] = src.clone() if rest > n else src  # overlapping ranges: through a copy
            st.n = rest

    def _window_spare(self, held: int) -> int:
        """Spare window slots for ``held`` tokens: up to ``residual + group_size`` (the window flushes before a new
        token would exceed it; a multi-token forward reallocates)."""
        return max(1, self.residual + self.group_size - held)

    # ------------------------------------------------------------------ transformers' layer contract
    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Flush full groups of the window, then append the ``n`` new tokens to it; returns the new tokens (the layer
        attends itself, see :meth:`attend`)."""
        self._flush()
        n = key_states.shape[2]
        rest = self._k.n
        if self._k.buf.shape[2] < rest + n:  # a trimmed window (after the prompt) grows to its steady size once
            self._reallocate_window(max(n, self._window_spare(rest)))  # as _drop_window_head's buffers
        super().update(key_states, value_states)
        return key_states, value_states

    def drop_tail(self, n: int) -> None:
        raise NotImplementedError("a quantized layer cannot forget a tail of tokens (kvzip's reconstruction runs "
                                  "before the cache is quantized)")

    def _map_batch(self, fn: Callable[[Tensor], Tensor]) -> None:
        if not self.is_initialized:
            return
        self._forget_arrays()
        super()._map_batch(fn)
        self._store = {name: SlotTensor(fn(s.view)) for name, s in self._store.items()}
        if self._qvalid is not None:
            self._qvalid = SlotTensor(fn(self.qvalid))
        self._nstore = {name: fn(t) for name, t in self._nstore.items()}
        self._nvalid = None if self._nvalid is None else fn(self._nvalid)
        self.channel_idx = None if self.channel_idx is None else fn(self.channel_idx)

    # ------------------------------------------------------------------ attention
    def attend(self, ctx) -> Tensor:
        """Attention of this forward's ``Q`` new tokens (the last ``Q`` of the window) over the layer, causal among
        themselves; ``(B, Q, H_q, Dv)``. For a decode step of an eviction method that accumulates attention
        probabilities, they are computed here too (``ctx.decode_probs``, over the ``[quantized, window]`` axis)."""
        q = ctx.query
        if ctx.key.shape[-2] != q.shape[2]:
            raise RuntimeError(
                f"QuantizedLayer.attend expects the {q.shape[2]} queries to be the tokens just appended, got "
                f"{ctx.key.shape[-2]} new keys"
            )
        evict = ctx.state.methods.get("evict")
        probs = q.shape[2] == 1 and evict is not None and evict.wants_decode_probs()
        arrays = self._kernel_arrays() if q.device.type == "cpu" else None
        if arrays is not None and arrays.k is not None and not self._nstore:  # the kernel on the kept arrays
            st = self._store
            Tq, groups = st["k_codes"].n, st["k_scale"].n
            out = numba_decode(q, ctx.scaling, arrays, Tq, self._k.n, Tq // groups if groups else 1, probs)
        else:
            out = quantized_decode_attention(q, self.quant(), self.keys, self.values, scale=ctx.scaling,
                                             valid=self.valid, return_probs=probs, narrow=self.nquant(),
                                             channel_idx=self.channel_idx, arrays=arrays)
        if probs:
            out, ctx.decode_probs = out
        return out.transpose(1, 2)

    def _kernel_arrays(self) -> NumbaArrays:
        """The numba kernel's arrays of this layer's buffers (:func:`numba_arrays`; the window's only when float32),
        kept while the buffers stay the same objects (a decode step appends in place: no per-step conversion, and
        :meth:`attend` then runs the kernel on them without building tensors of the buffers); dropped when the layer
        replaces its buffers (:meth:`_forget_arrays`), so they never keep old buffers alive."""
        bufs = [st.buf for st in self._store.values()]
        bufs += [None if st is None else st.buf for st in (self._qvalid, self._k, self._v, self._valid)]

        def build() -> NumbaArrays:
            f32 = self._k.buf.dtype == torch.float32  # a 16-bit window is converted at each call
            keys, values = (self.keys, self.values) if f32 else (None, None)
            return numba_arrays(self.quant(), keys, values, self.valid)

        self._arrays = _kept(self._arrays, bufs, build)
        return self._arrays[1]

    def _forget_arrays(self) -> None:
        self._arrays = self._fp8_arrays = None

    # ------------------------------------------------------------------ kvaccel's own API
    @property
    def length(self) -> int:
        """Token slots held per head: narrow (ThinK) + quantized part + window."""
        return self.narrow_length + self.quantized_length + self._k.n if self.is_initialized else 0

    def tensors(self) -> Iterator[Tensor]:
        if not self.is_initialized:
            return
        yield from super().tensors()
        yield from (s.buf for s in self._store.values())
        if self._qvalid is not None:
            yield self._qvalid.buf
        yield from self._nstore.values()
        yield from (t for t in (self._nvalid, self.channel_idx) if t is not None)

    def storage_nbytes(self) -> dict[str, int]:
        """Bytes held by part (whole buffers, spare slots included): ``codes``, ``scales``, ``zeros``, ``window``
        (full-precision keys and values), ``other`` (validity masks, method state), and ``quantized_elements`` (key and
        value elements stored as codes) so that ``(codes + scales + zeros) / quantized_elements`` is bytes per
        element."""
        def size(t: Tensor) -> int:
            return t.numel() * t.element_size()

        if not self.is_initialized:
            return dict(codes=0, scales=0, zeros=0, window=0, other=0, quantized_elements=0)
        bufs = {name: st.buf for name, st in self._store.items()}
        stores = [bufs, self._nstore] if self._nstore else [bufs]

        def total(*names: str) -> int:
            return sum(size(st[n]) for st in stores for n in names if n in st)

        parts = dict(codes=total("k_codes", "v_codes"), scales=total("k_scale", "v_scale"),
                     zeros=total("k_zero", "v_zero"), window=size(self._k.buf) + size(self._v.buf))
        parts["other"] = self.nbytes() - sum(parts.values())
        # elements stored as codes: K (T x D per group row of scales) and V (one code per element)
        def elements(st: dict) -> int:  # keys: slots x kept channels (the scales' width; fp8: the codes')
            kc, ks = st["k_codes"], st["k_scale"]
            width = kc.shape[-1] if self.fp8 is not None else ks.shape[-1]
            return kc.shape[:3].numel() * width + st["v_codes"].numel() * 8 // self.bits

        parts["quantized_elements"] = sum(elements(st) for st in stores)
        return parts

    def kept_per_head(self) -> Tensor:
        B, H = self.keys.shape[:2]
        return self.token_valid().expand(B, H, self.length).sum(-1)

    def full_valid(self) -> Tensor:
        return self.token_valid()

    def token_valid(self) -> Tensor:
        """(B, 1|H, Tn + Tq + Tw) validity over ``[narrow, quantized, window]``."""
        B, dev = self.keys.shape[0], self.keys.device
        parts = [(self._nvalid, self.narrow_length)] if self._nstore else []
        parts += [(self.qvalid, self.quantized_length), (self.valid, self._k.n)]
        masks = [m if m is not None else torch.ones(B, 1, n, dtype=torch.bool, device=dev) for m, n in parts]
        heads = max(m.shape[1] for m in masks)
        return torch.cat([m.expand(B, heads, -1) for m in masks], dim=-1)

    def dense_keys(self) -> tuple[Tensor, Tensor | None]:
        """Keys ``(B, H, Tn + Tq + Tw, D)`` in the model dtype (the quantized parts dequantized, ThinK's narrow keys
        zero-filled in their pruned channels: a temporary copy, for eviction scorers) and their validity (``None``
        when every slot is a token)."""
        parts = [self.quant().keys(self.dtype), self.keys]
        nq = self.nquant()
        if nq is not None:
            kn = nq.keys(self.dtype)
            idx = self.channel_idx[:, :, None, :].expand(*kn.shape)
            parts.insert(0, kn.new_zeros(*kn.shape[:3], self.keys.shape[-1]).scatter_(-1, idx, kn))
        keys = torch.cat(parts, dim=2)
        valid = None if self._nvalid is None and self.qvalid is None and self.valid is None else self.token_valid()
        return keys, valid

    def dense_values(self) -> Tensor:
        """Values ``(B, H, Tn + Tq + Tw, Dv)`` in the model dtype (dequantized copy)."""
        nq = self.nquant()
        head = [] if nq is None else [nq.values(self.dtype)]
        return torch.cat([*head, self.quant().values(self.dtype), self.values], dim=2)

    def keep(self, idx: Tensor, slot_valid: Tensor | None = None, reserve: int | None = None) -> None:
        """Keep the tokens ``idx`` (B, 1|H, K) of the ``[quantized, window]`` axis (sorted ascending; ``slot_valid``
        marks padding slots of ragged selections) and re-quantize (see the module docstring for the cost)."""
        if self._nstore:
            raise NotImplementedError(
                "decode-time eviction over a quantized cache with ThinK's narrow keys is not supported yet; evict at "
                "the prompt only (e.g. snapkv without decode_budget) or drop the channels method"
            )
        if reserve is not None:
            self.reserve = reserve
        keys, valid = self.dense_keys()
        values = self.dense_values()
        K = idx.shape[-1]
        r = self._reserve(K)
        keys, values = _take(keys, idx), _take(values, idx)
        self._state = type(self._state)({k: s.take(idx, r) for k, s in self._state.slots().items()})
        new_valid = None if valid is None else _take(valid, idx)
        if slot_valid is not None:
            new_valid = slot_valid if new_valid is None else new_valid & slot_valid
        if new_valid is not None and bool(new_valid.all()):
            new_valid = None
        n = max(0, (K - self.residual) // self.group_size * self.group_size)
        self._set_store(keys[:, :, :n], values[:, :, :n], None if new_valid is None else new_valid[:, :, :n])
        w = self._window_spare(K - n)
        self._k = SlotTensor.spare(keys[:, :, n:], w)
        self._v = SlotTensor.spare(values[:, :, n:], w)
        self._valid = None if new_valid is None else SlotTensor.spare(new_valid[:, :, n:], w)
        self.requantizations += 1
        self.pad_slots = 0  # keep_top ranks the padding last: a gather to the capacity drops it

    def _keep_with_narrow(self, idx: Tensor, slot_valid: Tensor | None) -> None:
        raise NotImplementedError("a QuantizedLayer has no narrow segment (ThinK channel pruning is not supported)")


def _kept(cached: tuple | None, bufs: list, build: Callable[[], object]) -> tuple:
    """``cached`` ``(buffers, arrays)`` while it was built from these same buffer objects (a decode step appends in
    place), else ``(bufs, build())``: the arrays a compiled kernel reads of a layer's buffers, kept across steps."""
    if cached is not None and len(cached[0]) == len(bufs) and all(
            a is b for a, b in zip(cached[0], bufs, strict=True)):
        return cached
    return bufs, build()


def _insert_zeros(t: Tensor, at: int, n: int) -> Tensor:
    """``t`` with ``n`` zero (``False``) slots inserted before slot ``at`` of axis 2."""
    return torch.cat([t[:, :, :at], t.new_zeros(*t.shape[:2], n, *t.shape[3:]), t[:, :, at:]], dim=2)


def _padded_copy(layer: VarlenLayer) -> KVAccelLayer:
    """A ``KVAccelLayer`` holding ``layer``'s segments padded to the longest one (right-aligned) with validity."""
    out = KVAccelLayer()
    out.seen, out.prompt_len, out.decode_steps = layer.seen, layer.prompt_len, layer.decode_steps
    out.reserve, out.dtype, out.device = layer.reserve, layer.dtype, layer.device
    keys, valid = layer.dense_keys()
    out.keys, out.values = keys, layer.dense_values()
    out.valid = None if bool(valid.all()) else valid
    out.is_initialized = True
    return out
