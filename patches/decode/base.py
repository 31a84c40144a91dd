"""Decode methods (stage ``decode``): how new tokens read the cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvaccel.config import Method

if TYPE_CHECKING:
    from kvaccel.patches.attention import AttentionContext


@dataclass
class DecodeMethod(Method):
    """Attention of new tokens over the kept cache; returns ``(B, q, H_q, D)``."""

    stage = "decode"

    def attention(self, ctx: AttentionContext) -> torch.Tensor:
        raise NotImplementedError
