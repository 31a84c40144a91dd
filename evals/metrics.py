"""Metrics for the eval harness: answer matching, fidelity to the full-cache model, perplexity, latency summaries.

Answer scores follow RULER (https://arxiv.org/abs/2404.06654, ``scripts/eval/synthetic/constants.py``):
case-insensitive substring matching of each expected answer in the prediction. Fidelity metrics compare a
compressed run with the reference (full KV cache) run on the same prompt.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "greedy_match",
    "kl_divergence",
    "perplexity",
    "string_match_all",
    "string_match_part",
    "summarize",
    "top1_agreement",
    "wilson_interval",
]


def _answers(answers: str | Sequence[str]) -> list[str]:
    """_answers: the expected answers as a non-empty list of strings."""
    if isinstance(answers, str):
        answers = [answers]
    answers = list(answers)
    if not answers:
        raise ValueError("answers is empty: nothing to match the prediction against")
    return answers


def string_match_all(prediction: str, answers: str | Sequence[str]) -> float:
    """string_match_all: fraction of the answers found in the prediction (RULER's niah/vt/cwe/fwe metric).

    ``sum(a.lower() in prediction.lower() for a in answers) / len(answers)``, in ``[0, 1]``.
    """
    answers = _answers(answers)
    pred = prediction.lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


def string_match_part(prediction: str, answers: str | Sequence[str]) -> float:
    """string_match_part: 1.0 if any answer is found in the prediction, else 0.0 (RULER's QA metric)."""
    pred = prediction.lower()
    return float(any(a.lower() in pred for a in _answers(answers)))


def _same_shape(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str]) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} {tuple(a.shape)} and {names[1]} {tuple(b.shape)} must have the same shape")


def kl_divergence(logits_ref: torch.Tensor, logits_test: torch.Tensor) -> torch.Tensor:
    """kl_divergence: KL(P_ref || P_test) per position from logits, in float64.

    ``sum_v p_ref(v) * (log p_ref(v) - log p_test(v))`` with ``log p = log_softmax(logits)``; entries where
    ``p_ref = 0`` (e.g. ``-inf`` logits) contribute 0.

    Parameters
    ----------
    logits_ref, logits_test : torch.Tensor
        ``(..., V)`` logits of the reference and the tested run (same shape).

    Returns
    -------
    torch.Tensor
        ``(...)`` float64, in nats.
    """
    _same_shape(logits_ref, logits_test, ("logits_ref", "logits_test"))
    logp = torch.log_softmax(logits_ref.to(torch.float64), dim=-1)
    logq = torch.log_softmax(logits_test.to(torch.float64), dim=-1)
    p = logp.exp()
    terms = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))
    return terms.sum(dim=-1)


def top1_agreement(logits_ref: torch.Tensor, logits_test: torch.Tensor) -> float:
    """top1_agreement: fraction of positions where both runs have the same argmax token.

    ``logits_ref`` and ``logits_test``: ``(..., V)``, same shape.
    """
    _same_shape(logits_ref, logits_test, ("logits_ref", "logits_test"))
    if logits_ref.numel() == 0:
        raise ValueError(f"top1_agreement needs at least one position, got logits of shape {tuple(logits_ref.shape)}")
    return (logits_ref.argmax(dim=-1) == logits_test.argmax(dim=-1)).double().mean().item()


def _token_list(tokens: Sequence[int] | torch.Tensor, name: str) -> list[int]:
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() > 1 and tokens.shape[0] == 1:
            tokens = tokens[0]
        if tokens.dim() != 1:
            raise ValueError(f"{name} must be 1-D (or (1, T)), got shape {tuple(tokens.shape)}")
        return tokens.tolist()
    return list(tokens)


def greedy_match(tokens_ref: Sequence[int] | torch.Tensor, tokens_test: Sequence[int] | torch.Tensor) -> dict:
    """greedy_match: how far the tested greedy generation follows the reference one.

    Returns ``prefix_match`` (number of leading tokens equal), ``fraction`` (positions equal, over the reference
    length; 1.0 when both are empty), ``n_ref`` and ``n_test`` (lengths).
    """
    ref, test = _token_list(tokens_ref, "tokens_ref"), _token_list(tokens_test, "tokens_test")
    equal = [a == b for a, b in zip(ref, test, strict=False)]
    prefix = next((i for i, e in enumerate(equal) if not e), len(equal))
    fraction = sum(equal) / len(ref) if ref else float(not test)
    return {"prefix_match": prefix, "fraction": fraction, "n_ref": len(ref), "n_test": len(test)}


def perplexity(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> float:
    """perplexity: ``exp(mean NLL)`` of the targets under the logits, in float64.

    Alignment is the caller's: ``logits[..., t, :]`` scores ``targets[..., t]`` (for a causal LM pass
    ``logits[:, :-1]`` and ``input_ids[:, 1:]``).

    Parameters
    ----------
    logits : torch.Tensor
        ``(..., T, V)``.
    targets : torch.Tensor
        ``(..., T)`` token ids; positions equal to ``ignore_index`` are left out (HF's -100 label convention).
    mask : torch.Tensor | None, default None
        ``(..., T)`` bool or 0/1: True / 1 = position scored, False / 0 = ignored.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} must be targets {tuple(targets.shape)} plus a vocab dim")
    keep = targets != ignore_index
    if mask is not None:
        if mask.shape != targets.shape:
            raise ValueError(f"mask {tuple(mask.shape)} must have the shape of targets {tuple(targets.shape)}")
        keep = keep & mask.bool()
    if not keep.any():
        raise ValueError("perplexity: every position is ignored (mask / ignore_index), nothing to score")
    logp = torch.log_softmax(logits.to(torch.float64), dim=-1)
    nll = -logp.gather(-1, targets.clamp_min(0).long().unsqueeze(-1)).squeeze(-1)
    return math.exp(nll[keep].mean().item())


def summarize(values: Sequence[float] | torch.Tensor | np.ndarray) -> dict:
    """summarize: median, mean, p10, p90, min, max and n of repeated measurements (e.g. latencies).

    Percentiles interpolate linearly (numpy's default).
    """
    x = np.asarray(values.tolist() if isinstance(values, torch.Tensor) else values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("summarize needs at least one value, got none")
    if not np.isfinite(x).all():
        raise ValueError(f"summarize got non-finite values: {x[~np.isfinite(x)].tolist()}")
    p10, p50, p90 = np.percentile(x, [10, 50, 90])
    return {
        "median": float(p50),
        "mean": float(x.mean()),
        "p10": float(p10),
        "p90": float(p90),
        "min": float(x.min()),
        "max": float(x.max()),
        "n": int(x.size),
    }


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """wilson_interval: Wilson score interval of a proportion ``successes / n`` (95% for ``z = 1.96``).

    ``(p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)``; unlike ``p ± z·sqrt(p(1-p)/n)`` it stays inside
    [0, 1] and is not empty at ``p = 0`` or ``1`` -- what small-sample accuracy tables need. ``(nan, nan)`` for n=0.
    """
    if n <= 0:
        return float("nan"), float("nan")
    if not 0 <= successes <= n:
        raise ValueError(f"successes ({successes}) must be in [0, n={n}]")
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)
