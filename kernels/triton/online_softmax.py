"""online_softmax_step (Triton): the tile update every flash-style kernel here shares.

Base-2 online softmax (logits already multiplied by ``log2(e) * scale``): with the running row maxima ``m_i``, sums
``l_i`` and output accumulator ``acc``, one tile of masked logits ``s`` (``-inf`` = not attended) and its values ``v``
update ``m_i ← max(m_i, max_j s_ij)``, ``l_i ← l_i·2^(m_old − m_i) + Σ_j 2^(s_ij − m_i)``,
``acc ← acc·2^(m_old − m_i) + 2^(s − m_i) @ v``. A row that has seen no key yet keeps ``m = -inf`` and subtracts 0
instead (no ``-inf − -inf`` NaN).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def online_softmax_step(s, v, m_i, l_i, acc, INPUT_PRECISION: tl.constexpr):
    """One tile: ``s`` (M, N) masked base-2 logits, ``v`` (N, Dv); returns the updated ``(acc, l_i, m_i)``."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
    return acc, l_i, m_new
