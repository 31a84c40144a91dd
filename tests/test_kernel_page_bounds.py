"""Tests for kvaccel.kernels.page_bounds (Quest): page bounds, scores, selection and page attention against loops in
float64; the compiled CPU kernels (page_bounds_numba) against the PyTorch compositions they replace and the loops;
Triton kernels under the interpreter (``triton`` marker, as tests/test_kernel_decode_attention.py)."""

from __future__ import annotations

import pytest
import torch

from kvaccel.kernels import page_bounds as page_bounds_module
from kvaccel.kernels.decode_attention import decode_attention_reference
from kvaccel.kernels.page_bounds import (
    append_page_bounds,
    attend_pages,
    page_attention,
    page_attention_reference,
    page_bounds,
    page_bounds_reference,
    page_scores,
    page_scores_reference,
    page_slots,
    select_attend,
    select_pages,
    select_top_pages,
)

from conftest import TRITON_DEVICE, requires_triton

P = 4


@pytest.fixture(params=["compiled", "pytorch"])
def cpu_path(request, monkeypatch):
    """Run a test on the compiled CPU kernels, and again on the PyTorch ops (as without numba, or for bf16)."""
    if request.param == "pytorch":
        monkeypatch.setattr(page_bounds_module, "_numba_kernels", lambda: None)
    else:
        assert page_bounds_module._numba_kernels() is not None, "numba is installed in the test environment"
    return request.param


