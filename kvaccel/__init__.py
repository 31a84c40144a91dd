"""kvaccel: KV-cache eviction, sparse prefill and retrieval attention for Hugging Face causal LMs, in one call.

    model, tok = kvaccel.load_model()
    kvaccel.patch(model, "streaming", budget=256)
    model.generate(**tok("...", return_tensors="pt"), max_new_tokens=64)
    kvaccel.report(model)["kv_bytes"]
"""

from kvaccel.api import SUPPORTED_MODEL_TYPES, is_patched, patch, patched, paused, report, unpatch
from kvaccel.cache import KVAccelCache, KVAccelLayer
from kvaccel.config import Method, methods, parse_spec, register
from kvaccel.models import load_model

__version__ = "0.1.0"

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "KVAccelCache",
    "KVAccelLayer",
    "Method",
    "is_patched",
    "load_model",
    "methods",
    "parse_spec",
    "patch",
    "patched",
    "paused",
    "register",
    "report",
    "unpatch",
]
