"""MInference (per-head searched patterns): each pattern against a hand-computed tile mask, mixed configs select per
head what the pattern alone selects, dense heads equal stock, the search's recall, files (fingerprint, missing,
the calibrate command) and padded batches."""

from __future__ import annotations

import json
import math

import pytest
import torch
from prefill_helpers import padded_batch_and_alone
from typer.testing import CliRunner

import kvaccel
from kvaccel.kernels.block_sparse_attention import causal_block_mask
from kvaccel.models import model_fingerprint, model_name
from kvaccel.patches.prefill.base import _diagonal_tiles
from kvaccel.patches.prefill.minference import (
    FORMAT,
    SEARCH_SPACE,
    MInference,
    calibrate,
    choose,
    load_config,
    search_layer,
    tile_mass,
    write_config,
)

from conftest import tiny_model, tiny_saved_model

BS = 16  # block size of the hand-checked configs

A_SHAPE = {"pattern": "a_shape", "sink_blocks": 1, "local_blocks": 2}
VS = {"pattern": "vertical_slash", "vertical_size": 3, "slash_size": 4}
BLOCKS = {"pattern": "block_sparse", "top_k": 2}
DENSE = {"pattern": "dense"}


def write(path, model, heads, block: int = BS, last_q: int = 8):
    """A configuration file for ``model`` whose layers all use ``heads`` (one entry per query head)."""
    layers = model.config.num_hidden_layers
    data = {"format": FORMAT, "model": model_name(model), "fingerprint": model_fingerprint(model),
            "settings": {"block_size": block, "last_q": last_q}, "heads": [list(heads) for _ in range(layers)]}
    write_config(path, data)
    return str(path)


def bound(model, tmp_path, heads, **kw) -> MInference:
    m = MInference(config=write(tmp_path / "c.json", model, heads, **kw), min_length=16)
    m.bind(model)
    return m


def qk(B=1, Hq=6, Hkv=2, L=100, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, Hq, L, D, generator=g), torch.randn(B, Hkv, L, D, generator=g)


def computed(m: MInference, q, k, scale=0.35) -> torch.Tensor:
    """The tiles the base computes from ``m.select``: the selection, the diagonal tiles, causal only."""
    L = k.shape[2]
    sel = m.select(q, k, None, scale, 0)
    return (sel.mask | _diagonal_tiles(L, BS, BS, None, q_len=q.shape[2])) & causal_block_mask(L, BS, BS,
                                                                                             q_len=q.shape[2])


# ------------------------------------------------------------------------------------------- each pattern by hand


def test_a_shape_tiles_by_hand(tmp_path):
    model = tiny_model("llama")
    q, k = qk(L=100)  # 7 blocks of 16
    got = computed(bound(model, tmp_path, [A_SHAPE] * 6), q, k)
    n = 7
    want = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(i + 1):
            want[i, j] = j < 1 or j > i - 2
    assert torch.equal(got[0, 0], want) and torch.equal(got, want.expand_as(got))