def _inputs(B=2, Hkv=2, G=3, N=37, D=16, padded=True, seed=0, dtype=torch.float32):
    """Keys/values/query; the last row left-padded by 5 slots (its pages start at slot 5), a hole in row 0 (B > 1)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, N, D + 4, generator=g).to(dtype)
    q = torch.randn(B, Hkv * G, 1, D, generator=g).to(dtype)
    valid = offset = None
    if padded:
        valid = torch.ones(B, 1, N, dtype=torch.bool)
        valid[-1, :, :5] = False
        offset = torch.zeros(B, dtype=torch.long)
        offset[-1] = 5
        if B > 1:
            valid[0, :, 9] = False
    return q, k, v, valid, offset


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_page_bounds_match_loops(padded, dtype):
    q, k, _, valid, offset = _inputs(padded=padded, dtype=dtype)
    kmin, kmax, count = page_bounds(k, P, valid, offset)
    rmin, rmax, rcount = page_bounds_reference(k, P, valid, offset)
    assert kmin.dtype == dtype and kmin.shape == rmin.shape == (2, 2, 10, 16)
    torch.testing.assert_close(kmin.double(), rmin, rtol=0, atol=0)  # min/max are exact in the keys' dtype
    torch.testing.assert_close(kmax.double(), rmax, rtol=0, atol=0)
    assert torch.equal(count.expand_as(rcount), rcount)
    if padded:
        assert count[1, 0, -1] == 0 and count[1, 0, 0] == 4 and count[0, 0, 2] == 3  # slot 9: a hole in page 2


@pytest.mark.parametrize("seed", range(20))
def test_page_score_bounds_every_key_of_its_page(seed):
    """U >= q·k for every real key of the page (the property selection rests on), and U == q·k for a one-token
    page (the bound is tight there, so it is not a loose constant)."""
    g = torch.Generator().manual_seed(seed)
    B, Hkv, G, N, D = 1, 2, 2, 29, 8
    k = torch.randn(B, Hkv, N, D, generator=g) * (1 + 3 * torch.rand(1, generator=g))
    q = torch.randn(B, Hkv * G, 1, D, generator=g)
    kmin, kmax, count = page_bounds(k, P, None, None)
    U = page_scores(q, kmin, kmax, count)  # (B, H_q, NP)
    qk = torch.einsum("bhd,bhnd->bhn", q[:, :, 0].double(), k.double().repeat_interleave(G, 1))
    page_of = torch.arange(N) // P
    assert (U.double()[:, :, page_of] >= qk - 1e-5).all()
    assert (U.double()[:, :, page_of] - qk).max() > 0.1  # pages of several tokens: a strict bound somewhere
    torch.testing.assert_close(U[:, :, -1].double(), qk[:, :, -1], atol=1e-5, rtol=1e-5)  # page 7: slot 28 alone


@pytest.mark.parametrize("padded", [False, True])
def test_page_scores_match_paper_formula(padded):
    q, k, _, valid, offset = _inputs(padded=padded)
    kmin, kmax, count = page_bounds(k, P, valid, offset)
    s = page_scores(q, kmin, kmax, count)
    ref = page_scores_reference(q, kmin, kmax, count)
    assert torch.equal(torch.isinf(s), torch.isinf(ref)) and torch.isinf(s).any() == padded  # empty pages: -inf
    fin = torch.isfinite(ref)
    torch.testing.assert_close(s.double()[fin], ref[fin], atol=1e-5, rtol=1e-5)


def test_group_scores_are_the_sum_over_the_kv_heads_query_heads():
    q, k, _, valid, offset = _inputs(padded=True)
    kmin, kmax, count = page_bounds(k, P, valid, offset)
    s = page_scores(q, kmin, kmax, count, group=True)
    ref = page_scores_reference(q, kmin, kmax, count).view(2, 2, 3, -1).sum(2)
    assert s.shape == (2, 2, 10) and torch.equal(torch.isinf(s), torch.isinf(ref))
    fin = torch.isfinite(ref)
    torch.testing.assert_close(s.double()[fin], ref[fin], atol=1e-5, rtol=1e-5)


def test_append_equals_build_from_scratch(cpu_path):
    """Appending tokens one at a time (pages filling, new pages, padded and invalid tokens) gives the bounds a
    build over all tokens gives, and counts each row's real tokens."""
    q, k, _, valid, offset = _inputs(N=37)
    n0 = 13
    kmin, kmax, count = page_bounds(k[:, :, :n0], P, valid[:, :, :n0], offset)
    cap = 12
    bufs = [torch.zeros(*t.shape[:2], cap, *t.shape[3:], dtype=t.dtype) for t in (kmin, kmax, count)]
    for buf, t in zip(bufs, (kmin, kmax, count), strict=True):
        buf[:, :, : t.shape[2]] = t
    valid = valid.clone()
    valid[0, :, 20] = False  # a token that is not real arrives: its page ignores it
    real = count[:, 0].sum(-1, dtype=torch.long)
    for t in range(n0, 37):
        append_page_bounds(*bufs, k[:, :, t], (t - offset) // P, valid[:, :, t], real)
    rmin, rmax, rcount = page_bounds_reference(k, P, valid, offset)
    assert real.tolist() == valid[:, 0].sum(-1).tolist() == [35, 32]
    NP = rmin.shape[2]
    torch.testing.assert_close(bufs[0][:, :, :NP].double(), rmin, rtol=0, atol=0)
    torch.testing.assert_close(bufs[1][:, :, :NP].double(), rmax, rtol=0, atol=0)
    assert torch.equal(bufs[2][:, :, :NP].expand_as(rcount), rcount)


def test_select_pages_equals_naive_top_k():
    g = torch.Generator().manual_seed(3)
    B, Hq, NP = 3, 4, 11
    scores = torch.randn(B, Hq, NP, generator=g)
    scores[2, :, 8:] = float("-inf")  # a shorter row: its last pages are empty
    pages = torch.tensor([4, 1, 6])
    last = torch.tensor([10, 3, 7])
    idx, keep = select_pages(scores, pages, last)
    for b in range(B):
        for h in range(Hq):
            order = sorted((j for j in range(NP) if j != last[b] and scores[b, h, j] > float("-inf")),
                           key=lambda j: -float(scores[b, h, j]))
            want = {int(last[b]), *order[: int(pages[b]) - 1]}
            assert set(idx[b, h][keep[b, h]].tolist()) == want
    assert keep.sum(-1).tolist() == [[4] * Hq, [1] * Hq, [6] * Hq]


def _selection(q, k, valid, offset, pages=(3, 2), group=False):
    N = k.shape[2]
    kmin, kmax, count = page_bounds(k, P, valid, offset)
    s = page_scores(q, kmin, kmax, count, group=group)
    off = offset if offset is not None else torch.zeros(k.shape[0], dtype=torch.long)
    idx, keep = select_pages(s, torch.tensor(pages), (N - 1 - off) // P)
    return page_slots(idx, keep, P, off, N, valid)


@pytest.mark.parametrize("blocks", [None, P])
@pytest.mark.parametrize("group", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_page_attention_equals_dense_over_selected_tokens(padded, group, blocks):
    """Also with the pages copied as blocks (``page_size``): the partial last page read as the last P slots."""
    q, k, v, valid, offset = _inputs(padded=padded)
    slots, ok = _selection(q, k, valid, offset, group=group)
    assert ok.view(*ok.shape[:2], -1, P)[..., 0].any()  # a page whose first slot is attended...
    assert ((slots.view(*slots.shape[:2], -1, P).diff(dim=-1)) == 1).all()  # ...and every page: P consecutive slots
    if padded:  # padding slots are never attended
        assert not (ok[1] & (slots[1] < 5)).any() and not (ok[0] & (slots[0] == 9)).any()
    out = page_attention(q, k, v, slots, ok, scale=0.25, page_size=blocks)
    torch.testing.assert_close(out.double(), page_attention_reference(q, k, v, slots, ok, scale=0.25),
                               atol=1e-5, rtol=1e-5)
    # and the reference is dense attention with every unselected slot masked
    sel = torch.zeros(*slots.shape[:2], 37, dtype=torch.int32).scatter_add_(-1, slots, ok.int()) > 0  # clamped
    sel = sel.repeat_interleave(6 // slots.shape[1], dim=1)  # slots repeat; a group's heads share its row
    for h in range(6):
        dense = decode_attention_reference(q[:, h : h + 1], k[:, h // 3 : h // 3 + 1], v[:, h // 3 : h // 3 + 1],
                                           scale=0.25, valid=sel[:, h : h + 1])[0]
        torch.testing.assert_close(out[:, h : h + 1].double(), dense.double(), atol=1e-5, rtol=1e-5)


def test_query_heads_of_a_kv_head_select_their_own_pages():
    """GQA "head" (the reference's): heads sharing a kv head may read other pages; "group": one selection per kv
    head, by the group's summed scores."""
    q, k, v, _, _ = _inputs(padded=False, seed=1)
    slots, ok = _selection(q, k, None, None, pages=(2, 2))
    chosen = [frozenset(slots[0, h][ok[0, h]].tolist()) for h in range(6)]
    assert any(len({chosen[h] for h in range(g * 3, g * 3 + 3)}) > 1 for g in range(2))
    slots, ok = _selection(q, k, None, None, pages=(2, 2), group=True)
    assert slots.shape[1] == 2 and ok.sum(-1).eq(P + 1).all()  # one full page + the last page (slot 36 alone)


def test_every_page_selected_equals_dense_attention():
    q, k, v, valid, offset = _inputs(padded=True)
    slots, ok = _selection(q, k, valid, offset, pages=(10, 10))
    out = page_attention(q, k, v, slots, ok, scale=0.25)
    torch.testing.assert_close(out, decode_attention_reference(q, k, v, scale=0.25, valid=valid)[0].float(),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("value_narrow", [False, True])
def test_page_attention_over_a_narrow_segment(value_narrow):
    """Slots below Tn read ThinK's narrow keys (q[channel_idx]) and values; equal to zero-filled keys in float64."""
    g = torch.Generator().manual_seed(4)
    q, k, v, _, _ = _inputs(padded=False)
    B, Hkv, Tn, D, Dk = 2, 2, 21, 16, 10
    kn = torch.randn(B, Hkv, Tn, Dk, generator=g)
    cidx = torch.stack([torch.randperm(D, generator=g)[:Dk].sort().values for _ in range(B * Hkv)]).view(B, Hkv, Dk)
    vidx = torch.stack([torch.randperm(20, generator=g)[:7].sort().values for _ in range(B * Hkv)]).view(B, Hkv, 7)
    vn = torch.randn(B, Hkv, Tn, 7 if value_narrow else 20, generator=g)
    N = Tn + k.shape[2]
    slot = torch.stack([torch.randperm(N, generator=g)[:30] for _ in range(B * 6)]).view(B, 6, 30)
    ok = torch.rand(B, 6, 30, generator=g) > 0.2
    kw = dict(k_narrow=kn, channel_idx=cidx, v_narrow=vn, value_idx=vidx if value_narrow else None)
    out = page_attention(q, k, v, slot, ok, scale=0.25, **kw)
    torch.testing.assert_close(out.double(), page_attention_reference(q, k, v, slot, ok, scale=0.25, **kw),
                               atol=1e-5, rtol=1e-5)


def _bounds_with_spare_pages(k, valid, offset, spare=3):
    """Page bounds in buffers with ``spare`` pages of NaN past the real ones (as Quest's layer state holds them):
    a kernel that read past its pages would turn its output into NaN."""
    kmin, kmax, count = page_bounds(k, P, valid, offset)
    NP = kmin.shape[2]
    out = []
    for t in (kmin, kmax, count):
        buf = torch.full((*t.shape[:2], NP + spare, *t.shape[3:]), float("nan") if t.is_floating_point() else 7,
                         dtype=t.dtype)
        buf[:, :, :NP] = t
        out.append(buf[:, :, :NP])
    return out


def _spare_slots(t, spare=5):
    """``t`` as the first slots of a buffer whose ``spare`` slots past them hold NaN (as a cache layer's keys)."""
    buf = torch.full((*t.shape[:2], t.shape[2] + spare, *t.shape[3:]), float("nan"), dtype=t.dtype)
    buf[:, :, : t.shape[2]] = t
    return buf[:, :, : t.shape[2]]


@pytest.mark.parametrize("group", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("pages", [(3, 2), (1, 1), (10, 12)])
def test_select_top_pages_equals_scores_then_top_k(cpu_path, padded, group, pages):
    """The same pages (as a set; the last page first) and the same kept flags as select_pages over page_scores,
    from bounds held in a buffer with spare pages; a budget above the pages keeps every non-empty page."""
    q, k, _, valid, offset = _inputs(padded=padded)
    off = offset if offset is not None else torch.zeros(2, dtype=torch.long)
    kmin, kmax, count = _bounds_with_spare_pages(k, valid, offset)
    last = (k.shape[2] - 1 - off) // P
    ref_idx, ref_keep = select_pages(page_scores(q, kmin, kmax, count, group=group), torch.tensor(pages), last)
    idx, keep = select_top_pages(q, kmin, kmax, count, torch.tensor(pages), last, group=group)
    assert idx.shape == ref_idx.shape == (2, 2 if group else 6, min(max(pages), 10))
    assert torch.equal(idx[..., 0], last[:, None].expand_as(idx[..., 0])) and keep[..., 0].all()
    assert torch.equal(keep.sum(-1), ref_keep.sum(-1))
    for b in range(2):
        for r in range(idx.shape[1]):
            assert set(idx[b, r][keep[b, r]].tolist()) == set(ref_idx[b, r][ref_keep[b, r]].tolist()), (b, r)


@pytest.mark.parametrize("group", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_attend_pages_equals_reference_over_the_pages_slots(cpu_path, padded, group):
    """attend_pages = page_attention_reference over page_slots' slots, keys and values read from buffers whose
    spare slots are NaN; ``attended`` adds each row's real tokens (= its ok slots)."""
    q, k, v, valid, offset = _inputs(padded=padded)
    off = offset if offset is not None else torch.zeros(2, dtype=torch.long)
    kmin, kmax, count = page_bounds(k, P, valid, offset)
    idx, keep = select_pages(page_scores(q, kmin, kmax, count, group=group), torch.tensor([3, 2]),
                             (k.shape[2] - 1 - off) // P)
    slots, ok = page_slots(idx, keep, P, off, k.shape[2], valid)
    attended = torch.full(idx.shape[:2], 5, dtype=torch.long)
    out = attend_pages(q, _spare_slots(k), _spare_slots(v), idx, keep, page_size=P, offset=off, scale=0.25,
                       valid=valid, attended=attended)
    assert out.dtype == q.dtype and out.shape == (2, 6, 1, 20)
    torch.testing.assert_close(out.double(), page_attention_reference(q, k, v, slots, ok, scale=0.25),
                               atol=1e-5, rtol=1e-5)
    assert torch.equal(attended, 5 + ok.sum(-1))


@pytest.mark.parametrize("group", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_select_attend_equals_select_then_attend(cpu_path, padded, group):
    """A Quest step in one call equals the two ops (the float64 reference over the selected pages' slots)."""
    q, k, v, valid, offset = _inputs(padded=padded, seed=5)
    off = offset if offset is not None else torch.zeros(2, dtype=torch.long)
    kmin, kmax, count = _bounds_with_spare_pages(k, valid, offset)
    pages, last = torch.tensor([3, 2]), (k.shape[2] - 1 - off) // P
    idx, keep = select_pages(page_scores(q, kmin, kmax, count, group=group), pages, last)
    slots, ok = page_slots(idx, keep, P, off, k.shape[2], valid)
    attended = torch.zeros(idx.shape[:2], dtype=torch.long)
    out = select_attend(q, kmin, kmax, count, pages, last, _spare_slots(k), _spare_slots(v), page_size=P, offset=off,
                        scale=0.25, valid=valid, group=group, attended=attended)
    torch.testing.assert_close(out.double(), page_attention_reference(q, k, v, slots, ok, scale=0.25),
                               atol=1e-5, rtol=1e-5)
    assert torch.equal(attended, ok.sum(-1))


def test_bad_input():
    q, k, v, valid, offset = _inputs()
    with pytest.raises(ValueError, match="page_size"):
        page_bounds(k, 0)
    with pytest.raises(ValueError, match="offset"):
        page_bounds(k, P, valid, torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match="valid"):
        page_bounds(k, P, valid[:, :, :5], offset)
    kmin, kmax, count = page_bounds(k, P, valid, offset)
    with pytest.raises(ValueError, match="multiple"):
        page_scores(q[:, :5], kmin, kmax, count)
    slots, ok = _selection(q, k, valid, offset)
    with pytest.raises(ValueError, match="slots"):
        page_attention(q, k, v, slots[:, :4], ok[:, :4], scale=0.25)
    with pytest.raises(ValueError, match="backend"):
        page_scores(q, kmin, kmax, count, backend="cuda")


@pytest.mark.triton
@requires_triton
@pytest.mark.parametrize("group", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("shape", [(2, 2, 3, 37, 16), (1, 3, 1, 70, 24)])
def test_triton_page_scores_and_attention(padded, shape, group):
    B, Hkv, G, N, D = shape
    q, k, v, valid, offset = _inputs(B=B, Hkv=Hkv, G=G, N=N, D=D, padded=padded)
    q, k, v = (t.to(TRITON_DEVICE) for t in (q, k, v))
    kmin, kmax, count = page_bounds(k, P, valid, offset)
    s = page_scores(q, kmin, kmax, count, backend="triton")
    ref = page_scores_reference(q, kmin, kmax, count)
    assert torch.equal(torch.isinf(s), torch.isinf(ref))
    fin = torch.isfinite(ref)
    torch.testing.assert_close(s.double()[fin], ref[fin], atol=1e-5, rtol=1e-5)
    pages = (3, 2) if B == 2 else (4,)
    slots, ok = _selection(q, k, valid, offset, pages=pages, group=group)
    out = page_attention(q, k, v, slots, ok, scale=D**-0.5, backend="triton")
    torch.testing.assert_close(out.double(), page_attention_reference(q, k, v, slots, ok, scale=D**-0.5),
                               atol=1e-5, rtol=1e-5)


def test_compiled_kernels_refuse_indices_outside_the_cache():
    """The compiled kernels index without bounds checks: pages, last pages, offsets and selected pages outside the
    cache, and inputs off the CPU, are refused with the values named, before any kernel runs."""
    q, k, v, valid, offset = _inputs()
    kmin, kmax, count = page_bounds(k, P, valid, offset)
    with pytest.raises(ValueError, match=r"last \(\[9, 10\]\) in \[0, 10\)"):
        select_top_pages(q, kmin, kmax, count, torch.tensor([2, 2]), torch.tensor([9, 10]))
    with pytest.raises(ValueError, match="pages"):
        select_attend(q, kmin, kmax, count, torch.tensor([0, 2]), torch.tensor([9, 7]), k, v, page_size=P,
                      offset=offset, scale=0.25, valid=valid)
    with pytest.raises(ValueError, match="offset"):
        select_attend(q, kmin, kmax, count, torch.tensor([2, 2]), torch.tensor([9, 7]), k, v, page_size=P,
                      offset=torch.tensor([0, 37]), scale=0.25, valid=valid)
    idx, keep = torch.tensor([[[9, 10]] * 6, [[7, 0]] * 6]), torch.ones(2, 6, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="outside the 37 tokens"):
        attend_pages(q, k, v, idx, keep, page_size=P, offset=offset, scale=0.25, valid=valid)
    keep[0, :, 1] = False  # an unselected entry may hold anything
    attend_pages(q, k, v, idx, keep, page_size=P, offset=offset, scale=0.25, valid=valid)
    with pytest.raises(ValueError, match="on meta while q, k and v are on the CPU"):  # raw host memory is read
        select_attend(q, kmin, kmax, count.to("meta"), [2, 2], [9, 7], k, v, page_size=P, offset=offset, scale=0.25)
