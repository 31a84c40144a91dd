"""The transformers glue: one registered attention function, its mask function and the ``self_attn`` pre-hook.

Data flow of a patched forward (stock ``*Attention.forward`` computes q/k/v and RoPE, then calls
``cache.update`` and the registered attention function)::

    kvaccel_attention -> prefill method (first forward, and later prompt chunks it computes: phase "extend")
                         | decode method (later forwards)
                      -> eviction method compresses the cache layer in place -> channel method prunes keys

Nothing here copies model code; everything reads ``module.layer_idx`` and the cache layer the pre-hook stored.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvaccel.cache import KVAccelCache, KVAccelLayer
from kvaccel.kernels.decode_attention import decode_attention

ATTENTION_NAME = "kvaccel"
Tensor = torch.Tensor


@dataclass
class PatchState:
    """Everything kvaccel keeps for one patched model (state lives on the model, never in globals)."""

    methods: dict[str, Any]  # stage -> method config
    num_layers: int
    original_attn: str
    layer_stats: list[dict] = field(default_factory=list)
    notes: set[str] = field(default_factory=set)
    cache: KVAccelCache | None = None  # the cache of the last forward (for report())
    #: weak refs to the ``(cos, sin)`` RoPE tables of the running forward (methods that need pre-RoPE q/k, e.g. seer)
    rope: tuple | None = None
    #: ``position_ids`` ``(1|B, q)`` of the running forward (key re-rotation moves new tokens from them to slots)
    position_ids: Tensor | None = None

    def __post_init__(self):
        self.layer_stats = [{} for _ in range(self.num_layers)]

    @property
    def needs_cache(self) -> bool:
        return any(stage in self.methods for stage in ("evict", "channels", "decode", "storage"))


@dataclass
class AttentionContext:
    """What a method sees in one attention call of one layer."""

    module: torch.nn.Module
    state: PatchState
    layer: KVAccelLayer | None
    query: Tensor  # (B, H_q, q, D) post-RoPE
    key: Tensor  # (B, H_kv, T, D) the full-width keys held (after cache.update)
    value: Tensor  # (B, H_kv, T, Dv)
    pad: Tensor | None  # (B, seen + q) bool padding mask, None when there is no padding
    scaling: float
    phase: str  # "prefill" | "extend" (later chunk of a prompt) | "decode"
    kwargs: dict
    #: ``(B, H_q, N)`` attention probabilities of this decode step over the layer's held tokens, when the decode
    #: path computed them for the eviction method (``EvictionMethod.wants_decode_probs``); else ``None``
    decode_probs: Tensor | None = None

    @property
    def layer_idx(self) -> int:
        return self.module.layer_idx

    @property
    def num_layers(self) -> int:
        return self.state.num_layers

    @property
    def groups(self) -> int:
        return self.query.shape[1] // self.key.shape[1]

    @property
    def stats(self) -> dict:
        return self.state.layer_stats[self.layer_idx]

    def record_capacity(self, capacity: int) -> None:
        self.stats["capacity"] = capacity
        if capacity >= self.layer.length:
            self.state.notes.add(
                f"budget ({capacity} tokens) >= prompt ({self.layer.length} tokens): nothing was evicted"
            )


# ------------------------------------------------------------------------------------------ dense paths


def real_runs(ctx: AttentionContext) -> list[tuple[slice, slice] | None]:
    """Per sequence, ``(key slice, query slice)`` of its one contiguous run of real tokens, or ``None`` when none of
    its queries is real. The queries are the last ``Lq`` of the ``Lk`` keys (``Lq < Lk``: a later prompt chunk over
    the cache), so a sequence's queries are the part of its run in the chunk. ``ValueError`` on holes."""
    Lq, Lk = ctx.query.shape[2], ctx.key.shape[2]
    first = Lk - Lq
    runs: list[tuple[slice, slice] | None] = []
    for b, row in enumerate(ctx.pad[:, -Lk:]):
        real = row.nonzero().flatten()
        s, e = (int(real[0]), int(real[-1]) + 1) if real.numel() else (0, 0)
        if e - s != real.numel():
            raise ValueError(
                "kvaccel supports left or right padding only (one contiguous run of real tokens per "
                f"sequence); sequence {b} has holes in its attention mask"
            )
        qs = max(s, first)
        runs.append((slice(s, e), slice(qs - first, e - first)) if qs < e else None)
    return runs


