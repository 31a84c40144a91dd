"""Decode methods (stage ``decode``). Importing this package registers them."""

from .base import DecodeMethod
from .quest import Quest
from .retrieval import Retrieval

__all__ = ["DecodeMethod", "Quest", "Retrieval"]
