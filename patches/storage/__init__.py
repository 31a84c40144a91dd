"""Storage methods (stage ``storage``): how kept tokens are stored. Importing this package registers them."""

from .quantized import KVFp8, KVInt4, KVInt8, QuantizedKVStorage, StorageMethod

__all__ = ["KVFp8", "KVInt4", "KVInt8", "QuantizedKVStorage", "StorageMethod"]
