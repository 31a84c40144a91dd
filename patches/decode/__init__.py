"""Decode methods (stage ``decode``). Importing this package registers them."""

from .base import DecodeMethod
from .retrieval import Retrieval

__all__ = ["DecodeMethod", "Retrieval"]