def per_sequence(ctx: AttentionContext, fn, extra: tuple[Tensor, ...] = ()) -> Tensor:
    """Run ``fn(q, k, v, *extra) -> (b, lq, H_q, Dv)`` on the whole batch, or per sequence on its real tokens when
    padded.

    Left/right padding is handled by slicing each sequence's one contiguous run of real tokens (O(B·L), no (L, L)
    mask; :func:`real_runs`); padded rows of the output are zeros. ``extra`` tensors ``(B, H, Lq | Lk, ...)`` are
    sliced like ``q`` or like ``k`` by their length (the same slice when ``Lq == Lk``).
    """
    q, k, v = ctx.query, ctx.key, ctx.value
    if ctx.pad is None:
        return fn(q, k, v, *extra)
    out = q.new_zeros(q.shape[0], q.shape[2], q.shape[1], v.shape[-1])
    for b, run in enumerate(real_runs(ctx)):
        if run is None:
            continue
        ks, qs = run
        ex = tuple(x[b : b + 1, :, ks if x.shape[2] == k.shape[2] else qs] for x in extra)
        out[b, qs] = fn(q[b : b + 1, :, qs], k[b : b + 1, :, ks], v[b : b + 1, :, ks], *ex)[0]
    return out


def dense_prefill(ctx: AttentionContext) -> Tensor:
    """Causal attention over a whole prompt with SDPA; left/right padding handled per sequence (O(B·L))."""
    return per_sequence(
        ctx, lambda q, k, v: sdpa_attention_forward(ctx.module, q, k, v, None, scaling=ctx.scaling, **ctx.kwargs)[0]
    )


def grouped_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    valid: Tensor | None = None,
    narrow=None,
    chunk: int = 256,
) -> Tensor:
    """Attention of the last ``Q`` tokens over a cache with per-head validity and an optional narrow segment.

    ``q`` ``(B, H_q, Q, D)``; ``k``/``v`` ``(B, H_kv, T, D)`` whose last ``Q`` tokens are the queries' own
    (causal among them); ``valid`` ``(B, 1|H_kv, T)``; ``narrow`` a ``NarrowSegment`` of older tokens placed
    before ``k``. GQA without repeating K/V: the ``G`` query heads of a kv head are stacked along rows.
    Returns ``(B, Q, H_q, Dv)``.
    """
    B, Hq, Q, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    G = Hq // Hkv
    qg = q.reshape(B, Hkv, G * Q, D)
    vals = [v]
    valids = [valid if valid is not None else k.new_ones(B, 1, T, dtype=torch.bool)]
    Tn = 0
    if narrow is not None:
        Tn = narrow.keys.shape[2]
        idx = narrow.channel_idx[:, :, None, :].expand(B, Hkv, G * Q, narrow.channel_idx.shape[-1])
        qn = qg.gather(-1, idx)
        vals.insert(0, narrow.dense_values(v.shape[-1]))
        nv = narrow.valid if narrow.valid is not None else k.new_ones(B, 1, Tn, dtype=torch.bool)
        valids.insert(0, nv)
    V = torch.cat(vals, dim=2) if len(vals) > 1 else v
    mask_all = torch.cat([m.expand(B, Hkv, m.shape[-1]) for m in valids], dim=-1) if len(valids) > 1 else valids[0]
    Ttot = Tn + T
    out = q.new_empty(B, Hkv, G * Q, v.shape[-1])
    rows_q = torch.arange(Q, device=q.device).repeat(G)  # query index of each stacked row
    for r0 in range(0, G * Q, chunk):
        r1 = min(G * Q, r0 + chunk)
        logits = torch.matmul(qg[:, :, r0:r1].float(), k.transpose(-1, -2).float())
        if narrow is not None:
            ln = torch.matmul(qn[:, :, r0:r1].float(), narrow.keys.transpose(-1, -2).float())
            logits = torch.cat([ln, logits], dim=-1)
        logits = logits * scale
        mask = mask_all[:, :, None, :]
        if Q > 1:  # causal among the new tokens: row i sees keys j <= Ttot - Q + i
            limit = (Ttot - Q + rows_q[r0:r1])[:, None]
            causal = torch.arange(Ttot, device=q.device)[None, :] <= limit
            mask = mask & causal
        logits = logits.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)
        out[:, :, r0:r1] = torch.matmul(probs.to(V.dtype), V)
    return out.reshape(B, Hq, Q, -1).transpose(1, 2).contiguous()


