"""Offline long-context tasks: RULER-style synthetic generators and a loader for local task files.

Every generator builds samples to a requested prompt length in tokens of the tokenizer it is given, without
any download: the haystack is either repeated noise sentences or real English prose from ``pydoc_data.topics``
(shipped with every Python), and keys come from a fixed word list in this file.

The model sees a plain-text layout, no chat template::

    context + "\\n\\n" + question + answer_prefix          (see format_prompt)

``context`` is the long part, the one KV-cache compression applies to. Scoring is substring matching of each
expected answer in the model's output (``kvaccel.evals.metrics.string_match_all``).

Task formats follow RULER (https://arxiv.org/abs/2404.06654, github.com/NVIDIA/RULER ``scripts/data/synthetic``)
and the passkey test of Landmark Attention (https://arxiv.org/abs/2305.16300). Differences are listed in the
docstring of each generator.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import numbers
import random
import string
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "HAYSTACKS",
    "TASKS",
    "Sample",
    "count_tokens",
    "format_prompt",
    "generate",
    "generate_common_words",
    "generate_frequent_words",
    "generate_niah_multikey",
    "generate_niah_multiquery",
    "generate_niah_multivalue",
    "generate_niah_single",
    "generate_passkey",
    "generate_variable_tracking",
    "get_task",
    "load_json",
    "load_jsonl",
]

HAYSTACKS = ("noise", "prose")
SEPARATOR = "\n\n"  # between context and question in format_prompt
LENGTH_TOLERANCE = 0.02  # |n_tokens - target_tokens| <= LENGTH_TOLERANCE * target_tokens
CLUSTER_HALF_WIDTH = 0.05  # several target needles (multivalue, multiquery, variable chains) sit in depth +- this

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

# A fixed local word list (adjectives, nouns, verbs): NIAH keys are "adjective-noun" (as RULER's wonderwords keys,
# e.g. "fearless-fishbone"); common_words draws single words from all three lists.
_ADJECTIVES = """
abundant adorable agile alert ample ancient arctic bashful bitter blazing bold brave breezy bright brilliant brisk
bumpy busy calm careful casual cheerful chilly clever cloudy clumsy cozy crispy crooked curious daring dazzling
delicate dizzy dreamy dusty eager early elegant empty endless enormous fancy fearless festive fierce fluffy foggy
fragile frantic friendly frosty fuzzy gentle giant glossy glowing golden graceful grateful greasy grumpy handsome
happy hasty hidden hollow honest humble hungry icy idle jolly joyful juicy keen kind lazy lively lonely loud lucky
majestic mellow merry mighty misty modern modest muddy narrow nervous nimble noble noisy patient peaceful plain
playful polite precious proud purple quick quiet rapid rare restless rich rough royal rusty sacred salty sandy
scarlet shaggy shiny silent silly sleepy slender slippery smooth snowy soft sour sparkling speedy spicy splendid
steady sticky strange sturdy sunny swift tall tender thirsty tidy tiny tranquil tricky vast vivid wandering warm
wary weary wild windy wise witty wobbly wooden young zealous zesty bouncy chubby dainty drowsy feisty frugal gloomy
hearty jagged lanky lofty mossy nifty plucky quaint rowdy scruffy snug spotty stout sunlit thorny vibrant wistful
"""
_NOUNS = """
acorn album alley almond anchor ankle antler apple apron armchair arrow attic avenue badge bagel bakery balloon
bamboo banana banner barn barrel basket beacon beard beaver beetle bench berry bicycle biscuit blanket blender
blizzard blossom boat bonnet bookcase bottle boulder bouquet bracelet branch brick bridge broom bucket buffalo
bugle bunny butter button cabin cactus cake calendar camel camera candle canoe canyon caravan carnival carpet
carrot castle cathedral cattle cauldron cedar cellar cello chalk cheese cherry chestnut chicken chimney chisel
cider cinnamon clarinet cliff clock closet clover coconut coffee collar comet compass copper coral cottage cotton
cradle crayon cricket crocodile crown crystal cupboard curtain cushion dagger daisy dentist desert diamond
dinosaur dolphin donkey dragon dragonfly drawer dune eagle elephant elm ember envelope fabric falcon farm feather
fence fern ferry fiddle finger flamingo flask flute forest fossil fountain frog gallery garage garden garlic gazelle
gecko geyser ginger giraffe glacier glove goblet goose gorilla granite grape gravel guitar hammer hamster harbor
harvest hawk hedge helmet hermit heron hive hornet horse igloo island ivory jacket jaguar jasmine jelly jewel
jungle kangaroo kayak kettle kitten koala ladder lagoon lamb lantern lava lemon leopard lettuce library lighthouse
lizard llama lobster locket lodge lotus lynx magnet mango maple marble meadow melon meteor mirror mitten monkey
moose mountain muffin museum mushroom nectar notebook nutmeg oak ocean olive onion orchard orchid ostrich otter
oven owl oyster paddle pagoda palace panda panther pantry parcel parrot pasta peach peacock pebble pelican pencil
penguin pepper piano pickle pigeon pillow pitcher pizza planet plank plaza plum pocket pond pony poppy porch
potato prairie prism pudding pumpkin puzzle quail quarry quilt rabbit raccoon radio radish raft rainbow raven reef
rhino ribbon river robin rocket saddle salad salmon sandal sapphire sardine satellite saucer scarf scooter
seashell shadow shark sheep shelf shield shovel shrimp slipper snail sock sofa sparrow spider sponge spoon spruce
squirrel statue stool stove strawberry stream summit sunflower swamp swan sweater sword tablet teapot temple tent
thimble thistle throne thunder tiger timber toad tomato torch tortoise towel tower tractor trout truck trumpet
tulip tunnel turnip turtle umbrella valley vase velvet village violin volcano vulture waffle wagon wallet walnut
walrus wardrobe wasp waterfall whale wheat wheel whistle willow window wizard wolf wren yacht yarn zebra
"""
_VERBS = """
accept admire arrange bake balance bounce breathe build carry chase climb collect cook crawl dance deliver dig
discover drift explore fetch float fold gather glide greet guard hum hunt imagine invent juggle jump kneel knit
laugh launch listen march melt mend nod observe offer paint plant polish pour protect pull push race reach repair
rescue roam roll row scatter search sew shout sing sketch slide smile sneeze sparkle spin splash sprint squeeze
stir stretch swim swing tickle travel tumble twist unfold unlock vanish visit wander wash weave whisper wiggle wink
wonder wrap yawn yell zoom borrow chew dive frown giggle hop hug kick lick munch nibble pinch scribble shiver skip
sniff snore stomp sway tiptoe wobble
"""

# RULER templates (scripts/data/synthetic/constants.py), split into context header / question / answer prefix.
_NIAH_HEADER = (
    "Some special magic {type_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_v} afterwards.\n"
)
_NIAH_QUESTION = "What are all the special magic {type_v} for {query} mentioned in the provided text?"
_NIAH_PREFIX = " The special magic {type_v} for {query} mentioned in the provided text are"
_NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."  # plural even for one value, as RULER
_PASSKEY_HEADER = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
_PASSKEY_NEEDLE = "The pass key is {value}. Remember it. {value} is the pass key."
_VT_HEADER = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
_VT_QUESTION = "Question: Find all variables that are assigned the value {value} in the text above."
_VT_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned "
    "the value {value}, they are:"
)
_CWE_HEADER = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n"
)
_CWE_QUESTION = "Question: What are the {num_cw} most common words in the above list?"
_CWE_PREFIX = " Answer: The top {num_cw} words that appear most often in the list are:"
_FWE_HEADER = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words. "
)
_FWE_QUESTION = (
    "Question: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
_FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"


@dataclass
class Sample:
    """Sample: one long-context test case (context, question, expected answers).

    Parameters
    ----------
    id : str
        ``"{task}-{target_tokens}-{index:04d}"`` for generated samples, e.g. ``"passkey-2048-0003"``.
    task : str
        Task name (a key of ``TASKS`` for generated samples).
    context : str
        The long part of the prompt, the part KV-cache compression applies to.
    question : str
        The question, placed after the context (see ``format_prompt``).
    answer_prefix : str
        Text the answer continues, e.g. ``" The pass key is"``; may be empty.
    answers : list[str]
        Expected strings; a prediction is scored by substring match of each of them.
    target_tokens : int
        Requested total prompt length in tokens (-1 when unknown).
    n_tokens : int
        Actual number of tokens of ``format_prompt(self)`` without special tokens (-1 when not counted).
    depth : float | None
        Relative needle depth in ``[0, 1]``: character offset of the needle over the context length (snapped to
        a sentence start), for tasks that have one.
    meta : dict
        Task-specific details (haystack kind, seed, needles, keys, frequencies...).
    """

    id: str
    task: str
    context: str
    question: str
    answer_prefix: str
    answers: list[str]
    target_tokens: int
    n_tokens: int
    depth: float | None = None
    meta: dict = field(default_factory=dict)

    def prompt(self, question_aware: bool = False) -> tuple[str, str]:
        """prompt: the prompt as ``(compressed part, uncompressed part)``; the two concatenate to format_prompt.

        With ``question_aware=False`` the question comes after the compressed part, so compression cannot see it
        (kvpress default); with ``question_aware=True`` the question is part of the compressed text and only the
        answer prefix follows (kvpress "query-aware" setting).
        """
        if question_aware:
            return self.context + SEPARATOR + self.question, self.answer_prefix
        # The separator opens the second part: BPE pre-tokenizers split "\n\nWhat" as "\n" + "\n" + "What", so
        # tokenizing the two parts apart gives the same tokens as the whole prompt.
        return self.context, SEPARATOR + self.question + self.answer_prefix


def format_prompt(sample: Sample) -> str:
    """format_prompt: the plain-text prompt the model sees, ``context + "\\n\\n" + question + answer_prefix``."""
    return sample.context + SEPARATOR + sample.question + sample.answer_prefix


def count_tokens(tokenizer: Any, text: str) -> int:
    """count_tokens: number of tokens of ``text`` without special tokens (HF tokenizer, or any ``.encode``)."""
    try:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    except TypeError:
        return len(tokenizer.encode(text))


# ----------------------------------------------------------------------------------------------------------------
# Local text resources (built lazily: nothing happens at import)


def _dedupe_words(*blocks: str) -> tuple[str, ...]:
    """_dedupe_words: sorted unique words with no word inside another (substring scoring stays unambiguous)."""
    noise_words = {w.strip(".").lower() for w in NOISE.split()}
    words = sorted({w for b in blocks for w in b.split()} - noise_words)
    return tuple(w for w in words if not any(w != o and w in o for o in words))


@functools.cache
def _word_lists() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """_word_lists: (adjectives, nouns, all single words) of the local word list."""
    return _dedupe_words(_ADJECTIVES), _dedupe_words(_NOUNS), _dedupe_words(_ADJECTIVES, _NOUNS, _VERBS)


@functools.cache
def _prose_text() -> str:
    """_prose_text: the pydoc topics in sorted key order, whitespace normalised, joined by spaces."""
    from pydoc_data.topics import topics

    return " ".join(" ".join(topics[k].split()) for k in sorted(topics))


@functools.cache
def _haystack_words(kind: str) -> tuple[str, ...]:
    """_haystack_words: the words a haystack of this kind cycles through."""
    return tuple((NOISE if kind == "noise" else _prose_text()).split(" "))


def _haystack_source(kind: str) -> str:
    """_haystack_source: the full text a haystack is cut from (to keep needle values out of it)."""
    return NOISE if kind == "noise" else _prose_text()


class _Haystack:
    """_Haystack: the first ``n`` words of a haystack, cycling from a per-sample start at a sentence start."""

    def __init__(self, kind: str, rng: random.Random):
        self.words = _haystack_words(kind)
        start = 0
        if kind == "prose":  # a random sentence start, so samples do not all share the same text
            start = rng.randrange(len(self.words))
            for _ in range(len(self.words)):
                if self.words[start - 1].endswith("."):
                    break
                start = (start + 1) % len(self.words)
        self.start = start

    def text(self, n: int) -> str:
        m = len(self.words)
        reps, rest = divmod(self.start + n, m)
        if reps == 0:
            return " ".join(self.words[self.start : self.start + n])
        parts = list(self.words[self.start :]) + list(self.words) * (reps - 1) + list(self.words[:rest])
        return " ".join(parts)


def _sentence_boundary(body: str, pos: int) -> int:
    """_sentence_boundary: the sentence start in ``body`` nearest to character ``pos`` (word start if none)."""
    cands = []
    left = body.rfind(". ", 0, pos + 1)
    right = body.find(". ", pos)
    cands += [i + 2 for i in (left, right) if i >= 0]
    cands.append(0)
    if body.endswith("."):
        cands.append(len(body))
    best = min(cands, key=lambda c: abs(c - pos))
    if abs(best - pos) > max(200, len(body) // 20):  # prose without a nearby full stop: a word boundary
        space = body.rfind(" ", 0, pos + 1)
        best = space + 1 if space >= 0 else 0
    return best


def _insert_needles(body: str, needles: Sequence[tuple[float, str]], head: int = 0) -> tuple[str, list[int]]:
    """_insert_needles: put each ``(depth, sentence)`` into ``body`` at the sentence start nearest its depth.

    Depth is relative to the whole context ``head characters + body + needles``, so the header and the needles
    placed before are taken into account. Returns the text and each needle's character offset in it (in the
    order given, not counting ``head``). Needles at the same sentence start keep their depth order.
    """
    total = head + len(body) + sum(len(s) + 1 for _, s in needles)
    out, offsets, cursor, before = "", [0] * len(needles), 0, 0
    for i in sorted(range(len(needles)), key=lambda j: (needles[j][0], j)):
        d, sentence = needles[i]
        want = min(max(round(d * total) - head - before, 0), len(body))
        b = max(_sentence_boundary(body, want), cursor)
        out += body[cursor:b]
        if out and not out.endswith(" "):
            out += " "
        offsets[i] = len(out)
        out += sentence + " "
        cursor, before = b, before + len(sentence) + 1
    return (out + body[cursor:]).rstrip(" "), offsets


# ----------------------------------------------------------------------------------------------------------------
# Argument checks, depths, randomness


def _warn_once(message: str) -> None:
    """_warn_once: a UserWarning issued once per message per process."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, UserWarning, stacklevel=4)


