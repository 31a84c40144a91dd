"""Channel-pruning methods (stage ``channels``). Importing this package registers them."""

from .base import ChannelMethod
from .think import ThinK

__all__ = ["ChannelMethod", "ThinK"]
