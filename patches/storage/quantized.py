"""kv_int8 / kv_int4 / kv_fp8: quantized KV storage (storage stage: KIVI codes, or float8), composing with eviction.

KIVI (https://arxiv.org/abs/2402.02750): ``q = round((x − min) / s)``, ``s = (max − min) / (2^bits − 1)``; keys per
channel (groups of ``group_size`` tokens), values per token (groups of ``group_size`` channels); the ``residual``
most recent tokens stay in the model dtype and are quantized a whole group at a time as the window fills.

The prompt is attended in full precision; once the forward that brought it is over (and any eviction of it, also
kvzip's after-forward one), every layer becomes a :class:`~kvaccel.patches.storage.quantized_layer.QuantizedLayer`;
later forwards attend the codes in place (``kernels/quantized_decode_attention.py``; decode speed and its first-call
compile cost: ``docs/results.md`` section 11). Per-head packed layers (adakv's and kvzip's
varlen layout) are stored padded to their longest head once quantized (a note in ``report()`` says so).
Decode-time eviction (streaming, h2o, snapkv with ``decode_budget``, keyformer, expected_attention, attention_gate)
gathers the kept tokens and re-quantizes (cost and error: the layer's docstring). ``report()["kv_storage_bytes"]``
counts codes, scales, zero points and the window apart. Stacked on ``retrieval`` (``kv_int8`` / ``kv_int4``), the
codes are retrieval's host store instead (:mod:`kvaccel.kernels.attention_index_store`) and the layers stay as they
are (sink + window in the model dtype); ``kv_fp8`` is refused there.

Parameters
----------
bits : int
    Code width: 8 for ``kv_int8``; 4 (default) or 2 for ``kv_int4``.
group_size : int
    Tokens per key group and channels per value group, in [32, 128]; must divide the value head size. 64 by
    default: with 16-bit scales and zero points a group costs ``4 / group_size`` bytes per element (0.0625 at 64).
residual : int
    Full-precision window of the most recent tokens (>= 0); it holds ``residual`` to ``residual + group_size - 1``
    tokens between flushes (after the prompt: ``residual``, its partial key group padded and quantized when that
    holds fewer bytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvaccel.checks import check_int
from kvaccel.config import Method, register
from kvaccel.kernels.kv_quant import check_bits, fp8_dtype
from kvaccel.models import head_size, text_config
from kvaccel.varlen_cache import VarlenLayer

from .quantized_layer import QuantizedLayer

#: eviction methods that read or rewrite a layer's full-precision values or keys in place (not served yet)
UNSUPPORTED_EVICTION = {
    "d2o": "it merges evicted keys and values into kept ones in place",
}


@dataclass
class StorageMethod(Method):
    """How kept tokens are stored (stage ``storage``)."""

    stage = "storage"

    def host_codes(self) -> tuple[int, int]:
        """``(bits, group_size)`` of retrieval's host store when stacked on it (``retrieval+kv_int8``)."""
        raise NotImplementedError(f"{self.name} cannot hold retrieval's host store")


@dataclass
class _QuantizedStorage(StorageMethod):
    """What the quantized storage methods share: the stages they refuse and the conversion after a forward."""

    def layer_options(self) -> dict:
        """Keyword arguments of :meth:`QuantizedLayer.from_layer`."""
        raise NotImplementedError

    def check_stages(self, stages: dict) -> None:
        """Refuse, at ``patch()`` time, methods whose layout the quantized layer does not serve yet."""
        other = stages.get("decode")
        if other is not None and other.name == "retrieval":
            self.host_codes()  # the format retrieval's host store takes (kv_fp8 says it has none)
        elif other is not None:
            raise NotImplementedError(
                f"{self.name} cannot be combined with the decode method '{other.name}' yet: it reads the "
                f"full-precision cache; drop '{other.name}' or {self.name}"
            )
        think = stages.get("channels")
        if think is not None and getattr(think, "value_ratio", 0):
            raise NotImplementedError(
                f"{self.name} cannot hold ThinK's narrow values yet (value_ratio={think.value_ratio}); use "
                "think(value_ratio=0)"
            )
        evict = stages.get("evict")
        if evict is not None and evict.name in UNSUPPORTED_EVICTION:
            raise NotImplementedError(
                f"{self.name} cannot be combined with '{evict.name}' yet: {UNSUPPORTED_EVICTION[evict.name]}"
            )

    def after_forward(self, model, cache, input_ids) -> None:
        """After a forward (and the other stages' after-forward work): quantize every layer not quantized yet.
        Stacked on retrieval, whose host store holds the codes, the device part stays in the model dtype."""
        state = model._kvaccel_state
        decode = state.methods.get("decode")
        if decode is not None and decode.name == "retrieval":
            state.notes.add(f"{self.name}: retrieval's host store holds the codes; its device part (sink + window) "
                            "stays in the model dtype (KIVI's full-precision window)")
            return
        for i, layer in enumerate(cache.layers):
            if layer.is_initialized and not isinstance(layer, QuantizedLayer):
                if isinstance(layer, VarlenLayer):
                    model._kvaccel_state.notes.add(
                        f"{self.name}: per-head packed layers (varlen) are stored padded to their longest head once "
                        "quantized (kv_storage_bytes counts the padding codes)"
                    )
                cache.layers[i] = QuantizedLayer.from_layer(layer, **self.layer_options())


