"""Channel-pruning methods (stage ``channels``). Importing this package registers them."""

from .base import ChannelMethod

__all__ = ["ChannelMethod"]
