"""Prefill methods (stage ``prefill``). Importing this package registers them."""

from .a_shape import AShape
from .base import BlockSelection, BlockSparsePrefill, PrefillMethod
from .flexprefill import FlexPrefill
from .minference import MInference
from .pbs import PBS
from .sale import SALE
from .seer import Seer
from .vertical_slash import VerticalSlash
from .xattention import XAttention

__all__ = ["AShape", "BlockSelection", "BlockSparsePrefill", "FlexPrefill", "MInference", "PBS", "PrefillMethod",
           "SALE", "Seer", "VerticalSlash", "XAttention"]