@dataclass
class QuantizedKVStorage(_QuantizedStorage):
    """KIVI-style quantized KV cache (see the module docstring)."""

    bits: int = 4
    group_size: int = 64
    residual: int = 128
    allowed_bits: ClassVar[tuple[int, ...]] = (2, 4, 8)

    def __post_init__(self):
        check_bits(self.bits)
        if self.bits not in self.allowed_bits:
            raise ValueError(f"{self.name}: bits ({self.bits!r}) must be one of {self.allowed_bits}")
        check_int("group_size", self.group_size, 32, 128, why="tokens per key group, channels per value group")
        check_int("residual", self.residual, 0, why="full-precision window of recent tokens")

    def layer_options(self) -> dict:
        return dict(bits=self.bits, group_size=self.group_size, residual=self.residual)

    def host_codes(self) -> tuple[int, int]:
        return self.bits, self.group_size

    def bind(self, model) -> None:
        head_dim = head_size(text_config(model))
        if head_dim % self.group_size:
            raise ValueError(
                f"{self.name}: group_size ({self.group_size}) must divide the head size ({head_dim}) of this model: "
                f"values are quantized per token in groups of group_size channels; pick a divisor of {head_dim}"
            )


@register
@dataclass
class KVInt8(QuantizedKVStorage):
    """kv_int8: 8-bit KIVI codes (keys per channel, values per token) and a full-precision recent window."""

    name = "kv_int8"
    bits: int = 8
    allowed_bits: ClassVar[tuple[int, ...]] = (8,)


@register
@dataclass
class KVInt4(QuantizedKVStorage):
    """kv_int4: 4-bit (or ``bits=2``) KIVI codes (keys per channel, values per token) and a full-precision window."""

    name = "kv_int4"
    bits: int = 4
    allowed_bits: ClassVar[tuple[int, ...]] = (2, 4)


@register
@dataclass
class KVFp8(_QuantizedStorage):
    """kv_fp8: float8 codes (e4m3 or e5m2) with one 16-bit scale per token for keys and values.

    Values ``v̂ = code · s``, ``s = max|v| / fp8_max`` per token. Keys: per token the better (squared error) of the
    same codes and codes centred on a per-channel offset ``μ`` (the mean of the prompt's keys, 16-bit, fixed for the
    layer): ``k̂ = μ + code · s``, so a channel with a large constant part (Qwen2's key bias) does not spend a token's
    ~3 significant bits on it (``kernels/kv_quant.py``; KL on both models: ``docs/results.md`` sections 10 and 11).
    On CPU the compiled kernel decodes the float8 bytes in registers (no Triton kernel for float8 codes yet: CUDA
    tensors take the PyTorch path).

    Parameters
    ----------
    format : str
        ``"e4m3"`` (``torch.float8_e4m3fn``, default: 3 mantissa bits) or ``"e5m2"`` (``torch.float8_e5m2``).
    residual : int
        Most recent tokens kept in the model dtype (>= 0). Default 0: with per-token scales a token is stored as soon
        as it arrives (after the forward that attends it in full precision).
    """

    name = "kv_fp8"
    format: str = "e4m3"
    residual: int = 0

    def __post_init__(self):
        fp8_dtype(self.format)
        check_int("residual", self.residual, 0, why="full-precision window of recent tokens")

    def layer_options(self) -> dict:
        return dict(bits=8, group_size=1, residual=self.residual, fp8=fp8_dtype(self.format))

    def host_codes(self) -> tuple[int, int]:
        raise NotImplementedError(
            f"{self.name} cannot hold retrieval's host store yet (it stores integer codes: use retrieval+kv_int8 or "
            "retrieval+kv_int4)"
        )
