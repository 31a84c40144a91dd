"""Storage methods (stage ``storage``): how kept tokens are stored. Importing this package registers them."""

from .quantized import KVInt4, KVInt8, QuantizedKVStorage, StorageMethod

__all__ = ["KVInt4", "KVInt8", "QuantizedKVStorage", "StorageMethod"]
