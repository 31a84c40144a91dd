"""Eviction methods (stage ``evict``). Importing this package registers them."""

from .adakv import AdaKV
from .attention_gate import AttentionGate
from .base import EvictionMethod, ScoredEviction
from .critical import Critical
from .d2o import D2O
from .duo_attention import DuoAttention
from .expected_attention import ExpectedAttention
from .full import Full
from .h2o import H2O
from .keydiff import KeyDiff
from .keyformer import Keyformer
from .knorm import KNorm
from .kvzip import KVzip
from .pyramidkv import PyramidKV
from .snapkv import SnapKV
from .streaming import Streaming
from .tova import TOVA

__all__ = [
    "AdaKV", "D2O", "EvictionMethod", "ExpectedAttention", "Full", "H2O", "Keyformer", "PyramidKV", "ScoredEviction",
    "AttentionGate", "KVzip",
    "SnapKV", "Streaming",
    "Critical", "KNorm", "KeyDiff", "TOVA", "DuoAttention",
]
