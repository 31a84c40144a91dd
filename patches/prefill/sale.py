"""SALE: sparse prefill selected by a low-bit (INT4) estimate of the attention scores, with per-head thresholds.

https://arxiv.org/abs/2505.24179 (Ji et al. 2025). The estimate and the block test live in
:mod:`kvaccel.kernels.sale_estimate`; this module is the prefill method and the per-(layer, head) threshold
calibration (the paper's: start at ``τ = 0.008``, halve until the head's sparse output is within a tolerance of
dense; at ``τ <= 1e-4`` the head stays dense).

Thresholds file (JSON, ``format = "kvaccel.sale_thresholds/1"``): ``model`` (:func:`kvaccel.models.model_name`),
``fingerprint`` (:func:`kvaccel.models.model_fingerprint`), ``settings`` (the calibration settings),
``thresholds`` (``num_layers`` lists of ``num_heads`` values; ``null`` = dense head) and per-layer ``density``
measured at calibration. Lookup order in ``bind()`` (when no uniform ``threshold`` is given): the ``thresholds``
field (a path), ``sale_thresholds.json`` in the model's directory, ``sale_<model name>.json`` in
:func:`kvaccel.models.cache_dir`, the file shipped in the package for the embedded default model; with none of them
the uniform ``DEFAULT_THRESHOLD`` is used, and ``report()`` says which source was used in its notes.

Calibration metric: per head, the relative Frobenius error ``||O_τ - O||_F / ||O||_F`` of the head's attention
output over the whole prompt, tolerance 1% by default (the paper's reference code bounds the summed absolute error
per token instead). Shipped file for SmolLM2-135M-Instruct: one 8192-token prose prompt (second half of
``pydoc_data``, disjoint from the eval harness's prose prompts), tolerance 1% -> no dense head, thresholds
0.008 (27 heads) / 0.004 (61) / 0.002 (96) / 0.001 (66) / 5e-4 (18) / 2.5e-4 (2), mean density 0.454 of the causal
tiles at 8k (per layer 0.16-0.87). ``kvaccel calibrate sale --prompts 1 --length 8192``: 171 s of CPU
(``OMP_NUM_THREADS=1``; 11.5 min wall on the shared 2-core machine). The file stores every candidate's error and
density, so :func:`rethreshold` gives thresholds for another tolerance without running the model (tolerance 2%:
density 0.369; 5%: 0.296). End to end with these thresholds (``kvaccel eval --method sale --tasks fidelity
--lengths 8000 --samples 3``): KL(full ‖ sale) 1.5e-4 / 6.7e-5 / 1.2e-4, top-1 agreement 15/16, 16/16, 16/16
(97.9%); prefill was 1.4x slower than dense SDPA on this CPU (sample 2: 90.9 s vs 64.6 s, shared machine).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvaccel.checks import check_int, check_number
from kvaccel.config import register
from kvaccel.kernels.block_sparse_attention import causal_block_mask, num_blocks
from kvaccel.kernels.sale_estimate import sale_block_scores, sale_estimate
from kvaccel.models import text_config

from .base import BlockSelection, BlockSparsePrefill, PrefillMethod, validate_blocks

FORMAT = "kvaccel.sale_thresholds/1"
DATA_DIR = Path(__file__).parent / "data" / "sale"  # package data: <model name>.json
BESIDE_MODEL = "sale_thresholds.json"
DEFAULT_THRESHOLD = 0.008  # the paper's calibration start: the uniform τ of a model without calibrated thresholds
_QUERY_SUM = "_kvaccel_sale_query_sum"  # cache-layer attribute: the running query sum of a chunked prompt


@register
@dataclass
class SALE(BlockSparsePrefill):
    """SALE: block-sparse prefill, key blocks kept when the INT4-estimated relative attention score exceeds ``τ_h``.

    https://arxiv.org/abs/2505.24179 — per query block, ``m_i, l_i`` from the exact sink + local logits, then
    ``r_ij = exp(ŝ_ij - m_i) / l_i`` with ``ŝ`` the mean-centred INT4 estimate; key block kept iff
    ``max_{i, j in block} r_ij > τ_h`` (``τ_h`` per layer and head, calibrated).

    Parameters
    ----------
    threshold : float, optional
        Uniform ``τ`` in (0, 1) for every head, instead of calibrated per-head thresholds. ``None`` (default) = the
        calibrated thresholds found for the model, else ``DEFAULT_THRESHOLD`` = 0.008 (the paper's calibration
        start), with a note in ``report()``.
    thresholds : str, optional
        Path of a thresholds JSON file (``kvaccel calibrate sale``); ``None`` = look beside the model / in the
        cache / in the package (module docstring). Exclusive with ``threshold``.
    block_m, block_n : int
        Query / key block sizes. Default 64 / 32 (paper).
    sink : int
        Leading tokens computed exactly for every query block (rounded up to key blocks). Default 32 (one block).
    local_window : int
        Tokens before each query block computed exactly. Default 128 (paper).
    bits : int
        Quantization bits of the estimate. Default 4 (paper).
    min_length : int
        Prompts shorter than this are prefilled densely. Default 1025 (paper: prompts of <= 1024 tokens are dense).
    dense_above : float
        A head whose selection covers more than this fraction of the causal tiles is computed densely (every causal
        tile: a superset of the selection, so its output is exact). Not in the paper: a cost rule for the CPU
        kernel, which costs about ``1.5 x density`` of SDPA on SALE's per-head 64x32 tiles at 8k (measured on the
        default model, ``benchmarks/prefill_attention.py``), so above ~0.65 the dense fused kernel is cheaper.
        Measured at 8k on the default model's dense-ish layers 0, 3, 24 (1 thread, CPU time, ``--clock cpu``):
        4.21 s vs 4.77 s with ``dense_above=1`` (SDPA 3.12 s), output error 0.27% vs 0.53%, computed tiles 0.82 vs
        0.71. Default 0.65; 1 = never.
    backend : str
        See :class:`BlockSparsePrefill`; also picks the estimator's backend.

    Chunked prefill: a later chunk's queries are estimated over every key so far, centred (the INT4 estimate's query
    mean) on the mean of the prompt's queries so far, kept per sequence on the cache layer. The last chunk therefore
    selects exactly what the unchunked prompt selects for the rows of its whole query blocks (a block split by the
    chunk boundary takes its max over its rows in the chunk); an earlier chunk's centre has not seen the later
    queries (the centre only moves the INT4 rounding). ``dense_above`` is decided per forward, over the rows it
    computes: it only ever adds tiles, so outputs stay exact where it differs.
    """

    name = "sale"
    threshold: float | None = None
    thresholds: str | None = None
    block_m: int = 64
    block_n: int = 32
    sink: int = 32
    local_window: int = 128
    bits: int = 4
    min_length: int = 1025
    dense_above: float = 0.65

    def __post_init__(self):
        super().__post_init__()
        if self.threshold is not None:
            check_threshold(self.threshold, "threshold")
        if self.thresholds is not None and not isinstance(self.thresholds, (str, Path)):
            raise ValueError(f"thresholds ({self.thresholds!r}) must be a path to a JSON file or None")
        if self.threshold is not None and self.thresholds is not None:
            raise ValueError(f"threshold ({self.threshold}) and thresholds ({self.thresholds!r}) are exclusive: give "
                             "a uniform threshold or a calibrated thresholds file, not both")
        validate_blocks(self, block_m=self.block_m, block_n=self.block_n)
        for f in ("sink", "local_window"):
            val = getattr(self, f)
            check_int(f, val, 0, why="tokens")
        check_int("bits", self.bits, 2, 8)
        d = self.dense_above
        check_number("dense_above", d, 0, 1, low_open=True,
                     why="the selected fraction of causal tiles above which a head is computed densely; 1 = never")
        self._tau: torch.Tensor | None = None  # (num_layers, H_q), 0 = dense head; set by bind()
        self._note = f"sale: uniform threshold={self.uniform_threshold} for every head (method not bound to a model)"

    # ------------------------------------------------------------------------------------------ thresholds
    def bind(self, model) -> None:
        """Find and check the per-head thresholds for ``model`` (lookup order in the module docstring)."""
        from kvaccel.models import model_fingerprint, model_name

        layers, heads = _shape(model)
        if self.threshold is not None:
            self._tau = None
            self._note = f"sale: uniform threshold={self.threshold} for every head (as given)"
            return
        if self.thresholds is not None:
            data = load_thresholds(self.thresholds, model)
            path = Path(self.thresholds)
        else:
            data, path = None, None
            for cand in _candidates(model):
                if cand.is_file():
                    found = json.loads(cand.read_text())
                    if found.get("fingerprint") == model_fingerprint(model):
                        data, path = load_thresholds(cand, model), cand
                        break
        if data is None:
            self._tau = None
            self._note = (
                f"sale: no calibrated thresholds for model {model_name(model)} (fingerprint "
                f"{model_fingerprint(model)}); uniform threshold={DEFAULT_THRESHOLD} used for every head — run "
                "`kvaccel calibrate sale --model ...` for per-head thresholds"
            )
            return
        self._tau = thresholds_tensor(data)
        dense = int((self._tau == 0).sum())
        self._note = f"sale: per-head thresholds from {path} ({dense} of {layers * heads} heads dense)"
        st = data.get("settings", {})
        differs = [f for f in ("block_m", "block_n", "sink", "local_window", "bits") if f in st and st[f] != getattr(
            self, f)]
        if differs:
            self._note += "; calibrated with " + ", ".join(f"{f}={st[f]}" for f in differs) + " (used with " + (
                ", ".join(f"{f}={getattr(self, f)}" for f in differs)) + ")"

    @property
    def uniform_threshold(self) -> float:
        """The ``τ`` of every head when no per-head thresholds are bound: ``threshold``, else ``DEFAULT_THRESHOLD``."""
        return DEFAULT_THRESHOLD if self.threshold is None else self.threshold

    def head_thresholds(self, layer: int) -> float | torch.Tensor:
        """``τ`` of every query head of ``layer`` (``(H_q,)``, 0 = dense) or the uniform threshold."""
        return self.uniform_threshold if self._tau is None else self._tau[layer]

    # ------------------------------------------------------------------------------------------ prefill
    def tile_shape(self) -> tuple[int, int]:
        return self.block_m, self.block_n

    def attention(self, ctx):
        ctx.state.notes.add(self._note)
        self._query_sum(ctx)  # every chunk, dense ones too: a later chunk centres on the prompt's queries so far
        return super().attention(ctx)

    def _query_sum(self, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        """Add this forward's real queries to the running per-sequence query sum kept on the cache layer (float64,
        ``(B, H_q, D)`` and counts ``(B,)``), restarted by the first forward of a prompt; returns the sum so far."""
        q = ctx.query
        real = None if ctx.pad is None else ctx.pad[:, -q.shape[2] :]
        if real is not None:
            q = q.masked_fill(~real[:, None, :, None], 0)
        total = q.sum(2, dtype=torch.float64)
        count = torch.full((q.shape[0],), q.shape[2], device=q.device) if real is None else real.sum(-1)
        previous = getattr(ctx.layer, _QUERY_SUM, None) if ctx.phase == "extend" else None
        if previous is not None:
            total, count = total + previous[0], count + previous[1]
        elif ctx.phase == "extend":
            ctx.state.notes.add("sale: a later prompt chunk centres the estimate on its own queries (no KVAccelCache "
                                "kept the earlier chunks' query sum)")
        if ctx.layer is not None:
            setattr(ctx.layer, _QUERY_SUM, (total, count))
        return total, count

    def select_inputs(self, ctx) -> tuple[torch.Tensor, ...]:
        """The query centre of every sequence (its queries so far), broadcast over this forward's rows."""
        kept = getattr(ctx.layer, _QUERY_SUM, None)
        total, count = kept if kept is not None else self._query_sum(ctx)
        mean = (total / count.clamp(min=1)[:, None, None]).float()
        return (mean[:, :, None, :].expand(ctx.query.shape[0], -1, ctx.query.shape[2], -1),)

    def select(self, q, k, v, scale, layer_idx, q_mean=None) -> BlockSelection:
        tau = self.head_thresholds(layer_idx)
        if isinstance(tau, torch.Tensor):
            tau = tau.to(q.device)
        mask = sale_estimate(
            q, k, scale=scale, threshold=tau, block_m=self.block_m, block_n=self.block_n, sink=self.sink,
            local_window=self.local_window, bits=self.bits, backend=self.backend,
            q_mean=None if q_mean is None else q_mean[:, :, :1],
        )
        if self.dense_above < 1:
            causal = causal_block_mask(k.shape[2], self.block_m, self.block_n, device=mask.device, q_len=q.shape[2])
            density = (mask & causal).flatten(2).sum(-1) / causal.sum()  # (B, H_q)
            mask = mask | ((density > self.dense_above)[..., None, None] & causal)
        return BlockSelection(mask, self.block_m, self.block_n)


