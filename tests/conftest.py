"""Shared fixtures: tiny random models of every supported family, built offline from configs."""

from __future__ import annotations

import functools
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")

# Triton kernel tests run compiled on a CUDA machine, and through the interpreter on a CPU-only one: there this
# sets TRITON_INTERPRET=1 before anything imports triton (``import torch`` does not). On a GPU machine the interpreter
# is never forced (an explicit TRITON_INTERPRET=1 from the caller is respected: CPU tensors, interpreted).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
requires_triton = pytest.mark.skipif(
    not (TRITON_INTERPRET or torch.cuda.is_available()),
    reason="Triton cases need CUDA or TRITON_INTERPRET=1 set before triton is imported",
)
TRITON_DEVICE = "cpu" if TRITON_INTERPRET or not torch.cuda.is_available() else "cuda"


@functools.cache
def triton_dtype_ok(dtype: torch.dtype) -> bool:
    """Whether Triton computes ``dtype`` right here: always compiled on CUDA; the interpreter stores bfloat16 as raw
    uint16 bits and multiplies the bit patterns (documented as unsupported: triton-lang/triton#4972, #11584), so a
    tiny probe kernel decides (bf16 cases then run once the interpreter supports them)."""
    if not TRITON_INTERPRET:
        return True
    import triton
    import triton.language as tl

    @triton.jit
    def _probe(x_ptr, y_ptr, N: tl.constexpr):
        o = tl.arange(0, N)
        x = tl.load(x_ptr + o)
        tl.store(y_ptr + o, (x * x).to(tl.float32))

    x = torch.linspace(-2, 2, 16).to(dtype)
    y = torch.empty(16)
    _probe[(1,)](x, y, 16)
    return bool(torch.allclose(y, (x * x).float(), atol=1e-2))


def require_triton_dtype(dtype: torch.dtype) -> None:
    """Skip (with the reason) a Triton case whose dtype the interpreter cannot compute."""
    if not triton_dtype_ok(dtype):
        pytest.skip(f"the Triton interpreter cannot compute {dtype} (bit-pattern arithmetic, triton-lang/triton#11584);"
                    " this case runs compiled on a CUDA machine")


def tiny_config(family: str, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=512,
        hidden_size=96,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    common.update(overrides)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}[family]
    if family == "qwen3":
        common.setdefault("head_dim", 16)
    if family == "mistral":
        common.setdefault("sliding_window", None)
    return cls(**common)


@functools.cache
def _tiny_state(family: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation="sdpa")
    # Sharper logits than the random init so greedy decoding is decisive (token ties are meaningless).
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0) if not model.config.tie_word_embeddings else None
    return model.state_dict()


def tiny_model(family: str = "llama", **overrides):
    """A fresh tiny random model (same weights for the same family and overrides)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    if not overrides:
        model.load_state_dict(_tiny_state(family))
    else:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    return model.eval()


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="session")
def default_model():
    """The real embedded SmolLM2-135M-Instruct (de-quantized once into the kvaccel cache dir)."""
    import kvaccel

    try:
        model, tok = kvaccel.load_model()
    except FileNotFoundError as e:  # the CI installs it; a dev machine without it skips loudly
        pytest.skip(str(e))
    _SESSION_MODELS.append(model)
    return model, tok


_SESSION_MODELS: list = []  # the session-scoped default model, once loaded


@pytest.fixture(autouse=True)
def _session_model_left_unpatched():
    """A test that patches the shared default model must not leave it patched for the next tests."""
    yield
    import kvaccel

    for model in _SESSION_MODELS:
        if kvaccel.is_patched(model):
            kvaccel.unpatch(model)


def tiny_saved_model(path, family: str = "llama"):
    """Save a tiny random ``family`` model with the default model's tokenizer to ``path`` (for CLI / Ray tests that
    load by path); skips when the default model (its tokenizer) is not installed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import kvaccel.models

    try:
        tok = AutoTokenizer.from_pretrained(kvaccel.models.default_model_path())
    except FileNotFoundError as e:
        pytest.skip(str(e))
    torch.manual_seed(0)
    cfg = tiny_config(family, vocab_size=len(tok), pad_token_id=tok.pad_token_id or 0,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
