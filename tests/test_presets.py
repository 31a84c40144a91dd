"""Named presets (kvaccel/presets.py): each parses into the configs it names, options override, errors stay clear."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import kvaccel
from kvaccel.cli import app
from kvaccel.config import register, registry
from kvaccel.patches.decode.retrieval import Retrieval
from kvaccel.patches.evict.expected_attention import ExpectedAttention
from kvaccel.patches.evict.kvzip import KVzip
from kvaccel.patches.prefill.minference import MInference
from kvaccel.patches.prefill.seer import Seer
from kvaccel.presets import PRESETS, presets

from conftest import tiny_model

#: what each preset stands for, written with the config classes (not with the preset's spec string)
EXPECTED = {
    "expected_attention_needles": [ExpectedAttention(budget=0.25, observation_weight=1.0, observation_pooling="forward",
                                                     observation_kernel=15, chunk=16, span_rule="sliding")],
    "expected_attention_kl": [ExpectedAttention(future_positions="mixture", observation_weight=0.2)],
    "kvzip_window": [KVzip(observation_window=128)],
    "seer_accurate": [Seer(threshold=0.005)],
    "minference_fast": [MInference(budget=0.22)],
    "retrieval_128k": [Retrieval(ef_per_key=0.0052)],
}


def test_every_preset_is_checked_here_and_listed():
    assert set(PRESETS) == set(EXPECTED)
    assert [p["name"] for p in presets()] == list(PRESETS)
    assert all(p["summary"] and p["spec"] for p in presets())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_parses_into_the_configs_it_names(name):
    assert kvaccel.parse_spec(name) == EXPECTED[name]
    assert kvaccel.parse_spec(PRESETS[name].spec) == EXPECTED[name]  # the spec string itself is a valid spec
    assert name not in registry()  # a preset never hides a method


def test_preset_options_override_its_settings_and_compose():
    (m,) = kvaccel.parse_spec("expected_attention_needles(budget=0.5)")
    assert m == ExpectedAttention(budget=0.5, observation_weight=1.0, observation_pooling="forward",
                                  observation_kernel=15, chunk=16, span_rule="sliding")
    assert kvaccel.parse_spec("seer_accurate+expected_attention_needles+think(ratio=0.4)")[:2] == [
        Seer(threshold=0.005), EXPECTED["expected_attention_needles"][0]]
    with pytest.raises(ValueError, match=r"method 'seer' has no option\(s\) \['budget'\]"):
        kvaccel.parse_spec("seer_accurate(budget=0.5)")


def test_patch_takes_a_preset_name_and_keyword_options():
    model = tiny_model("llama")
    kvaccel.patch(model, "expected_attention_needles", budget=0.5)
    try:
        assert model._kvaccel_state.methods == {"evict": ExpectedAttention(
            budget=0.5, observation_weight=1.0, observation_pooling="forward", observation_kernel=15, chunk=16,
            span_rule="sliding")}
        ids = torch.randint(3, 500, (1, 64), generator=torch.Generator().manual_seed(0))
        model.generate(ids, max_new_tokens=2, do_sample=False)
        assert kvaccel.report(model)["capacity"] == [32] * 3  # budget 0.5 of the 64-token prompt, on every layer
    finally:
        kvaccel.unpatch(model)


def test_unknown_name_still_gives_the_clear_error():
    with pytest.raises(ValueError, match=r"unknown method 'seer_acurate'\. Did you mean 'seer_accurate'\?.*"
                                         r"Available: .*streaming.*; presets: .*retrieval_128k"):
        kvaccel.parse_spec("seer_acurate")
    with pytest.raises(ValueError, match=r"unknown method 'nosuch'\. Available"):
        kvaccel.parse_spec("nosuch(budget=0.2)")


def test_a_method_cannot_take_a_preset_name():
    class Clash(kvaccel.Method):
        name = "seer_accurate"
        stage = "prefill"

    with pytest.raises(ValueError, match="'seer_accurate' is a preset's name"):
        register(Clash)
    assert registry()["seer"] is Seer


def test_cli_methods_lists_presets_and_cli_accepts_them():
    res = CliRunner().invoke(app, ["methods"], env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.output
    for p in presets():
        assert p["name"] in res.output and p["spec"] in res.output
    # a preset passes the spec check that runs before the model loads; a misspelt one fails it with the hint
    res = CliRunner().invoke(app, ["generate", "--prompt", "hi", "--method", "kvzip_windw"])
    assert res.exit_code == 2 and "Did you mean 'kvzip_window'" in res.output
