"""SALE: the INT4 estimator and its block test (PyTorch path, Triton kernel, float64 reference), the prefill method,
the thresholds file and its calibration."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from prefill_helpers import padded_batch_and_alone
from typer.testing import CliRunner

import kvaccel
from kvaccel.kernels.block_sparse_attention import block_sparse_attention, causal_block_mask
from kvaccel.kernels.sale_estimate import (
    sale_block_scores,
    sale_estimate,
    sale_estimate_reference,
    sale_prepare,
    sale_quantize,
)
from kvaccel.models import model_fingerprint
from kvaccel.patches.prefill.sale import SALE, calibrate, load_thresholds, rethreshold, write_thresholds

from conftest import TRITON_DEVICE, requires_triton, tiny_model, tiny_saved_model


def _qk(L=300, Hq=4, Hkv=2, D=32, seed=0, spread=0.6):
    """Queries/keys with a shared offset (what centring removes) and a few keys that draw attention."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, Hq, L, D, generator=g) * spread + 0.8
    k = torch.randn(1, Hkv, L, D, generator=g) * spread - 0.5
    hot = torch.randint(0, L, (L // 25,), generator=g)
    k[:, :, hot] += 2.0 * q.mean((1, 2), keepdim=True)[:, 0] - 1.0  # keys aligned with the mean query
    return q, k


# ---------------------------------------------------------------------------------------------- estimator
def test_quantize_hand_case():
    xi, s = sale_quantize(torch.tensor([[1.4, -0.7, 0.0, 0.35], [0.0, 0.0, 0.0, 0.0]]), bits=4)
    torch.testing.assert_close(s, torch.tensor([0.2, 1.0]))
    assert xi.dtype == torch.int8
    assert xi.tolist() == [[7, -4, 0, 2], [0, 0, 0, 0]]  # -3.5 rounds to even; an all-zero token keeps scale 1
    with pytest.raises(ValueError, match="bits"):
        sale_quantize(torch.zeros(2, 4), bits=1)


def test_estimate_tracks_exact_logits():
    """The dequantized INT4 estimate of the centred logits is close to the exact float ones."""
    q, k = _qk(L=256, Hq=2, Hkv=1, D=64)
    scale = 64**-0.5
    p = sale_prepare(q, k, scale=scale)
    est = scale * (p["sq"][..., :, None] * p["sk"][..., None, :] * (p["qi"].float() @ p["ki"].float().transpose(-1, -2))
                   + p["bias"][..., None, :])
    exact = scale * q @ (k - k.mean(2, keepdim=True)).transpose(-1, -2)
    err = (est - exact).abs()
    assert err.max() < 0.15 * exact.abs().max()
    assert torch.corrcoef(torch.stack([est.flatten(), exact.flatten()]))[0, 1] > 0.99


def test_selection_recalls_important_blocks():
    """Blocks whose exact max relative score is well above τ are kept by the INT4 estimate."""
    q, k = _qk(L=640, Hq=2, Hkv=1, D=64, seed=3)
    scale, tau = 64**-0.5, 0.02
    keep = sale_estimate(q, k, scale=scale, threshold=tau, backend="torch")
    # exact-score selection: same definition with 8-bit "quantization" of nearly exact values
    _, exact_scores = sale_estimate_reference(q, k, scale=scale, threshold=tau, bits=8)
    must = exact_scores > math.log(2 * tau)
    assert must.any() and (~must & torch.isfinite(exact_scores)).any()
    assert keep[must].float().mean() >= 0.95


@pytest.mark.parametrize("L,Hq,Hkv,D", [(520, 4, 2, 32), (513, 3, 1, 16), (640, 2, 2, 64)])
def test_torch_path_matches_reference(L, Hq, Hkv, D):
    q, k = _qk(L, Hq, Hkv, D, seed=L)
    scale = D**-0.5
    taus = torch.tensor([0.05, 0.0, 0.01, 0.2][:Hq])
    keep_ref, scores_ref = sale_estimate_reference(q, k, scale=scale, threshold=taus)
    keep = sale_estimate(q, k, scale=scale, threshold=taus, backend="torch", chunk=128)
    assert keep.shape == keep_ref.shape
    # the CPU path's bf16 GEMM rounds the scaled operands (2^-9): only blocks within 0.05 of log τ may differ
    margin = (scores_ref - torch.log(taus.clamp(min=1e-30).double()).view(1, -1, 1, 1)).abs() < 0.05
    assert ((keep != keep_ref) & ~margin).sum() == 0
    assert keep[0, 1].equal(keep_ref[0, 1])  # τ = 0: dense head, every causal tile
    assert 0 < keep.float().mean() < 1
    scores = sale_block_scores(q, k, scale=scale, chunk=128)
    fin = torch.isfinite(scores_ref)
    assert torch.equal(torch.isfinite(scores), fin)
    torch.testing.assert_close(scores[fin].double(), scores_ref[fin], atol=0.05, rtol=0.01)


def test_torch_path_worker_threads():
    """With 2 intra-op threads the estimate's chunks run on 2 worker threads: the same mask and scores as 1 thread
    (two batch rows, a ragged tail, a dense head), and the caller's thread count is restored."""
    q, k = _qk(L=650, Hq=4, Hkv=2, D=32, seed=5)
    q, k = torch.cat([q, q.flip(2)]), torch.cat([k, k.flip(2)])
    taus = torch.tensor([0.05, 0.0, 0.01, 0.2])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        keep1 = sale_estimate(q, k, scale=32**-0.5, threshold=taus, backend="torch", chunk=128)
        scores1 = sale_block_scores(q, k, scale=32**-0.5, chunk=128)
        torch.set_num_threads(2)
        keep2 = sale_estimate(q, k, scale=32**-0.5, threshold=taus, backend="torch", chunk=128)
        scores2 = sale_block_scores(q, k, scale=32**-0.5, chunk=128)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(keep1, keep2) and torch.equal(scores1, scores2)
    assert 0 < keep1.float().mean() < 1


@pytest.mark.triton
@requires_triton
@pytest.mark.parametrize("L,Hq,Hkv,D", [(700, 4, 2, 32), (300, 3, 1, 16)])
def test_triton_matches_reference(L, Hq, Hkv, D):
    q, k = _qk(L, Hq, Hkv, D, seed=L)
    q, k = q.to(TRITON_DEVICE), k.to(TRITON_DEVICE)
    taus = torch.tensor([0.05, 0.0, 0.01, 0.2][:Hq])
    keep_ref, scores_ref = sale_estimate_reference(q, k, scale=D**-0.5, threshold=taus)
    keep = sale_estimate(q, k, scale=D**-0.5, threshold=taus, backend="triton")
    margin = (scores_ref - torch.log(taus.clamp(min=1e-30).double()).view(1, -1, 1, 1)).abs() < 1e-4
    assert ((keep != keep_ref) & ~margin).sum() == 0
    assert 0 < keep.float().mean() < 1


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=[pytest.mark.triton, requires_triton])])
@pytest.mark.parametrize("start", [256, 300])
def test_chunk_selects_what_the_whole_prompt_selects_for_its_rows(backend, start):
    """Queries ``[start, L)`` over every key, centred on the whole prompt's query mean: the tiles of the whole
    prompt's estimate for the query blocks of the chunk (the chunk's first block, when ``start`` falls inside it,
    over its rows in the chunk: the reference's definition)."""
    L, Hq, Hkv, D = 650, 4, 2, 32
    q, k = _qk(L, Hq, Hkv, D, seed=11)
    dev = TRITON_DEVICE if backend == "triton" else "cpu"
    q, k = q.to(dev), k.to(dev)
    taus = torch.tensor([0.05, 0.0, 0.01, 0.2])
    kw = dict(scale=D**-0.5, threshold=taus)
    qm = q.mean(2, keepdim=True)
    full = sale_estimate(q, k, **kw, backend=backend, chunk=128)
    chunk = sale_estimate(q[:, :, start:], k, **kw, backend=backend, chunk=128, q_mean=qm)
    keep_ref, scores_ref = sale_estimate_reference(q[:, :, start:].cpu(), k.cpu(), **kw, q_mean=qm.cpu())
    i0 = start // 64
    assert chunk.shape == (1, Hq, 11 - i0, 21)
    whole = 0 if start % 64 == 0 else 1  # query blocks of the chunk with all their rows in it
    assert torch.equal(chunk[:, :, whole:], full[:, :, i0 + whole :])
    margin = (scores_ref - torch.log(taus.clamp(min=1e-30).double()).view(1, -1, 1, 1)).abs() < 0.05
    assert ((chunk.cpu() != keep_ref) & ~margin).sum() == 0
    assert 0 < chunk.float().mean() < 1


