"""Fast offline comparison of eviction scorers on kvpress' KL protocol (a lab for choosing a scorer, not a result).

One dense prefill per prompt captures every layer's post-RoPE queries, keys and values; each candidate scorer then
selects the kept tokens per kv head from those tensors, and only the 64 teacher-forced target tokens are run over
the compressed cache (explicit positions, as kvpress does). Since eviction at prefill never changes the prefill's
own hidden states, this gives the same KL as compressing inside the forward, at 1/20 of the cost per candidate.
Numbers reported as results come from ``kvpress_vs_kvaccel.py kl`` (the real patched path), not from this lab.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/peers/score_lab.py --prompts runs/kl-peers/kl_tune.jsonl \\
        --budgets 0.5,0.25 --candidates ea,ea+recent32,snapkv
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from collections import defaultdict
from pathlib import Path

import torch


@contextlib.contextmanager
def attention_function(model, name: str, fn):
    """Run the block with ``fn`` registered as ``name`` and set as the model's attention implementation."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, fn)
    old = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(old)


def capture(model, ctx_ids):
    """Dense prefill; returns the cache and per layer (q post-RoPE (1,Hq,L,D), k, v (1,Hkv,L,D))."""
    from transformers import DynamicCache
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    grabbed = {}

    def grab(module, query, key, value, attention_mask, **kw):
        grabbed[module.layer_idx] = (query.detach(), key.detach(), value.detach())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    with attention_function(model, "lab_capture", grab):
        model(ctx_ids, past_key_values=DynamicCache(), use_cache=True)
    return [grabbed[i] for i in range(len(grabbed))]


def target_logits(model, layers_kv, L, tgt_ids):
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(layers_kv):
        cache.update(k, v, i)
    pos = torch.arange(L, L + tgt_ids.shape[1])[None]
    return model(tgt_ids, past_key_values=cache, use_cache=True, position_ids=pos).logits[0].double()


MASKS: dict = {}  # layer -> (1, Hkv, L) bool keep-mask of the context keys (per-head budgets, masked not freed)


def masked_target_logits(model, layers_kv, masks, L, tgt_ids):
    """Target logits over the full context cache with per-head keep-masks (how kvpress applies AdaKV / KVzip)."""

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        G = query.shape[1] // key.shape[1]
        n = query.shape[2]
        keep = MASKS[module.layer_idx].repeat_interleave(G, 1)[:, :, None, :]  # (1, Hq, 1, L)
        bias = torch.zeros(1, query.shape[1], n, key.shape[2], dtype=query.dtype)
        bias[..., :L] = bias[..., :L].masked_fill(~keep, float("-inf"))
        bias[..., L:] = torch.full((n, n), float("-inf")).triu(1)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key.repeat_interleave(G, 1), value.repeat_interleave(G, 1), attn_mask=bias, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    MASKS.clear()
    MASKS.update(enumerate(masks))
    with attention_function(model, "lab_masked", attend):
        return target_logits(model, layers_kv, L, tgt_ids)


ZIP: dict = {}  # layer -> (1, Hkv, L) KVzip scores of the current window


def reconstruction_scores(model, tokenizer, layers_kv, ctx_ids):
    """KVzip (https://arxiv.org/abs/2505.23416; kvpress' KVzipPress on plain text, one chunk): feed
    "\n\nRepeat the previous context exactly." + "\n" + context over the context's cache; a context key's score is
    the max, over the repeat queries and the group's query heads, of its softmax attention (over context + repeat):
    ``kvaccel.patches.evict.kvzip.reconstruction_max_attention``, the method's own scoring."""
    from transformers import DynamicCache

    from kvaccel.patches.evict.kvzip import reconstruction_max_attention

    L = ctx_ids.shape[1]
    rep = tokenizer.encode("\n\nRepeat the previous context exactly.", add_special_tokens=False)
    rep = rep + tokenizer.encode("\n", add_special_tokens=False)
    ids = torch.cat([torch.tensor([rep]), ctx_ids], 1)
    n = ids.shape[1]

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        G = query.shape[1] // key.shape[1]
        ZIP[module.layer_idx] = reconstruction_max_attention(query, key, scaling, slice(0, L), 0)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key.repeat_interleave(G, 1), value.repeat_interleave(G, 1),
            attn_mask=torch.cat([torch.zeros(n, L), torch.full((n, n), float("-inf")).triu(1)], 1), scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    cache = DynamicCache()
    for i, (k, v) in enumerate(layers_kv):
        cache.update(k, v, i)
    ZIP.clear()
    with attention_function(model, "lab_zip", attend):
        model(ids, past_key_values=cache, use_cache=True, position_ids=torch.arange(L, L + n)[None])


