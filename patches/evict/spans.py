"""Sliding span selection: keep the best contiguous spans of tokens wherever they start (no fixed chunk grid)."""

from __future__ import annotations

import torch

from .base import KEEP_SCORE

Tensor = torch.Tensor


def sliding_span_select(scores: Tensor, capacity: int, width: int) -> Tensor:
    """Span-preserving selection without a chunk grid: ``(B, H, capacity)`` token indices (unsorted).

    ``chunk_select`` cuts the tokens into fixed chunks, so a needle that straddles a chunk boundary is kept only in
    part when the second chunk's summed score is low. This rule, per sequence and head, on ``scores`` ``(B, H|1, N)``
    (``-inf`` = not a token, ``KEEP_SCORE`` = always kept, other scores >= 0):

    1. Tokens scored ``KEEP_SCORE`` are kept first.
    2. Repeatedly, the window of ``width`` consecutive slots whose *not yet kept* real tokens have the largest
       summed score is taken whole (its new tokens are kept); a window whose new tokens would exceed the rest of the
       budget gives only its best new tokens. Windows with no new token are skipped, so every step keeps at least
       one token and a span that was kept in part is completed by the next window over it when it scores best.
    3. When no window has a new token left, or the budget is used, selection stops; exactly ``capacity`` tokens are
       kept (or every real token when there are fewer).

    Steps run for all rows at once; at most ``capacity`` steps (each is O(N) per row).
    """
    if width < 2:
        raise ValueError(f"width ({width}) must be >= 2 for span selection; use top-k for per-token selection")
    B, H, N = scores.shape
    valid = scores > float("-inf")
    kept = valid & (scores >= KEEP_SCORE)
    budget = torch.full((B, H, 1), capacity, device=scores.device) - kept.sum(-1, keepdim=True)
    free_score = torch.where(valid & ~kept, scores.float().clamp_min(0.0), 0.0)
    w = min(width, N)
    starts = torch.arange(N - w + 1, device=scores.device)
    offsets = torch.arange(w, device=scores.device)
    for _ in range(capacity):
        open_ = budget > 0  # (B, H, 1)
        if not bool(open_.any()):
            break
        new = valid & ~kept
        # window sums of the new tokens' scores and counts, by cumulative sums (window j = slots j .. j+w-1)
        cs = torch.nn.functional.pad(torch.where(new, free_score, 0.0).cumsum(-1), (1, 0))
        cn = torch.nn.functional.pad(new.float().cumsum(-1), (1, 0))
        wsum = cs[..., w:] - cs[..., :-w]
        wcount = cn[..., w:] - cn[..., :-w]
        wsum = torch.where(wcount > 0, wsum, float("-inf"))
        best, j = wsum.max(-1, keepdim=True)  # (B, H, 1)
        take = open_ & (best > float("-inf"))
        if not bool(take.any()):
            break
        slots = (starts[j.squeeze(-1)][..., None] + offsets)  # (B, H, w)
        cand = new.gather(-1, slots)
        cand_score = torch.where(cand, free_score.gather(-1, slots), float("-inf"))
        # the window's best new tokens, at most the rest of the budget
        order = cand_score.argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(-1, order, offsets.expand_as(order))
        pick = cand & (rank < budget) & take
        kept = kept.scatter(-1, slots, kept.gather(-1, slots) | pick)
        budget = budget - pick.sum(-1, keepdim=True)
    # kept slots first (by position), then the rest: the first `capacity` indices are the kept ones
    key = torch.where(kept, 0, 1) * (N + 1) + torch.arange(N, device=scores.device)
    return key.argsort(dim=-1)[..., :capacity]
