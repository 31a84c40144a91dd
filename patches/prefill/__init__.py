"""Prefill methods (stage ``prefill``). Importing this package registers them."""

from .a_shape import AShape
from .base import BlockSelection, BlockSparsePrefill, PrefillMethod

__all__ = ["AShape", "BlockSelection", "BlockSparsePrefill", "PrefillMethod"]
