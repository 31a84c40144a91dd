"""lse_merge: hand-computed case, reference agreement, exact split of full attention, empty parts."""

import math

import pytest
import torch

from kvaccel.kernels.lse_merge import lse_merge, lse_merge_reference


def _attend(q, k, v, scale):
    logits = (q @ k.transpose(-1, -2)) * scale
    return torch.softmax(logits, -1) @ v, torch.logsumexp(logits, -1)


def test_hand_computed():
    # part a: one key with logit 0 and value [1, 0]; part b: one key with logit ln 3 and value [0, 1]
    o_a, lse_a = torch.tensor([[1.0, 0.0]]), torch.tensor([0.0])
    o_b, lse_b = torch.tensor([[0.0, 1.0]]), torch.tensor([math.log(3.0)])
    o, lse = lse_merge(o_a, lse_a, o_b, lse_b)
    torch.testing.assert_close(o, torch.tensor([[0.25, 0.75]]))
    torch.testing.assert_close(lse, torch.tensor([math.log(4.0)]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_equals_full_attention(dtype):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 1, 16), torch.randn(2, 3, 40, 16), torch.randn(2, 3, 40, 8)
    full, lse_full = _attend(q, k, v, 0.25)
    perm = torch.randperm(40)
    a, b = perm[:13], perm[13:]
    o_a, l_a = _attend(q, k[:, :, a], v[:, :, a], 0.25)
    o_b, l_b = _attend(q, k[:, :, b], v[:, :, b], 0.25)
    o, lse = lse_merge(o_a.to(dtype), l_a, o_b.to(dtype), l_b)
    assert o.dtype == dtype and lse.dtype == torch.float32
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(o.float(), full, **tol)
    torch.testing.assert_close(lse, lse_full, atol=1e-5, rtol=1e-5)
    ref, lse_ref = lse_merge_reference(o_a, l_a, o_b, l_b)
    torch.testing.assert_close(ref.float(), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_ref.float(), lse_full, atol=1e-5, rtol=1e-5)


def test_empty_parts():
    o_a = torch.tensor([[1.0, 2.0], [float("nan"), 0.0], [5.0, 5.0]])
    lse_a = torch.tensor([0.5, float("-inf"), float("-inf")])
    o_b = torch.tensor([[float("nan"), 1.0], [3.0, 4.0], [7.0, 7.0]])
    lse_b = torch.tensor([float("-inf"), 1.0, float("-inf")])
    o, lse = lse_merge(o_a, lse_a, o_b, lse_b)
    torch.testing.assert_close(o, torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]]))
    torch.testing.assert_close(lse, torch.tensor([0.5, 1.0, float("-inf")]))
    ref, lse_ref = lse_merge_reference(o_a, lse_a, o_b, lse_b)
    torch.testing.assert_close(ref.float(), o)
    torch.testing.assert_close(lse_ref.float(), lse)


def test_out_and_bad_shapes():
    o_a, o_b = torch.randn(4, 8), torch.randn(4, 8)
    l_a, l_b = torch.randn(4), torch.randn(4)
    out = torch.empty(4, 8)
    res, _ = lse_merge(o_a, l_a, o_b, l_b, out=out)
    assert res.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, lse_merge_reference(o_a, l_a, o_b, l_b)[0].float())
    with pytest.raises(ValueError, match="o_b"):
        lse_merge(o_a, l_a, torch.randn(4, 7), l_b)
    with pytest.raises(ValueError, match="lse_a"):
        lse_merge(o_a, torch.randn(4, 8), o_b, l_b)