_WARNED: set[str] = set()


def _check_args(task: str, length: int, n: int, haystack: str, depth: float | None) -> None:
    """_check_args: ValueError for a bad n, length, haystack or depth."""
    if not isinstance(n, numbers.Integral) or n <= 0:
        raise ValueError(f"n ({n!r}) must be a positive integer (number of samples of task {task!r})")
    if not isinstance(length, numbers.Integral) or length <= 0:
        raise ValueError(f"length ({length!r}) must be a positive integer number of tokens (task {task!r})")
    if haystack not in HAYSTACKS:
        raise ValueError(f"unknown haystack {haystack!r} for task {task!r}; available: {list(HAYSTACKS)}")
    if depth is not None and not (0.0 <= depth <= 1.0):
        raise ValueError(f"depth ({depth}) must be in [0, 1] or None (task {task!r})")


def _depths(n: int, depth: float | None) -> list[float]:
    """_depths: ``depth`` for every sample, or depths swept evenly over ``[0.05, 0.95]`` when it is None."""
    if depth is not None:
        return [float(depth)] * n
    if n == 1:
        return [0.5]
    return [0.05 + 0.9 * i / (n - 1) for i in range(n)]


def _cluster(rng: random.Random, center: float, k: int) -> list[float]:
    """_cluster: ``k`` sorted depths drawn in ``center +- CLUSTER_HALF_WIDTH``, the window kept inside [0, 1]."""
    lo = min(max(center - CLUSTER_HALF_WIDTH, 0.0), 1.0 - 2 * CLUSTER_HALF_WIDTH)
    return sorted(lo + 2 * CLUSTER_HALF_WIDTH * rng.random() for _ in range(k))


