"""Synthetic long-context retrieval tasks, shared by model training and evaluation.

Each task hides one or more "needles" in natural haystack text and ends the prompt with a
question whose answer the model must copy from the needles:

- `passkey`: one pass key (Mohtashami & Jaggi 2023, "Landmark Attention", arXiv 2305.16300).
- `multikey`: needles for several keys, one asked (RULER niah_multikey, arXiv 2404.06654).
- `multivalue`: several values for one key, all asked, in order of appearance (RULER niah_multivalue).
- `kvlookup`: a JSON object of random hex keys and values, one key asked (Liu et al. 2023,
  "Lost in the Middle", arXiv 2307.03172).
- `people`: several natural-language facts ("Alice lives in the city of Oslo.") in the prose, one
  person asked (a natural-language multi-key needle task for pretrained models).

The first four are the formats `models/needle-llama` was trained on. Pretrained instruction models
(SmolLM2-135M-Instruct, `kvpress.testbed`) take ``chat=True``: the haystack and question become
the user's message in the tokenizer's chat template and the answer's lead ("The pass key is")
starts the assistant's reply.

Lengths are in tokens of the given tokenizer and include the BOS token (if the tokenizer adds one)
and the answer. With a byte-level tokenizer and ASCII text the length is exact; with other
tokenizers it is within a few tokens. Depths are fractions of the haystack in [0, 1] (0 = first
token, 1 = just before the question). A sample is a pure function of its seed.
"""

from __future__ import annotations

import gzip
import os
import random
from dataclasses import dataclass, field
from functools import lru_cache

TASKS = ("passkey", "multikey", "multivalue", "kvlookup", "people")

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data")

# Keys of the multi-key / multi-value needles: short distinct English words.
WORDS = """
apple anchor arrow badge basket beacon bridge button cabin camera candle canyon carpet castle
cedar chalk cherry circle cloud clover comet copper coral cotton crystal dagger desert diamond
dolphin dragon eagle ember engine falcon feather fiddle forest fossil galaxy garden garnet ginger
glacier granite harbor hammer helmet honey island ivory jacket jasmine jungle kettle ladder
lantern lemon lizard magnet maple marble meadow mirror monkey needle nickel oasis ocean olive
orchid oyster paddle panther parrot pebble pepper pillow planet pocket quartz rabbit raven ribbon
rocket saddle salmon silver spider spruce statue summit tiger timber tulip tunnel velvet violet
walnut willow window winter zebra
""".split()

# Keys and values of the natural-language `people` needles: first names and cities, one token or two
# in common tokenizers, so small instruction models can copy them.
NAMES = """
Alice Bob Carol David Emma Frank Grace Henry Irene Jack Karen Louis Maria Nathan Olivia Peter
Quinn Rachel Samuel Teresa Victor Wendy Xavier Yvonne
""".split()
CITIES = """
Amsterdam Athens Bangkok Barcelona Berlin Boston Cairo Chicago Dublin Geneva Helsinki Istanbul
Lisbon London Madrid Manila Montreal Moscow Nairobi Oslo Paris Prague Rome Seoul Sydney Tokyo
Toronto Vienna Warsaw Zurich
""".split()


@dataclass
class Sample:
    """One task instance: the model reads `prompt` and must continue with `answer`."""

    task: str
    prompt: str
    answer: str
    length: int  # requested length in tokens (BOS + prompt + answer)
    depth: float  # depth of the asked needle (or of the first value) in the haystack, in [0, 1]
    values: list[str] = field(default_factory=list)  # the values to retrieve (multivalue: several)
    followups: list[tuple[str, str]] = field(default_factory=list)  # more (question, answer), training only
    chat: bool = False  # the prompt is a chat template's text: tokenize it without adding special tokens


CORPORA = {"train": "pydoc_train", "heldout": "pydoc_heldout", "code": "pycode_train"}


@lru_cache(maxsize=None)
def load_corpus(split: str = "train") -> str:
    """A bundled text corpus from Python's standard library (PSF licence; kvpress/data/SOURCES.md).

    split: "train" (docstrings and comments, 2.6 MB; also the default calibration haystack),
    "heldout" (docstrings and comments of 27 modules never seen in training, 0.15 MB; used for
    evaluation and perplexity) or "code" (source code of the training modules, 9.3 MB).
    """
    if split not in CORPORA:
        raise ValueError(f"unknown corpus {split!r}; choose one of {list(CORPORA)}")
    path = os.path.join(DATA_DIR, f"{CORPORA[split]}.txt.gz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing; rebuild it with `python models/build_corpus.py`")
    with gzip.open(path, "rt", encoding="ascii") as f:
        return f.read()


def _digits(rng: random.Random, n: int = 7) -> str:
    return str(rng.randrange(10 ** (n - 1), 10**n))


def _hex(rng: random.Random, n: int = 8) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(n))