def _hand_case(A: float):
    """All queries equal e1, keys a_j e1: the centred query is 0, so the estimate is exact (bias term only)."""
    L, D = 64, 16
    q = torch.zeros(1, 1, L, D)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, L, D)
    k[0, 0, 16:32, 0] = -30.0  # key block 1: negligible attention...
    k[0, 0, 20, 0] = A  # ...but for one key; every exactly computed logit is equal (a_j = 0)
    return q, k


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=[pytest.mark.triton, requires_triton])])
def test_relative_score_hand_case(backend):
    """Blocks 16: query block 3 (rows 48-63) computes key block 0 (sink) and blocks 2-3 (local 16 + itself) exactly;
    key block 1 is estimated. Row 48 sees 16 + 17 = 33 equal logits, so ``max r = exp(A) / 33``."""
    A = math.log(33 * 0.02)  # max r over the block = 0.02
    q, k = _hand_case(A)
    kw = dict(scale=1.0, block_m=16, block_n=16, sink=16, local_window=16)
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    for tau, kept in ((0.03, False), (0.01, True)):
        dev = TRITON_DEVICE if backend == "triton" else "cpu"
        keep = sale_estimate(q.to(dev), k.to(dev), threshold=tau, backend=backend, **kw)
        want = expected.clone()
        want[3, 1] = kept
        assert torch.equal(keep[0, 0].cpu(), want), (tau, keep[0, 0])
    _, scores = sale_estimate_reference(q, k, threshold=0.01, **kw)
    assert scores[0, 0, 3, 1].item() == pytest.approx(math.log(0.02), abs=1e-6)