def allocate(scores, cap, rule, alpha=0.2):
    """Per-head keep-masks from per-layer scores [(1, Hkv, L)] with ``cap`` tokens per head on average.
    ``head``: AdaKV within each layer (top cap*Hkv of the layer's heads, each head >= alpha*cap);
    ``global``: across every layer and head, scores normalised per head (each head's finite scores sum to 1)."""
    def norm(s):
        f = torch.isfinite(s)
        z = torch.where(f, s, torch.zeros_like(s))
        z = z / z.sum(-1, keepdim=True).clamp(min=1e-30)
        return torch.where(f, z, torch.full_like(s, 1e9))  # sinks first

    masks = []
    if rule == "raw":  # KVzip's: global top over the raw scores of every layer and head (sinks first)
        z = torch.stack([torch.where(torch.isfinite(s), s, torch.full_like(s, 1e9)) for s in scores])
        keep = torch.zeros_like(z, dtype=torch.bool)
        keep.view(-1)[z.flatten().topk(cap * z.shape[2] * z.shape[0]).indices] = True
        return list(keep)
    if rule == "head":
        for s in scores:
            H = s.shape[1]
            z = norm(s)
            keep = torch.zeros_like(z, dtype=torch.bool)
            safe = z.topk(int(alpha * cap), -1).indices
            keep.scatter_(-1, safe, True)
            rest = z.masked_fill(keep, -1.0).flatten()
            keep.view(-1)[rest.topk(cap * H - int(alpha * cap) * H).indices] = True
            masks.append(keep)
        return masks
    z = torch.stack([norm(s) for s in scores])  # (layers, 1, H, L)
    keep = torch.zeros_like(z, dtype=torch.bool)
    keep.view(-1)[z.flatten().topk(cap * z.shape[2] * z.shape[0]).indices] = True
    return list(keep)


# ---------------------------------------------------------------------------------------------- scorers
def ea_probs(q, k, rotary, n_future=512, n_sink=4, cov=True, window=0, positions="avg_rotation", n_pos=8,
             group="mean", cov_scale=1.0):
    """(1, Hkv, L) expected attention probabilities (sinks excluded from the softmax and set to 0)."""
    from kvaccel.patches.evict.expected_attention import average_rotation, expected_logits, query_statistics, unrotate

    B, Hq, L, D = q.shape
    pos = torch.arange(L)[None]
    cos, sin = rotary(q, pos)
    q_pre = unrotate(q.float(), cos[:, None], sin[:, None])
    mask = torch.zeros(1, L, dtype=torch.bool)
    mask[:, n_sink:] = True
    if window:
        mask[:, : L - window] = False
    mu, cv = query_statistics(q_pre, mask, cov)
    if cv is not None:
        cv = cv * cov_scale
    scale = 1 / math.sqrt(D)

    def probs_at(fpos):
        """Expected attention with the query statistics rotated by the average rotation over ``fpos``."""
        c, s = rotary(mu, fpos)
        R = average_rotation(c, s)[:, None]
        mu_f = (R @ mu[..., None])[..., 0]
        cv_f = None if cv is None else R @ cv @ R.transpose(-1, -2)
        logits = expected_logits(mu_f, cv_f, k, scale)
        logits[..., :n_sink] = float("-inf")
        p = torch.softmax(logits, -1)
        return p.amax(2) if group == "max" else p.mean(2)

    if positions == "avg_rotation":
        return probs_at(torch.arange(L, L + n_future)[None])
    # mixture over future positions: mean_p softmax(E-logits at position p) (log-spaced sample of offsets)
    offs = torch.unique(torch.logspace(0, math.log10(n_future), n_pos).round().long() - 1)
    if positions == "uniform":
        offs = torch.linspace(0, n_future - 1, n_pos).round().long()
    return sum(probs_at(torch.tensor([[L + o]])) for o in offs.tolist()) / len(offs)