def _rng(task: str, seed: int, index: int) -> random.Random:
    """_rng: the per-sample generator (string seeds are hashed with SHA-512: stable across runs)."""
    return random.Random(f"kvaccel.evals/{task}/{seed}/{index}")


def _unique(rng: random.Random, make: Callable[[random.Random], str], k: int, avoid: str, taken: set[str]) -> list[str]:
    """_unique: ``k`` distinct values from ``make`` that occur neither in ``avoid`` nor in ``taken``."""
    out: list[str] = []
    for _ in range(1000 * k):
        if len(out) == k:
            break
        v = make(rng)
        if v not in taken and v not in avoid:
            taken.add(v)
            out.append(v)
    if len(out) < k:
        raise RuntimeError(f"could not draw {k} distinct values (got {len(out)})")
    return out


def _number(digits: int) -> Callable[[random.Random], str]:
    return lambda rng: str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _word_key(rng: random.Random) -> str:
    adjectives, nouns, _ = _word_lists()
    return f"{rng.choice(adjectives)}-{rng.choice(nouns)}"


def _var_name(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_uppercase, k=5))


# ----------------------------------------------------------------------------------------------------------------
# Length fitting


def _fit(
    build: Callable[[int], tuple[str, str, str, Any]],
    tokenizer: Any,
    target: int,
    task: str,
    lo: int = 0,
    hi_max: int | None = None,
    hint: int | None = None,
) -> tuple[int, int, tuple[str, str, str, Any]]:
    """_fit: the size ``n`` whose prompt ``build(n)`` is closest to ``target`` tokens, preferring not to exceed it.

    ``build(n) -> (context, question, answer_prefix, extra)`` must grow (roughly monotonically) with ``n`` from
    ``lo`` up to ``hi_max``. Bracketed interpolation search with bisection steps when the bracket shrinks slowly;
    every candidate is counted exactly. Returns ``(n, n_tokens, build(n))``.
    """
    cache: dict[int, tuple[int, tuple]] = {}

    def f(k: int) -> int:
        if k not in cache:
            parts = build(k)
            cache[k] = (_prompt_tokens(tokenizer, parts), parts)
        return cache[k][0]

    tol = LENGTH_TOLERANCE * target
    n0, base = lo, f(lo)
    if base > target + tol:
        raise ValueError(
            f"length ({target}) is too small for task {task!r}: its needles, question and instructions alone take "
            f"{base} tokens; use length >= {base}"
        )
    hi: int | None = None  # invariant: f(lo) <= target < f(hi)
    if base > target:
        hi = lo
    elif hi_max is not None and f(hi_max) <= target:
        lo = hi_max
    guess = hint if hint is not None else lo + max(1, target - base)
    width = math.inf
    for _ in range(64):
        if hi is not None and hi - lo <= 1 or hi_max is not None and lo >= hi_max:
            break
        top = hi - 1 if hi is not None else (hi_max if hi_max is not None else guess)
        k = min(max(guess, lo + 1), top)
        if f(k) <= target:
            lo = k
        else:
            hi = k
        if hi is None:  # extrapolate at the rate seen so far, a little beyond, to get a bracket
            rate = (f(lo) - base) / (lo - n0) if lo > n0 and f(lo) > base else 1.0
            guess = lo + math.ceil((target - f(lo)) / rate * 1.02) + 1
        else:  # interpolate; bisect when the last step did not halve the bracket
            new_width = hi - lo
            if new_width > width / 2:
                guess = (lo + hi) // 2
            else:
                guess = round(lo + (target - f(lo)) * (hi - lo) / max(f(hi) - f(lo), 1))
            width = new_width
    best = lo
    if hi is not None and (target - f(lo) > tol or f(lo) > target) and abs(f(hi) - target) < abs(f(lo) - target):
        best = hi
    n_tok = f(best)
    if abs(n_tok - target) > tol:
        raise RuntimeError(
            f"could not fit task {task!r} to {target} tokens (+-{tol:.0f}): the closest prompt has {n_tok} tokens"
            + (f" (the largest possible prompt has {f(hi_max)} tokens)" if hi_max is not None else "")
        )
    return best, n_tok, cache[best][1]


