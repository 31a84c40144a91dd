"""Named presets: the recommended settings of a method, asked for by name.

``kvaccel.patch(model, "expected_attention_needles")`` or ``kvaccel --method expected_attention_needles`` stands for
the method spec string of that preset; options override its settings (``expected_attention_needles(budget=0.5)``,
or ``kvaccel.patch(model, "expected_attention_needles", budget=0.5)``). Presets compose with other stages like
methods (``"seer_accurate+expected_attention_needles"``). The measurements behind each are in docs/results.md.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    """A name for a method spec string, with a one-line summary of what it is for."""

    name: str
    spec: str
    summary: str


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "expected_attention_needles",
            "expected_attention(budget=0.25,observation_weight=1.0,observation_pooling='forward',"
            "observation_kernel=15,chunk=16,span_rule='sliding')",
            "question-aware retrieval at a 25% budget: keeps whole 16-token spans around what the question reads "
            "(0.97 of full's right NIAH + passkey answers at 1k, 1.00 at 2k)",
        ),
        Preset(
            "expected_attention_kl",
            "expected_attention(future_positions='mixture',observation_weight=0.2)",
            "lowest KL of expected attention on kvpress' protocol (0.73x ExpectedAttentionPress at compression "
            "0.5 and 0.75)",
        ),
        Preset(
            "kvzip_window",
            "kvzip(observation_window=128)",
            "KVzip plus the prompt's last 128 queries: 0.62x / 0.51x the KL of kvpress' KVzipPress at "
            "compression 0.5 / 0.75",
        ),
        Preset(
            "seer_accurate",
            "seer(threshold=0.005)",
            "SeerAttention at half the default threshold: prefill attention 2.00x faster than SDPA at 8k with 5.3% "
            "mean output error (default: 2.69x, 9.1%)",
        ),
        Preset(
            "minference_fast",
            "minference(budget=0.22)",
            "MInference's per-head patterns re-picked at a 22% tile budget from the shipped search: time to first "
            "token 1.60-1.63x at 8k with continuation KL 0.0095 (default: 1.38x, 0.0026)",
        ),
        Preset(
            "retrieval_128k",
            "retrieval(ef_per_key=0.0052)",
            "retrieval with a longer search list for ~128k-token caches: recall@100 >= 0.9 on both measured layers "
            "(0.911 / 0.966), attention step 5.36x / 5.85x faster than dense",
        ),
    )
}


def presets() -> list[dict[str, str]]:
    """Every preset: name, the spec string it expands to, and a one-line summary."""
    return [{"name": p.name, "spec": p.spec, "summary": p.summary} for p in PRESETS.values()]