def empirical_probs(q, k, rotary, n_future=512, n_sink=4, n_q=128, n_pos=8, stride=False):
    """(1, Hkv, L) Monte Carlo expected attention: ``n_q`` real prompt queries (pre-RoPE; the last ones, or spread
    over the prompt with ``stride``), each placed at ``n_pos`` log-spaced future positions; softmax over the keys
    (sinks excluded), averaged over queries, positions and the group."""
    from kvaccel.patches.evict.expected_attention import unrotate

    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    cos, sin = rotary(q, torch.arange(L)[None])
    q_pre = unrotate(q.float(), cos[:, None], sin[:, None])
    idx = torch.linspace(n_sink, L - 1, n_q).round().long() if stride else torch.arange(max(n_sink, L - n_q), L)
    qs = q_pre[:, :, idx]  # (1, Hq, n, D)
    offs = torch.unique(torch.logspace(0, math.log10(n_future), n_pos).round().long() - 1)
    kk = k.float()
    acc = 0
    for o in offs.tolist():
        c, s_ = rotary(qs, torch.full((1, 1), L + o))
        qr = qs * c[:, None] + torch.cat((-qs[..., D // 2:], qs[..., : D // 2]), -1) * s_[:, None]
        a = torch.einsum("bhgnd,bhld->bhgnl", qr.view(B, Hkv, G, -1, D), kk) / math.sqrt(D)
        a[..., :n_sink] = float("-inf")
        acc = acc + torch.softmax(a, -1).mean((2, 3))
    return acc / len(offs)


def window_probs(q, k, window=32, pool=7):
    """(1, Hkv, L) SnapKV: attention of the last ``window`` queries, averaged over queries and group, max-pooled."""
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    qw = q[:, :, -window:].float()
    kk = k.float().repeat_interleave(G, 1)
    a = qw @ kk.transpose(-1, -2) / math.sqrt(D)
    causal = torch.ones(window, L, dtype=torch.bool).tril(L - window)
    a = torch.softmax(a.masked_fill(~causal, float("-inf")), -1)
    s = a.mean(2).view(B, Hkv, G, L).mean(2)
    if pool > 1:
        s = torch.nn.functional.max_pool1d(s, pool, 1, pool // 2)
    return s


def make_scores(name, q, k, v, rotary, layer=0):
    """Parse ``name`` = '+'-joined parts: base scorer then modifiers. Returns (scores (1,Hkv,L), chunk)."""
    parts = name.split("+")
    base, mods = parts[0], parts[1:]
    L = k.shape[2]
    kw = {}
    obs_w, obs_pool = 32, 7
    for m in mods:
        if m.startswith("obs"):
            obs_w = int(m[3:])
        elif m.startswith("pool"):
            obs_pool = int(m[4:])
        if m.startswith("F"):
            kw["n_future"] = int(m[1:])
        elif m.startswith("win"):
            kw["window"] = int(m[3:])
        elif m.startswith("cov"):
            kw["cov_scale"] = float(m[3:])
        elif m == "gmax":
            kw["group"] = "max"
        elif m == "nocov":
            kw["cov"] = False
        elif m.startswith("mixu"):  # uniform offsets
            kw["positions"] = "uniform"
            kw["n_pos"] = int(m[4:])
        elif m.startswith("mixpos"):
            kw["positions"] = "mixture"
            if m[6:]:
                kw["n_pos"] = int(m[6:])
    if base == "zip":
        s = ZIP[layer].clone()
    elif base.startswith("zwin"):  # KVzip's max with the last N prompt queries' own attention added to its queries
        from kvaccel.patches.evict.kvzip import reconstruction_max_attention

        n = int(base[4:])
        own = reconstruction_max_attention(q[:, :, L - n :], k, 1 / math.sqrt(q.shape[-1]), slice(0, L - n), 0,
                                           include_own=True)
        s = torch.maximum(ZIP[layer], own)
    elif base in ("pmax", "zmax"):  # max attention over every prompt query (and the group); zmax: max with KVzip's
        Hkv, G = k.shape[1], q.shape[1] // k.shape[1]
        a = torch.einsum("bhgqd,bhkd->bhgqk", q.view(1, Hkv, G, L, -1).float(), k.float()) / math.sqrt(q.shape[-1])
        a = torch.softmax(a + torch.full((L, L), float("-inf")).triu(1), -1)
        s = a.amax((2, 3))
        if base == "zmax":
            s = torch.maximum(s, ZIP[layer])
    elif base.startswith("zhyb"):  # zhybA: (1-A) * normalised KVzip + A * (EA-mixture + 20% SnapKV) (A in percent)
        a = int(base[4:]) / 100
        z = ZIP[layer].clone()
        z[..., :4] = 0
        kw.setdefault("positions", "mixture")
        e = ea_probs(q, k, rotary, **kw)
        w = window_probs(q, k, obs_w, obs_pool)
        w[..., :4] = 0
        h = 0.8 * e + 0.2 * w / w.sum(-1, keepdim=True)
        s = (1 - a) * z / z.sum(-1, keepdim=True) + a * h
    elif base == "ea":
        s = ea_probs(q, k, rotary, **kw)
    elif base.startswith("emp"):  # empN[s]: empirical expected attention of N queries (s: strided), mixture offsets
        n = int(base[3:].rstrip("s"))
        s = empirical_probs(q, k, rotary, n_q=n, stride=base.endswith("s"))
    elif base.startswith("ehyb"):  # ehybA_N[s]: (1-A) * empirical + A * SnapKV
        a, n = base[4:].split("_")
        e = empirical_probs(q, k, rotary, n_q=int(n.rstrip("s")), stride=n.endswith("s"))
        w = window_probs(q, k, obs_w, obs_pool)
        w[..., :4] = 0
        s = (1 - int(a) / 100) * e + int(a) / 100 * w / w.sum(-1, keepdim=True)
    elif base == "snapkv":
        s = window_probs(q, k)
    elif base.startswith("hyb"):  # hybA: (1-A) * EA + A * SnapKV probabilities (A in percent)
        a = int(base[3:]) / 100
        e = ea_probs(q, k, rotary, **kw)
        w = window_probs(q, k, obs_w, obs_pool)
        w[..., :4] = 0
        s = (1 - a) * e + a * w / w.sum(-1, keepdim=True)
    else:
        raise ValueError(base)
    vn = v.float().norm(dim=-1)
    chunk = 1
    for m in mods:
        if m.startswith("vpow"):
            vn = vn ** float(m[4:])
        if m == "novnorm":
            vn = None
        elif m == "caote":  # attention-output error of dropping j: p_j * ||v_j - o||, o the expected output
            pn = s / s.sum(-1, keepdim=True)
            o = (pn[..., None] * v.float()).sum(2, keepdim=True)
            vn = (v.float() - o).norm(dim=-1)
        elif m.startswith("recent"):
            s = s.clone()
            s[..., L - int(m[6:]):] = float("inf")
        elif m.startswith("chunk"):
            chunk = int(m[5:])
    if vn is not None and base not in ("snapkv", "zip", "pmax", "zmax") and not base.startswith("zwin") or "vn" in mods:
        s = s * vn
    s = s.clone()
    s[..., :4] = float("inf")  # sinks
    return s, chunk


def select(scores, cap, chunk):
    from kvaccel.patches.evict.base import KEEP_SCORE, chunk_select

    s = scores.masked_fill(torch.isinf(scores), KEEP_SCORE)
    idx = chunk_select(s, cap, chunk) if chunk >= 2 else s.topk(cap, -1).indices
    return idx.sort(-1).values


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--budgets", default="0.5,0.25")
    ap.add_argument("--candidates", required=True)
    ap.add_argument("--out", default="")
    ap.add_argument("--limit", type=int, default=0)
    args = ap.parse_args()
    import kvaccel

    torch.set_num_threads(1)
    model, tokenizer = kvaccel.load_model()
    rotary = model.model.rotary_emb
    prompts = [json.loads(x) for x in Path(args.prompts).read_text().splitlines() if x.strip()]
    if args.limit:
        prompts = prompts[: args.limit]
    cands = args.candidates.split(",")
    res = defaultdict(list)
    out = open(args.out, "a") if args.out else None
    with torch.inference_mode():
        for p in prompts:
            t0 = time.time()
            ctx, tgt = torch.tensor([p["context_ids"]]), torch.tensor([p["target_ids"]])
            L = ctx.shape[1]
            layers = capture(model, ctx)
            ref = torch.log_softmax(target_logits(model, [(k, v) for _, k, v in layers], L, tgt), -1)
            if any("zip" in c for c in cands):
                reconstruction_scores(model, tokenizer, [(k, v) for _, k, v in layers], ctx)
            for b in (float(x) for x in args.budgets.split(",")):
                cap = int(L * b)
                for c in cands:
                    rule, _, scorer = c.rpartition("|")  # "head|..." / "global|...": per-head budgets (masked)
                    if rule:
                        scores = [make_scores(scorer, q, k, v, rotary, i)[0] for i, (q, k, v) in enumerate(layers)]
                        masks = allocate(scores, cap, rule)
                        logits = masked_target_logits(model, [(k, v) for _, k, v in layers], masks, L, tgt)
                        lp = torch.log_softmax(logits, -1)
                    else:
                        kv = []
                        for i, (q, k, v) in enumerate(layers):
                            s, chunk = make_scores(c, q, k, v, rotary, i)
                            idx = select(s, cap, chunk)
                            g = idx[..., None].expand(-1, -1, -1, k.shape[-1])
                            kv.append((k.gather(2, g), v.gather(2, g)))
                        lp = torch.log_softmax(target_logits(model, kv, L, tgt), -1)
                    kl = float((ref.exp() * (ref - lp)).sum(-1).mean())
                    res[(b, c)].append(kl)
                    if out:
                        out.write(json.dumps({"id": p["id"], "budget": b, "cand": c, "kl": kl}) + "\n")
                        out.flush()
            print(f"{p['id']} {time.time() - t0:.0f}s", flush=True)
    for b in sorted({b for b, _ in res}, reverse=True):
        base = None
        for c in cands:
            ks = res[(b, c)]
            m = sum(ks) / len(ks)
            base = base or m
            print(f"kept {b} {c:32s} KL {m:.4f}  x{m / base:.2f}  per-sample " + " ".join(f"{x:.4f}" for x in ks))


if __name__ == "__main__":
    main()