def _sample(
    task: str,
    length: int,
    index: int,
    n_tok: int,
    parts: tuple[str, str, str, Any],
    answers: list[str],
    depth: float | None,
    meta: dict,
) -> Sample:
    context, question, prefix, extra = parts
    meta = dict(meta)
    if extra:
        meta.update(extra)
    return Sample(
        id=f"{task}-{length}-{index:04d}",
        task=task,
        context=context,
        question=question,
        answer_prefix=prefix,
        answers=list(answers),
        target_tokens=length,
        n_tokens=n_tok,
        depth=depth,
        meta=meta,
    )


def _needle_task(
    task: str,
    tokenizer: Any,
    length: int,
    n: int,
    seed: int,
    haystack: str,
    depth: float | None,
    make: Callable[[random.Random, float], tuple[str, str, str, list[tuple[float, str]], list[int], list[str], dict]],
) -> list[Sample]:
    """_needle_task: shared loop of the haystack tasks (needles inserted into a haystack fitted to the length).

    ``make(rng, depth) -> (header, question, prefix, needles, targets, answers, meta)`` where ``needles`` is a
    list of ``(depth, sentence)`` and ``targets`` the indices of the needles that hold the answers.
    """
    _check_args(task, length, n, haystack, depth)
    samples, hint = [], None
    for i, d in enumerate(_depths(n, depth)):
        rng = _rng(task, seed, i)
        hay = _Haystack(haystack, rng)
        header, question, prefix, needles, targets, answers, meta = make(rng, d)

        def build(k: int, hay=hay, header=header, question=question, prefix=prefix, needles=needles, targets=targets):
            body, offsets = _insert_needles(hay.text(k), needles, head=len(header))
            ctx = header + body
            return ctx, question, prefix, {"needle_offsets": [len(header) + offsets[t] for t in targets]}

        k, n_tok, parts = _fit(build, tokenizer, length, task, hint=hint)
        hint = k
        meta = {"haystack": haystack, "seed": seed, "haystack_words": k, **meta}
        meta["needles"] = [needles[t][1] for t in targets]
        samples.append(_sample(task, length, i, n_tok, parts, answers, d, meta))
    return samples


