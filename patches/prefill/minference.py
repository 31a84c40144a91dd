"""MInference: per-(layer, head) sparse patterns found offline, run on the block-sparse kernel.

https://arxiv.org/abs/2407.02490 (Jiang et al. 2024). An offline "kernel-aware sparse pattern search" gives every head
one of three patterns with its sizes (A-shape, vertical-slash, block-sparse), chosen by the share of the head's true
attention mass its tiles cover at a matched cost, on one calibration prompt; at prefill each head runs its pattern
with an online estimate (vertical-slash: the last 64 queries' attention; block-sparse: mean-pooled 64-blocks).

Configuration file (JSON, ``format = "kvaccel.minference_config/1"``): ``model`` (:func:`kvaccel.models.model_name`),
``fingerprint`` (:func:`kvaccel.models.model_fingerprint`), ``settings`` (the search settings, with ``block_size`` and
``last_q`` the method runs with), ``heads`` (``num_layers`` lists of ``num_heads`` entries ``{"pattern": ..., sizes,
"recall", "density"}``), ``candidates`` and ``search`` (every candidate's ``[density, recall]`` per head, so
:func:`choose` re-picks for another budget without the model). Lookup order in ``bind()``: the ``config`` field (a
path), ``minference_config.json`` in the model's directory, ``minference_<model name>.json`` in
:func:`kvaccel.models.cache_dir`, the file shipped for the default model; none -> ``ValueError`` naming
``kvaccel calibrate minference``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from kvaccel.checks import check_int, check_number
from kvaccel.config import register, resolve_budget, validate_budget
from kvaccel.kernels.block_sparse_attention import causal_block_mask, first_query_block, num_blocks
from kvaccel.models import text_config

from .a_shape import AShape
from .base import BlockSelection, BlockSparsePrefill, PrefillMethod, _diagonal_tiles
from .pbs import block_mean
from .sale import _candidates, default_out, run_calibration_prompts
from .vertical_slash import VerticalSlash, last_query_attention

Tensor = torch.Tensor

FORMAT = "kvaccel.minference_config/1"
DATA_DIR = Path(__file__).parent / "data" / "minference"  # package data: <model name>.json
BESIDE_MODEL = "minference_config.json"
PREFIX = "minference"
#: Size fields of each pattern (``dense``: every causal tile).
PATTERNS: dict[str, tuple[str, ...]] = {
    "dense": (),
    "a_shape": ("sink_blocks", "local_blocks"),
    "vertical_slash": ("vertical_size", "slash_size"),
    "block_sparse": ("top_k",),
}
#: Sizes the search tries (a_shape in blocks; vertical_slash and block_sparse as fractions of the prompt's tokens /
#: key blocks, so a file found at one length keeps its densities at another).
SEARCH_SPACE: tuple[dict, ...] = (
    ({"pattern": "dense"},)
    + tuple({"pattern": "a_shape", "sink_blocks": s, "local_blocks": w} for s in (1, 2) for w in (2, 4, 8, 12, 16, 24,
                                                                                                     32, 48))
    + tuple({"pattern": "vertical_slash", "vertical_size": v, "slash_size": d}
            for v in (0.005, 0.01, 0.02, 0.04, 0.08) for d in (0.01, 0.02, 0.05, 0.1, 0.2))
    + tuple({"pattern": "block_sparse", "top_k": t} for t in (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5))
)
#: fp32 elements of one chunk of attention rows in the search (bounds its memory: 64 MB).
_CHUNK_ELEMS = 1 << 24


class Estimates:
    """The online estimates of one sequence, computed once per layer on first use and shared by its heads.

    ``q`` ``(B, H_q, Lq, D)`` are the last ``Lq`` of the ``L`` positions of ``k`` ``(B, H_kv, L, D)``. ``last``: the
    exact causal attention of the last ``last_q`` queries ``(B, H_q, last_q, L)`` (vertical-slash); ``pooled``: the
    logits of mean-pooled query blocks over mean-pooled key blocks ``(B, H_q, nQB, nB)``, ``-inf`` above the block
    diagonal (block-sparse; MInference's ``_build_block_index``: unscaled, which ranks the same).
    """

    def __init__(self, q: Tensor, k: Tensor, scale: float, block: int, last_q: int):
        self.q, self.k, self.scale, self.block, self.last_q = q, k, scale, block, last_q
        self.L, self.Lq = k.shape[2], q.shape[2]
        self.n, self.i0 = num_blocks(self.L, block), first_query_block(self.L, self.Lq, block)

    @cached_property
    def last(self) -> Tensor:
        return last_query_attention(self.q, self.k, self.scale, min(self.last_q, self.Lq))

    @cached_property
    def kbar(self) -> Tensor:
        """Mean-pooled key blocks ``(B, H_kv, nB, D)``, at least float32."""
        return block_mean(self.k, self.block).to(torch.promote_types(self.k.dtype, torch.float32))

    @cached_property
    def pooled(self) -> Tensor:
        q, bs, kbar = self.q, self.block, self.kbar
        B, Hq, _, D = q.shape
        Hkv = kbar.shape[1]
        qbar = block_mean(q, bs, self.L - self.Lq - self.i0 * bs).to(kbar.dtype)  # a split first block: its chunk rows
        logits = (qbar.view(B, Hkv, -1, D) @ kbar.transpose(-1, -2)).view(B, Hq, self.n - self.i0, self.n)
        ar = torch.arange(self.n, device=q.device)
        return logits.masked_fill(ar[None, :] > ar[self.i0 :, None], float("-inf"))


def top_k_blocks(logits: Tensor, k: int) -> Tensor:
    """Per row of ``logits`` ``(..., nQB, nB)`` (``-inf`` = not causal), the ``k`` highest causal entries: bool."""
    k = min(k, logits.shape[-1])
    idx = logits.topk(k, dim=-1).indices
    return torch.zeros(logits.shape, dtype=torch.bool, device=logits.device).scatter_(-1, idx, True) & (
        logits > float("-inf"))


def pattern_tiles(entry: dict, est: Estimates, heads: Tensor | None = None) -> Tensor:
    """Tiles ``(B | 1, H | 1, nQB, nB)`` a head config ``entry`` selects for the query heads ``heads`` (default all)
    of the sequence of ``est``; the base adds the diagonal tiles and keeps causal ones."""
    kind, bs = entry["pattern"], est.block
    if kind == "dense":
        return causal_block_mask(est.L, bs, bs, device=est.q.device, q_len=est.Lq)[None, None]
    if kind == "a_shape":
        m = AShape(sink_blocks=entry["sink_blocks"], local_blocks=entry["local_blocks"], block_size=bs, min_length=0)
        return m.select(est.q, est.k, None, est.scale, 0).mask
    if kind == "vertical_slash":
        m = VerticalSlash(vertical_size=entry["vertical_size"], slash_size=entry["slash_size"], last_q=est.last_q,
                          block_size=bs, min_length=0)
        p = est.last if heads is None else est.last[:, heads]
        return m.pattern(p)[:, :, est.i0 :]
    if kind == "block_sparse":
        logits = est.pooled if heads is None else est.pooled[:, heads]
        return top_k_blocks(logits, resolve_budget(entry["top_k"], est.n))
    raise ValueError(f"unknown pattern {kind!r}; expected one of {sorted(PATTERNS)}")


def check_entry(entry, where: str) -> dict:
    """``ValueError`` naming ``where`` unless ``entry`` is a head config with valid sizes for its pattern."""
    if not isinstance(entry, dict) or entry.get("pattern") not in PATTERNS:
        raise ValueError(f"{where}: expected {{'pattern': one of {sorted(PATTERNS)}, sizes...}}, got {entry!r}")
    fields = PATTERNS[entry["pattern"]]
    sizes = {f: entry[f] for f in fields if f in entry}
    if len(sizes) != len(fields):
        raise ValueError(f"{where}: pattern {entry['pattern']!r} needs the sizes {fields}, got {entry!r}")
    try:
        if entry["pattern"] == "a_shape":
            AShape(**sizes, min_length=0)
        elif entry["pattern"] == "vertical_slash":
            VerticalSlash(**sizes, min_length=0)
        elif entry["pattern"] == "block_sparse":
            validate_budget(sizes["top_k"], "top_k")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return entry


@register
@dataclass
class MInference(BlockSparsePrefill):
    """MInference: each head runs its own searched pattern (A-shape, vertical-slash or block-sparse) and sizes.

    https://arxiv.org/abs/2407.02490 — per (layer, query head), from the model's configuration file (``kvaccel
    calibrate minference``): ``a_shape`` (sink + local band, :class:`AShape`), ``vertical_slash`` (columns and
    diagonals of the last ``last_q`` queries' attention, :class:`VerticalSlash`), ``block_sparse`` (per query block
    the ``top_k`` key blocks by ``mean(q_block) · mean(k_block)``, MInference's 64x64 pooled estimate) or ``dense``.
    Block size and ``last_q`` come from the file. GQA: patterns are per query head, as MInference searches them (it
    repeats K/V): the kernel computes tiles per query head anyway, so a per-KV-head pattern could only make a group's
    heads share one union of tiles.

    Differences from the reference (github.com/microsoft/MInference ``minference/modules/minference_forward.py``): it
    runs vertical columns at token granularity; ours are whole key blocks (superset, see :class:`VerticalSlash`). Its
    search tries 6 fixed size pairs sized for 128k prompts and maps A-shape / block-sparse winners to vertical-slash;
    ours tries :data:`SEARCH_SPACE` and keeps each winner (:func:`search_layer`). A head may be ``dense``. Chunked
    prefill: as the patterns it reuses (a_shape exact, vertical_slash from the chunk's last queries); block-sparse
    scores a query block from its rows in the chunk, so a chunk starting on a block boundary selects its rows' tiles.

    Parameters
    ----------
    config : str, optional
        Path of a configuration JSON file; ``None`` = the model's file (lookup order in the module docstring).
    budget, min_recall : float, optional
        Re-pick every head from the file's stored search (:func:`choose`, no model run): the best recall within
        ``budget`` (fraction of a head's causal tiles), and with ``min_recall`` the cheapest candidate reaching it
        when that recall is lower (default 0 = MInference's rule alone). ``None`` = the file's own choice.
    min_length, backend
        See :class:`BlockSparsePrefill` (default ``min_length=1024``).
    """

    name = "minference"
    config: str | None = None
    budget: float | None = None
    min_recall: float | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.config is not None and not isinstance(self.config, (str, Path)):
            raise ValueError(f"config ({self.config!r}) must be a path to a JSON file or None")
        if self.min_recall is not None and self.budget is None:
            raise ValueError(f"min_recall ({self.min_recall}) re-picks the heads within a budget: pass budget too")
        if self.budget is not None:
            _check_choice(self.budget, self.min_recall or 0.0)
        self._heads: list[list[dict]] | None = None  # set by bind()
        self._plan: list[list[tuple[dict, Tensor]]] = []
        self.block_size, self.last_q = 64, 64
        self._note = ""

    def bind(self, model) -> None:
        """Find and check the head configuration for ``model`` (``ValueError`` when there is none)."""
        from kvaccel.models import model_fingerprint, model_name

        if self.config is not None:
            path = Path(self.config)
            data = load_config(path, model)
        else:
            fp, found = model_fingerprint(model), []
            data = path = None
            for cand in _candidates(model, BESIDE_MODEL, PREFIX, DATA_DIR):
                if cand.is_file():
                    found.append(cand)
                    if _read(cand).get("fingerprint") == fp:
                        data, path = load_config(cand, model), cand
                        break
            if data is None:
                other = f" ({', '.join(map(str, found))} fit other models)" if found else ""
                raise ValueError(
                    f"minference: no pattern configuration for model {model_name(model)!r} (fingerprint {fp}){other}; "
                    f"run `kvaccel calibrate minference --model ...` or pass minference(config='path.json')")
        if self.budget is not None:
            if "search" not in data:
                raise ValueError(f"minference(budget=...) re-picks from the search stored in the configuration, and "
                                 f"{path} has none; re-run `kvaccel calibrate minference` or drop budget")
            data = choose(data, self.budget, self.min_recall or 0.0)
        self._heads = data["heads"]
        self.block_size, self.last_q = int(data["settings"]["block_size"]), int(data["settings"]["last_q"])
        self._plan = []
        for row in self._heads:  # heads of a layer grouped by identical entries: one selection per group
            groups: dict[str, list[int]] = {}
            for h, e in enumerate(row):
                groups.setdefault(json.dumps(_sizes(e), sort_keys=True), []).append(h)
            self._plan.append([(json.loads(key), torch.tensor(hs)) for key, hs in groups.items()])
        kinds = [e["pattern"] for row in self._heads for e in row]
        picked = "" if self.budget is None else (
            f", re-picked at budget {self.budget}, min_recall {self.min_recall or 0}")
        self._note = f"minference: head patterns from {path}{picked} (" + ", ".join(
            f"{kinds.count(k)} {k}" for k in PATTERNS if kinds.count(k)) + ")"

    def attention(self, ctx):
        ctx.state.notes.add(self._note)
        return super().attention(ctx)

    def select(self, q, k, v, scale, layer_idx) -> BlockSelection:
        est = Estimates(q, k, scale, self.block_size, self.last_q)
        mask = torch.zeros(q.shape[0], q.shape[1], est.n - est.i0, est.n, dtype=torch.bool, device=q.device)
        for entry, heads in self._plan[layer_idx]:
            heads = heads.to(q.device)
            tiles = pattern_tiles(entry, est, heads)
            mask[:, heads] = tiles.expand(q.shape[0], len(heads), -1, -1)
        return BlockSelection(mask, self.block_size, self.block_size)


def _sizes(entry: dict) -> dict:
    """The pattern and sizes of a head entry (without its calibration figures)."""
    return {"pattern": entry["pattern"]} | {f: entry[f] for f in PATTERNS[entry["pattern"]]}


# ---------------------------------------------------------------------------------------------- file helpers
def _shape(model) -> tuple[int, int]:
    cfg = text_config(model)
    return int(cfg.num_hidden_layers), int(cfg.num_attention_heads)


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"MInference configuration {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a MInference configuration (expected format {FORMAT!r})")
    return data


def load_config(path: str | Path, model=None) -> dict:
    """Read and check a configuration file; with ``model``, refuse one fitted to another model (``ValueError``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"MInference configuration {path} does not exist; create it with `kvaccel calibrate "
                         "minference`")
    data = _read(path)
    st, rows = data.get("settings"), data.get("heads")
    if not isinstance(st, dict) or "block_size" not in st or "last_q" not in st:
        raise ValueError(f"{path}: 'settings' must hold the block_size and last_q the patterns were searched with")
    try:
        AShape(block_size=st["block_size"])
        check_int("last_q", st["last_q"], 1, why="queries of the vertical-slash estimate")
    except ValueError as e:
        raise ValueError(f"{path}: settings: {e}") from None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and r for r in rows):
        raise ValueError(f"{path}: 'heads' must be a non-empty list of per-layer lists of per-head entries")
    for li, row in enumerate(rows):
        for hi, e in enumerate(row):
            check_entry(e, f"{path}: layer {li} head {hi}")
    if model is not None:
        from kvaccel.models import model_fingerprint, model_name

        fp, name = model_fingerprint(model), model_name(model)
        if data.get("fingerprint") != fp:
            raise ValueError(
                f"{path} holds MInference patterns for model {data.get('model')!r} (fingerprint "
                f"{data.get('fingerprint')}), not for model {name!r} (fingerprint {fp}); search this model's with "
                "`kvaccel calibrate minference`")
        layers, heads = _shape(model)
        if len(rows) != layers or any(len(r) != heads for r in rows):
            raise ValueError(f"{path}: 'heads' must be {layers} layers x {heads} heads for model {name!r}")
    return data


def write_config(path: str | Path, data: dict) -> Path:
    """Write a configuration dict (as :func:`calibrate` returns it) to ``path`` after checking every entry."""
    for li, row in enumerate(data["heads"]):
        for hi, e in enumerate(row):
            check_entry(e, f"layer {li} head {hi}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- search
def tile_mass(q: Tensor, k: Tensor, scale: float, block: int) -> Tensor:
    """Share of the true causal attention in each tile: ``(H_q, nB, nB)`` float64, each head summing to 1.

    ``q`` ``(1, H_q, L, D)``, ``k`` ``(1, H_kv, L, D)``; entry ``(h, i, j)`` = mean over the ``L`` rows of the attention
    probability head ``h``'s row puts on key block ``j``, summed over the rows of query block ``i``: the mass a tile
    mask keeps is its recall (mean over rows of the attention it covers). Rows in chunks, exact softmax in float32.
    """
    _, Hq, L, D = q.shape
    Hkv = k.shape[1]
    G, n = Hq // Hkv, num_blocks(L, block)
    rows = max(block, (_CHUNK_ELEMS // max(1, Hq * L)) // block * block)
    pos = torch.arange(L, device=q.device)
    qg, kf = q[0].float().view(Hkv, G, L, D), k[0].float()
    mass = torch.zeros(Hq, n, n, dtype=torch.float64, device=q.device)
    for r0 in range(0, L, rows):
        r1 = min(L, r0 + rows)
        nk = num_blocks(r1, block)
        s = (qg[:, :, r0:r1] @ kf[:, None, :r1].transpose(-1, -2)).mul_(scale)  # (Hkv, G, R, r1)
        s.masked_fill_(pos[None, :r1] > pos[r0:r1, None], float("-inf"))
        p = torch.nn.functional.pad(torch.softmax(s, dim=-1), (0, nk * block - r1))
        per_key_block = p.view(Hq, r1 - r0, nk, block).sum(-1)  # (Hq, R, nk)
        mass[:, :, :nk].index_add_(1, pos[r0:r1] // block, per_key_block.double())
    return mass / L


def search_layer(q: Tensor, k: Tensor, scale: float, space: Sequence[dict] = SEARCH_SPACE, block: int = 64,
                 last_q: int = 64) -> list[list[tuple[float, float]]]:
    """Every candidate of ``space`` on every query head of one prompt's layer: ``[head][candidate] = (density,
    recall)``, density = computed tiles / causal tiles (the diagonal tiles always computed, as at prefill), recall =
    share of the head's true attention inside them (:func:`tile_mass`). ``q``/``k``: ``(1, H, L, D)``."""
    L = k.shape[2]
    mass = tile_mass(q, k, scale, block)
    est = Estimates(q, k, scale, block, last_q)
    causal = causal_block_mask(L, block, block, device=q.device)
    must = _diagonal_tiles(L, block, block, q.device)
    total = int(causal.sum())
    out: list[list[tuple[float, float]]] = [[] for _ in range(q.shape[1])]
    for entry in space:
        m = ((pattern_tiles(entry, est)[0] | must) & causal).expand(q.shape[1], -1, -1)
        dens, rec = m.sum((-1, -2)).double() / total, (mass * m).sum((-1, -2))
        for h in range(q.shape[1]):
            out[h].append((float(dens[h]), float(rec[h])))
    return out


def choose(data: dict, budget: float, min_recall: float = 0.0) -> dict:
    """Each head's pattern from a search's stored ``[density, recall]`` per candidate (no model run).

    Per head (MInference's rule at a matched cost): of the candidates within ``budget`` (fraction of the causal tiles),
    the one with the highest recall (ties: fewer tiles; none within budget: the cheapest). Not in the reference: when
    that recall is below ``min_recall``, the cheapest candidate reaching ``min_recall`` instead (``dense`` reaches 1).
    Sets ``heads`` and the per-layer mean ``density`` / ``recall`` of the choice, and ``settings`` budget/min_recall.
    """
    _check_choice(budget, min_recall)
    cands, heads, density, recall = data["candidates"], [], [], []
    for layer in data["search"]:
        row = []
        for res in layer:
            fits = [c for c, (d, _) in enumerate(res) if d <= budget + 1e-12]
            pick = max(fits, key=lambda c: (res[c][1], -res[c][0])) if fits else min(range(len(res)),
                                                                                    key=lambda c: res[c][0])
            if res[pick][1] < min_recall:
                pick = min((c for c, (_, r) in enumerate(res) if r >= min_recall), key=lambda c: res[c][0])
            row.append(dict(cands[pick], density=round(res[pick][0], 5), recall=round(res[pick][1], 5)))
        heads.append(row)
        density.append(sum(e["density"] for e in row) / len(row))
        recall.append(sum(e["recall"] for e in row) / len(row))
    out = dict(data)
    out["settings"] = dict(data.get("settings", {}), budget=budget, min_recall=min_recall)
    out["heads"], out["density"], out["recall"] = heads, density, recall
    return out


def _check_choice(budget: float, min_recall: float) -> None:
    check_number("budget", budget, 0, 1, low_open=True, why="fraction of a head's causal tiles")
    check_number("min_recall", min_recall, 0, 1, why="share of a head's attention its tiles must cover")


@dataclass
class _Search(PrefillMethod):
    """Internal prefill "method" used by :func:`calibrate`: dense output, plus the per-head search of each layer."""

    name = "minference_search"
    min_length: int = 1024
    block: int = 64
    last_q: int = 64
    progress: Callable[[str], None] | None = None

    def __post_init__(self):
        self.results: dict[int, list] = {}  # layer -> prompt -> head -> candidate -> (density, recall)

    def attention(self, ctx):
        from kvaccel.patches.attention import dense_prefill

        q, k = ctx.query, ctx.key
        if ctx.pad is not None or q.shape[0] != 1:
            raise ValueError("the MInference search runs one unpadded prompt at a time (batch 1)")
        t0 = time.perf_counter()
        self.results.setdefault(ctx.layer_idx, []).append(search_layer(q, k, ctx.scaling, SEARCH_SPACE, self.block,
                                                                       self.last_q))
        if self.progress:
            self.progress(f"layer {ctx.layer_idx} searched ({time.perf_counter() - t0:.1f} s)")
        return dense_prefill(ctx)


def calibrate(
    model,
    tokenizer,
    prompts: Sequence[str | Tensor] | None = None,
    *,
    num_prompts: int = 1,
    length: int = 8192,
    budget: float = 0.1,
    min_recall: float = 0.95,
    min_length: int = 1024,
    out: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Search every (layer, query head)'s pattern on ``model``; returns the configuration dict (and writes ``out``).

    One dense prefill per prompt (default: ``num_prompts`` prose prompts of ``length`` tokens from ``pydoc_data``, the
    second half of the text, as SALE's calibration); in every layer, :func:`search_layer` scores every candidate of
    :data:`SEARCH_SPACE` per head; over several prompts a candidate keeps its mean density and its lowest recall
    (both rounded to 4 decimals in the file).
    :func:`choose` then picks each head's pattern at ``budget`` / ``min_recall``.
    """
    from kvaccel.models import model_fingerprint, model_name

    _check_choice(budget, min_recall)
    search = _Search(min_length=min_length, progress=progress)
    t0 = time.perf_counter()
    ids = run_calibration_prompts(model, search, tokenizer, prompts, num_prompts, length, min_length, progress)
    layers, heads = _shape(model)
    table = []
    for li in range(layers):
        per_prompt = search.results.get(li)
        if not per_prompt:
            raise RuntimeError(f"layer {li} was never searched (no prefill reached it)")
        table.append([[[round(sum(p[h][c][0] for p in per_prompt) / len(per_prompt), 4),
                        round(min(p[h][c][1] for p in per_prompt), 4)] for c in range(len(SEARCH_SPACE))]
                      for h in range(heads)])
    settings = {"metric": "recall: mean over rows of the true attention inside the head's tiles",
                "prompts": len(ids), "lengths": [int(x.shape[-1]) for x in ids], "block_size": search.block,
                "last_q": search.last_q, "seconds": round(time.perf_counter() - t0, 1)}
    data = {"format": FORMAT, "model": model_name(model), "fingerprint": model_fingerprint(model),
            "settings": settings, "candidates": [dict(c) for c in SEARCH_SPACE], "search": table}
    data = choose(data, budget, min_recall)
    if out is not None:
        write_config(out, data)
    return data


def default_config_out(model) -> Path:
    """Where ``kvaccel calibrate minference`` writes by default: beside a local model, else in the kvaccel cache."""
    return default_out(model, BESIDE_MODEL, PREFIX)


__all__ = ["MInference", "calibrate", "choose", "load_config", "search_layer", "tile_mass", "top_k_blocks",
           "write_config"]
