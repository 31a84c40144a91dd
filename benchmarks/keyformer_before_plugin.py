"""``--plugin`` for ``benchmarks/decode_eviction.py``: registers ``keyformer_before``, Keyformer with its decode-step
scoring at the process's thread count (as before commit 091add0, which runs it in ``base.one_thread``), so both
run side by side in one process::

    python benchmarks/decode_eviction.py --plugin benchmarks/keyformer_before_plugin.py \\
        --method "keyformer_before(budget=0.25)" --method "keyformer(budget=0.25)"
"""

import contextlib
from dataclasses import dataclass

import kvaccel.patches.evict.keyformer as kf
from kvaccel.config import register


@register
@dataclass
class KeyformerBefore(kf.Keyformer):
    """Keyformer without the one-thread decode scoring (for timing only)."""

    name = "keyformer_before"

    def accumulate(self, ctx) -> None:
        real = kf.one_thread
        kf.one_thread = lambda enabled=True: contextlib.nullcontext()
        try:
            super().accumulate(ctx)
        finally:
            kf.one_thread = real
