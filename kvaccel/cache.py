"""KVAccelCache: a transformers ``Cache`` whose layers really shrink when tokens or key channels are evicted.

Storage of one layer (``KVAccelLayer``)::

    keys    (B, H, T, D)    values (B, H, T, Dv)     full-width tokens, in arrival order
    valid   (B, 1|H, T)     bool, or None when every slot is a real token (the fast path)
    narrow  NarrowSegment   optional older tokens whose keys keep only Dk < D channels (ThinK)
    token_state  {name: (B, 1|H, T)}  per-token method state (e.g. accumulated scores) moved with the tokens

Per-head variable lengths are stored padded to the largest per-head count (never to the full length) with
``valid`` marking the real slots; only kvaccel's attention reads ``valid``. ``get_seq_length()`` returns the
tokens *seen*, so positions of new tokens stay right after eviction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

Tensor = torch.Tensor


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


def _gather_tokens(t: Tensor, idx: Tensor) -> Tensor:
    """Gather along the token axis 2 of ``t`` (B, H|1, T, ...) with ``idx`` (B, H|1, K)."""
    if idx.shape[1] != t.shape[1]:
        heads = max(idx.shape[1], t.shape[1])
        t = t.expand(t.shape[0], heads, *t.shape[2:])
        idx = idx.expand(idx.shape[0], heads, idx.shape[2])
    if t.dim() == 4:
        return t.gather(2, idx.unsqueeze(-1).expand(*idx.shape, t.shape[-1]))
    return t.gather(2, idx)


class KVAccelLayer(CacheLayerMixin):
    """One layer of ``KVAccelCache``: tokens-seen counter, physical storage that shrinks, per-head validity."""

    is_sliding = False
    is_croppable = False
    is_compileable = False

    def __init__(self, **kwargs):
        super().__init__()
        self.seen = 0  # tokens the layer has been given (positions), never decreases on eviction
        self.prompt_len = 0  # tokens of the prompt (all multi-token forwards before the first decode step)
        self.valid: Tensor | None = None
        self.narrow: NarrowSegment | None = None
        self.token_state: dict[str, Tensor] = {}
        self.decode_steps = 0

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
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        if self.valid is not None:
            ones = self.valid.new_ones(*self.valid.shape[:2], n)
            self.valid = torch.cat([self.valid, ones], dim=-1)
        for name, t in self.token_state.items():
            self.token_state[name] = torch.cat([t, t.new_zeros(*t.shape[:2], n)], dim=-1)
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
        self.keys = self.values = None
        self.is_initialized = False
        self.__init__()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "KVAccelCache cannot be cropped: evicted tokens are gone. Assisted/speculative decoding that rolls "
            "the cache back is not supported with kvaccel; use a DynamicCache for it."
        )

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
        return self.keys.shape[-2] + (0 if self.narrow is None else self.narrow.keys.shape[-2])

    def tensors(self) -> Iterator[Tensor]:
        if not self.is_initialized:
            return
        yield self.keys
        yield self.values
        if self.valid is not None:
            yield self.valid
        yield from self.token_state.values()
        if self.narrow is not None:
            yield from self.narrow.tensors()

    def nbytes(self) -> int:
        """Bytes physically held by this layer (keys, values, masks, narrow segment, method state)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def mark_padding(self, new_valid: Tensor) -> None:
        """Record which of the last ``n`` arrived tokens are real: ``new_valid`` is (B, n) bool."""
        n = new_valid.shape[-1]
        if self.valid is None:
            if bool(new_valid.all()):
                return
            self.valid = new_valid.new_ones(self.keys.shape[0], 1, self.keys.shape[-2])
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

    def keep(self, idx: Tensor, slot_valid: Tensor | None = None) -> None:
        """Keep only the tokens ``idx`` (B, 1|H, K), sorted ascending, indexing the full-width segment.

        ``slot_valid`` (B, 1|H, K) marks padding slots of per-head ragged selections (False = not a token).
        The stored tensors are replaced by new, smaller ones: the memory of evicted tokens is freed.

        With a narrow segment (ThinK), ``idx`` indexes the concatenated ``[narrow (Tn), full (T)]`` token axis
        (``token_state`` spans that axis too): kept narrow tokens stay narrow, kept full-width ones stay full; each
        segment is padded to its largest per-head count with validity marking the real slots.
        """
        if self.narrow is not None:
            self._keep_with_narrow(idx, slot_valid)
            return
        valid = self.valid
        self.keys = _gather_tokens(self.keys, idx).contiguous()
        self.values = _gather_tokens(self.values, idx).contiguous()
        self.token_state = {k: _gather_tokens(v, idx).contiguous() for k, v in self.token_state.items()}
        new_valid = None if valid is None else _gather_tokens(valid, idx)
        if slot_valid is not None:
            new_valid = slot_valid if new_valid is None else new_valid & slot_valid
        if new_valid is not None and bool(new_valid.all()):
            new_valid = None
        self.valid = None if new_valid is None else new_valid.contiguous()

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
        self.token_state = {k: _gather_tokens(v, cat_idx).contiguous() for k, v in self.token_state.items()}

        n_idx = torch.where(sv_n, idx.gather(-1, pos_n), 0)
        f_idx = torch.where(sv_f, idx.gather(-1, pos_f) - Tn, 0)
        if n_idx.shape[-1] == 0:
            self.narrow = None
        else:
            nv = sv_n if narrow.valid is None else _gather_tokens(narrow.valid, n_idx) & sv_n
            self.narrow = NarrowSegment(
                keys=_gather_tokens(narrow.keys, n_idx).contiguous(),
                values=_gather_tokens(narrow.values, n_idx).contiguous(),
                channel_idx=narrow.channel_idx,
                valid=None if bool(nv.all()) else nv.contiguous(),
                value_idx=narrow.value_idx,
            )
        fv = sv_f if self.valid is None else _gather_tokens(self.valid, f_idx) & sv_f
        self.keys = _gather_tokens(self.keys, f_idx).contiguous()
        self.values = _gather_tokens(self.values, f_idx).contiguous()
        self.valid = None if bool(fv.all()) else fv.contiguous()


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
    ``generate(past_key_values=KVAccelCache(model))`` to keep it.
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