def test_block_sparse_tiles_by_hand(tmp_path):
    model = tiny_model("llama")
    q, k = qk(L=100, seed=1)
    got = computed(bound(model, tmp_path, [BLOCKS] * 6), q, k)
    L, n = 100, 7
    for h in range(6):
        kh = k[0, h // 3]
        qbar = torch.stack([q[0, h, i * BS : min(L, (i + 1) * BS)].mean(0) for i in range(n)])  # ragged last block
        kbar = torch.stack([kh[j * BS : min(L, (j + 1) * BS)].mean(0) for j in range(n)])
        s = qbar @ kbar.T
        for i in range(n):
            top = sorted(range(i + 1), key=lambda j: -float(s[i, j]))[:2]  # the 2 best causal key blocks
            want = {*top, i}  # the diagonal tile always
            assert {j for j in range(n) if got[0, h, i, j]} == want, (h, i)


def vertical_slash_by_hand(q, k, h, scale, last, vertical, slash):
    """Tiles of query head ``h`` by loops: columns / diagonals of the last queries' attention, MInference's rules."""
    L = k.shape[2]
    n = -(-L // BS)
    s = (q[0, h, L - last :] @ k[0, h // 3].T) * scale
    for r in range(last):
        s[r, L - last + r + 1 :] = -math.inf
    p = s.softmax(-1)
    col, diag = p.sum(0), torch.zeros(L)
    for r in range(last):
        for c in range(L - last + r + 1):
            diag[L - last + r - c] += p[r, c]
    # sizes clamped to >= 30 columns / 50 diagonals; the first 30 columns and the 100 latest diagonals rank first
    vs, ss = min(L, max(vertical, 30)), min(L, max(slash, 50))
    cols = list(range(30)) + [int(c) for c in col.argsort(descending=True) if c >= 30]
    diags = list(range(100)) + [int(d) for d in diag.argsort(descending=True) if d >= 100]
    cols, diags = set(cols[:vs]), set(diags[:ss])
    want = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(i + 1):
            rows, keys = range(i * BS, min(L, (i + 1) * BS)), range(j * BS, min(L, (j + 1) * BS))
            want[i, j] = any(c in cols for c in keys) or any(r - c in diags for r in rows for c in keys if r >= c)
    return want


@pytest.mark.parametrize("L,vertical,slash", [(100, 3, 4), (320, 40, 110)])
def test_vertical_slash_tiles_by_hand(tmp_path, L, vertical, slash):
    """(100, 3, 4): the clamps and forced entries alone; (320, 40, 110): 10 columns and 10 diagonals by score."""
    model = tiny_model("llama")
    q, k = qk(L=L, seed=2)
    entry = {"pattern": "vertical_slash", "vertical_size": vertical, "slash_size": slash}
    got = computed(bound(model, tmp_path, [entry] * 6, last_q=8), q, k, 0.35)
    for h in range(6):
        assert torch.equal(got[0, h], vertical_slash_by_hand(q, k, h, 0.35, 8, vertical, slash)), h
    assert not got.all()


def test_dense_pattern_is_every_causal_tile(tmp_path):
    model = tiny_model("llama")
    q, k = qk(L=100)
    assert torch.equal(computed(bound(model, tmp_path, [DENSE] * 6), q, k)[0, 0], causal_block_mask(100, BS, BS))


# ------------------------------------------------------------------------------------------- mixed configs


@pytest.mark.parametrize("Lq", [100, 37])  # whole prompt, and a later chunk's last queries
def test_mixed_config_selects_per_head_what_each_pattern_selects_alone(tmp_path, Lq):
    model = tiny_model("llama")
    q, k = qk(L=100, seed=5)
    q = q[:, :, 100 - Lq :]
    mixed = [A_SHAPE, VS, BLOCKS, DENSE, BLOCKS, VS]
    got = computed(bound(model, tmp_path, mixed), q, k)
    for h, entry in enumerate(mixed):
        alone = computed(bound(model, tmp_path, [entry] * 6), q, k)
        assert torch.equal(got[:, h], alone[:, h]), (h, entry)
    assert not torch.equal(got[:, 0], got[:, 1])  # the heads do differ


def test_all_dense_config_equals_stock(tmp_path):
    model = tiny_model("qwen2")
    ids = torch.randint(3, 512, (1, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        with kvaccel.patched(model, MInference(config=write(tmp_path / "d.json", model, [DENSE] * 6),
                                               min_length=16)):
            out = model(ids, use_cache=False).logits
            rep = kvaccel.report(model)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert rep["prefill_density"] == [1.0] * model.config.num_hidden_layers
    assert any("6 dense" not in n and "dense" in n and "minference" in n for n in rep["notes"]), rep["notes"]


def test_short_prompt_is_dense_and_counted(tmp_path):
    model = tiny_model("llama")
    ids = torch.randint(3, 512, (1, 60), generator=torch.Generator().manual_seed(1))
    cfg = write(tmp_path / "s.json", model, [A_SHAPE] * 6)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        with kvaccel.patched(model, MInference(config=cfg, min_length=100)):
            out = model(ids, use_cache=False).logits
            rep = kvaccel.report(model)
    torch.testing.assert_close(out, ref)
    assert rep["prefill_density"] == [1.0] * model.config.num_hidden_layers
    assert any("min_length=100" in n for n in rep["notes"])


def test_left_padded_batch_equals_rows_alone(tmp_path):
    model = tiny_model("llama")
    cfg = write(tmp_path / "p.json", model, [A_SHAPE, VS, BLOCKS, DENSE, BLOCKS, VS])
    seqs = [torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(10 + n)) for n in (260, 201)]
    dens, batched, single = padded_batch_and_alone(model, MInference(config=cfg, min_length=16), seqs)
    for b, s in zip(batched, single, strict=True):
        torch.testing.assert_close(b, s, atol=2e-5, rtol=1e-4)
    assert all(d < 1 for d in dens), dens


# ------------------------------------------------------------------------------------------- the search


def test_tile_mass_is_the_attention_in_each_tile():
    q, k = qk(L=70, seed=7)
    scale = 0.4
    mass = tile_mass(q, k, scale, BS)
    L, n = 70, 5
    for h in (0, 4):
        s = (q[0, h] @ k[0, h // 3].T) * scale
        p = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), -math.inf).softmax(-1).double()
        want = torch.tensor([[float(p[i * BS : (i + 1) * BS, j * BS : (j + 1) * BS].sum()) / L for j in range(n)]
                             for i in range(n)], dtype=torch.float64)
        torch.testing.assert_close(mass[h], want)
    torch.testing.assert_close(mass.sum((-1, -2)), torch.ones(6, dtype=torch.float64))


def test_search_scores_each_candidate_by_its_tiles():
    q, k = qk(L=300, seed=8)
    space = [DENSE, A_SHAPE, BLOCKS]
    res = search_layer(q, k, 0.35, space, block=BS, last_q=8)
    mass = tile_mass(q, k, 0.35, BS)
    causal, diag = causal_block_mask(300, BS, BS), _diagonal_tiles(300, BS, BS, None)
    a = (torch.tensor([[j < 1 or j > i - 2 for j in range(19)] for i in range(19)]) | diag) & causal
    for h in range(6):
        assert res[h][0] == pytest.approx((1.0, 1.0))
        assert res[h][1] == pytest.approx((float(a.sum() / causal.sum()), float((mass[h] * a).sum())))
        assert res[h][2][1] < 1 and res[h][2][0] < 1


def test_choose_takes_the_best_recall_within_budget():
    data = {"candidates": [DENSE, A_SHAPE, BLOCKS],
            "search": [[[[1.0, 1.0], [0.3, 0.8], [0.2, 0.85]], [[1.0, 1.0], [0.3, 0.9], [0.2, 0.6]]]]}
    picked = choose(data, budget=0.3)["heads"][0]
    assert [e["pattern"] for e in picked] == ["block_sparse", "a_shape"]
    assert [e["pattern"] for e in choose(data, budget=0.25)["heads"][0]] == ["block_sparse", "block_sparse"]
    assert [e["pattern"] for e in choose(data, budget=0.1)["heads"][0]] == ["block_sparse", "block_sparse"]  # cheapest
    strict = choose(data, budget=0.3, min_recall=0.88)["heads"][0]
    assert [e["pattern"] for e in strict] == ["dense", "a_shape"]
    assert strict[1] == dict(A_SHAPE, density=0.3, recall=0.9)
    with pytest.raises(ValueError, match="budget"):
        choose(data, budget=0)


def test_budget_re_picks_from_the_stored_search(tmp_path):
    """minference(budget=..., min_recall=...) applies choose() to the file's stored search at bind (what the
    file's heads would be at that budget); a file without a search, or min_recall alone, is refused."""
    model = tiny_model("llama")
    path = write(tmp_path / "c.json", model, [DENSE] * 6)
    data = json.loads(open(path).read())
    data["candidates"] = [DENSE, A_SHAPE, BLOCKS]
    data["search"] = [[[[1.0, 1.0], [0.3, 0.82 + h / 50], [0.2, 0.85]] for h in range(6)] for _ in range(3)]
    (tmp_path / "s.json").write_text(json.dumps(data))
    for budget, min_recall in ((0.3, None), (0.25, None), (0.3, 0.84)):
        m = MInference(config=str(tmp_path / "s.json"), budget=budget, min_recall=min_recall)
        m.bind(model)
        assert m._heads == choose(data, budget, min_recall or 0.0)["heads"]
        assert f"re-picked at budget {budget}" in m._note
    assert [e["pattern"] for e in m._heads[0]] == ["block_sparse"] * 2 + ["a_shape"] * 4  # recall 0.85 vs 0.82-0.92
    with pytest.raises(ValueError, match="has none; re-run `kvaccel calibrate minference`"):
        MInference(config=path, budget=0.3).bind(model)
    with pytest.raises(ValueError, match="pass budget too"):
        MInference(min_recall=0.9)
    with pytest.raises(ValueError, match="budget"):
        MInference(budget=1.5)


class _CharTok:
    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        return {"input_ids": torch.tensor([[3 + ord(c) % 490 for c in text]])}


def test_calibrate_writes_a_file_that_loads_and_runs(tmp_path):
    model = tiny_model("llama")
    path = tmp_path / "m.json"
    prompt = torch.randint(3, 500, (1, 320), generator=torch.Generator().manual_seed(0))
    data = calibrate(model, _CharTok(), [prompt], min_length=256, budget=0.7, min_recall=0.0, out=path)
    on_disk = load_config(path, model)
    assert on_disk["heads"] == data["heads"] and len(on_disk["search"]) == 3
    assert len(on_disk["search"][0][0]) == len(SEARCH_SPACE) and on_disk["settings"]["lengths"] == [320]
    for layer, heads in zip(on_disk["search"], on_disk["heads"], strict=True):
        for res, e in zip(layer, heads, strict=True):  # each head: the best recall within the budget
            fits = [r for d, r in res if d <= 0.7]
            assert e["recall"] == pytest.approx(max(fits), abs=1e-5) and e["density"] <= 0.7
    ids = torch.randint(3, 500, (1, 300))
    with torch.no_grad(), kvaccel.patched(model, MInference(config=str(path), min_length=256)):
        model(ids)
        assert all(d < 1 for d in kvaccel.report(model)["prefill_density"])


# ------------------------------------------------------------------------------------------- files and errors


def test_config_for_another_model_refused(tmp_path):
    path = write(tmp_path / "c.json", tiny_model("llama"), [A_SHAPE] * 6)
    with pytest.raises(ValueError, match=r"for model 'llama' .* not for model 'qwen2'.*kvaccel calibrate minference"):
        kvaccel.patch(tiny_model("qwen2"), MInference(config=path))


def test_missing_config_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("KVACCEL_CACHE", str(tmp_path))
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"no pattern configuration for model 'llama'.*kvaccel calibrate minference"):
        kvaccel.patch(model, "minference")
    assert not kvaccel.is_patched(model)
    with pytest.raises(ValueError, match=r"nope.json does not exist.*kvaccel calibrate minference"):
        kvaccel.patch(model, MInference(config=str(tmp_path / "nope.json")))
    other = tiny_model("qwen2")  # a file of another model in the cache is not used for this one
    write(tmp_path / "minference_llama.json", other, [A_SHAPE] * 6)
    with pytest.raises(ValueError, match=r"minference_llama.json fit other models"):
        kvaccel.patch(model, "minference")


@pytest.mark.parametrize("entry,match", [
    ({"pattern": "diagonal"}, "expected"),
    ({"pattern": "a_shape", "sink_blocks": 1}, "needs the sizes"),
    ({"pattern": "vertical_slash", "vertical_size": 0, "slash_size": 4}, "vertical_size"),
    ({"pattern": "block_sparse", "top_k": 1.5}, "top_k"),
])
def test_bad_entry_refused_with_its_place(tmp_path, entry, match):
    model = tiny_model("llama")
    path = write(tmp_path / "c.json", model, [A_SHAPE] * 6)
    data = json.loads(open(path).read())
    data["heads"][2][4] = entry
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"layer 2 head 4.*{match}"):
        kvaccel.patch(model, MInference(config=str(tmp_path / "bad.json")))


def test_cli_calibrate_writes_beside_the_model(tmp_path):
    from kvaccel.cli import app

    model_dir = tiny_saved_model(tmp_path / "tiny")
    res = CliRunner().invoke(app, ["calibrate", "minference", "--model", model_dir, "--length", "1100",
                                   "--budget", "0.3"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "tiny" / "minference_config.json").is_file() and "written to" in res.output
    model, _ = kvaccel.load_model(model_dir)
    method = MInference()
    kvaccel.patch(model, method)  # found beside the model by itself
    kvaccel.unpatch(model)
    assert "minference_config.json" in method._note
    bad = CliRunner().invoke(app, ["calibrate", "minference", "--model", model_dir, "--tolerance", "0.1"])
    assert bad.exit_code == 2 and "--tolerance is an option of `kvaccel calibrate sale`" in bad.output


def test_shipped_config_fits_the_default_model(default_model):
    model, _ = default_model
    method = MInference()
    method.bind(model)
    assert "data/minference/SmolLM2-135M-Instruct.json" in method._note
    assert len(method._heads) == 30 and all(len(r) == 9 for r in method._heads)
