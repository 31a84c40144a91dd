"""Block-sparse prefill attention on CPU: designs of the PyTorch path side by side with dense causal SDPA.

Shapes default to the default model (SmolLM2-135M: ``H_q=9, H_kv=3, D=64``), fp32, batch 1. Masks (64x64 tiles):

- ``a_shape``: sink block + local band (MInference's A-shape), ~13% of the causal tiles at 8k;
- ``vertical_slash``: per head a few column blocks + a few diagonal bands (heads differ), ~13%;
- ``random10``: 10% of the causal tiles at random + the diagonal, shared by the heads of a kv head;
- ``all``: every causal tile (must stay close to SDPA).

Designs (all take the same mask, all in one process, interleaved, median of ``--repeat`` runs):

- ``gather_flash`` (the library's PyTorch path): gather the selected K/V blocks per chunk of (unit, query block)
  items, fused CPU flash kernel (``aten._scaled_dot_product_flash_attention_for_cpu``) over full tiles (per-key
  bias) and partial tiles (per-row mask), merged by log-sum-exp;
- ``gather_bmm``: same gather, plain ``bmm`` + masked softmax + ``bmm``;
- ``flex``: ``torch.compile(flex_attention)`` with ``BlockMask.from_kv_blocks`` (full tiles without mask_mod,
  partial tiles with a causal mask_mod); compile time reported apart. No ``lse`` on CPU (inductor refuses it).

Errors are the max abs difference to dense SDPA (``all``) or to a float64 reference on 4 query blocks.

    OMP_NUM_THREADS=2 python benchmarks/block_sparse_kernel.py --length 8192 --repeat 5 \
        --out runs/block_sparse_kernel.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kvaccel.kernels.block_sparse_attention import (
    block_sparse_attention,
    causal_block_mask,
    num_blocks,
    plan_block_sparse,
)


def make_mask(kind: str, L: int, Hq: int, Hkv: int, bm: int, bn: int, gen: torch.Generator) -> torch.Tensor:
    nqb, nkb = num_blocks(L, bm), num_blocks(L, bn)
    causal = causal_block_mask(L, bm, bn)
    qi, kj = torch.arange(nqb)[:, None], torch.arange(nkb)[None, :]
    diag = (kj >= qi * bm // bn) & (kj <= torch.clamp(qi * bm + bm - 1, max=L - 1) // bn)
    if kind == "all":
        m = causal
    elif kind == "a_shape":
        m = (kj == 0) | ((qi * bm // bn - kj) < 16)
    elif kind == "vertical_slash":
        heads = []
        for _ in range(Hq):
            cols = torch.zeros(nkb, dtype=torch.bool)
            cols[torch.randperm(nkb, generator=gen)[:8]] = True
            cols[0] = True
            offs = torch.cat([torch.tensor([0, 1]), torch.randint(2, max(3, nkb), (6,), generator=gen)])
            slash = ((qi * bm // bn - kj)[..., None] == offs).any(-1)
            heads.append(cols[None, :] | slash)
        m = torch.stack(heads)
    elif kind == "random10":
        per_kv = torch.rand(Hkv, nqb, nkb, generator=gen) < 0.10
        m = per_kv.repeat_interleave(Hq // Hkv, 0)
    else:
        raise ValueError(f"unknown mask {kind!r}")
    m = (m | diag) & causal
    return m.expand(1, Hq, nqb, nkb) if m.dim() == 2 else m[None]


def gather_bmm(q, k, v, mask, scale, bm, bn):
    """Design (a): same plan and gather, bmm + masked softmax + bmm in fp32."""
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    # an all-True key_valid turns off the plan's dense-unit shortcut: every tile goes through the bmm here
    plan = plan_block_sparse(mask, L, Hq, Hkv, block_m=bm, block_n=bn, key_valid=torch.ones(B, L, dtype=torch.bool))
    G = Hq // Hkv
    Gs = G if plan.stacked else 1
    U, nqb, nkb = plan.units, plan.n_q_blocks, plan.n_k_blocks
    R = Gs * bm
    qi = F.pad(q, (0, 0, 0, nqb * bm - L)).view(B, U, Gs, nqb, bm, D).transpose(2, 3).reshape(-1, R, D) * scale
    kb = F.pad(k, (0, 0, 0, (nkb + 1) * bn - L)).view(-1, bn, D)
    vb = F.pad(v, (0, 0, 0, (nkb + 1) * bn - L)).view(-1, bn, D)
    idx_all = torch.cat([plan.full_idx, plan.part_idx], 1)
    q_first = (torch.arange(qi.shape[0]) % nqb) * bm
    row_pos = q_first[:, None] + torch.arange(bm).repeat(Gs)
    out = torch.zeros(qi.shape[0], R, D)
    chunk = max(1, (32 << 20) // (idx_all.shape[1] * bn * 2 * D * 4))
    for c0 in range(0, plan.order.numel(), chunk):
        ids = plan.order[c0 : c0 + chunk]
        n = ids.numel()
        idx = idx_all.index_select(0, ids).reshape(-1)
        s = torch.bmm(qi.index_select(0, ids), kb.index_select(0, idx).view(n, -1, D).transpose(1, 2))
        kpos = plan.slot_pos.index_select(0, idx).view(n, 1, -1)
        s.masked_fill_(kpos > row_pos.index_select(0, ids)[:, :, None], float("-inf"))
        p = torch.softmax(s, -1)
        out.index_copy_(0, ids, torch.bmm(p, vb.index_select(0, idx).view(n, -1, D)))
    return out.view(B, U, nqb, Gs, bm, D).transpose(2, 3).reshape(B, Hq, nqb * bm, D)[:, :, :L]


class Flex:
    """Design (b): compiled FlexAttention with a BlockMask from kv-block indices (full / partial tiles apart)."""

    def __init__(self):
        from torch.nn.attention.flex_attention import flex_attention

        self.fn = torch.compile(flex_attention, dynamic=False)

    @staticmethod
    def block_mask(mask, L, bm, bn):
        from torch.nn.attention.flex_attention import BlockMask

        nqb = mask.shape[2]
        q_first = torch.arange(nqb) * bm
        k_last = torch.clamp(torch.arange(mask.shape[3]) * bn + bn - 1, max=L - 1)
        full = mask & (k_last[None, :] <= q_first[:, None])
        part = mask & ~full

        def csr(x):
            cnt = x.sum(-1).to(torch.int32)
            idx = torch.sort(x.to(torch.int8), dim=-1, descending=True, stable=True).indices.to(torch.int32)
            return cnt, idx

        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        return BlockMask.from_kv_blocks(
            *csr(part), *csr(full), BLOCK_SIZE=(bm, bn), mask_mod=causal, seq_lengths=(L, L)
        )

    def __call__(self, q, k, v, bmask, scale):
        return self.fn(q, k, v, block_mask=bmask, scale=scale, enable_gqa=True)


def reference_rows(q, k, v, mask, scale, bm, bn, qblocks):
    """float64 block-sparse attention for the query blocks ``qblocks`` only (no (L, L) tensor)."""
    B, Hq, L, D = q.shape
    G = Hq // k.shape[1]
    k64, v64 = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    res = {}
    for i in qblocks:
        r0, r1 = i * bm, min(L, i * bm + bm)
        tile = mask.expand(B, Hq, -1, -1)[:, :, i].repeat_interleave(bn, -1)[..., :L]  # (B, Hq, L)
        vis = tile[:, :, None, :] & (torch.arange(L)[None, :] <= torch.arange(r0, r1)[:, None])
        s = scale * q[:, :, r0:r1].double() @ k64.transpose(-1, -2)
        s = s.masked_fill(~vis, float("-inf"))
        res[i] = torch.softmax(s, -1) @ v64
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--masks", default="a_shape,vertical_slash,random10,all")
    ap.add_argument("--designs", default="gather_flash,gather_bmm,flex")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    L, Hq, Hkv, D, blk = args.length, args.heads, args.kv_heads, args.head_dim, args.block
    dt = getattr(torch, args.dtype)
    q = torch.randn(1, Hq, L, D).to(dt)
    k, v = torch.randn(1, Hkv, L, D).to(dt), torch.randn(1, Hkv, L, D).to(dt)
    scale = D**-0.5
    designs = args.designs.split(",")
    flex = Flex() if "flex" in designs else None

    def timed(fn):
        t0 = time.perf_counter()
        res = fn()
        return time.perf_counter() - t0, res

    rows = []
    n_causal = int(causal_block_mask(L, blk, blk).sum())
    for kind in args.masks.split(","):
        mask = make_mask(kind, L, Hq, Hkv, blk, blk, gen)
        density = float(mask.expand(1, Hq, -1, -1).sum()) / (n_causal * Hq)
        fns = {
            "sdpa_causal": lambda: F.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=True, scale=scale
            )
        }
        if "gather_flash" in designs:
            fns["gather_flash"] = lambda m=mask: block_sparse_attention(
                q, k, v, m, scale=scale, block_m=blk, block_n=blk
            )
        if "gather_bmm" in designs and dt == torch.float32:
            fns["gather_bmm"] = lambda m=mask: gather_bmm(q, k, v, m, scale, blk, blk)
        compile_s = None
        if flex is not None:
            bmask = Flex.block_mask(mask.expand(1, Hq, -1, -1), L, blk, blk)
            compile_s, _ = timed(lambda b=bmask: flex(q, k, v, b, scale))
            # the BlockMask is rebuilt inside the timed call: a method builds one per prompt
            fns["flex"] = lambda m=mask: flex(q, k, v, Flex.block_mask(m.expand(1, Hq, -1, -1), L, blk, blk), scale)
        times = {name: [] for name in fns}
        outs = {}
        for _ in range(args.repeat):  # interleaved: every design sees the same machine load
            for name, fn in fns.items():
                t, outs[name] = timed(fn)
                times[name].append(t)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        nqb = num_blocks(L, blk)
        check = sorted({0, nqb // 3, nqb - 2, nqb - 1})
        ref = None if kind == "all" else reference_rows(q, k, v, mask, scale, blk, blk, check)
        for name in fns:
            o = outs[name]
            if kind == "all":
                err = float((o.float() - outs["sdpa_causal"].float()).abs().max())
            elif name == "sdpa_causal":
                err = None  # dense attention is not the sparse result
            else:
                err = max(float((o[:, :, i * blk : i * blk + blk].double() - r).abs().max()) for i, r in ref.items())
            rows.append(
                {
                    "mask": kind, "design": name, "length": L, "density": round(density, 4),
                    "time_s": med[name], "times_s": times[name], "speedup_vs_sdpa": med["sdpa_causal"] / med[name],
                    "max_err": err, "compile_s": compile_s if name == "flex" else None,
                }
            )
    print(f"L={L} H_q={Hq} H_kv={Hkv} D={D} block={blk} dtype={args.dtype} threads={torch.get_num_threads()}")
    print(f"{'mask':<15}{'density':>8} {'design':<13}{'median s':>9}{'vs SDPA':>9}{'max err':>10}{'compile s':>10}")
    for r in rows:
        c = f"{r['compile_s']:.1f}" if r["compile_s"] is not None else ""
        print(
            f"{r['mask']:<15}{r['density']:>8.3f} {r['design']:<13}{r['time_s']:>9.3f}{r['speedup_vs_sdpa']:>8.2f}x"
            f"{'' if r['max_err'] is None else format(r['max_err'], '.1e'):>10}{c:>10}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