# ---------------------------------------------------------------------------------------------- file helpers
def check_threshold(value: Any, where: str) -> float:
    """``ValueError`` naming ``where`` and the value unless ``0 < value < 1``."""
    check_number(where, value, 0, 1, low_open=True, high_open=True,
                 why="the relative attention score a key block must exceed")
    return float(value)


def _shape(model) -> tuple[int, int]:
    cfg = text_config(model)
    return int(cfg.num_hidden_layers), int(cfg.num_attention_heads)


def _candidates(model, beside: str = BESIDE_MODEL, prefix: str = "sale", data_dir: Path = DATA_DIR) -> list[Path]:
    """Files fitted to ``model``, in lookup order: ``beside`` in a local model's directory, ``<prefix>_<model
    name>.json`` in the kvaccel cache dir, ``<model name>.json`` in the package's ``data_dir``."""
    from kvaccel.models import cache_dir, model_name

    out = []
    src = Path(str(getattr(model.config, "_name_or_path", "") or ""))
    if str(src) and src.is_dir():
        out.append(src / beside)
    out.append(cache_dir() / f"{prefix}_{model_name(model)}.json")
    out.append(data_dir / f"{model_name(model)}.json")
    return out


def default_out(model, beside: str = BESIDE_MODEL, prefix: str = "sale") -> Path:
    """Where ``kvaccel calibrate sale`` (``minference``: its ``beside`` / ``prefix``) writes by default: beside a
    local model, else in the kvaccel cache dir."""
    from kvaccel.models import DEFAULT_MODEL, cache_dir, model_name

    src = Path(str(getattr(model.config, "_name_or_path", "") or ""))
    if str(src) and src.is_dir() and src.resolve() != (cache_dir() / DEFAULT_MODEL).resolve():
        return src / beside
    return cache_dir() / f"{prefix}_{model_name(model)}.json"


