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
    """Older tokens whose keys keep only the channels ``channel_idx`` (post-RoPE channel pruning)."""

    keys: Tensor  # (B, H, Tn, Dk)
    values: Tensor  # (B, H, Tn, Dv)
    channel_idx: Tensor  # (B, H, Dk) long, sorted
    valid: Tensor | None = None  # (B, 1|H, Tn) bool

    def tensors(self) -> Iterator[Tensor]:
        yield from (t for t in (self.keys, self.values, self.channel_idx, self.valid) if t is not None)

    def map_batch(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.keys, self.values, self.channel_idx = fn(self.keys), fn(self.values), fn(self.channel_idx)
        self.valid = None if self.valid is None else fn(self.valid)


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

    def keep(self, idx: Tensor, slot_valid: Tensor | None = None) -> None:
        """Keep only the tokens ``idx`` (B, 1|H, K), sorted ascending, indexing the full-width segment.

        ``slot_valid`` (B, 1|H, K) marks padding slots of per-head ragged selections (False = not a token).
        The stored tensors are replaced by new, smaller ones: the memory of evicted tokens is freed.
        """
        if self.narrow is not None:
            raise NotImplementedError("token eviction after channel pruning is done by the channels method")
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
