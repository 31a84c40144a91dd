"""Eviction methods (stage ``evict``). Importing this package registers them."""

from .base import EvictionMethod, ScoredEviction
from .d2o import D2O
from .full import Full
from .streaming import Streaming

__all__ = ["EvictionMethod", "Full", "ScoredEviction", "Streaming"]
