"""A-shape (MInference baseline): every query block reads the sink blocks and a local band of key blocks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvaccel.checks import check_int
from kvaccel.config import register
from kvaccel.kernels.block_sparse_attention import first_query_block, num_blocks

from .base import BlockSelection, BlockSparsePrefill, validate_blocks


@register
@dataclass
class AShape(BlockSparsePrefill):
    """A-shape: sink + local band of key blocks for every query block (StreamingLLM's pattern, at prefill).

    https://arxiv.org/abs/2407.02490 (MInference, the A-shape baseline) — query block ``i`` reads key blocks
    ``[0, sink_blocks)`` and ``(i - local_blocks, i]``; token-level causal inside the diagonal block. The pattern
    depends on positions only, so a chunked prefill computes exactly the unchunked tiles.

    Parameters
    ----------
    sink_blocks : int
        Leading key blocks every query reads. Default 2 (128 tokens: MInference's A-shape ``n_init=128``,
        ``minference/models_patch.py``).
    local_blocks : int
        Key blocks of the local band, the diagonal one included. Default 16 (1024 tokens). MInference's A-shape
        uses ``n_local=3968`` (sink + band = 4096 tokens), sized for 128k-token prompts: at 4k it would be dense,
        so we keep a quarter of a 4k prompt.
    block_size : int
        Query and key block size (tokens). Default 64.
    min_length, backend
        See :class:`BlockSparsePrefill`.
    """

    name = "a_shape"
    sink_blocks: int = 2
    local_blocks: int = 16
    block_size: int = 64

    def __post_init__(self):
        super().__post_init__()
        for f in ("sink_blocks", "local_blocks"):
            val = getattr(self, f)
            check_int(f, val, 0 if f == "sink_blocks" else 1)
        validate_blocks(self, block_size=self.block_size)

    def select(self, q, k, v, scale, layer_idx) -> BlockSelection:
        L, bs = k.shape[2], self.block_size
        n = num_blocks(L, bs)
        i = torch.arange(first_query_block(L, q.shape[2], bs), n, device=q.device)  # a chunk's query blocks
        j = torch.arange(n, device=q.device)[None, :]
        mask = (j < self.sink_blocks) | ((j <= i[:, None]) & (j > i[:, None] - self.local_blocks))
        return BlockSelection(mask[None, None], bs, bs)
