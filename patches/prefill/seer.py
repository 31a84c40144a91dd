"""SeerAttention (method ``seer``): a trained AttnGate picks the 64x64 attention blocks to compute at prefill."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvaccel.checks import check_int, check_number
from kvaccel.config import register
from kvaccel.kernels.block_sparse_attention import first_query_block
from kvaccel.rope import rotary_embedding

from .base import BlockSelection, BlockSparsePrefill
from .seer_gate import SeerGate, pooled_attention_target, unrotate

Tensor = torch.Tensor
DEFAULT_THRESHOLD = 1e-2
MODES = ("gate", "oracle")


@register
@dataclass
class Seer(BlockSparsePrefill):
    """SeerAttention: a learned AttnGate scores 64x64 blocks; keep those above τ (or a target density).

    https://arxiv.org/abs/2410.13276 — ``gate = softmax(q̃ k̃ᵀ/√d_gate + block-causal mask)`` from block-pooled
    pre-RoPE q/k (see :mod:`seer_gate`); keep block ``(i, j)`` iff ``gate_ij >= τ`` (threshold mode) or ``j`` is among
    the ``ceil(density·(i+1))`` highest-scoring causal blocks of row ``i`` (density mode: every row keeps the same
    fraction of its causal blocks, so the overall density is ``density``; the reference instead takes a fixed top-k
    of ``1 - sqrt(1 - nz_ratio)`` blocks per row). The last ``dense_last_rows`` query-block rows are computed densely
    (reference: ``dense_mask[:, :, -2:, :] = True``); the base adds every diagonal tile.

    The default τ=0.01 is about the 80%-sparsity point at 8k on the default model; thresholding beats a fixed per-row
    density (heads differ in how many blocks they need). Densities, fidelity and per-layer error for each τ, with
    their commands: ``docs/results.md``, section 7.

    ``mode="oracle"`` scores blocks with the *true* attention max-pooled to blocks (computed in query chunks, as
    dense as full attention: for testing the method and kernel, not for speed). It scores whole prompts only: later
    chunks of a chunked prefill are computed densely, with a note in ``report()``.

    Chunked prefill (gate mode): a later chunk's query blocks are scored against every key so far (the keys
    un-rotated with the model's RoPE at their positions, consecutive up to the chunk's last token), so it selects
    exactly what the unchunked prompt selects for the rows of its whole query blocks; a block split by the chunk
    boundary pools its rows in the chunk. The ``dense_last_rows`` are the last rows of each forward.

    Parameters
    ----------
    threshold : float | None
        τ in ``[0, 1)`` on the gate's per-row block probabilities; ``0`` keeps every block. Default
        ``0.01`` when neither threshold nor density is given (the paper uses 5e-4 … 5e-3 on 32k-token prompts of
        7B+ models, whose rows spread over many more blocks).
    density : float | None
        Target fraction of causal blocks in ``(0, 1]`` (top-k per row); exclusive with ``threshold``.
    weights : str | None
        Gate directory (``gate.safetensors`` + ``gate.json``); default the gate shipped for the model, if any.
    mode : str
        ``"gate"`` (trained AttnGate) or ``"oracle"`` (true pooled attention).
    dense_last_rows : int
        Query-block rows at the end of the prompt computed densely. Default 2 (reference).
    min_length, backend
        See :class:`BlockSparsePrefill`.
    """

    name = "seer"
    threshold: float | None = None
    density: float | None = None
    weights: str | None = None
    mode: str = "gate"
    dense_last_rows: int = 2

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in MODES:
            raise ValueError(f"mode ({self.mode!r}) must be one of {MODES}")
        if self.threshold is not None and self.density is not None:
            raise ValueError(
                f"threshold ({self.threshold}) and density ({self.density}) are exclusive; give one of them"
            )
        t = self.threshold
        if t is not None:
            check_number("threshold", t, 0, 1, high_open=True, why="gate probability; 0 keeps every block")
        d = self.density
        if d is not None:
            check_number("density", d, 0, 1, low_open=True, why="fraction of causal blocks kept")
        r = self.dense_last_rows
        check_int("dense_last_rows", r, 0, why="query-block rows")
        if self.weights is not None and self.mode == "oracle":
            raise ValueError(f"weights ({self.weights!r}) are unused with mode='oracle'; drop one of them")
        self._gate: SeerGate | None = None

    @property
    def block_size(self) -> int:
        return self._gate.block_size if self._gate is not None else 64

    def bind(self, model) -> None:
        if self.mode == "oracle":
            return
        gate = SeerGate.trained_for(model, self.weights, "seer",
                                     hint=" (or use mode='oracle' to test with true attention)")
        param = next(model.parameters())
        self._gate = gate.to(param.device).eval().requires_grad_(False)
        self._rotary = rotary_embedding(model)  # RoPE tables of the cached keys' positions (a later prompt chunk)

    def extend_blocker(self, ctx) -> str | None:
        if self.mode == "oracle":
            return "seer(mode='oracle') scores whole prompts only"
        return super().extend_blocker(ctx)

    # ------------------------------------------------------------------------------------------ attention

    def select_inputs(self, ctx) -> tuple[Tensor, ...]:
        """The gate reads pre-RoPE q/k: un-rotated with the forward's own RoPE tables (none in oracle mode)."""
        if self.mode == "oracle":
            return ()
        from kvaccel.patches.attention import rope_tables

        if self._gate is None:
            raise RuntimeError("seer: the gate is not loaded; patch the model with kvaccel.patch(model, 'seer')")
        rope = rope_tables(ctx)
        if rope is None:
            raise RuntimeError(
                f"seer: {type(ctx.module).__name__} got no RoPE tables (position_embeddings) in its forward; the gate "
                "needs pre-RoPE q/k, so it supports RoPE models (Llama, Qwen, Mistral...)"
            )
        Lq, L = ctx.query.shape[2], ctx.key.shape[2]
        return unrotate(ctx.query, *rope), unrotate(ctx.key, *(rope if Lq == L else self._key_tables(ctx)))

    def _key_tables(self, ctx) -> tuple[Tensor, Tensor]:
        """RoPE ``(cos, sin)`` ``(B|1, L, D)`` of every key of a later prompt chunk's forward: positions consecutive up
        to the chunk's last token (``position_ids[:, -1] - L + 1 + j``), from the model's rotary embedding."""
        pos = ctx.state.position_ids
        if self._rotary is None or pos is None or pos.dim() != 2:
            raise RuntimeError(
                "seer: a later prompt chunk needs the RoPE of the cached keys: the model's rotary embedding "
                "(model.model.rotary_emb) and 2-D position_ids in the forward; this model/forward has "
                f"{'no rotary embedding' if self._rotary is None else 'no 2-D position_ids'}"
            )
        L = ctx.key.shape[2]
        keys = pos[:, -1:] - (L - 1) + torch.arange(L, device=pos.device)
        return self._rotary(ctx.key, keys)

    def block_scores(self, q: Tensor, k: Tensor, scale: float, layer_idx: int, *pre: Tensor) -> Tensor:
        """Per-row block scores ``(B, H_q, nq, nb)`` (probabilities over causal blocks) of the query blocks holding
        ``q`` (the last positions of ``k``); ``pre`` = pre-RoPE (q, k) for the gate."""
        if self.mode == "oracle":
            return pooled_attention_target(q, k, scale, self.block_size)
        gate = self._gate.layers[layer_idx]
        q_pre, k_pre = pre
        Lq, L = q_pre.shape[2], k_pre.shape[2]
        if Lq == L:
            return gate.scores(q_pre, k_pre)
        # a later chunk: pool its rows on the prompt's block grid (the first block over its rows in the chunk),
        # place them at their block positions, score every block row (block-level, cheap) and keep the chunk's
        bs = self.block_size
        i0 = first_query_block(L, Lq, bs)
        shift = L - Lq - i0 * bs
        qf, kf = gate.features(torch.nn.functional.pad(q_pre, (0, 0, shift, 0)), k_pre)
        qf[:, :, 0] *= min(bs, Lq + shift) / (min(bs, Lq + shift) - shift)  # the mean over the real rows only
        qf = torch.nn.functional.pad(qf, (0, 0, i0, 0))  # (B, H_q, nb, D): empty rows before the chunk
        return torch.softmax(gate(qf, kf), dim=-1)[:, :, i0:]

    def select(self, q: Tensor, k: Tensor, v: Tensor, scale: float, layer_idx: int, *pre: Tensor) -> BlockSelection:
        scores = self.block_scores(q, k, scale, layer_idx, *pre)
        bs = self.block_size
        return BlockSelection(self.mask_from_scores(scores), bs, bs)

    def mask_from_scores(self, scores: Tensor) -> Tensor:
        """Bool block mask ``(B, H_q, nq, nb)`` from the block scores of the last ``nq`` block rows (threshold or
        per-row density; the last rows dense)."""
        nq, n = scores.shape[-2:]
        if self.density is not None:
            cols = torch.arange(n, device=scores.device)
            rows = cols[n - nq :]  # block row of each score row
            keep_k = torch.clamp(torch.ceil(self.density * (rows + 1).double()).long(), min=1)  # per row
            order = scores.argsort(dim=-1, descending=True, stable=True)
            rank = torch.empty_like(order).scatter_(-1, order, cols.expand_as(order).contiguous())
            mask = rank < keep_k[:, None]
        else:
            tau = DEFAULT_THRESHOLD if self.threshold is None else self.threshold
            mask = scores >= tau
        if self.dense_last_rows:
            mask[..., max(0, nq - self.dense_last_rows) :, :] = True
        return mask