def dense_decode(ctx: AttentionContext) -> Tensor:
    """New tokens attend every token held. Exactly stock SDPA when heads share one validity mask."""
    q, k, v = ctx.query, ctx.key, ctx.value
    Q = q.shape[2]
    layer = ctx.layer
    attend = getattr(layer, "attend", None)  # a layer with its own storage layout attends itself (e.g. varlen)
    if attend is not None:
        return attend(ctx)
    if layer is not None:
        valid, narrow = layer.valid, layer.narrow
    else:  # a cache that is not ours (or none): it holds every token, padding comes from the 2-D mask
        valid = None if ctx.pad is None else ctx.pad[:, None, -k.shape[2] :]
        narrow = None
    if narrow is None and (valid is None or valid.shape[1] == 1) and not (Q == 1 and _fuse_decode_probs(ctx)):
        mask = None if valid is None else valid[:, :, None, :]
        if Q > 1:
            T = k.shape[2]
            causal = torch.arange(T, device=q.device)[None, :] <= (T - Q + torch.arange(Q, device=q.device))[:, None]
            mask = causal[None, None] if mask is None else mask & causal
        return sdpa_attention_forward(ctx.module, q, k, v, mask, scaling=ctx.scaling, **ctx.kwargs)[0]
    if Q == 1:  # per-head ragged and/or narrow keys: the decode kernel (Triton on GPU, PyTorch on CPU)
        nk = {} if narrow is None else dict(
            k_narrow=narrow.keys, channel_idx=narrow.channel_idx, v_narrow=narrow.values, valid_narrow=narrow.valid,
            value_idx=narrow.value_idx,
        )
        if _fuse_decode_probs(ctx):
            out, ctx.decode_probs = decode_attention(
                q, k, v, scale=ctx.scaling, valid=valid, backend="torch", return_probs=True, **nk
            )
            return out.transpose(1, 2)
        return decode_attention(q, k, v, scale=ctx.scaling, valid=valid, **nk).transpose(1, 2)
    return grouped_attention(q, k, v, ctx.scaling, valid=valid, narrow=narrow)


def _fuse_decode_probs(ctx: AttentionContext) -> bool:
    """Compute this decode step's attention probabilities in the attention itself (one pass over the keys instead
    of two), for an eviction method that accumulates them: on CPU (the Triton kernel does not return them) and once
    the layer holds fewer tokens than it saw (before any eviction, the stock fused path keeps tokens identical)."""
    evict = ctx.state.methods.get("evict")
    layer = ctx.layer
    return (
        evict is not None and evict.wants_decode_probs() and layer is not None and ctx.query.device.type == "cpu"
        and layer.length < layer.seen
    )


# ------------------------------------------------------------------------------------------ registered functions


