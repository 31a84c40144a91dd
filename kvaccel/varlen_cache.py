"""VarlenLayer: a KV cache layer whose (batch, kv head) segments have their own lengths and are packed, not padded.

Storage of one layer::

    key_buffer    (N, D)      every segment's keys back to back, segment s = b * H + h
    value_buffer  (N, Dv)     same rows
    seg_start     (B, H)      int64, first row of each segment
    seg_len       (B, H)      int64, tokens held by each segment
    free          int         slack rows reserved after every segment (the same number for all of them)

``N = sum(seg_len) + B * H * free``: the bytes are the tokens held plus the slack, never a padding of every head to
the longest (AdaKV's per-head budgets, https://arxiv.org/abs/2407.11550, are stored at their real size). A new token
is written into its segment's slack (one ``index_copy_`` for all segments, O(new tokens)); when the slack runs out
the layer is repacked once with ``free = max(MIN_SLACK, ceil(SLACK_FRACTION * mean segment length))`` rows per
segment, so the slack stays below ``SLACK_FRACTION`` of the tokens held (once segments are longer than
``MIN_SLACK / SLACK_FRACTION`` tokens) and repacks get rarer as the cache grows (geometric growth: a repack copies
the layer once every ``free`` steps). ``nbytes()`` counts the slack; ``slack_tokens`` / ``slack_nbytes()`` report it.

``keys`` / ``values`` are empty ``(B, H, 0, D)`` / ``(B, H, 0, Dv)`` tensors that carry the layer's geometry, dtype and
device for code that reads them (``KVAccelCache.full_nbytes``); the tokens live in the buffers only. Code that needs
the tokens per head reads :meth:`VarlenLayer.dense_keys` (a padded copy), attention reads :meth:`VarlenLayer.attend`.

Not supported (clear errors): a narrow segment (ThinK channel pruning), per-token method state (``token_state``),
padding inside new tokens after the prompt, ``crop``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from kvaccel.cache import KVAccelLayer
from kvaccel.kernels.varlen_decode_attention import varlen_decode_attention

Tensor = torch.Tensor


def check_varlen_stages(name: str, stages: dict, fix: str) -> None:
    """Refuse, at ``patch()`` time, channel / decode methods next to an eviction method ``name`` that stores its layers
    as ``VarlenLayer`` (they read a layer's padded per-head ``keys`` / ``values``). ``fix`` is the advice, formatted
    with ``other`` (the refused method's name)."""
    for stage in ("channels", "decode"):
        other = stages.get(stage)
        if other is not None:
            raise NotImplementedError(
                f"{name} stores each head packed at its own length, which the {stage} method '{other.name}' cannot "
                f"read yet (it reads the padded per-head keys); {fix.format(other=other.name)}"
            )


def _segment_rows(starts: Tensor, lengths: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """For segments ``starts``/``lengths`` (S,) holding ``total`` tokens: ``(segment id, row)`` of every token,
    in segment order."""
    S = lengths.numel()
    seg = torch.repeat_interleave(torch.arange(S, device=lengths.device), lengths, output_size=total)
    first = lengths.cumsum(0) - lengths  # token index of each segment's first token
    return seg, starts[seg] + torch.arange(total, device=lengths.device) - first[seg]


class VarlenLayer(KVAccelLayer):
    """One layer of ``KVAccelCache`` storing each (batch, kv head) segment packed at its own length.

    Build it with :meth:`from_selection` from a layer and a per-head ragged selection (AdaKV), then put it in
    ``cache.layers[i]``; it implements the transformers layer contract (``update``, ``get_seq_length``, beam-search
    reordering) and attends itself (:meth:`attend`, called by kvaccel's decode path for ``Q >= 1`` new tokens).
    """

    #: slack per segment, as a fraction of the mean segment length, reserved at every repack
    SLACK_FRACTION = 1 / 32
    #: least slack per segment reserved at a repack (tokens)
    MIN_SLACK = 4

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.key_buffer: Tensor | None = None
        self.value_buffer: Tensor | None = None
        self.seg_start: Tensor | None = None
        self.seg_len: Tensor | None = None
        self.free = 0  # slack rows after every segment
        self.max_len = 0  # longest segment (host copy: no device sync per step)
        self.total_len = 0  # tokens held, all segments
        self.repacks = 0  # times the buffers were reallocated to grow

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_selection(cls, layer: KVAccelLayer, idx: Tensor, slot_valid: Tensor | None = None) -> VarlenLayer:
        """A packed layer holding, per (batch, kv head), the tokens ``idx`` (B, 1|H, K) of ``layer`` where
        ``slot_valid`` (B, 1|H, K) is True (and the token is real); ``idx`` sorted ascending per head.

        ``layer`` is a ``KVAccelLayer`` (``idx`` indexes its full-width token axis) or a ``VarlenLayer`` (``idx``
        indexes its :meth:`dense_keys` axis). No slack is reserved: the first new token triggers the first repack.
        """
        out = cls()
        out._copy_counters(layer)
        lengths, total, key_src, value_src, src_rows, B, H = _selection(layer, idx, slot_valid)
        out._pack(key_src, value_src, src_rows, lengths.view(B, H), total, free=0)
        return out

    def _copy_counters(self, layer: KVAccelLayer) -> None:
        self.seen, self.prompt_len, self.decode_steps = layer.seen, layer.prompt_len, layer.decode_steps
        self.dtype, self.device = layer.dtype, layer.device

    def _pack(self, key_src: Tensor, value_src: Tensor, src_rows: Tensor, lengths: Tensor, total: int,
              free: int) -> None:
        """(Re)build the buffers: segment ``s`` gets the rows ``src_rows`` of its tokens (segment order) of
        ``key_src`` (M, D) / ``value_src`` (M, Dv), followed by ``free`` zeroed slack rows."""
        B, H = lengths.shape
        S, D, Dv = B * H, key_src.shape[-1], value_src.shape[-1]
        flat_len = lengths.reshape(S)
        cap = flat_len + free
        starts = cap.cumsum(0) - cap
        keys = key_src.index_select(0, src_rows)
        values = value_src.index_select(0, src_rows)
        if free:  # zeroed slack: the torch decode path reads (and masks) rows past a segment's end
            _, dest = _segment_rows(starts, flat_len, total)
            keys = key_src.new_zeros(total + S * free, D).index_copy_(0, dest, keys)
            values = value_src.new_zeros(total + S * free, Dv).index_copy_(0, dest, values)
        self.key_buffer, self.value_buffer = keys, values
        self.seg_start, self.seg_len = starts.view(B, H), lengths.clone()
        self.free, self.total_len = free, total
        self.max_len = int(flat_len.max()) if S else 0
        self.keys = keys.new_empty(B, H, 0, D)  # geometry carriers (see the module docstring)
        self.values = values.new_empty(B, H, 0, Dv)
        self.is_initialized = True

    def _token_rows(self) -> Tensor:
        """Rows of every held token in segment order."""
        return _segment_rows(self.seg_start.reshape(-1), self.seg_len.reshape(-1), self.total_len)[1]

    # ------------------------------------------------------------------ transformers' layer contract
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        """Empty segments for the batch and heads of ``key_states`` (a reset layer given new tokens)."""
        self.dtype, self.device = key_states.dtype, key_states.device
        B, H = key_states.shape[:2]
        empty = torch.zeros(B, H, dtype=torch.int64, device=key_states.device)
        rows = torch.zeros(0, dtype=torch.int64, device=key_states.device)
        self._pack(key_states.new_zeros(0, key_states.shape[-1]), value_states.new_zeros(0, value_states.shape[-1]),
                   rows, empty, 0, free=0)

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Append ``n`` new tokens ``(B, H, n, D)`` to every segment; returns them (not the cache: the layer
        attends itself, see :meth:`attend`)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, H, n = key_states.shape[:3]
        if (B, H) != tuple(self.seg_len.shape):
            raise ValueError(
                f"new tokens for batch {B} x {H} kv heads, but the layer holds {tuple(self.seg_len.shape)} segments"
            )
        if self.free < n:
            self._grow(n)
        S = B * H
        rows = (self.seg_start + self.seg_len).view(S, 1)  # next free row of every segment
        if n > 1:
            rows = rows + torch.arange(n, device=rows.device)
        self.key_buffer.index_copy_(0, rows.view(-1), key_states.reshape(S * n, -1))
        self.value_buffer.index_copy_(0, rows.view(-1), value_states.reshape(S * n, -1))
        self.seg_len += n
        self.free -= n
        self.max_len += n
        self.total_len += S * n
        self.seen += n
        return key_states, value_states

    def _grow(self, n: int) -> None:
        """Repack with room for ``n`` new tokens and ``free >= max(MIN_SLACK, SLACK_FRACTION * mean length)``."""
        S = self.seg_len.numel()
        mean = self.total_len / max(S, 1) + n
        free = max(n, self.MIN_SLACK, math.ceil(self.SLACK_FRACTION * mean))
        self._pack(self.key_buffer, self.value_buffer, self._token_rows(), self.seg_len, self.total_len, free)
        self.repacks += 1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_batch(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            batch = torch.arange(self.seg_len.shape[0], device=self.seg_len.device)
            self._select_batch(batch.repeat_interleave(repeats))

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.is_initialized:
            idx = torch.as_tensor(indices, device=self.seg_len.device)
            self._select_batch(idx.nonzero().flatten() if idx.dtype == torch.bool else idx)

    def _select_batch(self, batch_idx: Tensor) -> None:
        """New batch ``b`` = old batch ``batch_idx[b]`` (beam reordering, expansion, selection); slack kept."""
        if not self.is_initialized:
            return
        batch_idx = batch_idx.to(self.seg_len.device)
        H = self.seg_len.shape[1]
        lengths = self.seg_len.index_select(0, batch_idx)
        src_start = self.seg_start.index_select(0, batch_idx).reshape(-1)
        total = int(lengths.sum())
        rows = _segment_rows(src_start, lengths.reshape(-1), total)[1]
        self._pack(self.key_buffer, self.value_buffer, rows, lengths.view(-1, H), total, self.free)

    def offload(self) -> None:
        if self.is_initialized:
            self.key_buffer = self.key_buffer.to("cpu", non_blocking=True)
            self.value_buffer = self.value_buffer.to("cpu", non_blocking=True)

    def prefetch(self) -> None:
        if self.is_initialized and self.key_buffer.device != self.device:
            self.key_buffer = self.key_buffer.to(self.device, non_blocking=True)
            self.value_buffer = self.value_buffer.to(self.device, non_blocking=True)

    # ------------------------------------------------------------------ attention
    def attend(self, ctx) -> Tensor:
        """Attention of this forward's ``Q`` new tokens (already appended by :meth:`update`) over their segments,
        causal among themselves; ``(B, Q, H_q, Dv)`` as kvaccel's attention returns it."""
        q = ctx.query
        if ctx.key.shape[-2] != q.shape[2]:
            raise RuntimeError(
                f"VarlenLayer.attend expects the {q.shape[2]} queries to be the tokens just appended, got "
                f"{ctx.key.shape[-2]} new keys"
            )
        out = varlen_decode_attention(q, self.key_buffer, self.value_buffer, self.seg_start, self.seg_len,
                                      scale=ctx.scaling, max_len=self.max_len)
        return out.transpose(1, 2)

    # ------------------------------------------------------------------ kvaccel's own API
    @property
    def length(self) -> int:
        """Longest segment: the width of the :meth:`dense_keys` token axis."""
        return self.max_len if self.is_initialized else 0

    @property
    def slack_tokens(self) -> int:
        """Reserved, unused slots (all segments)."""
        return self.free * self.seg_len.numel() if self.is_initialized else 0

    def slack_nbytes(self) -> int:
        """Bytes of the reserved, unused slots (counted in :meth:`nbytes`)."""
        if not self.is_initialized:
            return 0
        row = self.key_buffer.shape[-1] * self.key_buffer.element_size()
        row += self.value_buffer.shape[-1] * self.value_buffer.element_size()
        return self.slack_tokens * row

    def tensors(self) -> Iterator[Tensor]:
        if not self.is_initialized:
            return
        yield from (self.key_buffer, self.value_buffer, self.seg_start, self.seg_len)

    def kept_per_head(self) -> Tensor:
        """(B, H) tokens held per sequence and head."""
        return self.seg_len.clone()

    def mark_padding(self, new_valid: Tensor) -> None:
        if bool(new_valid.all()):
            return
        raise NotImplementedError(
            "padding inside new tokens after the prompt is not supported by the varlen (per-head) cache layout; "
            "pad prompts on the left or right only, or use adakv(layout='padded')"
        )

    def full_valid(self) -> Tensor:
        """(B, H, L) validity of the :meth:`dense_keys` axis, ``L = length``: segments right-aligned."""
        pos = torch.arange(self.max_len, device=self.seg_len.device)
        return pos >= (self.max_len - self.seg_len)[..., None]

    def token_valid(self) -> Tensor:
        return self.full_valid()

    def _dense_rows(self) -> tuple[Tensor, Tensor]:
        """``(rows, valid)`` (B, H, L): buffer row of every slot of the right-aligned dense axis."""
        valid = self.full_valid()
        pos = torch.arange(self.max_len, device=self.seg_len.device)
        rows = self.seg_start[..., None] + pos - (self.max_len - self.seg_len)[..., None]
        return torch.where(valid, rows, 0), valid

    def dense_keys(self) -> tuple[Tensor, Tensor | None]:
        """Keys ``(B, H, L, D)`` of every segment padded to the longest one (right-aligned: a segment's newest
        token is in the last slot, as in the padded layout) and their validity ``(B, H, L)``. A copy, for
        scorers at a prompt chunk; decoding never builds it."""
        rows, valid = self._dense_rows()
        keys = self.key_buffer[rows] * valid[..., None]
        return keys, valid

    def dense_values(self) -> Tensor:
        """Values ``(B, H, L, Dv)`` on the :meth:`dense_keys` axis (zeros in padding slots)."""
        rows, valid = self._dense_rows()
        return self.value_buffer[rows] * valid[..., None]

    def keep(self, idx: Tensor, slot_valid: Tensor | None = None, reserve: int | None = None) -> None:
        """Keep only the tokens ``idx`` (B, 1|H, K) of the :meth:`dense_keys` axis, sorted ascending, where
        ``slot_valid`` is True; repacked with ``reserve`` slack rows per segment (default none: the memory of
        evicted tokens is freed, the next new token repacks with slack)."""
        lengths, total, key_src, value_src, src_rows, B, H = _selection(self, idx, slot_valid)
        self._pack(key_src, value_src, src_rows, lengths.view(B, H), total, free=reserve or 0)

    def _keep_with_narrow(self, idx: Tensor, slot_valid: Tensor | None) -> None:
        raise NotImplementedError("a VarlenLayer has no narrow segment (ThinK channel pruning is not supported)")


def _selection(layer: KVAccelLayer, idx: Tensor, slot_valid: Tensor | None):
    """Rows of the tokens ``idx`` / ``slot_valid`` of ``layer`` in segment order: ``(lengths (S,), total,
    key_src, value_src, src_rows, B, H)``."""
    if not layer.is_initialized:
        raise ValueError("cannot select tokens of an empty cache layer (no forward has written into it)")
    if layer.narrow is not None:
        raise NotImplementedError(
            "the varlen layout cannot hold ThinK's narrow keys (channels stage); use adakv(layout='padded') with "
            "think, or drop the channels method"
        )
    if layer.token_state:
        raise NotImplementedError(
            f"the varlen layout does not carry per-token method state ({sorted(layer.token_state)}); use it with "
            "prompt-time eviction only"
        )
    if isinstance(layer, VarlenLayer):
        B, H = layer.seg_len.shape
        rows, valid = layer._dense_rows()
        key_src, value_src = layer.key_buffer, layer.value_buffer
    else:
        B, H, T = layer.keys.shape[:3]
        rows = (torch.arange(B * H, device=layer.keys.device) * T).view(B, H, 1) + torch.arange(
            T, device=layer.keys.device)
        valid = layer.full_valid().expand(B, H, T)
        key_src = layer.keys.reshape(B * H * T, -1)
        value_src = layer.values.reshape(B * H * T, -1)
    if idx.dim() != 3 or idx.shape[0] != B or idx.shape[1] not in (1, H):
        raise ValueError(f"idx must have shape ({B}, {H} or 1, K), got {tuple(idx.shape)}")
    idx = idx.expand(B, H, idx.shape[-1])
    keep = valid.gather(-1, idx)
    if slot_valid is not None:
        keep = keep & slot_valid.expand(idx.shape)
    lengths = keep.sum(-1).reshape(-1)
    src_rows = rows.gather(-1, idx)[keep]  # (b, h, k) order = segment order, tokens ascending
    return lengths, src_rows.numel(), key_src, value_src, src_rows, B, H
