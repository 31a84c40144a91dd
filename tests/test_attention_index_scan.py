"""The exact scan's compiled top-k selection (kernels/attention_index_scan.py) and the sort its results are written
out by (``_sort_desc``, kernels/attention_index_heap.py), pinned against numpy on inputs full of ties: the result is
the top-k by descending score, ties in the order the selection meets the keys (the strided groups of
``_top_of_scores``: key ``b``, ``b + nb``, ... for ``b = 0, 1, ...``), the rule of the float32 selection before its
``np.argsort`` was replaced; the bfloat16 selection's re-scored order follows it too (``np.argsort``'s quicksort
before, unspecified on ties)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("numba") is None,
                                reason="the index kernels need numba: pip install '.[retrieval]'")


def _met_order(n: int) -> np.ndarray:
    """The order ``_top_of_scores`` meets ``n`` keys in: group ``b`` of ``nb = min(SELECT_GROUPS, n)`` holds keys
    ``b, b + nb, b + 2 nb, ...``."""
    from kvaccel.kernels.attention_index_scan import SELECT_GROUPS

    nb = min(SELECT_GROUPS, n)
    return np.concatenate([np.arange(b, n, nb) for b in range(nb)]) if n else np.zeros(0, np.int64)


def _top(s: np.ndarray, k: int) -> np.ndarray:
    """Reference selection: the ids of the top ``k`` of ``s`` by descending score, ties in met order."""
    perm = _met_order(len(s))
    return perm[np.argsort(-s[perm], kind="stable")[:k]]


def _tied(rng, shape) -> np.ndarray:
    """float32 scores on a coarse grid (many ties; no -0.0, which the selection orders below 0.0 by its bits)."""
    return (np.round(rng.standard_normal(shape) * 2) / 2 + 0.0).astype(np.float32)


@pytest.mark.parametrize("m", [0, 1, 2, 15, 16, 17, 33, 100, 116, 257, 1000])
def test_sort_desc_is_numpys_stable_argsort(m):
    from kvaccel.kernels.attention_index_heap import _sort_desc

    rng = np.random.default_rng(m)
    for scores in (_tied(rng, m), rng.standard_normal(m).astype(np.float32),
                   np.where(rng.random(m) < 0.3, -np.inf, _tied(rng, m)).astype(np.float32)):
        ids = rng.permutation(m).astype(np.int64)
        order = np.argsort(-scores, kind="stable")
        want_ids, want_scores = ids[order], scores[order]
        tail = rng.standard_normal(5).astype(np.float32)  # items past m stay where they are
        s2, i2 = np.concatenate([scores, tail]), np.concatenate([ids, np.arange(5) + m])
        _sort_desc(i2, s2, m)
        np.testing.assert_array_equal(i2[:m], want_ids)
        np.testing.assert_array_equal(s2[:m], want_scores)
        np.testing.assert_array_equal(s2[m:], tail)


@pytest.mark.parametrize("n", [300, 2000])  # fewer keys than groups (met order = key order), and more
def test_float32_selection_order_on_ties(n):
    from kvaccel.kernels.attention_index_scan import _select_rows

    rng = np.random.default_rng(n)
    m = n + 7  # the scores buffer is wider than the row's keys
    scores = np.stack([_tied(rng, m), np.zeros(m, np.float32), rng.standard_normal(m).astype(np.float32)])[None]
    for k in (1, 50, 116):
        ids = np.empty((1, 3, k), np.int64)
        out = np.empty((1, 3, k), np.float32)
        _select_rows(scores, np.array([n]), ids, out)
        for g in range(3):
            want = _top(scores[0, g, :n], k)
            np.testing.assert_array_equal(ids[0, g], want, err_msg=f"k={k} g={g}")
            np.testing.assert_array_equal(out[0, g], scores[0, g, want])


def test_bfloat16_selection_rescored_order_on_ties():
    """Candidates: the best ``kc`` by the bfloat16 scores (ties in met order); result: the best ``k`` of them by the
    float32 re-scores, ties in candidate order. Integer keys and queries make every ``q · k`` exact in float32; the
    bfloat16 scores (given as bits) are a coarser grid, so both selections meet ties. A row with fewer keys than
    ``kc`` has every key re-scored, ``-1`` / ``-inf`` past them."""
    from kvaccel.kernels.attention_index_scan import _select_rescore_bf16

    rng = np.random.default_rng(0)
    R, M, D, cap, k, kc = 3, 2, 8, 1200, 100, 116
    n = np.array([1100, 400, 60])
    keys = rng.integers(-1, 2, (R, cap, D)).astype(np.float32)  # few distinct keys: many equal q · k
    qs = rng.integers(-2, 3, (R, M, D)).astype(np.float32)
    exact = np.einsum("rmd,rjd->rmj", qs, keys)
    coarse = (np.floor(exact / 3) * 3 + 0.0).astype(np.float32)  # exact in bfloat16 (small integers)
    bits = (coarse.view(np.uint32) >> 16).astype(np.uint16)
    ids = np.empty((R, M, k), np.int64)
    out = np.empty((R, M, k), np.float32)
    _select_rescore_bf16(bits, n, qs, keys, kc, ids, out)
    for r in range(R):
        for g in range(M):
            cand = _top(coarse[r, g, : n[r]], kc)
            want = cand[np.argsort(-exact[r, g, cand], kind="stable")][:k]
            got = ids[r, g, : len(want)]
            np.testing.assert_array_equal(got, want, err_msg=f"row {r} query {g}")
            np.testing.assert_array_equal(out[r, g, : len(want)], exact[r, g, want])
            assert (ids[r, g, len(want):] == -1).all() and np.isneginf(out[r, g, len(want):]).all()


def test_bfloat16_scan_of_a_row_with_few_keys_is_exact():
    """``scan_rows`` with a bfloat16 margin also takes rows of at most ``k + margin`` keys (every key re-scored in
    float32): the same ids and scores as the float32 scan."""
    from kvaccel.kernels.attention_index import AttentionIndex

    rng = np.random.default_rng(1)
    D, k, margin = 8, 10, 16
    index = AttentionIndex(2, D, D)
    held = [rng.integers(-3, 4, (c, D)).astype(np.float32) for c in (20, 7)]  # <= k + margin keys per row
    index.store(held, held, [np.arange(len(h)) for h in held])
    q = rng.integers(-3, 4, (2, 3, D)).astype(np.float32)
    want_ids, want_scores = index.scan_rows(q, k, None)
    ids, scores = index.scan_rows(q, k, margin)
    np.testing.assert_array_equal(scores, want_scores)
    np.testing.assert_array_equal(ids, want_ids)
    assert index._scan_keys is not None  # the bfloat16 pass ran
