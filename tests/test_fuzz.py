"""Fuzzing (hypothesis): spec strings and method configs give clean errors or work — never a crash inside torch.

"Clean" = ``ValueError`` / ``TypeError`` (bad input, with a message) or ``ImportError`` (a missing optional
dependency). Anything else (``RuntimeError`` / ``IndexError`` from torch, ``SyntaxError``, ``AttributeError``,
``ZeroDivisionError``, ...) fails the test with the input that caused it.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import pytest
import torch

import kvaccel
from kvaccel.config import method_class, registry

from conftest import tiny_model

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is in the dev extra")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

CLEAN = (ValueError, TypeError, ImportError)
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
MODEL_RUNS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                      derandomize=True)

NAMES = sorted(registry())
FIELDS = sorted({f.name for n in NAMES for f in dataclasses.fields(method_class(n))})
SPEC_CHARS = "abcdefghijklmnopqrstuvwxyz_()=,.+- 0123456789'\"[]{}:*"

values = st.one_of(
    st.integers(-(10**12), 10**12),
    st.integers(-3, 70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(0.0, 1.5),
    st.booleans(),
    st.none(),
    st.text(max_size=6),
    st.sampled_from(["snapkv", "streaming", "max", "avg", "mean", "gate", "oracle", "auto", "triton", "torch"]),
    st.lists(st.integers(-2, 4), max_size=3),
)
names = st.one_of(st.sampled_from(NAMES), st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", max_size=10))
kwargs = st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(alphabet="abcdefgh_", min_size=1, max_size=6)),
                         values, max_size=4)


def _spec(name: str, kw: dict) -> str:
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in kw.items())})" if kw else name


@FAST
@given(st.text(alphabet=SPEC_CHARS, max_size=48))
def test_random_spec_text(spec):
    try:
        kvaccel.parse_spec(spec)
    except CLEAN:
        pass


@FAST
@given(st.lists(st.tuples(names, kwargs), min_size=1, max_size=3))
def test_structured_specs(parts):
    spec = "+".join(_spec(n, kw) for n, kw in parts)
    try:
        kvaccel.parse_spec(spec)
    except CLEAN:
        pass


@functools.cache
def _model():
    return tiny_model("llama", num_hidden_layers=4)  # d2o needs >= 4 layers


IDS = torch.randint(3, 512, (1, 48), generator=torch.Generator().manual_seed(0))


RAN: list[str] = []  # specs that generated (checked below: the fuzz reaches the model, not only __init__)


@MODEL_RUNS
@given(st.data())
def test_configs_patch_and_run_or_fail_cleanly(data):
    """A config object that constructs must patch and generate on a tiny model, or fail cleanly."""
    name = data.draw(st.sampled_from(NAMES), label="method")
    fields = {f.name: f.default for f in dataclasses.fields(method_class(name))}
    keys = data.draw(st.lists(st.sampled_from(sorted(fields)) if fields else st.text("abc", min_size=1, max_size=3),
                              max_size=3, unique=True), label="keys")
    kw = {}
    for k in keys:  # mostly plausible values (a default, a small int, a fraction), sometimes anything
        default = fields.get(k)
        plausible = [st.just(default), st.integers(0, 64), st.floats(0.01, 1.0)]
        if isinstance(default, bool):
            plausible.append(st.booleans())
        kw[k] = data.draw(st.one_of(*plausible, values), label=k)
    model = _model()
    try:
        method = method_class(name)(**kw)
    except CLEAN:
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with kvaccel.patched(model, method):
                out = model.generate(IDS, max_new_tokens=3, min_new_tokens=3, do_sample=False)
                assert out.shape == (1, IDS.shape[1] + 3)
                kvaccel.report(model)
                RAN.append(method.spec())
    except CLEAN:
        pass
    finally:
        assert not kvaccel.is_patched(model)


def test_fuzz_reached_the_model():
    """Runs after the fuzz above (file order): many random configs got through construction to generate()."""
    if not RAN:
        pytest.skip("run together with test_configs_patch_and_run_or_fail_cleanly")
    assert len(RAN) >= 15 and len({s.split("(")[0] for s in RAN}) >= 8, RAN