def test_tiny_threshold_keeps_every_block_and_equals_dense():
    q, k = _qk(L=1100, Hq=6, Hkv=2, D=16, seed=1)
    v = torch.randn(1, 2, 1100, 16)
    sel = SALE(threshold=1e-300).select(q, k, v, 0.25, 0)
    assert torch.equal(sel.mask, causal_block_mask(1100, 64, 32).expand(1, 6, -1, -1))  # every causal tile
    out = block_sparse_attention(q, k, v, sel.mask, scale=0.25, block_m=sel.block_m, block_n=sel.block_n)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_dense_above_computes_dense_heads():
    """A head selecting more than ``dense_above`` of the causal tiles gets every causal tile; the others keep their
    estimate; ``dense_above=1`` never promotes."""
    q, k = _qk(L=1100, Hq=4, Hkv=2, D=16, seed=2)
    v = torch.randn(1, 2, 1100, 16)
    tau = torch.tensor([0.2, 0.05, 0.2, 0.2])  # head 1 keeps ~0.67 of the causal tiles, the others ~0.38
    causal = causal_block_mask(1100, 64, 32)
    m = SALE()
    m._tau = tau.expand(1, 4)  # per-head thresholds as bind() would set them
    plain = SALE(dense_above=1.0)
    plain._tau = m._tau
    base = plain.select(q, k, v, 0.25, 0).mask & causal
    density = base.flatten(2).sum(-1)[0] / causal.sum()
    assert 1 > density[1] > 0.65 > density[[0, 2, 3]].max()
    sel = m.select(q, k, v, 0.25, 0).mask & causal
    assert torch.equal(sel[0, 1], causal)
    assert torch.equal(sel[0, [0, 2, 3]], base[0, [0, 2, 3]])
    with pytest.raises(ValueError, match=r"dense_above \(0\) must be a number in \(0, 1\]"):
        SALE(dense_above=0)


def test_tiny_threshold_model_matches_dense_and_reports():
    model = tiny_model("llama")
    x = torch.randint(3, 500, (1, 1100))
    with torch.no_grad():
        ref = model(x).logits
        kvaccel.patch(model, SALE(threshold=1e-300))
        out = model(x).logits
    r = kvaccel.report(model)
    kvaccel.unpatch(model)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert r["prefill_density"] == pytest.approx([1.0] * 3)
    assert any("uniform threshold=1e-300" in n for n in r["notes"])  # no calibration file: said so


