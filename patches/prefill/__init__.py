"""Prefill methods (stage ``prefill``). Importing this package registers them."""

from .a_shape import AShape
from .base import BlockSelection, BlockSparsePrefill, PrefillMethod
from .pbs import PBS
from .sale import SALE
from .seer import Seer
from .vertical_slash import VerticalSlash
from .xattention import XAttention

__all__ = ["AShape", "BlockSelection", "BlockSparsePrefill", "PBS", "PrefillMethod", "SALE", "Seer", "VerticalSlash",
           "XAttention"]
