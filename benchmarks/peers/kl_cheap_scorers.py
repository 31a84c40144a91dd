"""kvaccel's cheap scorers (issue 23) on kvpress' KL protocol: ``kvpress_vs_kvaccel.py`` with their rows added.

Same commands and windows as ``benchmarks/peers/README.md`` (``export-kl``, ``kl``, ``report-kl``); the rows are
kvpress' presses of the same name (``TOVAPress``, ``KnormPress``, ``KeyDiffPress``, ``CriticalKVPress`` over
``ExpectedAttentionPress(use_vnorm=False)`` / ``SnapKVPress``, kvpress' ``critical_*`` evaluation presses)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/peers/kl_cheap_scorers.py kl --framework kvaccel \\
        --prompts runs/kl-peers/kl_eval4.jsonl --out runs/kl-peers/kl_cheap.jsonl --threads 1 \\
        --methods snapkv,tova,knorm,keydiff,critical-expected_attention,critical-snapkv
    .venv/bin/python benchmarks/peers/kl_cheap_scorers.py report-kl runs/kl-peers/kl_cheap.jsonl
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kvpress_vs_kvaccel as peers  # noqa: E402

peers.KL_KVACCEL.update({
    "tova": "tova(budget={b})",
    "knorm": "knorm(budget={b})",
    "keydiff": "keydiff(budget={b})",
    "critical-expected_attention": "critical(scorer=expected_attention(use_vnorm=False), budget={b})",
    "critical-snapkv": "critical(scorer=snapkv, budget={b})",
})

if __name__ == "__main__":
    peers.main()