def test_left_padded_batch_equals_each_prompt_alone():
    """A left-padded batch of two prompts of different lengths gives, per row, the logits of each prompt alone
    (every statistic of the estimate, the centring means included, is per sequence)."""
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(7)
    seqs = [torch.randint(3, 500, (n,), generator=g) for n in (300, 233)]
    method = SALE(threshold=0.2, local_window=32, min_length=100, dense_above=1.0)
    dens, batched, single = padded_batch_and_alone(model, method, seqs)
    assert all(d < 0.7 for d in dens), dens  # sparse (0.64 measured): not dense vs dense
    for row, alone in zip(batched, single, strict=True):
        torch.testing.assert_close(row, alone, atol=2e-5, rtol=1e-4)


def test_dense_fallback_below_min_length():
    model = tiny_model("llama")
    x = torch.randint(3, 500, (1, 200))
    with torch.no_grad():
        ref = model(x).logits
        kvaccel.patch(model, "sale")
        out = model(x).logits
    notes = kvaccel.report(model)["notes"]
    kvaccel.unpatch(model)
    assert torch.equal(out, ref)
    assert any("shorter than min_length=1025" in n for n in notes)


# ---------------------------------------------------------------------------------------------- config + files
@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.0, 1.5, float("nan")])
def test_bad_threshold_refused(bad):
    with pytest.raises(ValueError, match=r"threshold \(.*\) must be a number in \(0, 1\)"):
        SALE(threshold=bad)


def test_bad_fields_refused():
    with pytest.raises(ValueError, match="block_n"):
        SALE(block_n=48)
    with pytest.raises(ValueError, match="local_window"):
        SALE(local_window=-1)
    with pytest.raises(ValueError, match="bits"):
        SALE(bits=1)


