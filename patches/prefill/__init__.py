"""Prefill methods (stage ``prefill``). Importing this package registers them."""

from .base import PrefillMethod

__all__ = ["PrefillMethod"]