def kvaccel_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, None]:
    """The attention function registered as ``"kvaccel"`` (transformers' AttentionInterface contract)."""
    state: PatchState | None = getattr(module, "_kvaccel_state", None)
    if state is None:
        raise RuntimeError(
            f"{type(module).__name__} runs kvaccel attention but was not patched; call kvaccel.patch(model)"
        )
    if dropout and module.training:
        raise NotImplementedError("kvaccel attention is for inference; call model.eval() (dropout > 0 found)")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"kvaccel expects the 2-D padding mask its mask function builds, got a {attention_mask.dim()}-D mask; "
            "custom 4-D attention masks are not supported"
        )
    scaling = module.scaling if scaling is None else scaling
    ref = getattr(module, "_kvaccel_layer", None)
    layer: KVAccelLayer | None = ref() if ref is not None else None
    q_len, kv_len = query.shape[2], key.shape[2]

    if layer is None and state.needs_cache:
        raise RuntimeError(
            f"the patched methods ({', '.join(m.name for m in state.methods.values())}) act on the KV cache, but this "
            "forward has " + ("a cache that is not a KVAccelCache" if getattr(module, "_kvaccel_foreign", False)
                              else "no cache (use_cache=False)")
            + "; call generate(), or pass cache=kvaccel.KVAccelCache(model) and use_cache=True"
        )

    window = kwargs.get("sliding_window")
    seen = layer.seen if layer is not None else kv_len
    if window is not None and seen > window:
        raise NotImplementedError(
            f"layer {module.layer_idx} uses sliding-window attention (window {window}) and the sequence has {seen} "
            "tokens; kvaccel does not implement sliding windows yet: keep prompts + new tokens <= the window"
        )

    if layer is not None:
        first = layer.seen == q_len
        phase = "prefill" if first else ("extend" if q_len > 1 and layer.decode_steps == 0 else "decode")
        if attention_mask is not None:
            new = attention_mask[:, -q_len:]
            if first or not bool(new.all()):
                layer.mark_padding(new)
    else:  # a cache that is not ours (or none) holds every token: a multi-token forward over it is a later chunk
        phase = "prefill" if q_len == kv_len else ("extend" if q_len > 1 else "decode")

    evict = state.methods.get("evict")
    if layer is not None and getattr(evict, "rerotate", False):
        query = _rerotate_new_tokens(evict, layer, query, state.position_ids)
    ctx = AttentionContext(module, state, layer, query, key, value, attention_mask, scaling, phase, kwargs)
    prefill = state.methods.get("prefill")
    if phase == "prefill":
        out = prefill.attention(ctx) if prefill is not None else dense_prefill(ctx)
        ctx.stats.setdefault("prefill_density", 1.0)
    elif phase == "extend" and prefill is not None and prefill.extends(ctx):  # a later prompt chunk, sparse
        out = prefill.attention(ctx)
    else:
        decode = state.methods.get("decode")
        out = decode.attention(ctx) if decode is not None else dense_decode(ctx)

    if layer is not None:
        if phase == "decode":
            layer.decode_steps += 1
        else:
            layer.prompt_len = layer.seen
        for stage in ("evict", "channels"):
            method = state.methods.get(stage)
            if method is not None:
                (method.after_decode if phase == "decode" else method.after_prefill)(ctx)
        decode = state.methods.get("decode")  # e.g. retrieval moves the prompt to host memory after eviction
        if phase != "decode" and getattr(decode, "after_prefill", None) is not None:
            decode.after_prefill(ctx)
    return out, None


def _rerotate_new_tokens(evict, layer: KVAccelLayer, query: Tensor, position_ids: Tensor | None) -> Tensor:
    """Key re-rotation (``kvaccel.rope``): the new tokens' keys (in the cache) and queries move to their slots."""
    shift = evict.rope_shift
    if shift is None:
        raise RuntimeError(f"{evict.name}(rerotate=True) was not bound to the model; patch it with kvaccel.patch")
    if position_ids is None:
        raise ValueError(
            "rerotate=True needs the position_ids the model passes to its attention modules, and this model's "
            "attention received none: use rerotate=False"
        )
    layer.rope = shift
    return shift.place_new_tokens(layer, query, position_ids)


def kvaccel_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: Tensor | None = None,
    **kwargs,
) -> Tensor | None:
    """Mask function registered as ``"kvaccel"``: ``None`` without padding, else the O(B·L) 2-D padding mask.

    Never an (L, L) mask: causality and per-head validity are applied inside ``kvaccel_attention``.
    """
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    return None if bool(attention_mask.all()) else attention_mask


def cache_pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """``self_attn`` forward pre-hook: remember (weakly) the cache layer this forward writes into.

    Also keeps weak refs to the forward's RoPE ``(cos, sin)`` (``position_embeddings``) on the state, so a method
    can recover pre-RoPE q/k (see :func:`rope_tables`).
    """
    pe = kwargs.get("position_embeddings")
    module._kvaccel_state.rope = None if pe is None else tuple(weakref.ref(t) for t in pe)
    module._kvaccel_state.position_ids = kwargs.get("position_ids")
    pkv = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers >= 5.24 names it `cache`
    if isinstance(pkv, KVAccelCache):
        module._kvaccel_layer = weakref.ref(pkv.layers[module.layer_idx])
        module._kvaccel_foreign = False
        if module.layer_idx == 0:
            module._kvaccel_state.cache = pkv
    else:
        module._kvaccel_layer = None
        module._kvaccel_foreign = pkv is not None


def rope_tables(ctx: AttentionContext) -> tuple[Tensor, Tensor] | None:
    """The ``(cos, sin)`` RoPE tables ``(B|1, L, D)`` of the running forward, or ``None`` (no RoPE / not captured)."""
    refs = ctx.state.rope
    if refs is None:
        return None
    tables = tuple(r() for r in refs)
    return None if any(t is None for t in tables) else tables