class _CharTok:
    """A tokenizer stand-in: one token per character (ids < 500)."""

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        return {"input_ids": torch.tensor([[3 + ord(c) % 490 for c in text]])}


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    model = tiny_model("llama")
    path = tmp_path_factory.mktemp("sale") / "th.json"
    method = SALE(min_length=256)
    prompts = [torch.randint(3, 500, (1, 320), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    data = calibrate(model, _CharTok(), prompts, method=method, out=path, tolerance=0.05)
    return model, path, data


def test_calibration_file_round_trip(calibrated):
    model, path, data = calibrated
    on_disk = load_thresholds(path, model)
    assert on_disk["fingerprint"] == model_fingerprint(model)
    assert on_disk["thresholds"] == data["thresholds"]
    assert len(on_disk["thresholds"]) == 3 and all(len(r) == 6 for r in on_disk["thresholds"])
    assert on_disk["settings"]["tolerance"] == 0.05 and on_disk["settings"]["lengths"] == [320, 320]
    for row, errs in zip(on_disk["thresholds"], on_disk["errors"], strict=True):
        for tau, he in zip(row, errs, strict=True):  # the chosen τ is the first candidate within tolerance
            first = next((c for c, e in zip(on_disk["candidates"], he, strict=True) if e <= 0.05), None)
            assert tau == first
    # a looser tolerance never asks for smaller thresholds
    loose = rethreshold(on_disk, 0.5)
    for a, b in zip(sum(loose["thresholds"], []), sum(on_disk["thresholds"], []), strict=True):
        assert (a or 0) >= (b or 0)
    method = SALE(thresholds=str(path), min_length=256)
    kvaccel.patch(model, method)
    x = torch.randint(3, 500, (1, 300))
    with torch.no_grad():
        model(x)
    notes = kvaccel.report(model)["notes"]
    kvaccel.unpatch(model)
    assert any(f"per-head thresholds from {path}" in n for n in notes)
    want = torch.tensor([[t or 0.0 for t in row] for row in data["thresholds"]], dtype=torch.float64)
    assert torch.equal(method._tau, want)


def test_thresholds_for_another_model_refused(calibrated):
    _, path, _ = calibrated
    other = tiny_model("qwen2")
    with pytest.raises(ValueError, match=r"for model 'llama' .* not for model 'qwen2'"):
        kvaccel.patch(other, SALE(thresholds=str(path)))


def test_bad_threshold_in_file_refused(calibrated, tmp_path):
    model, path, _ = calibrated
    data = json.loads(path.read_text())
    data["thresholds"][1][2] = 2.5
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"layer 1 head 2 \(2.5\) must be a number in \(0, 1\)"):
        kvaccel.patch(model, SALE(thresholds=str(bad)))
    with pytest.raises(ValueError, match=r"\(0\) must be a number"):
        write_thresholds(tmp_path / "w.json", dict(data, thresholds=[[0]]))


def test_cli_calibrate_writes_beside_the_model(tmp_path):
    from kvaccel.cli import app

    model_dir = tiny_saved_model(tmp_path / "tiny")
    res = CliRunner().invoke(app, ["calibrate", "sale", "--model", model_dir, "--prompts", "1", "--length", "1100"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "tiny" / "sale_thresholds.json"
    assert out.is_file() and "written to" in res.output
    model, _ = kvaccel.load_model(model_dir)
    method = SALE()
    kvaccel.patch(model, method)  # found beside the model by itself
    kvaccel.unpatch(model)
    assert method._tau is not None and "per-head thresholds from" in method._note
    uniform = SALE(threshold=0.05)  # an explicit uniform threshold is used as given, not replaced by the file's
    kvaccel.patch(model, uniform)
    kvaccel.unpatch(model)
    assert uniform._tau is None and uniform.head_thresholds(0) == 0.05
    assert "uniform threshold=0.05 for every head (as given)" in uniform._note
    bad = CliRunner().invoke(app, ["calibrate", "snapkv", "--model", model_dir])
    assert bad.exit_code == 2 and "cannot calibrate 'snapkv'" in bad.output


def test_calibration_error_equals_sparse_attention_error():
    """calibrate_layer's per-candidate error (partial sums of the exact softmax) is the error of the real kernel."""
    from kvaccel.patches.prefill.sale import calibrate_layer

    q, k = _qk(L=400, Hq=4, Hkv=2, D=32, seed=5, spread=1.0)
    v = torch.randn(1, 2, 400, 32, generator=torch.Generator().manual_seed(6))
    scale, cands = 32**-0.5, [0.2, 0.05, 0.01]
    method = SALE(min_length=0)
    _, _, errors, _ = calibrate_layer(q, k, v, scale, method, cands, tolerance=0.01, chunk=128)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    assert max(max(e) for e in errors) > 1e-3  # the candidates do drop attention mass
    for c, tau in enumerate(cands):
        mask = sale_estimate(q, k, scale=scale, threshold=tau, backend="torch")
        out = block_sparse_attention(q, k, v, mask, scale=scale, block_m=64, block_n=32)
        rel = (out - dense).flatten(2).norm(dim=-1) / dense.flatten(2).norm(dim=-1)  # (1, Hq)
        for h in range(4):
            assert errors[h][c] == pytest.approx(float(rel[0, h]), rel=1e-3, abs=1e-6)


@pytest.mark.real_model
def test_default_model_finds_its_thresholds(default_model):
    """``patch(model, "sale")`` on the embedded default model picks up calibrated per-head thresholds by itself."""
    model, _ = default_model
    method = SALE()
    kvaccel.patch(model, method)
    kvaccel.unpatch(model)
    assert method._tau is not None and method._tau.shape == (30, 9), method._note
    assert "per-head thresholds from" in method._note
    assert ((method._tau == 0) | ((method._tau > 0) & (method._tau < 1))).all()


def test_all_dense_heads_skip_the_estimate():
    q, k = _qk(L=300, Hq=4, Hkv=2, D=16)
    keep = sale_estimate(q, k, scale=0.25, threshold=torch.zeros(4), backend="torch")
    assert torch.equal(keep, causal_block_mask(300, 64, 32).expand(1, 4, -1, -1))
    with pytest.raises(ValueError, match="must be < 1"):
        sale_estimate(q, k, scale=0.25, threshold=1.0)


def test_uniform_threshold_and_thresholds_file_are_exclusive():
    with pytest.raises(ValueError, match=r"threshold \(0.01\) and thresholds \('t.json'\) are exclusive"):
        SALE(threshold=0.01, thresholds="t.json")