def thresholds_tensor(data: dict) -> torch.Tensor:
    """``(num_layers, H_q)`` float64 thresholds of a checked file (``null`` dense heads as 0)."""
    return torch.tensor([[0.0 if t is None else t for t in row] for row in data["thresholds"]], dtype=torch.float64)


def load_thresholds(path: str | Path, model=None) -> dict:
    """Read and check a thresholds file; with ``model``, refuse a file fitted to another model (``ValueError``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SALE thresholds file {path} does not exist; create it with `kvaccel calibrate sale`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"SALE thresholds file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a SALE thresholds file (expected format {FORMAT!r})")
    rows = data.get("thresholds")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and r for r in rows):
        raise ValueError(f"{path}: 'thresholds' must be a non-empty list of per-layer lists of per-head values")
    for li, row in enumerate(rows):
        for hi, t in enumerate(row):
            if t is not None:
                check_threshold(t, f"{path}: threshold of layer {li} head {hi}")
    if model is not None:
        from kvaccel.models import model_fingerprint, model_name

        fp, name = model_fingerprint(model), model_name(model)
        if data.get("fingerprint") != fp:
            raise ValueError(
                f"{path} holds SALE thresholds for model {data.get('model')!r} (fingerprint "
                f"{data.get('fingerprint')}), not for model {name!r} (fingerprint {fp}); calibrate this model with "
                "`kvaccel calibrate sale`"
            )
        layers, heads = _shape(model)
        if len(rows) != layers or any(len(r) != heads for r in rows):
            raise ValueError(f"{path}: thresholds must be {layers} layers x {heads} heads for model {name!r}")
    return data


def write_thresholds(path: str | Path, data: dict) -> Path:
    """Write a thresholds dict (as :func:`calibrate` returns it) to ``path`` after checking every value."""
    for li, row in enumerate(data["thresholds"]):
        for hi, t in enumerate(row):
            if t is not None:
                check_threshold(t, f"threshold of layer {li} head {hi}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- calibration
def calibration_prompts(tokenizer, num_prompts: int = 2, length: int = 4096) -> list[torch.Tensor]:
    """``num_prompts`` ``(1, length)`` token-id tensors of English prose from ``pydoc_data.topics`` (offline), cut at
    different places of the second half of the text (the eval harness's prose prompts start at its beginning)."""
    from pydoc_data.topics import topics

    text = " ".join(" ".join(topics[k].split()) for k in sorted(topics))
    out = []
    span = length * 8  # characters: >= 1 token each for this tokenizer family
    half = len(text) // 2  # the second half: evals' prose prompts (fidelity) start at the beginning of the text
    for p in range(num_prompts):
        start = half + p * half // max(1, num_prompts)
        chunk = (text[start:] + " " + text)[:span]
        ids = tokenizer(chunk, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :length]
        if ids.shape[1] < length:
            raise ValueError(f"could not build a {length}-token calibration prompt from pydoc_data")
        out.append(ids)
    return out


def run_calibration_prompts(
    model,
    method: PrefillMethod,
    tokenizer,
    prompts: Sequence[str | torch.Tensor] | None,
    num_prompts: int,
    length: int,
    min_length: int,
    progress: Callable[[str], None] | None = None,
) -> list[torch.Tensor]:
    """One dense, cache-less prefill of every calibration prompt under ``method`` (a recording prefill method), on an
    unpatched ``model``, which is unpatched again afterwards; returns the prompts' token ids.

    ``prompts`` (strings or token ids; default :func:`calibration_prompts` of ``num_prompts`` x ``length``) must each
    have at least ``min_length`` tokens."""
    from kvaccel.api import is_patched, patch, unpatch

    if is_patched(model):
        raise ValueError("calibrate() needs an unpatched model; call kvaccel.unpatch(model) first")
    if prompts is None:
        prompts = calibration_prompts(tokenizer, num_prompts, length)
    ids = [tokenizer(p, return_tensors="pt", add_special_tokens=False)["input_ids"] if isinstance(p, str) else p
           for p in prompts]
    short = [x.shape[-1] for x in ids if x.shape[-1] < min_length]
    if short:
        raise ValueError(f"calibration prompts must have >= min_length={min_length} tokens, got lengths {short}")
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    patch(model, method)
    try:
        with torch.inference_mode():
            for i, x in enumerate(ids):
                model(input_ids=x.reshape(1, -1).to(device), use_cache=False, logits_to_keep=1)
                if progress:
                    progress(f"prompt {i + 1}/{len(ids)} ({x.shape[-1]} tokens) done, {time.perf_counter() - t0:.0f}s")
    finally:
        unpatch(model)
    return ids


@dataclass
class _Calibration(PrefillMethod):
    """Internal prefill "method" used by :func:`calibrate`: dense output, plus the per-head threshold search."""

    name = "sale_calibration"
    sale: SALE | None = None
    candidates: tuple = ()
    tolerance: float = 0.01
    chunk: int = 256

    def __post_init__(self):
        self.errors: dict[int, list[list[list[float]]]] = {}  # layer -> prompt -> head -> candidate
        self.cand_density: dict[int, list[list[list[float]]]] = {}

    def attention(self, ctx):
        from kvaccel.patches.attention import dense_prefill

        q, k, v = ctx.query, ctx.key, ctx.value
        if ctx.pad is not None or q.shape[0] != 1:
            raise ValueError("SALE calibration runs one unpadded prompt at a time (batch 1)")
        if q.shape[2] >= self.sale.min_length:
            _, _, errs, cand_dens = calibrate_layer(q, k, v, ctx.scaling, self.sale, self.candidates,
                                                          self.tolerance, self.chunk)
            self.errors.setdefault(ctx.layer_idx, []).append(errs)
            self.cand_density.setdefault(ctx.layer_idx, []).append(cand_dens)
        return dense_prefill(ctx)


def calibrate_layer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, sale: SALE,
                    candidates: Sequence[float], tolerance: float, chunk: int = 256
                    ) -> tuple[list[float], float, list[list[float]], list[list[float]]]:
    """Per query head, the first ``τ`` of ``candidates`` (decreasing) whose sparse output has relative error
    ``||O_τ - O||_F / ||O||_F <= tolerance`` against dense attention, or 0 (dense) when none does.

    One estimate gives every candidate's mask (``sale_block_scores > log τ``); the sparse outputs come from per
    (row, key block) partial sums of the exact softmax, so a candidate costs ``O(L · nKB · D)``, not an attention.
    Returns the per-head thresholds, the density (fraction of causal tiles) they give on this prompt, and per head
    the relative error and the density of every candidate.
    """
    _, Hq, L, D = q.shape
    G = Hq // k.shape[1]
    bm, bn = sale.block_m, sale.block_n
    scores = sale_block_scores(q, k, scale=scale, block_m=bm, block_n=bn, sink=sale.sink,
                               local_window=sale.local_window, bits=sale.bits)[0]  # (Hq, nQB, nKB)
    nkb = num_blocks(L, bn)
    causal = causal_block_mask(L, bm, bn, device=q.device)
    logs = torch.tensor([math.log(t) for t in candidates], dtype=torch.float32, device=q.device)
    taus, kept, errors, densities = [], 0, [], []
    pos = torch.arange(L, device=q.device)
    for h in range(Hq):
        qh, kh = q[0, h].float(), k[0, h // G].float()
        vh = torch.zeros(nkb * bn, v.shape[-1], dtype=torch.float32, device=q.device)
        vh[:L] = v[0, h // G].float()
        err2 = torch.zeros(len(candidates), dtype=torch.float64, device=q.device)
        ref2 = torch.zeros((), dtype=torch.float64, device=q.device)
        for r0 in range(0, L, chunk):
            r1 = min(L, r0 + chunk)
            nk = num_blocks(r1, bn)  # key blocks this chunk's rows can see (causal)
            hi = min(L, nk * bn)
            s = (qh[r0:r1] @ kh[:hi].T) * scale
            s.masked_fill_(pos[None, :hi] > pos[r0:r1, None], float("-inf"))
            p = torch.softmax(s, -1)
            pp = torch.zeros(r1 - r0, nk * bn, dtype=torch.float32, device=q.device)
            pp[:, :hi] = p
            num = torch.bmm(pp.view(-1, nk, bn).transpose(0, 1), vh[: nk * bn].view(nk, bn, -1))  # (nk, R, Dv)
            den = pp.view(-1, nk, bn).sum(-1)  # (R, nk)
            o_ref = num.sum(0)
            rb = pos[r0:r1] // bm
            sc = scores[h, rb, :nk]  # (R, nk) per row: its query block's block scores
            m = (sc[None] > logs[:, None, None]) & causal[rb, :nk][None]  # (C, R, nk)
            mf = m.float()
            o = torch.einsum("crj,jrd->crd", mf, num) / (mf * den[None]).sum(-1, keepdim=True)
            err2 += (o - o_ref[None]).double().pow(2).sum((1, 2))
            ref2 += o_ref.double().pow(2).sum()
        rel = (err2 / ref2.clamp(min=1e-30)).sqrt()
        errors.append([float(e) for e in rel])
        ncausal = int(causal.sum())
        densities.append([float(((scores[h] > lg) & causal).sum()) / ncausal for lg in logs])
        ok = (rel <= tolerance).nonzero().flatten()
        if ok.numel():
            c = int(ok[0])
            taus.append(float(candidates[c]))
            kept += int(((scores[h] > logs[c]) & causal).sum())
        else:
            taus.append(0.0)
            kept += ncausal
    return taus, kept / (Hq * int(causal.sum())), errors, densities


def calibrate(
    model,
    tokenizer,
    prompts: Sequence[str | torch.Tensor] | None = None,
    *,
    num_prompts: int = 2,
    length: int = 4096,
    tolerance: float = 0.01,
    start: float = 0.008,
    floor: float = 1e-4,
    method: SALE | None = None,
    out: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Calibrate SALE's per-(layer, head) thresholds on ``model``; returns the thresholds dict (and writes ``out``).

    For every prompt (default: ``num_prompts`` prose prompts of ``length`` tokens from ``pydoc_data``) the model
    runs one dense prefill; in every layer and head, ``τ`` starts at ``start`` and halves until the head's sparse
    output is within ``tolerance`` (relative Frobenius error) of dense; once ``τ <= floor`` the head stays dense
    (``null`` in the file). Over several prompts a head keeps the smallest ``τ`` found (dense if any prompt needed
    dense). ``method`` gives the block sizes / window / bits (default ``SALE()``).
    """
    sale = method or SALE()
    for name, val in (("tolerance", tolerance), ("start", start), ("floor", floor)):
        check_threshold(val, name)
    if floor >= start:
        raise ValueError(f"floor ({floor}) must be smaller than start ({start})")
    candidates, t = [], start
    while t > floor:
        candidates.append(t)
        t /= 2
    calib = _Calibration(sale=sale, candidates=tuple(candidates), tolerance=tolerance)
    t0 = time.perf_counter()
    ids = run_calibration_prompts(model, calib, tokenizer, prompts, num_prompts, length, sale.min_length, progress)
    layers, heads = _shape(model)
    errors, cand_density = [], []
    for li in range(layers):
        if not calib.errors.get(li):
            raise RuntimeError(f"layer {li} was never calibrated (no prefill reached it)")
        per_prompt = calib.errors[li]  # prompt -> head -> candidate
        errors.append([[max(p[h][c] for p in per_prompt) for c in range(len(candidates))] for h in range(heads)])
        dens = calib.cand_density[li]
        cand_density.append([[sum(p[h][c] for p in dens) / len(dens) for c in range(len(candidates))]
                             for h in range(heads)])
    settings = {
        "tolerance": tolerance, "start": start, "floor": floor, "metric": "relative Frobenius error of the head output",
        "prompts": len(ids), "lengths": [int(x.shape[-1]) for x in ids], "block_m": sale.block_m,
        "block_n": sale.block_n, "sink": sale.sink, "local_window": sale.local_window, "bits": sale.bits,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    from kvaccel.models import model_fingerprint, model_name

    data = {"format": FORMAT, "model": model_name(model), "fingerprint": model_fingerprint(model),
            "settings": settings, "candidates": candidates, "errors": errors, "candidate_density": cand_density}
    data = rethreshold(data, tolerance)
    if out is not None:
        write_thresholds(out, data)
    return data


def rethreshold(data: dict, tolerance: float) -> dict:
    """Thresholds for another ``tolerance`` from a calibration's stored per-candidate errors (no model run).

    Per head: the first (largest) candidate ``τ`` whose error is ``<= tolerance``, else dense (``null``); also sets
    ``density``, the per-layer mean calibration density of the chosen thresholds.
    """
    check_threshold(tolerance, "tolerance")
    if "errors" not in data or "candidates" not in data:
        raise ValueError("this thresholds file stores no per-candidate errors; re-run `kvaccel calibrate sale`")
    cands = data["candidates"]
    table, density = [], []
    for errs, dens in zip(data["errors"], data["candidate_density"], strict=True):
        row, d = [], []
        for he, hd in zip(errs, dens, strict=True):
            c = next((i for i, e in enumerate(he) if e <= tolerance), None)
            row.append(None if c is None else float(cands[c]))
            d.append(1.0 if c is None else hd[c])
        table.append(row)
        density.append(sum(d) / len(d))
    out = dict(data)
    out["settings"] = dict(data.get("settings", {}), tolerance=tolerance)
    out["thresholds"], out["density"] = table, density
    return out
