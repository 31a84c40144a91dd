"""Prefill methods (stage ``prefill``): how the prompt's attention is computed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvaccel.config import Method

if TYPE_CHECKING:
    from kvaccel.patches.attention import AttentionContext


@dataclass
class PrefillMethod(Method):
    """Computes causal attention of a whole prompt; returns ``(B, q, H_q, D)`` like transformers' backends."""

    stage = "prefill"

    def attention(self, ctx: AttentionContext) -> torch.Tensor:
        raise NotImplementedError
