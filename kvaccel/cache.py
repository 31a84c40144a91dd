"""KVAccelCache: a transformers ``Cache`` whose layers really shrink when tokens or key channels are evicted.

Storage of one layer (``KVAccelLayer``)::

    keys    (B, H, T, D)    values (B, H, T, Dv)     full-width tokens, in arrival order
    valid   (B, 1|H, T)     bool, or None when every slot is a real token (the fast path)
    narrow  NarrowSegment   optional older tokens whose keys keep only Dk < D channels (ThinK)
    token_state  {name: (B, 1|H, T)}  per-token method state (e.g. accumulated scores) moved with the tokens

Every per-token tensor is a view of the first ``T`` slots of a buffer with spare slots (``SlotTensor``): a new
token is written in place (O(new tokens), no copy of the layer), and only a full buffer is reallocated, with
``reserve`` spare slots (an eviction method sets it to its decode slack; otherwise ``max(4, T / 32)``, so a
growing cache is copied once every ``T / 32`` steps). ``nbytes()`` counts the whole buffers, spare slots included.
Eviction (``keep``) writes the kept tokens into a new buffer of ``kept + reserve`` slots (the memory of evicted
tokens is freed).

Per-head variable lengths are stored padded to the largest per-head count (never to the full length) with
``valid`` marking the real slots; only kvaccel's attention reads ``valid``. ``get_seq_length()`` returns the
tokens *seen*, so positions of new tokens stay right after eviction.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

Tensor = torch.Tensor


@functools.cache
def _cache_kwarg_of(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def cache_kwarg(model) -> str:
    """The name under which ``model.forward`` takes the KV cache: ``cache`` on transformers >= 5.24, else
    ``past_key_values`` (the old name still works there but warns on every call)."""
    return _cache_kwarg_of(type(model))


@dataclass
class NarrowSegment:
    """Older tokens whose keys keep only the channels ``channel_idx`` (post-RoPE channel pruning), and whose
    values keep only ``value_idx`` when value channels are pruned too (otherwise full width)."""

    keys: Tensor  # (B, H, Tn, Dk)
    values: Tensor  # (B, H, Tn, Dv), or (B, H, Tn, Dvn) with value_idx
    channel_idx: Tensor  # (B, H, Dk) long, sorted
    valid: Tensor | None = None  # (B, 1|H, Tn) bool
    value_idx: Tensor | None = None  # (B, H, Dvn) long, sorted

    def tensors(self) -> Iterator[Tensor]:
        yield from (
            t for t in (self.keys, self.values, self.channel_idx, self.valid, self.value_idx) if t is not None
        )

    def map_batch(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.keys, self.values, self.channel_idx = fn(self.keys), fn(self.values), fn(self.channel_idx)
        self.valid = None if self.valid is None else fn(self.valid)
        self.value_idx = None if self.value_idx is None else fn(self.value_idx)

    def dense_values(self, head_dim_v: int) -> Tensor:
        """``(B, H, Tn, Dv)`` values, zero-filled in the pruned value channels (no copy when none are pruned)."""
        if self.value_idx is None:
            return self.values
        B, H, Tn, Dvn = self.values.shape
        out = self.values.new_zeros(B, H, Tn, head_dim_v)
        return out.scatter_(-1, self.value_idx[:, :, None, :].expand(B, H, Tn, Dvn), self.values)


def _rows_view(t4: Tensor) -> tuple[Tensor, int]:
    """``(rows, C)``: ``t4`` (B, H, T, F...) as a 2-D view of the rows of its buffer, ``C >= T`` slots per head (a
    contiguous tensor, or the first ``T`` slots of a contiguous ``(B, H, C, F...)`` buffer); a copy otherwise."""
    B, H, T = t4.shape[:3]
    F = math.prod(t4.shape[3:])
    if t4.numel() and t4[0, 0, 0].is_contiguous() and t4.stride(2) == F and t4.stride(1) % F == 0:
        C = t4.stride(1) // F
        if C >= T and (B == 1 or t4.stride(0) == H * C * F):
            return t4.as_strided(((B * H - 1) * C + T, F), (F, 1)), C  # rows up to the last real slot
    t4 = t4.contiguous()
    return t4.view(B * H * T, F), T


def _take(t: Tensor, idx: Tensor, reserve: int = 0) -> Tensor:
    """``t`` (B, Ht, T, ...) gathered at ``idx`` (B, Hi, K) along axis 2 into a new tensor of ``K + reserve`` slots
    (the last ``reserve`` uninitialised), heads broadcast between ``Ht`` and ``Hi`` (one of them 1 or equal).

    One ``index_select`` of rows of the flattened buffer: on CPU ~10x faster than ``gather`` with an index expanded
    over the feature axis.
    """
    B, Ht = t.shape[:2]
    Hi, K = idx.shape[1], idx.shape[2]
    heads = max(Ht, Hi)
    feat = t.shape[3:]
    rows, C = _rows_view(t.unsqueeze(-1) if t.dim() == 3 else t)
    off = torch.arange(B, device=idx.device)[:, None] * (Ht * C)
    if Ht == heads:
        off = off + torch.arange(Ht, device=idx.device)[None, :] * C
    flat = (idx.expand(B, heads, K) + off[:, :, None]).reshape(-1)
    got = rows.index_select(0, flat).view(B, heads, K, *feat)
    if not reserve:
        return got
    out = t.new_empty(B, heads, K + reserve, *feat)
    out[:, :, :K] = got
    return out


class SlotTensor:
    """A per-token tensor with spare slots: ``view`` is the first ``n`` slots of ``buf`` along axis 2."""

    __slots__ = ("buf", "n")

    def __init__(self, t: Tensor, n: int | None = None):
        self.buf = t
        self.n = t.shape[2] if n is None else n

    @classmethod
    def spare(cls, t: Tensor, reserve: int) -> SlotTensor:
        """``t`` copied into a buffer with ``reserve`` spare slots."""
        buf = t.new_empty(*t.shape[:2], t.shape[2] + reserve, *t.shape[3:])
        buf[:, :, : t.shape[2]] = t
        return cls(buf, t.shape[2])

    @property
    def view(self) -> Tensor:
        return self.buf if self.n == self.buf.shape[2] else self.buf[:, :, : self.n]

    def _room(self, q: int, reserve: int) -> None:
        if self.buf.shape[2] < self.n + q:
            grown = self.buf.new_empty(*self.buf.shape[:2], self.n + q + reserve, *self.buf.shape[3:])
            grown[:, :, : self.n] = self.buf[:, :, : self.n]
            self.buf = grown

    def append(self, new: Tensor, reserve: int) -> None:
        """Write ``new`` (B, H, q, ...) into the next ``q`` slots (in place; reallocate with ``reserve`` spare slots
        when full)."""
        q = new.shape[2]
        self._room(q, reserve)
        self.buf[:, :, self.n : self.n + q] = new
        self.n += q

    def append_fill(self, q: int, value, reserve: int) -> None:
        """Append ``q`` slots filled with ``value``."""
        self._room(q, reserve)
        self.buf[:, :, self.n : self.n + q] = value
        self.n += q

    def take(self, idx: Tensor, reserve: int) -> SlotTensor:
        """The slots ``idx`` (B, H|1, K) in a new buffer with ``reserve`` spare slots."""
        return SlotTensor(_take(self.view, idx, reserve), idx.shape[2])


class TokenState(dict):
    """``{name: (B, 1|H, T) tensor}`` of per-token method state, each stored as a ``SlotTensor``.

    Reading an item gives the view of its real slots; assigning one stores it (its length becomes the item's).
    """

    def __init__(self, items=()):
        super().__init__()
        for k, v in dict(items).items():
            self[k] = v

    def __getitem__(self, name: str) -> Tensor:
        return super().__getitem__(name).view

    def get(self, name: str, default=None):
        return self[name] if name in self else default

    def __setitem__(self, name: str, t: Tensor) -> None:
        if isinstance(t, SlotTensor):
            super().__setitem__(name, t)
            return
        old = super().get(name)
        T = t.shape[2]
        if old is not None and old.buf.shape[:2] == t.shape[:2] and old.buf.shape[2] >= T and old.buf.dtype == t.dtype:
            if old.buf.data_ptr() != t.data_ptr():  # a new value of an existing state: into its buffer
                old.buf[:, :, :T] = t
            old.n = T
            return
        super().__setitem__(name, SlotTensor(t))

    def slots(self) -> dict[str, SlotTensor]:
        return dict(super().items())

    def values(self):
        return [s.view for s in super().values()]

    def items(self):
        return [(k, s.view) for k, s in super().items()]


class KVAccelLayer(CacheLayerMixin):
    """One layer of ``KVAccelCache``: tokens-seen counter, physical storage that shrinks, per-head validity."""

    is_sliding = False
    is_croppable = False
    is_compileable = False
    #: invalid slots the storage added for its own layout (a quantized layer's padded key group), which decode-time
    #: eviction does not count as held tokens
    pad_slots = 0

    def __init__(self, **kwargs):
        super().__init__()
        self.seen = 0  # tokens the layer has been given (positions), never decreases on eviction
        self.prompt_len = 0  # tokens of the prompt (all multi-token forwards before the first decode step)
        self._k: SlotTensor | None = None
        self._v: SlotTensor | None = None
        self._valid: SlotTensor | None = None
        self.narrow: NarrowSegment | None = None
        self._state = TokenState()
        self.decode_steps = 0
        #: spare slots a reallocated buffer gets (``None``: ``max(4, T / 32)``); eviction methods set their slack
        self.reserve: int | None = None
        #: key re-rotation (``kvaccel.rope.RopeShift``): slot ``s`` holds RoPE position ``s``; ``None`` = true positions
        self.rope = None

    # ------------------------------------------------------------------ storage (views of slot buffers)
    @property
    def keys(self) -> Tensor | None:
        return None if self._k is None else self._k.view

    @keys.setter
    def keys(self, t: Tensor | None) -> None:
        self._k = None if t is None else SlotTensor(t)

    @property
    def values(self) -> Tensor | None:
        return None if self._v is None else self._v.view

    @values.setter
    def values(self, t: Tensor | None) -> None:
        self._v = None if t is None else SlotTensor(t)

    @property
    def valid(self) -> Tensor | None:
        return None if self._valid is None else self._valid.view

    @valid.setter
    def valid(self, t: Tensor | None) -> None:
        self._valid = None if t is None else SlotTensor(t)

    @property
    def token_state(self) -> TokenState:
        return self._state

    @token_state.setter
    def token_state(self, d: dict) -> None:
        self._state = d if isinstance(d, TokenState) else TokenState(d)

    def _reserve(self, n: int) -> int:
        return max(4, n // 32) if self.reserve is None else self.reserve

    # ------------------------------------------------------------------ transformers' layer contract
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        # the prompt is stored at its size (an uncompressed cache holds exactly its tokens); growth gets spare slots
        reserve = 0 if self._k.n == 0 else self._reserve(self._k.n + n)
        self._k.append(key_states, reserve)
        self._v.append(value_states, reserve)
        if self._valid is not None:
            self._valid.append_fill(n, True, reserve)
        for slot in self._state.slots().values():
            slot.append_fill(n, 0, reserve)
        self.seen += n
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Our mask function only slices the 2-D padding mask, which always spans every token seen.
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.is_initialized = False
        self.__init__()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "KVAccelCache cannot be cropped: evicted tokens are gone. Assisted/speculative decoding that rolls "
            "the cache back is not supported with kvaccel; use a DynamicCache for it."
        )

    def drop_tail(self, n: int) -> None:
        """Forget every token after the first ``n`` (counters and slot views; the buffers keep their size): for
        tokens fed only to be looked at, e.g. kvzip's reconstruction pass. Not ``crop``: nothing was evicted."""
        for slot in [self._k, self._v, self._valid, *self._state.slots().values()]:
            if slot is not None:
                slot.n = n
        self.seen = self.prompt_len = n

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def _map_batch(self, fn: Callable[[Tensor], Tensor]) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.valid = None if self.valid is None else fn(self.valid)
        self.token_state = {k: fn(v) for k, v in self.token_state.items()}
        if self.narrow is not None:
            self.narrow.map_batch(fn)

    # ------------------------------------------------------------------ kvaccel's own API
    @property
    def length(self) -> int:
        """Physical token slots held (narrow + full segment), per head, padded to the largest head."""
        if not self.is_initialized:
            return 0
        return self._k.n + (0 if self.narrow is None else self.narrow.keys.shape[-2])

    def tensors(self) -> Iterator[Tensor]:
        """Every tensor the layer holds (whole buffers, spare slots included)."""
        if not self.is_initialized:
            return
        yield self._k.buf
        yield self._v.buf
        if self._valid is not None:
            yield self._valid.buf
        yield from (slot.buf for slot in self._state.slots().values())
        if self.narrow is not None:
            yield from self.narrow.tensors()

    def nbytes(self) -> int:
        """Bytes physically held by this layer (keys, values, masks, narrow segment, method state, spare slots)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def mark_padding(self, new_valid: Tensor) -> None:
        """Record which of the last ``n`` arrived tokens are real: ``new_valid`` is (B, n) bool."""
        n = new_valid.shape[-1]
        if self._valid is None:
            if bool(new_valid.all()):
                return
            B, T = self._k.buf.shape[0], self._k.n
            self._valid = SlotTensor(new_valid.new_ones(B, 1, self._k.buf.shape[2]), T)
        self.valid[:, :, -n:] &= new_valid[:, None, :]

    def kept_per_head(self) -> Tensor:
        """(B, H) number of real tokens held per sequence and head."""
        B, H, T = self.keys.shape[:3]
        full = (
            torch.full((B, H), T, device=self.keys.device)
            if self.valid is None
            else self.valid.expand(B, H, T).sum(-1)
        )
        if self.narrow is not None:
            nv = self.narrow.valid
            Tn = self.narrow.keys.shape[-2]
            full = full + (Tn if nv is None else nv.expand(B, H, Tn).sum(-1))
        return full

    def full_valid(self) -> Tensor:
        """(B, 1|H, T) validity of the full-width segment (materialised)."""
        if self.valid is not None:
            return self.valid
        return torch.ones(self.keys.shape[0], 1, self.keys.shape[-2], dtype=torch.bool, device=self.keys.device)

    def token_valid(self) -> Tensor:
        """(B, 1|H, Tn + T) validity over the whole token axis ``[narrow segment, full-width segment]``."""
        full = self.full_valid()
        if self.narrow is None:
            return full
        nv = self.narrow.valid
        if nv is None:
            nv = full.new_ones(full.shape[0], 1, self.narrow.keys.shape[-2])
        heads = max(nv.shape[1], full.shape[1])
        return torch.cat([nv.expand(-1, heads, -1), full.expand(-1, heads, -1)], dim=-1)

    def dense_keys(self) -> tuple[Tensor, Tensor | None]:
        """Keys of every held token on the ``[narrow, full]`` axis ``(B, H, N, D)`` and their validity.

        Narrow keys are zero-filled in their pruned channels, so ``q · K`` equals ThinK's narrow logits: scorers
        (SnapKV, H2O, ...) read this and work unchanged after channel pruning. Without a narrow segment this is
        ``(keys, valid)`` with no copy; validity is ``None`` when every slot is a real token.
        """
        if self.narrow is None:
            return self.keys, self.valid
        nar = self.narrow
        B, H, Tn, Dk = nar.keys.shape
        kn = self.keys.new_zeros(B, H, Tn, self.keys.shape[-1])
        kn.scatter_(-1, nar.channel_idx[:, :, None, :].expand(B, H, Tn, Dk), nar.keys)
        valid = None if (self.valid is None and nar.valid is None) else self.token_valid()
        return torch.cat([kn, self.keys], dim=2), valid

    def dense_values(self) -> Tensor:
        """Values of every held token on the :meth:`dense_keys` axis ``(B, H, Tn + T, Dv)``, ThinK's pruned value
        channels zero-filled (no copy without a narrow segment). Subclasses that store tokens elsewhere (packed,
        quantized) override it: scorers read this, never ``values`` alone."""
        if self.narrow is None:
            return self.values
        return torch.cat([self.narrow.dense_values(self.values.shape[-1]), self.values], 2)

    def keep(self, idx: Tensor, slot_valid: Tensor | None = None, reserve: int | None = None) -> None:
        """Keep only the tokens ``idx`` (B, 1|H, K), sorted ascending, indexing the full-width segment.

        ``slot_valid`` (B, 1|H, K) marks padding slots of per-head ragged selections (False = not a token).
        The kept tokens move to new buffers of ``K + reserve`` slots (``reserve`` also becomes the layer's spare-slot
        count for later growth; ``None`` keeps the current rule): the memory of evicted tokens is freed.

        With a narrow segment (ThinK), ``idx`` indexes the concatenated ``[narrow (Tn), full (T)]`` token axis
        (``token_state`` spans that axis too): kept narrow tokens stay narrow, kept full-width ones stay full; each
        segment is padded to its largest per-head count with validity marking the real slots.
        """
        if reserve is not None:
            self.reserve = reserve
        if self.narrow is not None:
            if self.rope is not None:
                raise NotImplementedError("key re-rotation cannot move narrow (channel-pruned) keys")
            self._keep_with_narrow(idx, slot_valid)
            return
        r = self._reserve(idx.shape[-1])
        valid = self.valid
        self._k, self._v = self._k.take(idx, r), self._v.take(idx, r)
        if self.rope is not None:
            self.rope.move_kept(self.keys, idx)
        self._state = TokenState({k: s.take(idx, r) for k, s in self._state.slots().items()})
        new_valid = None if valid is None else _take(valid, idx)
        if slot_valid is not None:
            new_valid = slot_valid if new_valid is None else new_valid & slot_valid
        if new_valid is not None and bool(new_valid.all()):
            new_valid = None
        self._valid = None if new_valid is None else SlotTensor.spare(new_valid, r)

    def _keep_with_narrow(self, idx: Tensor, slot_valid: Tensor | None) -> None:
        """``keep`` when a narrow segment exists: split the selection into its narrow and full-width parts."""
        narrow = self.narrow
        Tn = narrow.keys.shape[-2]
        B, H = self.keys.shape[:2]
        idx = idx.expand(B, H, idx.shape[-1])
        sv = torch.ones_like(idx, dtype=torch.bool) if slot_valid is None else slot_valid.expand(idx.shape)
        in_narrow = sv & (idx < Tn)
        pos_n, sv_n = compact_slots(in_narrow)
        pos_f, sv_f = compact_slots(sv & (idx >= Tn))
        # token_state spans [narrow, full]: gather it in the new storage order (narrow slots, then full slots)
        pos = torch.cat([pos_n, pos_f], dim=-1)
        cat_idx = torch.where(torch.cat([sv_n, sv_f], -1), idx.gather(-1, pos), 0)
        self._state = TokenState({k: st.take(cat_idx, self._reserve(cat_idx.shape[-1]))
                                  for k, st in self._state.slots().items()})

        n_idx = torch.where(sv_n, idx.gather(-1, pos_n), 0)
        f_idx = torch.where(sv_f, idx.gather(-1, pos_f) - Tn, 0)
        if n_idx.shape[-1] == 0:
            self.narrow = None
        else:
            nv = sv_n if narrow.valid is None else _take(narrow.valid, n_idx) & sv_n
            self.narrow = NarrowSegment(
                keys=_take(narrow.keys, n_idx),
                values=_take(narrow.values, n_idx),
                channel_idx=narrow.channel_idx,
                valid=None if bool(nv.all()) else nv.contiguous(),
                value_idx=narrow.value_idx,
            )
        fv = sv_f if self.valid is None else _take(self.valid, f_idx) & sv_f
        r = self._reserve(f_idx.shape[-1])
        self._k, self._v = self._k.take(f_idx, r), self._v.take(f_idx, r)
        self._valid = None if bool(fv.all()) else SlotTensor.spare(fv, r)


def compact_slots(mask: Tensor, min_width: int = 0) -> tuple[Tensor, Tensor]:
    """Positions of the True slots of ``mask`` (B, H, K), moved to the front in order, padded to the largest count.

    Returns ``(pos, slot_valid)``, both ``(B, H, K')`` with ``K'`` the largest per-row count of True slots.
    """
    counts = mask.sum(-1)
    width = max(min_width, int(counts.max()) if mask.numel() else 0)
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[..., :width]
    return order, torch.arange(width, device=mask.device) < counts[..., None]


class KVAccelCache(Cache):
    """A ``Cache`` of ``KVAccelLayer``s, one per decoder layer of ``model`` (or of a config).

    ``generate()`` on a patched model creates one automatically; pass one explicitly to ``model(...)`` or
    ``generate(cache=KVAccelCache(model))`` to keep it.
    """

    def __init__(self, model_or_config=None, num_layers: int | None = None):
        if num_layers is None:
            if model_or_config is None:
                raise ValueError("KVAccelCache needs a model, a config or num_layers")
            config = getattr(model_or_config, "config", model_or_config)
            num_layers = config.get_text_config(decoder=True).num_hidden_layers
        super().__init__(layers=[KVAccelLayer() for _ in range(num_layers)])

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def full_nbytes(self) -> int:
        """Bytes a full (uncompressed) cache would hold for the tokens seen by each layer."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                B, H, _, D = layer.keys.shape
                Dv = layer.values.shape[-1]
                total += B * H * layer.seen * (D + Dv) * layer.keys.element_size()
        return total

    def __iter__(self):
        for layer in self.layers:
            yield layer.keys, layer.values
