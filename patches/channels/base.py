"""Channel methods (stage ``channels``): which key channels stay in the cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvaccel.config import Method

if TYPE_CHECKING:
    from kvaccel.patches.attention import AttentionContext


@dataclass
class ChannelMethod(Method):
    """Prunes key channels of cached tokens (stored narrow); runs after the eviction method."""

    stage = "channels"

    def after_prefill(self, ctx: AttentionContext) -> None:
        """After the prompt was attended (and evicted): prune channels of the layer."""

    def after_decode(self, ctx: AttentionContext) -> None:
        """After one decode step."""
