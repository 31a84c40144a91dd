"""Full cache: no eviction (the baseline, explicit)."""

from __future__ import annotations

from dataclasses import dataclass

from kvaccel.config import register

from .base import EvictionMethod


@register
@dataclass
class Full(EvictionMethod):
    """Full cache: keep every token (the full-attention baseline)."""

    name = "full"