# ----------------------------------------------------------------------------------------------------------------
# Generators


def generate_passkey(
    tokenizer: Any, length: int, n: int, seed: int = 0, haystack: str = "noise", depth: float | None = None
) -> list[Sample]:
    """passkey: a 5-digit pass key hidden at ``depth`` in noise or prose (Landmark Attention's test).

    https://arxiv.org/abs/2305.16300 -- needle "The pass key is 71432. Remember it. 71432 is the pass key.",
    question "What is the pass key?", answer prefix " The pass key is".

    Parameters
    ----------
    tokenizer : tokenizer
        Counts the prompt tokens (any HF tokenizer).
    length : int
        Target prompt length in tokens; every sample is within 2 % of it.
    n : int
        Number of samples.
    seed : int, default 0
        Same seed, same samples.
    haystack : {"noise", "prose"}, default "noise"
        Repeated noise sentences, or English prose from ``pydoc_data.topics``.
    depth : float | None, default None
        Relative needle depth (character offset / context length); None sweeps ``linspace(0.05, 0.95, n)``.
    """
    source = _haystack_source(haystack)

    def make(rng, d):
        key = _unique(rng, _number(5), 1, source, set())[0]
        needle = _PASSKEY_NEEDLE.format(value=key)
        return _PASSKEY_HEADER, "What is the pass key?", " The pass key is", [(d, needle)], [0], [key], {}

    return _needle_task("passkey", tokenizer, length, n, seed, haystack, depth, make)


def _niah(task: str, num_k: int, num_v: int, num_q: int) -> Callable[..., list[Sample]]:
    """_niah: a RULER NIAH generator with ``num_k`` keys, ``num_v`` values per key and ``num_q`` keys asked."""

    def generator(tokenizer, length, n, seed=0, haystack="noise", depth=None):
        source = _haystack_source(haystack)

        def make(rng, d):
            taken: set[str] = set()
            keys = _unique(rng, _word_key, num_k, source, taken)
            values = [_unique(rng, _number(7), num_v, source, taken) for _ in keys]
            asked = rng.sample(range(num_k), num_q)
            single = num_q * num_v == 1
            type_v = "number" if single else "numbers"
            # Asked needles cluster around the depth (exactly at it when there is one); distractors anywhere.
            target_depths = iter([d] if single else _cluster(rng, d, num_q * num_v))
            needles, targets, answers = [], [], []
            for ki in asked:
                for v in values[ki]:
                    targets.append(len(needles))
                    answers.append(v)
                    needles.append((next(target_depths), _NIAH_NEEDLE.format(key=keys[ki], value=v)))
            for ki in range(num_k):
                if ki not in asked:
                    for v in values[ki]:
                        needles.append((rng.random(), _NIAH_NEEDLE.format(key=keys[ki], value=v)))
            queries = [keys[ki] for ki in asked]
            query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
            header, question, prefix = _NIAH_HEADER, _NIAH_QUESTION, _NIAH_PREFIX
            if single:  # RULER's singular wording for one asked value
                header = header.replace("Some", "A").replace("are", "is")
                question = question.replace("are all", "is")
                prefix = prefix.replace("are", "is")
            meta = {"keys": keys, "values": values, "asked_keys": queries}
            return (
                header.format(type_v=type_v),
                question.format(type_v=type_v, query=query),
                prefix.format(type_v=type_v, query=query),
                needles,
                targets,
                answers,
                meta,
            )

        return _needle_task(task, tokenizer, length, n, seed, haystack, depth, make)

    generator.__name__ = f"generate_{task}"
    return generator