def _needles(task: str, rng: random.Random, depth: float, num_needles: int):
    """(needles [(depth, text)], questions [(ask, lead, answer, values)]) of one task instance.

    A question is asked as ``ask + " " + lead`` and answered right after ``lead`` (with a chat
    template, ``ask`` is the user's message and ``lead`` starts the assistant's reply). The first
    question is the asked one; the others (multikey: the other keys, kvlookup: the other pairs) can
    follow it, for denser supervision in training."""
    if task == "passkey":
        key = _digits(rng)
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        return [(depth, needle)], [("What is the pass key?", "The pass key is ", key, [key])]
    if task == "multikey":
        keys = rng.sample(WORDS, num_needles)
        values = [_digits(rng) for _ in keys]
        depths = [depth] + [rng.random() for _ in keys[1:]]
        needles = [(d, f"One of the special magic numbers for {k} is: {v}.") for d, k, v in zip(depths, keys, values)]
        return needles, [(f"What is the special magic number for {k}?", f"The special magic number for {k} is: ", v, [v])
                         for k, v in zip(keys, values)]
    if task == "multivalue":
        key = rng.choice(WORDS)
        values = [_digits(rng) for _ in range(num_needles)]
        depths = sorted([depth] + [rng.uniform(depth, 1.0) for _ in values[1:]])
        needles = [(d, f"One of the special magic numbers for {key} is: {v}.") for d, v in zip(depths, values)]
        return needles, [(f"What are all the special magic numbers for {key}?",
                          f"The special magic numbers for {key} are: ", ", ".join(values), values)]
    if task == "kvlookup":
        pairs = [(_hex(rng), _hex(rng)) for _ in range(num_needles)]
        block = "JSON data: {" + ", ".join(f'"{k}": "{v}"' for k, v in pairs) + "}"
        rng.shuffle(pairs)
        return [(depth, block)], [(f'Extract the value for key "{k}" from the JSON data above.', 'Value: "', v, [v])
                                  for k, v in pairs]
    if task == "people":
        names = rng.sample(NAMES, num_needles)
        cities = rng.sample(CITIES, num_needles)
        depths = [depth] + [rng.random() for _ in names[1:]]
        needles = [(d, f"{n} lives in the city of {c}.") for d, n, c in zip(depths, names, cities)]
        return needles, [(f"In which city does {n} live?", f"{n} lives in the city of ", c, [c]) for n, c in zip(names, cities)]
    raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")


DEFAULT_NEEDLES = {"passkey": 1, "multikey": 4, "multivalue": 4, "kvlookup": 16, "people": 4}


def make_sample(
    task: str,
    tokenizer,
    haystack: str,
    length: int,
    depth: float,
    seed: int | str,
    num_needles: int | None = None,
    questions: int = 1,
    chat: bool = False,
) -> Sample:
    """Build one `task` instance of `length` tokens with its (asked) needle at `depth`.

    haystack: source text; a window starting at a random line is used (wrapping around if short).
    num_needles: keys (multikey, people), values (multivalue) or pairs (kvlookup); defaults to
        DEFAULT_NEEDLES.
    questions: up to this many questions (training: denser supervision); the first is `prompt` /
        `answer`, the others go to `followups`, each asked on a new line after the previous answer.
    chat: the prompt is the tokenizer's chat template of one user message (the haystack and the
        question) and the start of the assistant's reply; it holds its special tokens as text, so
        tokenize it with ``add_special_tokens=False`` (``Sample.chat`` says so).
    """
    if chat and questions > 1:
        raise ValueError("follow-up questions are for plain-text training samples; use questions=1 with chat")
    rng = random.Random(f"{task}/{length}/{depth}/{seed}")
    num_needles = num_needles or DEFAULT_NEEDLES[task]
    needles, qas = _needles(task, rng, depth, num_needles)
    (ask, lead, answer, values), qas = qas[0], qas[1:questions]
    question = ask + " " + lead
    followups = [("\n" + q + " " + l, a) for q, l, a, _ in qas]
    n_tok = lambda s: len(tokenizer.encode(s, add_special_tokens=False))  # noqa: E731
    n_special = 0 if chat else len(tokenizer.encode("", add_special_tokens=True))

    def finish(hay: str) -> str:
        if not chat:
            return hay + "\n\n" + question
        messages = [{"role": "user", "content": hay + "\n\n" + ask}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + lead
    start = haystack.find("\n", rng.randrange(len(haystack))) + 1

    def build(budget: int) -> str:
        chars = budget + 64  # enough for a byte-level tokenizer; doubled until enough tokens
        while True:
            window = haystack[start : start + chars]
            while len(window) < chars:  # wrap around a short haystack
                window += "\n" + haystack[: chars - len(window) - 1]
            ids = tokenizer.encode(window, add_special_tokens=False)
            if len(ids) >= budget:
                break
            chars *= 2
        hay = tokenizer.decode(ids[: max(budget, 0)])
        spots = []
        for i, (d, needle) in enumerate(needles):
            at = int(d * len(hay))
            line, sentence = hay.rfind("\n", 0, at) + 1, hay.rfind(". ", 0, at)
            spots.append((max(line, sentence + 2 if sentence >= 0 else 0), i, needle))  # a line or sentence start
        for at, _, needle in sorted(spots, reverse=True):  # from the end, so positions stay valid
            hay = hay[:at] + needle + " " + hay[at:]
        return finish(hay)

    fixed = n_special + n_tok(answer) + n_tok(finish("")) + sum(n_tok(n + " ") for _, n in needles)
    after = sum(n_tok(q) + n_tok(a) for q, a in followups)  # tokens of the follow-up questions
    fixed += after
    budget = length - fixed
    prompt = build(budget)
    for _ in range(2):  # correct for tokenization at the seams (exact for byte-level tokenizers)
        extra = n_special + n_tok(prompt) + n_tok(answer) + after - length
        if extra == 0:
            break
        budget -= extra
        prompt = build(budget)
    if budget < 0:
        raise ValueError(f"length {length} is too short for task {task!r} (needs about {fixed} tokens)")
    return Sample(task, prompt, answer, length, depth, values, followups, chat)


def score(sample: Sample, prediction: str) -> float:
    """Exact match of the answer (1.0 or 0.0); for multivalue, the fraction of values recalled."""
    prediction = prediction.strip()
    if sample.task == "multivalue":
        return sum(v in prediction for v in sample.values) / len(sample.values)
    return float(prediction == sample.answer)
