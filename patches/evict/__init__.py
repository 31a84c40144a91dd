"""Eviction methods (stage ``evict``). Importing this package registers them."""

from .adakv import AdaKV
from .attention_gate import AttentionGate
from .base import EvictionMethod, ScoredEviction
from .d2o import D2O
from .expected_attention import ExpectedAttention
from .full import Full
from .h2o import H2O
from .keyformer import Keyformer
from .kvzip import KVzip
from .pyramidkv import PyramidKV
from .snapkv import SnapKV
from .streaming import Streaming

__all__ = [
    "AdaKV", "D2O", "EvictionMethod", "ExpectedAttention", "Full", "H2O", "Keyformer", "PyramidKV", "ScoredEviction",
    "AttentionGate", "KVzip",
    "SnapKV", "Streaming",
]
