"""SeerAttention's AttnGate: a tiny learned predictor of which 64x64 blocks of a prompt's attention matter.

https://arxiv.org/abs/2410.13276 (SeerAttention). Per layer, from pre-RoPE q/k pooled over blocks of ``B`` tokens::

    q̃ = RoPE_blk(avgpool(q) W_q)    k̃ = RoPE_blk([maxpool(k), minpool(k), avgpool(k)] W_k)
    gate = softmax(q̃ k̃ᵀ / sqrt(d_gate) + block-causal mask)              (B_blk x B_blk per head)

``W_q`` ``(H_q, D, d_gate)`` and ``W_k`` ``(H_kv, 3D, d_gate)`` are per-head linear maps (the reference's
``MultiHeadLinear``; K is mapped per kv head and shared by the query heads of its group, GQA), and ``RoPE_blk`` is a
RoPE of dimension ``d_gate`` (the model's ``rope_theta``) at block positions ``0, B, 2B, …`` (reference:
``position_ids[:, 0::block_size]``). Only relative block positions enter ``q̃ k̃ᵀ``, so the offset is irrelevant.

Self-distillation target (:func:`pooled_attention_target`): the true attention map max-pooled to ``B x B`` blocks,
rows renormalised to sum to 1, computed in query chunks — the ``(L, L)`` map is never held at once.

Pre-RoPE q/k: kvaccel's attention function receives q/k after RoPE (Qwen3: after ``q_norm``/``k_norm`` then RoPE,
the same place the gate reads them in the reference). RoPE is a rotation, so we undo it exactly with the forward's
own ``(cos, sin)`` tables (:func:`unrotate`), which the ``self_attn`` pre-hook keeps (``rope_tables``). This is
exact for any position ids (left padding included) and needs no copy of the model's projections.

Training length (measured on the default model: KL(target ‖ gate) on a held-out 8k prose prompt, mean over layers,
by query-block row). A gate trained on 4k-token sequences only does well on the rows a 4k prompt has (rows 16–63:
0.15–0.19) and worse on every later one (rows 64–79 / 80–95 / 96–111 / 112–127: 0.30 / 0.39 / 0.45 / 0.58). On those
rows its entropy keeps growing with the row (2.2 → 2.7 nats; the target's stays ~2.0) and the mass it gives the sink
block falls from 0.24 to 0.14 (true: 0.27 throughout): it spreads probability over far blocks it never had to rank.
Squeezing the block positions (position interpolation x0.75 / x0.5) does not help (rows ≥ 64: 0.43 / 0.42), so unseen
RoPE angles are not the whole cause. We keep the paper's design and train at the length the gate serves: the shipped
gate is trained on 8k-token sequences (the model's context), rows 64–127 0.19–0.21, rows 16–63 0.16–0.17, held-out KL
0.188 at 8k (4k-trained gate: 0.347) and 0.169 at 4k (0.168).

Files: ``gate.safetensors`` (weights) + ``gate.json`` (model name and fingerprint, shapes, training recipe).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kvaccel.gate_files import GateFile
from kvaccel.models import head_size, text_config
from kvaccel.rope import rotate_half, unrotate

FORMAT = "kvaccel-seer-gate/1"
MASK_VALUE = -1e9  # finite block-causal mask: KL terms of masked blocks stay 0 instead of 0 * inf = nan
DATA_DIR = Path(__file__).parent / "data"


# ------------------------------------------------------------------------------------------ block RoPE


@functools.lru_cache(maxsize=64)
def _block_rope_tables(n: int, d: int, block_size: int, theta: float, device: torch.device, dtype: torch.dtype):
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    pos = torch.arange(n, device=device, dtype=torch.float32) * block_size
    freqs = pos[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def block_rope(x: Tensor, block_size: int, theta: float) -> Tensor:
    """RoPE of dimension ``x.shape[-1]`` at block positions ``0, B, 2B, …``: ``x`` ``(..., n_blocks, d)``."""
    cos, sin = _block_rope_tables(x.shape[-2], x.shape[-1], block_size, float(theta), x.device, x.dtype)
    return x * cos + rotate_half(x) * sin


# ------------------------------------------------------------------------------------------ pooling and target


def _pad_to_blocks(x: Tensor, block_size: int, value: float) -> Tensor:
    pad = (-x.shape[-2]) % block_size
    return F.pad(x, (0, 0, 0, pad), value=value) if pad else x


def pool_blocks(x: Tensor, block_size: int, kinds: tuple[str, ...]) -> Tensor:
    """Pool ``x`` ``(B, H, L, D)`` over blocks of tokens: ``(B, H, ceil(L/bs), len(kinds)·D)``, kinds in max/min/avg.

    A ragged last block pools over its real tokens only (the reference's ``ceil_mode=True``).
    """
    B, H, L, D = x.shape
    n = -(-L // block_size)
    out = []
    for kind in kinds:
        if kind == "avg":
            s = _pad_to_blocks(x, block_size, 0.0).view(B, H, n, block_size, D).sum(3)
            counts = torch.full((n,), float(block_size), device=x.device, dtype=x.dtype)
            counts[-1] = L - (n - 1) * block_size
            out.append(s / counts[:, None])
        elif kind == "max":
            out.append(_pad_to_blocks(x, block_size, float("-inf")).view(B, H, n, block_size, D).amax(3))
        elif kind == "min":
            out.append(_pad_to_blocks(x, block_size, float("inf")).view(B, H, n, block_size, D).amin(3))
        else:
            raise ValueError(f"pooling kind ({kind!r}) must be one of 'max', 'min', 'avg'")
    return torch.cat(out, dim=-1)


def pooled_attention_target(
    q: Tensor, k: Tensor, scale: float, block_size: int = 64, chunk_blocks: int = 4
) -> Tensor:
    """The true causal attention map max-pooled to ``bs x bs`` blocks, rows renormalised (SeerAttention's target).

    ``q`` ``(B, H_q, L, D)``, ``k`` ``(B, H_kv, L, D)`` post-RoPE (GQA without repeating K). Computed
    ``chunk_blocks`` query blocks at a time over the causal key prefix only, so memory is
    ``O(chunk_blocks·bs·L)`` per head, never ``(L, L)``. Returns ``(B, H_q, nb, nb)`` float32; entries above the
    block diagonal are 0 and each row sums to 1.
    """
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    n = -(-L // block_size)
    out = q.new_zeros(B, Hq, n, n, dtype=torch.float32)
    rows = chunk_blocks * block_size
    kf = k.float()
    for r0 in range(0, L, rows):
        r1 = min(L, r0 + rows)
        qc = q[:, :, r0:r1].float().view(B, Hkv, G, r1 - r0, D)
        logits = torch.matmul(qc, kf[:, :, None, :r1].transpose(-1, -2)) * scale  # (B, Hkv, G, r, r1)
        causal = torch.arange(r1, device=q.device)[None, :] <= torch.arange(r0, r1, device=q.device)[:, None]
        probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
        probs = _pad_to_blocks(probs.transpose(-1, -2), block_size, 0.0).transpose(-1, -2)  # keys -> whole blocks
        probs = _pad_to_blocks(probs, block_size, 0.0)  # query rows -> whole blocks
        nq, nk = probs.shape[-2] // block_size, probs.shape[-1] // block_size
        pooled = probs.view(B, Hkv, G, nq, block_size, nk, block_size).amax(dim=(4, 6))
        b0 = r0 // block_size
        out[:, :, b0 : b0 + nq, :nk] = pooled.reshape(B, Hq, nq, nk)
    return out / out.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


# ------------------------------------------------------------------------------------------ the gate


class AttnGate(nn.Module):
    """One layer's AttnGate: pooled pre-RoPE q/k features -> block-attention logits ``(B, H_q, nb, nb)``.

    Parameters
    ----------
    num_q_heads, num_kv_heads, head_dim : int
        The attention layer's shape (GQA: ``num_q_heads`` a multiple of ``num_kv_heads``).
    hidden : int
        Gate dimension ``d_gate`` (reference: 128).
    block_size : int
        Tokens per block (reference: 64).
    rope_theta : float
        Base of the block-level RoPE (the model's).
    """

    q_pool = ("avg",)
    k_pool = ("max", "min", "avg")

    def __init__(
        self, num_q_heads: int, num_kv_heads: int, head_dim: int, hidden: int = 128, block_size: int = 64,
        rope_theta: float = 10000.0,
    ):
        super().__init__()
        if num_q_heads % num_kv_heads:
            raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.hidden, self.block_size, self.rope_theta = hidden, block_size, float(rope_theta)
        qi, ki = head_dim * len(self.q_pool), head_dim * len(self.k_pool)
        self.q_weight = nn.Parameter(torch.randn(num_q_heads, qi, hidden) * qi**-0.5)
        self.k_weight = nn.Parameter(torch.randn(num_kv_heads, ki, hidden) * ki**-0.5)

    def features(self, q_pre: Tensor, k_pre: Tensor) -> tuple[Tensor, Tensor]:
        """Pooled inputs: ``q_pre`` ``(B, H_q, L, D)`` -> ``(B, H_q, nb, D)``; ``k_pre`` -> ``(B, H_kv, nb, 3D)``."""
        return pool_blocks(q_pre, self.block_size, self.q_pool), pool_blocks(k_pre, self.block_size, self.k_pool)

    def forward(self, qf: Tensor, kf: Tensor) -> Tensor:
        """Block logits ``(B, H_q, nb, nb)`` (``MASK_VALUE`` above the block diagonal) from :meth:`features`."""
        dtype = self.q_weight.dtype
        qt = block_rope(torch.matmul(qf.to(dtype), self.q_weight), self.block_size, self.rope_theta)
        kt = block_rope(torch.matmul(kf.to(dtype), self.k_weight), self.block_size, self.rope_theta)
        B, Hq, n, d = qt.shape
        G = Hq // self.num_kv_heads
        logits = torch.matmul(qt.view(B, self.num_kv_heads, G, n, d), kt[:, :, None].transpose(-1, -2))
        logits = logits.reshape(B, Hq, n, n) / math.sqrt(d)
        causal = torch.ones(n, n, dtype=torch.bool, device=qt.device).tril()
        return logits.masked_fill(~causal, MASK_VALUE)

    def scores(self, q_pre: Tensor, k_pre: Tensor) -> Tensor:
        """Gate probabilities ``(B, H_q, nb, nb)`` (rows sum to 1 over causal blocks) from pre-RoPE q/k."""
        return torch.softmax(self(*self.features(q_pre, k_pre)), dim=-1)


def model_shape(model) -> dict[str, Any]:
    """Layers, heads, head dim and RoPE base of a transformers causal LM (what a gate for it must match)."""
    cfg = text_config(model)
    hq = cfg.num_attention_heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    return dict(
        num_layers=cfg.num_hidden_layers,
        num_q_heads=hq,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or hq,
        head_dim=head_size(cfg),
        rope_theta=float(theta or getattr(cfg, "rope_theta", 10000.0)),
    )


class SeerGate(GateFile, nn.Module):
    """The AttnGates of every layer of one model, with the metadata saved beside the weights.

    ``meta`` holds ``model_name``, ``model_fingerprint`` (see :mod:`kvaccel.models`), the shapes, ``block_size``,
    ``hidden`` and the training ``recipe``.
    """

    LABEL = "SeerAttention gate"
    FORMAT = FORMAT
    REQUIRED = ("model_name", "model_fingerprint", "num_layers", "num_q_heads", "num_kv_heads", "head_dim", "hidden",
                "block_size", "rope_theta")
    TRAIN_KIND = "seer"
    DATA_DIR = DATA_DIR
    SHIPPED_PREFIX = "seer_gate"

    def __init__(self, meta: dict[str, Any]):
        super().__init__()
        self.meta = dict(meta)
        self.layers = nn.ModuleList(
            AttnGate(meta["num_q_heads"], meta["num_kv_heads"], meta["head_dim"], meta["hidden"], meta["block_size"],
                     meta["rope_theta"])
            for _ in range(meta["num_layers"])
        )

    @classmethod
    def for_model(cls, model, hidden: int = 128, block_size: int = 64, recipe: dict | None = None) -> SeerGate:
        """A freshly initialised gate shaped for ``model``."""
        from kvaccel.models import model_fingerprint, model_name

        meta = dict(format=FORMAT, model_name=model_name(model), model_fingerprint=model_fingerprint(model),
                    hidden=hidden, block_size=block_size, q_pool=list(AttnGate.q_pool),
                    k_pool=list(AttnGate.k_pool), recipe=recipe or {}, **model_shape(model))
        return cls(meta)

    @property
    def block_size(self) -> int:
        return self.meta["block_size"]


shipped_gate_dir = SeerGate.shipped_dir  # the name seer.py, the benchmarks and the tests import

__all__ = ["AttnGate", "SeerGate", "block_rope", "model_shape", "pool_blocks", "pooled_attention_target",
           "shipped_gate_dir", "unrotate"]
