"""RoPE helpers: undoing transformers' rotation (:func:`unrotate`), and key re-rotation (:class:`RopeShift`).

Key re-rotation: cached post-RoPE keys moved to the positions of their cache slots (StreamingLLM's endless streams).

RoPE rotates each channel pair ``(c, c + D/2)`` of a key at position ``p`` by ``p·θ_c``, so a key cached at
position ``p`` is moved to position ``s`` by one more rotation by ``(s − p)·θ_c`` (rotations compose). With
``rerotate=True`` a token-eviction method keeps **slot ``s`` of the cache at RoPE position ``s``**: a new token
(key and query alike) is rotated from its true position to its slot, and an eviction that moves a kept key from slot
``i`` to slot ``j`` rotates it by ``j − i``. Positions the attention sees therefore stay below the cache size, however
many tokens were generated: as StreamingLLM (https://arxiv.org/abs/2309.17453, §3.2: "positions within the cache"),
a model can generate past ``max_position_embeddings`` with a bounded cache.

Angles are computed in float64 (``delta · θ`` for deltas of millions of positions), the rotation in float32, the
result stored in the cache's dtype. Supported RoPE variants: those with a constant ``inv_freq`` over the whole
head dimension (``default``, ``linear``, ``llama3``, ``yarn``; yarn's attention factor is already in the keys);
position-dependent frequencies (``dynamic``, ``longrope``) and partial rotary dimensions are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvaccel.models import head_size, text_config

Tensor = torch.Tensor

#: RoPE types whose frequencies do not depend on the sequence length (a rotation by a delta is exact)
CONSTANT_FREQUENCY_ROPE = ("default", "linear", "llama3", "yarn")


def rotate_half(x: Tensor) -> Tensor:
    """``P x`` with ``P`` the RoPE quarter turn of transformers' half-split layout: ``[x1, x2] -> [-x2, x1]``."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def unrotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Invert transformers' ``apply_rotary_pos_emb``: ``x`` ``(B, H, L, D)`` post-RoPE -> pre-RoPE, in ``x``'s dtype.

    ``y = x·cos + P(x)·sin`` is a rotation scaled by ``cos² + sin²`` (1, or the ``attention_scaling`` of YaRN-like
    RoPE), so ``x = (y·cos − P(y)·sin) / (cos² + sin²)``, exact for any position ids (left padding included).
    ``cos``/``sin``: the forward's tables ``(B|1, L, D)`` (the head axis is added, as ``apply_rotary_pos_emb`` does)
    or already ``(B|1, 1|H, L, D)``.
    """
    if cos.dim() == x.dim() - 1:
        cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return (x * cos - rotate_half(x) * sin) / (cos * cos + sin * sin)


def rotary_embedding(model) -> torch.nn.Module | None:
    base = getattr(model, "model", model)
    for holder in (base, getattr(base, "language_model", None), getattr(model, "get_decoder", lambda: None)()):
        rotary = getattr(holder, "rotary_emb", None)
        if rotary is not None:
            return rotary
    return None


@dataclass
class RopeShift:
    """Rotations by position deltas for one model: ``inv_freq`` ``(D / 2,)`` float64 (the model's frequencies)."""

    inv_freq: Tensor

    @classmethod
    def from_model(cls, model) -> RopeShift:
        """The model's RoPE frequencies; ``ValueError`` when its RoPE cannot be re-rotated exactly."""
        rotary = rotary_embedding(model)
        if rotary is None or not isinstance(getattr(rotary, "inv_freq", None), Tensor):
            raise ValueError(
                f"rerotate=True needs a model with rotary position embeddings (model.model.rotary_emb.inv_freq); "
                f"{type(model).__name__} has none: use rerotate=False"
            )
        rope_type = getattr(rotary, "rope_type", "default")
        if rope_type not in CONSTANT_FREQUENCY_ROPE:
            raise ValueError(
                f"rerotate=True needs RoPE frequencies that do not change with the sequence length "
                f"({', '.join(CONSTANT_FREQUENCY_ROPE)}); this model uses '{rope_type}': use rerotate=False"
            )
        head_dim = head_size(text_config(model))
        if 2 * rotary.inv_freq.numel() != head_dim:
            raise ValueError(
                f"rerotate=True needs RoPE over the whole head ({head_dim} channels); this model rotates "
                f"{2 * rotary.inv_freq.numel()} (partial rotary): use rerotate=False"
            )
        return cls(inv_freq=rotary.inv_freq.detach().double())

    def rotate(self, x: Tensor, delta: Tensor) -> Tensor:
        """``x`` ``(B, H, T, D)`` rotated by ``delta`` ``(B, H|1, T)`` positions (``rotate_half`` convention)."""
        angles = delta.to(device=x.device, dtype=torch.float64)[..., None] * self.inv_freq.to(x.device)
        cos, sin = angles.cos().float(), angles.sin().float()  # (B, H|1, T, D/2)
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    def place_new_tokens(self, layer, query: Tensor, positions: Tensor) -> Tensor:
        """Move the ``q`` tokens just written to the last slots of ``layer`` (keys, in place) and their queries
        ``(B, H_q, q, D)`` from their true ``positions`` ``(1|B, q)`` to their slot positions; returns the query."""
        q_len, n = query.shape[2], layer.keys.shape[2]
        slots = torch.arange(n - q_len, n, device=query.device)
        delta = (slots - positions.to(query.device)).expand(query.shape[0], q_len)[:, None, :]  # (B, 1, q)
        if not bool(delta.any()):
            return query
        new = layer.keys[:, :, n - q_len :]
        new.copy_(self.rotate(new, delta))
        return self.rotate(query, delta)

    def move_kept(self, keys: Tensor, idx: Tensor) -> None:
        """After an eviction: ``keys`` ``(B, H, K, D)`` (in place) came from slots ``idx`` ``(B, H|1, K)`` and now
        sit in slots ``0..K-1``."""
        delta = torch.arange(idx.shape[-1], device=idx.device) - idx
        keys.copy_(self.rotate(keys, delta))
