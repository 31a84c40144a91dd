"""Decode methods (stage ``decode``). Importing this package registers them."""

from .base import DecodeMethod

__all__ = ["DecodeMethod"]
