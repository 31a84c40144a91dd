"""Eviction methods (stage ``evict``). Importing this package registers them."""

from .base import EvictionMethod, ScoredEviction
from .full import Full
from .streaming import Streaming

__all__ = ["EvictionMethod", "ScoredEviction", "Full", "Streaming"]