_niah_single = _niah("niah_single", 1, 1, 1)
_niah_multikey = _niah("niah_multikey", 4, 1, 1)
_niah_multivalue = _niah("niah_multivalue", 1, 4, 1)
_niah_multiquery = _niah("niah_multiquery", 4, 1, 4)


def generate_niah_single(
    tokenizer: Any, length: int, n: int, seed: int = 0, haystack: str = "noise", depth: float | None = None
) -> list[Sample]:
    """niah_single: one "special magic number" needle for a word key at ``depth`` (RULER niah_single).

    https://arxiv.org/abs/2404.06654 -- needle "One of the special magic numbers for {key} is: {7 digits}.",
    keys are "adjective-noun" words. Parameters as ``generate_passkey``.
    """
    return _niah_single(tokenizer, length, n, seed, haystack, depth)


def generate_niah_multikey(
    tokenizer: Any, length: int, n: int, seed: int = 0, haystack: str = "noise", depth: float | None = None
) -> list[Sample]:
    """niah_multikey: 4 key-value needles, one key asked (RULER niah_multikey_1).

    The asked needle is at ``depth``; the 3 distractors at uniformly random depths. Parameters as
    ``generate_passkey``.
    """
    return _niah_multikey(tokenizer, length, n, seed, haystack, depth)


def generate_niah_multivalue(
    tokenizer: Any, length: int, n: int, seed: int = 0, haystack: str = "noise", depth: float | None = None
) -> list[Sample]:
    """niah_multivalue: one key with 4 values, all must be recalled (RULER niah_multivalue).

    RULER scatters the 4 needles at random depths; here they lie in ``depth +- 0.05`` so that depth sweeps mean
    something. Parameters as ``generate_passkey``.
    """
    return _niah_multivalue(tokenizer, length, n, seed, haystack, depth)


def generate_niah_multiquery(
    tokenizer: Any, length: int, n: int, seed: int = 0, haystack: str = "noise", depth: float | None = None
) -> list[Sample]:
    """niah_multiquery: 4 keys with one value each, all 4 asked at once (RULER niah_multiquery).

    The 4 needles lie in ``depth +- 0.05`` (RULER: random depths). Parameters as ``generate_passkey``.
    """
    return _niah_multiquery(tokenizer, length, n, seed, haystack, depth)


def generate_variable_tracking(
    tokenizer: Any, length: int, n: int, seed: int = 0, haystack: str = "noise", depth: float | None = None
) -> list[Sample]:
    """variable_tracking: a chain "VAR A = 12345", "VAR B = VAR A", ... of 4 hops; name every variable holding it.

    RULER ``variable_tracking`` with 1 chain of 4 hops (5 variables of 5 capital letters, a 5-digit value).
    Differences: the 5 assignments lie in order within ``depth +- 0.05`` (RULER: anywhere), RULER's in-context
    example is left out, and the answer prefix ends with ":" (no trailing space). Parameters as
    ``generate_passkey``.
    """
    num_hops = 4
    source = _haystack_source(haystack)

    def make(rng, d):
        taken: set[str] = set()
        names = _unique(rng, _var_name, num_hops + 1, source, taken)
        value = _unique(rng, _number(5), 1, source, taken)[0]
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[j + 1]} = VAR {names[j]}." for j in range(num_hops)]
        needles = list(zip(_cluster(rng, d, len(chain)), chain, strict=True))
        question = _VT_QUESTION.format(value=value)
        prefix = _VT_PREFIX.format(num_v=num_hops + 1, value=value)
        meta = {"value": value, "chain": chain}
        return _VT_HEADER, question, prefix, needles, list(range(len(chain))), names, meta

    return _needle_task("variable_tracking", tokenizer, length, n, seed, haystack, depth, make)


def _ignored_options(task: str, haystack: str, depth: float | None) -> None:
    """_ignored_options: one-time warnings for options a word-list task does not use."""
    if haystack != "noise":
        _warn_once(f"task {task!r} has no haystack: haystack={haystack!r} is ignored")
    if depth is not None:
        _warn_once(f"task {task!r} has no needle: depth={depth} is ignored")


