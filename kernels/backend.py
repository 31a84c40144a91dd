"""Backend choice and input checks shared by the kernel ops (``decode_attention``, ``window_attention_scores``)."""

from __future__ import annotations

import os

import torch
from torch import Tensor

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, like: Tensor) -> str:
    """``"auto"`` -> Triton for CUDA tensors, PyTorch otherwise; an explicit ``"triton"`` needs a Triton device."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if like.is_cuda else "torch"
    if backend == "triton":
        require_triton_device(like)
    return backend


def require_triton_device(q: Tensor) -> None:
    """Triton runs CUDA tensors, or CPU tensors through the interpreter (``TRITON_INTERPRET=1``)."""
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors (got device {q.device}); on CPU set TRITON_INTERPRET=1 "
            "before triton is first imported, or use backend='torch'"
        )


def check_mask(name: str, m: Tensor | None, B: int, Hkv: int, T: int) -> None:
    """A validity mask is ``None`` or bool ``(B, H_kv | 1, T)``."""
    if m is None:
        return
    if m.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor, got dtype {m.dtype}")
    if m.dim() != 3 or m.shape[0] != B or m.shape[1] not in (1, Hkv) or m.shape[2] != T:
        raise ValueError(f"{name} must have shape ({B}, {Hkv} or 1, {T}), got {tuple(m.shape)}")
