"""Public API: ``patch``, ``unpatch``, ``patched``, ``report``."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from kvaccel.cache import KVAccelCache, cache_kwarg
from kvaccel.config import STAGES, Method, parse_spec
from kvaccel.patches.attention import (
    ATTENTION_NAME,
    PatchState,
    cache_pre_hook,
    kvaccel_attention,
    kvaccel_mask,
)

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
_STATE_ATTR = "_kvaccel_state"
# Live patched models; the global registration is removed when the last one is unpatched (a patched model that is
# garbage-collected without unpatch() leaves the set by itself).
_patched_models: weakref.WeakSet = weakref.WeakSet()


def _register_globally() -> None:
    AttentionInterface.register(ATTENTION_NAME, kvaccel_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, kvaccel_mask)


def _unregister_globally() -> None:
    AttentionInterface._global_mapping.pop(ATTENTION_NAME, None)
    AttentionMaskInterface._global_mapping.pop(ATTENTION_NAME, None)


def _attention_modules(model) -> list[torch.nn.Module]:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (expected `.layers`)")
    return [layer.self_attn for layer in layers]


def check_model(model) -> None:
    """Raise ``ValueError`` unless ``model`` is a supported causal LM."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"kvaccel.patch expects a transformers model, got {type(model).__name__}")
    text = config.get_text_config(decoder=True)
    model_type = getattr(text, "model_type", "?")
    causal = (
        not getattr(config, "is_encoder_decoder", False)
        and getattr(text, "is_causal", True) is not False
        and (not hasattr(model, "can_generate") or model.can_generate())
    )
    if not causal:
        raise ValueError(
            f"{type(model).__name__} ({model_type}) is not a causal language model; kvaccel patches decoder-only "
            f"causal LMs loaded with AutoModelForCausalLM ({', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported architecture '{model_type}'; kvaccel supports the families "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def _resolve_methods(methods: tuple, options: dict[str, Any]) -> dict[str, Method]:
    resolved: list[Method] = []
    named: list[Method] = []
    for m in methods:
        if isinstance(m, Method):
            resolved.append(m)
        elif isinstance(m, str):
            ms = parse_spec(m)
            resolved.extend(ms)
            named.extend(ms)
        else:
            raise TypeError(f"a method is a registered name, a spec string or a config object, got {type(m).__name__}")
    if options:  # options go to the methods given by name that have that field
        used = set()
        for i, m in enumerate(resolved):
            if not any(m is n for n in named):
                continue
            fields = {f.name for f in dataclasses.fields(m)}
            mine = {k: v for k, v in options.items() if k in fields}
            if mine:
                resolved[i] = dataclasses.replace(m, **mine)
                used |= set(mine)
        unused = set(options) - used
        if unused:
            raise ValueError(
                f"option(s) {sorted(unused)} apply to none of the methods given by name "
                f"({', '.join(m.name for m in named) or 'none'}); pass them inside a config object or a spec"
            )
    by_stage: dict[str, Method] = {}
    for m in resolved:
        if m.stage in by_stage:
            raise ValueError(
                f"'{by_stage[m.stage].name}' and '{m.name}' are both {m.stage} methods; at most one method per "
                f"stage ({', '.join(STAGES)}) — pick one"
            )
        by_stage[m.stage] = m
    return by_stage


def patch(model, *methods: str | Method, **options: Any):
    """Patch ``model`` in place so its attention runs kvaccel's methods; returns the model.

    ``kvaccel.patch(model)`` installs the machinery with dense prefill, no eviction and dense decode (same tokens
    as stock transformers). ``kvaccel.patch(model, "streaming", budget=256)`` or
    ``kvaccel.patch(model, Streaming(budget=256))`` or ``kvaccel.patch(model, "snapkv(budget=0.25)+think")``.
    Keyword options go to the methods given by name that have that field. Patching a patched model replaces
    its methods.
    """
    check_model(model)
    stages = _resolve_methods(methods, options)
    for m in stages.values():  # a method that cannot compose with another one says so before anything is installed
        check = getattr(m, "check_stages", None)
        if check is not None:
            check(stages)
    for m in stages.values():
        m.check_dependencies()
        m.bind(model)
    if is_patched(model):
        unpatch(model)
    _register_globally()
    _patched_models.add(model)
    modules = _attention_modules(model)
    state = PatchState(methods=stages, num_layers=len(modules), original_attn=model.config._attn_implementation)
    handles = []
    for mod in modules:
        mod._kvaccel_state = state
        handles.append(mod.register_forward_pre_hook(cache_pre_hook, with_kwargs=True))
    for m in stages.values():  # methods that need their own hooks (e.g. attention_gate reads the layer input)
        install = getattr(m, "install_hooks", None)
        if install is not None:
            handles.extend(install(model, modules))
    state.handles = handles
    setattr(model, _STATE_ATTR, state)
    model.set_attn_implementation(ATTENTION_NAME)
    _install_default_cache(model)
    return model


_MISSING = object()  # "the instance had no own attribute of that name"


def _install_default_cache(model) -> None:
    """Make ``generate()`` and ``model(...)`` create a KVAccelCache when the caller passes no cache.

    Wraps whatever ``forward``/``generate`` the instance has now (accelerate's ``dispatch_model``/``cpu_offload``
    replace the bound ``forward`` with a ``functools.partial`` that moves inputs between devices and runs the
    ``_hf_hook``s), and records the instance's own attributes so ``unpatch`` gives exactly those back.
    """
    state: PatchState = getattr(model, _STATE_ATTR)
    previous = {name: model.__dict__.get(name, _MISSING) for name in ("generate", "forward")}
    inner_generate, inner_forward = model.generate, model.forward  # instance wrappers (accelerate) or the class's
    cache_kw = cache_kwarg(model)

    def given_cache(kwargs: dict):
        return kwargs.get("cache", kwargs.get("past_key_values"))

    def refuse_attention_weights(requested: bool | None) -> None:
        if requested if requested is not None else getattr(model.config, "output_attentions", False):
            raise ValueError(
                "output_attentions=True: a kvaccel-patched model never materialises attention weights (SDPA and "
                "kernels compute attention in blocks, evicted tokens have no column); call kvaccel.unpatch(model) "
                "and load the model with attn_implementation='eager' to get them"
            )

    def active() -> bool:  # False once unpatched (if another library wrapped on top of us, we stay in its chain)
        return getattr(model, _STATE_ATTR, None) is state

    @functools.wraps(inner_generate)
    def generate(*args, **kwargs):
        if not active():
            return inner_generate(*args, **kwargs)
        gen_cfg = kwargs.get("generation_config") or model.generation_config
        refuse_attention_weights(kwargs.get("output_attentions", gen_cfg.output_attentions))
        wants_cache = kwargs.get("use_cache", gen_cfg.use_cache) is not False
        custom = kwargs.get("cache_implementation") or gen_cfg.cache_implementation
        if given_cache(kwargs) is None and wants_cache and not custom:
            kwargs[cache_kw] = KVAccelCache(model)
        state.max_new_tokens = kwargs.get("max_new_tokens", gen_cfg.max_new_tokens)  # e.g. Keyformer's schedule
        try:
            return inner_generate(*args, **kwargs)
        finally:
            state.max_new_tokens = None

    @functools.wraps(inner_forward)
    def forward(*args, **kwargs):
        if not active():
            return inner_forward(*args, **kwargs)
        refuse_attention_weights(kwargs.get("output_attentions"))
        use_cache = kwargs.get("use_cache")
        use_cache = model.config.use_cache if use_cache is None else use_cache
        if given_cache(kwargs) is None and use_cache:
            kwargs[cache_kw] = KVAccelCache(model)
        state.forward_depth = getattr(state, "forward_depth", 0) + 1
        try:
            out = inner_forward(*args, **kwargs)
            cache = given_cache(kwargs)
            if isinstance(cache, KVAccelCache) and state.forward_depth == 1:
                # methods that act once the whole forward ran (e.g. kvzip), in stage order (storage quantizes last);
                # only after the outermost forward (kvzip's reconstruction forwards run inside its own hook)
                for m in sorted(state.methods.values(), key=lambda m: STAGES.index(m.stage)):
                    after = getattr(m, "after_forward", None)
                    if after is not None:
                        after(model, cache, kwargs.get("input_ids", args[0] if args else None))
        finally:
            state.forward_depth -= 1
        return out

    model.generate = generate
    model.forward = forward
    state.instance_methods = (previous, {"generate": generate, "forward": forward})


def _restore_instance_methods(model, state: PatchState) -> None:
    """Give back the instance's own ``generate``/``forward`` (or none) that ``patch`` found.

    If something wrapped ours after ``patch`` (e.g. ``dispatch_model`` on a patched model), its wrapper stays: ours
    inside it passes calls straight through once unpatched.
    """
    previous, ours = getattr(state, "instance_methods", ({}, {}))
    for name, original in previous.items():
        if model.__dict__.get(name) is not ours[name]:
            continue
        if original is _MISSING:
            model.__dict__.pop(name, None)
        else:
            model.__dict__[name] = original


def is_patched(model) -> bool:
    return getattr(model, _STATE_ATTR, None) is not None


def unpatch(model):
    """Undo ``patch``: the stock attention implementation, no hooks, no kvaccel attributes. Returns the model."""
    state: PatchState | None = getattr(model, _STATE_ATTR, None)
    if state is None:
        return model
    for h in state.handles:
        h.remove()
    for mod in _attention_modules(model):
        for attr in ("_kvaccel_state", "_kvaccel_layer", "_kvaccel_foreign"):
            mod.__dict__.pop(attr, None)
    _restore_instance_methods(model, state)
    model.set_attn_implementation(state.original_attn)
    delattr(model, _STATE_ATTR)
    state.cache = None
    _patched_models.discard(model)
    if not _patched_models:
        _unregister_globally()
    return model


@contextlib.contextmanager
def patched(model, *methods: str | Method, **options: Any) -> Iterator[Any]:
    """Context manager: ``with kvaccel.patched(model, "streaming", budget=256): model.generate(...)``."""
    previous: PatchState | None = getattr(model, _STATE_ATTR, None)
    patch(model, *methods, **options)
    try:
        yield model
    finally:
        unpatch(model)
        if previous is not None:
            patch(model, *previous.methods.values())


#: stages that change what the cache holds; ``paused`` switches them off
PAUSABLE_STAGES = ("evict", "channels")


@contextlib.contextmanager
def paused(model) -> Iterator[Any]:
    """Context manager: inside it the patched model's eviction and channel methods do not compress the cache.

    kvpress' protocol: compress the context, then feed the question (and teacher-forced answer tokens) over the
    compressed cache without compressing again::

        model(context_ids, cache=cache)          # prefill: evicts to the budget
        with kvaccel.paused(model):
            logits = model(question_ids, cache=cache).logits   # attends the kept cache, evicts nothing

    Prefill and decode methods (how attention is computed) stay active. Tokens fed while paused are kept whole
    and count as prompt (``prompt_len``) for budgets resolved later. Methods come back on exit, also on error.
    """
    state: PatchState | None = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError("kvaccel.paused(model) needs a model patched with kvaccel.patch(model, ...)")
    held = {stage: state.methods.pop(stage) for stage in PAUSABLE_STAGES if stage in state.methods}
    try:
        yield model
    finally:
        if getattr(model, _STATE_ATTR, None) is state:  # not re-patched or unpatched inside the block
            for stage, method in held.items():
                state.methods.setdefault(stage, method)


def report(model) -> dict[str, Any]:
    """Statistics of the last forward / generate of a patched model.

    Keys: ``kv_bytes`` (bytes physically held by the cache: keys, values, masks, method state),
    ``kv_bytes_full`` (what a full cache would hold for the same tokens), ``kv_ratio``, ``seen_tokens``,
    ``kept_tokens`` (per layer, per sequence, per head), ``capacity`` (per layer budget in tokens, where an
    eviction method set one), ``prefill_density`` (fraction of causal attention tiles computed at prefill, per layer),
    ``prefill_estimate_s`` / ``prefill_attention_s`` (a block-sparse prefill's time choosing tiles vs computing them,
    summed over layers; ``None`` without one),
    ``methods`` (spec strings) and ``notes``. With a quantized storage method, ``kv_storage_bytes``: ``codes``,
    ``scales``, ``zeros``, ``window`` (full-precision recent tokens), ``other`` (masks, method state) and
    ``quantized_elements`` (elements stored as codes), summed over layers.
    """
    state: PatchState | None = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError("report() needs a model patched with kvaccel.patch(model, ...)")
    out: dict[str, Any] = {
        "methods": {stage: m.spec() for stage, m in state.methods.items()},
        "notes": sorted(state.notes),
    }
    cache = state.cache
    if cache is None:
        out.update(kv_bytes=0, kv_bytes_full=0, kv_ratio=None, seen_tokens=0, kept_tokens=[])
    else:
        for method in state.methods.values():
            method.report_stats(cache, state.layer_stats)
        kv, full = cache.nbytes(), cache.full_nbytes()
        out.update(
            kv_bytes=kv,
            kv_bytes_full=full,
            kv_ratio=(kv / full) if full else None,
            seen_tokens=cache.get_seq_length(),
            kept_tokens=[
                layer.kept_per_head().tolist() if layer.is_initialized else [] for layer in cache.layers
            ],
        )
        storage = [layer.storage_nbytes() for layer in cache.layers if hasattr(layer, "storage_nbytes")]
        if storage:  # a storage method (e.g. kv_int4): bytes by part, the full-precision window apart
            out["kv_storage_bytes"] = {k: sum(p[k] for p in storage) for k in storage[0]}
    out["capacity"] = [s.get("capacity") for s in state.layer_stats]
    out["prefill_density"] = [s.get("prefill_density") for s in state.layer_stats]
    for key in ("prefill_estimate_s", "prefill_attention_s"):  # block-sparse prefill: estimation vs attention
        per_layer = [s.get(key) for s in state.layer_stats]
        out[key] = sum(t for t in per_layer if t is not None) if any(t is not None for t in per_layer) else None
    # decode methods: per-layer lists of their stats (retrieval_*: host/device bytes, time split, recall...; quest_*:
    # page metadata bytes, sparse/dense steps, attended tokens)
    for key in sorted({k for s in state.layer_stats for k in s if k.startswith(("retrieval_", "quest_"))}):
        out[key] = [s.get(key) for s in state.layer_stats]
    return out