def generate_common_words(
    tokenizer: Any, length: int, n: int, seed: int = 0, haystack: str = "noise", depth: float | None = None
) -> list[Sample]:
    """common_words: name the 10 words that appear most often in a long numbered list (RULER cwe).

    RULER ``common_words_extraction``: 10 common words appear ``freq_cw`` times, the others ``freq_ucw`` times
    (30 / 3, or 6 / 1 below 4096 tokens), shuffled into "1. word 2. word ...". The number of uncommon words sets
    the length. Differences: no in-context example; when the local word list is too short for the length both
    frequencies are scaled by the same factor (``meta["freq_cw"]``, ``meta["freq_ucw"]``). ``haystack`` and
    ``depth`` do not apply (a warning if set).
    """
    task, num_cw = "common_words", 10
    _check_args(task, length, n, haystack, depth)
    _ignored_options(task, haystack, depth)
    freq_cw, freq_ucw = (6, 1) if length < 4096 else (30, 3)
    question = _CWE_QUESTION.format(num_cw=num_cw)
    prefix = _CWE_PREFIX.format(num_cw=num_cw)
    samples, hint = [], None
    for i in range(n):
        rng = _rng(task, seed, i)
        vocab = list(_word_lists()[2])
        rng.shuffle(vocab)
        common, uncommon = vocab[:num_cw], vocab[num_cw:]
        order_seed = rng.getrandbits(64)

        def build(m: int, scale: int = 1, common=common, uncommon=uncommon, order_seed=order_seed):
            words = common * (freq_cw * scale) + uncommon[:m] * (freq_ucw * scale)
            random.Random(order_seed).shuffle(words)
            ctx = _CWE_HEADER + " ".join(f"{j + 1}. {w}" for j, w in enumerate(words))
            return ctx, question, prefix, {"freq_cw": freq_cw * scale, "freq_ucw": freq_ucw * scale}

        # Scale both frequencies when even every word of the list gives too short a prompt.
        scale, top = 1, len(uncommon)
        hdr = count_tokens(tokenizer, _CWE_HEADER + SEPARATOR + question + prefix)
        while (full := _prompt_tokens(tokenizer, build(top, scale))) < length * (1 - LENGTH_TOLERANCE):
            scale = max(scale + 1, math.ceil(scale * (length - hdr) / max(full - hdr, 1)))
        m, n_tok, parts = _fit(functools.partial(build, scale=scale), tokenizer, length, task, hi_max=top, hint=hint)
        hint = m
        meta = {"seed": seed, "num_uncommon": m, "common": common}
        samples.append(_sample(task, length, i, n_tok, parts, common, None, meta))
    return samples


def _prompt_tokens(tokenizer: Any, parts: tuple[str, str, str, Any]) -> int:
    """_prompt_tokens: tokens of the prompt laid out from ``(context, question, answer_prefix, extra)``."""
    return count_tokens(tokenizer, parts[0] + SEPARATOR + parts[1] + parts[2])


def generate_frequent_words(
    tokenizer: Any, length: int, n: int, seed: int = 0, haystack: str = "noise", depth: float | None = None
) -> list[Sample]:
    """frequent_words: name the 3 most frequent coded words of a Zipf-distributed text (RULER fwe).

    RULER ``freq_words_extraction``: a vocabulary of ``length // 50`` random 6-letter words, word of rank k
    repeated ``floor(N * k**-2 / zeta(2))`` times, shuffled; rank 1 is the noise word "..." and the answers are
    ranks 2-4. N sets the length. Differences: no in-context example. ``haystack`` and ``depth`` do not apply
    (a warning if set).
    """
    task, alpha = "frequent_words", 2.0
    zeta = math.pi**2 / 6  # zeta(2)
    _check_args(task, length, n, haystack, depth)
    _ignored_options(task, haystack, depth)
    vocab_size = max(length // 50, 10)
    samples, hint = [], None

    def counts(total: int) -> list[int]:
        return [int(total * k**-alpha / zeta) for k in range(1, vocab_size + 1)]

    # smallest N whose ranks 2..5 have strictly decreasing counts (the top 3 are well defined)
    def well_defined(total: int) -> bool:  # ranks 2..5 strictly decreasing and rank 4 seen at least twice
        c = counts(total)
        return c[1] > c[2] > c[3] > c[4] and c[3] >= 2

    n_min = next(t for t in range(10, 10**6) if well_defined(t))
    for i in range(n):
        rng = _rng(task, seed, i)
        vocab = _unique(rng, lambda r: "".join(r.choices(string.ascii_lowercase, k=6)), vocab_size, "", set())
        vocab[0] = "..."
        order_seed = rng.getrandbits(64)

        def build(total: int, vocab=vocab, order_seed=order_seed):
            words = [w for w, c in zip(vocab, counts(total), strict=True) for _ in range(c)]
            random.Random(order_seed).shuffle(words)
            return _FWE_HEADER + " ".join(words), _FWE_QUESTION, _FWE_PREFIX, {"counts": counts(total)[:5]}

        total, n_tok, parts = _fit(build, tokenizer, length, task, lo=n_min, hint=hint)
        hint = total
        meta = {"seed": seed, "num_words": total, "vocab": vocab}
        samples.append(_sample(task, length, i, n_tok, parts, vocab[1:4], None, meta))
    return samples


TASKS: dict[str, Callable[..., list[Sample]]] = {
    "passkey": generate_passkey,
    "niah_single": generate_niah_single,
    "niah_multikey": generate_niah_multikey,
    "niah_multivalue": generate_niah_multivalue,
    "niah_multiquery": generate_niah_multiquery,
    "variable_tracking": generate_variable_tracking,
    "common_words": generate_common_words,
    "frequent_words": generate_frequent_words,
}
_ALIASES = {"vt": "variable_tracking", "cwe": "common_words", "fwe": "frequent_words"}


def get_task(name: str) -> Callable[..., list[Sample]]:
    """get_task: the generator registered under ``name`` (or RULER's short alias: vt, cwe, fwe)."""
    key = _ALIASES.get(name, name)
    if key in TASKS:
        return TASKS[key]
    close = difflib.get_close_matches(str(name), list(TASKS) + list(_ALIASES), n=1, cutoff=0.4)
    hint = f"; did you mean {_ALIASES.get(close[0], close[0])!r}?" if close else ""
    raise ValueError(f"unknown task {name!r}{hint} Available: {sorted(TASKS)}")


def generate(
    task: str,
    tokenizer: Any,
    length: int,
    n: int,
    seed: int = 0,
    haystack: str = "noise",
    depth: float | None = None,
) -> list[Sample]:
    """generate: ``n`` samples of ``task`` at ``length`` tokens (see ``TASKS``; arguments as ``generate_passkey``)."""
    fn = get_task(task)
    _check_args(task, length, n, haystack, depth)
    return fn(tokenizer, length, n, seed=seed, haystack=haystack, depth=depth)


# ----------------------------------------------------------------------------------------------------------------
# Local task files (kvpress-style records)


def _record_to_sample(record: Any, where: str, index: int, default_task: str, tokenizer: Any) -> Sample:
    """_record_to_sample: one kvpress-style record as a Sample; ValueError naming ``where`` and the field."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object with context/question/answers, got {type(record).__name__}")
    for name in ("context", "question", "answers"):
        if name not in record:
            raise ValueError(f"{where}: missing field {name!r} (fields present: {sorted(record)})")
    for name in ("context", "question", "answer_prefix"):
        if name in record and not isinstance(record[name], str):
            raise ValueError(f"{where}: field {name!r} must be a string, got {type(record[name]).__name__}")
    answers = record["answers"]
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{where}: field 'answers' must be a string or a non-empty list of strings, got {answers!r}")
    known = {"context", "question", "answer_prefix", "answers", "id", "task", "depth", "target_tokens"}
    sample = Sample(
        id=str(record.get("id", f"{default_task}-{index:04d}")),
        task=str(record.get("task", default_task)),
        context=record["context"],
        question=record["question"],
        answer_prefix=record.get("answer_prefix", ""),
        answers=list(answers),
        target_tokens=int(record.get("target_tokens", -1)),
        n_tokens=-1,
        depth=record.get("depth"),
        meta={k: v for k, v in record.items() if k not in known},
    )
    if tokenizer is not None:
        sample.n_tokens = count_tokens(tokenizer, format_prompt(sample))
    return sample


def load_jsonl(path: str | Path, tokenizer: Any = None) -> list[Sample]:
    """load_jsonl: samples from a JSON-lines file, one kvpress-style record per line.

    Each record has ``context``, ``question``, ``answers`` (a string or a list of strings) and optionally
    ``answer_prefix`` (default ""), ``id``, ``task`` (default: the file name stem), ``depth``, ``target_tokens``;
    other fields go to ``meta``. ``n_tokens`` is counted when a tokenizer is given, else -1.
    """
    path = Path(path)
    samples = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}: record {len(samples) + 1} (line {lineno})"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from e
            samples.append(_record_to_sample(record, where, len(samples), path.stem, tokenizer))
    if not samples:
        raise ValueError(f"{path}: no records")
    return samples


def load_json(path: str | Path, tokenizer: Any = None) -> list[Sample]:
    """load_json: samples from a JSON file: a list of records, ``{"data": [...]}``, or a dict of columns.

    Columns are what ``pandas.DataFrame.to_json`` writes by default (``{"context": {"0": ...}, ...}``) or lists
    (``{"context": [...], ...}``). Records as in ``load_jsonl``.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        records = data["data"]
    elif isinstance(data, dict) and "context" in data and isinstance(data["context"], (dict, list)):
        columns = {k: (list(v.values()) if isinstance(v, dict) else v) for k, v in data.items()}
        sizes = {k: len(v) for k, v in columns.items() if isinstance(v, list)}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"{path}: columns have different lengths: {sizes}")
        n = next(iter(sizes.values()))
        records = [{k: v[i] for k, v in columns.items()} for i in range(n)]
    elif isinstance(data, list):
        records = data
    else:
        raise ValueError(f"{path}: expected a list of records, {{'data': [...]}} or a dict of columns")
    if not records:
        raise ValueError(f"{path}: no records")
    return [_record_to_sample(r, f"{path}: record {i + 1}", i, path.stem, tokenizer) for i, r in enumerate(records)]
