"""Synthetic calibration data: needles hidden in haystack text (DuoAttention, arXiv 2410.10819,
section 3.2). Every question and answer comes at the end; the answers are the supervised span.

Kinds of needle (``PasskeyRecipe.data``, comma-separated; each sample draws one kind):

- ``passkey``: the reference's data: ``num_passkeys`` passkeys of ``passkey_words`` NATO-alphabet
  words at random depths, each asked and answered at the end.
- ``kvlookup``: one JSON object of ``2 * num_passkeys`` random UUID keys and values at one random
  depth; ``num_passkeys`` of the keys are asked (key-value retrieval, Liu et al. 2023, arXiv 2307.03172).
- ``multivalue``: ``num_passkeys`` values (codes of NATO words) of one key at sorted random depths,
  all asked at once, in order (RULER's niah_multivalue, arXiv 2404.06654).

Samples are built in token space, so any tokenizer works and lengths are exact: the haystack, each
needle, each question and each answer are tokenized separately and concatenated.
"""

from __future__ import annotations

import gzip
import random
from dataclasses import dataclass
from pathlib import Path

import torch

NATO = (
    "alfa bravo charlie delta echo foxtrot golf hotel india juliett kilo lima mike november oscar "
    "papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu"
).split()
KINDS = ("passkey", "kvlookup", "multivalue")
DEFAULT_DATA = "passkey"  # the reference's
# `kvpress-calibrate duo --data` default: the mix that measured best on needle-llama (docs/duo.md)
RECOMMENDED_DATA = "passkey,kvlookup,multivalue"


@dataclass(frozen=True)
class PasskeyRecipe:
    """How calibration samples look. Defaults are the reference's (``kvpress-calibrate duo`` defaults
    ``data`` to :data:`RECOMMENDED_DATA`)."""

    min_length: int = 1024  # tokens
    max_length: int = 32768  # tokens
    num_lengths: int = 50  # evenly spaced lengths between min and max
    num_passkeys: int = 10  # needles asked per sample (passkeys, looked-up keys, values of the key)
    passkey_words: int = 32  # NATO-alphabet words per passkey (kvlookup: fixed UUIDs; multivalue: words // 8 per value, at least 2)
    min_depth: float = 0.05
    max_depth: float = 0.95
    data: str = DEFAULT_DATA  # comma-separated kinds of needle, from KINDS

    def kinds(self) -> list[str]:
        kinds = [k for k in self.data.split(",") if k]
        if not kinds or (unknown := set(kinds) - set(KINDS)):
            what = f"unknown kind(s) {', '.join(sorted(unknown))} in" if kinds else "no kind in"
            raise ValueError(f"{what} calibration data {self.data!r}; give a comma-separated mix of {', '.join(KINDS)}")
        return kinds

    def lengths(self) -> list[int]:
        if self.num_lengths == 1:
            return [self.max_length]
        step = (self.max_length - self.min_length) / (self.num_lengths - 1)
        return [round(self.min_length + i * step) for i in range(self.num_lengths)]


@dataclass
class Sample:
    input_ids: torch.Tensor  # [1, length]
    supervised: torch.Tensor  # [length] bool: the answer tokens


def leading_special_tokens(tokenizer) -> list[int]:
    """The tokens a tokenizer puts before the text (a BOS token, usually), if any."""
    with_specials = tokenizer.encode("a", add_special_tokens=True)
    plain = tokenizer.encode("a", add_special_tokens=False)
    for start in range(len(with_specials) - len(plain) + 1):
        if with_specials[start : start + len(plain)] == plain:
            return with_specials[:start]
    return []


def read_haystack(paths: list[str | Path] | None = None) -> str:
    """Haystack text from files (plain or .gz); by default the corpus bundled with kvpress."""
    if not paths:
        from kvpress.eval.tasks import load_corpus

        return load_corpus("train")
    texts = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"haystack file {path} not found")
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
    text = "\n".join(texts)
    if len(text) < 1000:
        raise ValueError("the haystack text is too short (under 1000 characters); give longer files")
    return text


class PasskeyData:
    """Deterministic samples: ``sample(i)`` depends only on the seed and ``i``."""

    def __init__(self, tokenizer, recipe: PasskeyRecipe, haystack: str, seed: int = 0, check: bool = True):
        self.tokenizer, self.recipe, self.haystack, self.seed = tokenizer, recipe, haystack, seed
        self.prefix = leading_special_tokens(tokenizer)
        self.kinds = recipe.kinds()
        fixed = self.fixed_tokens()
        if check and fixed >= recipe.min_length:
            raise ValueError(
                f"{recipe.num_passkeys} needles ({recipe.passkey_words}-word passkeys; data {recipe.data}) need about "
                f"{fixed} tokens, more than the shortest length ({recipe.min_length}); lower --num-passkeys / "
                "--passkey-words or raise --min-length"
            )

    def fixed_tokens(self) -> int:
        """Most tokens the needles, questions and answers of one sample take (over the kinds)."""
        return len(self.prefix) + 2 + max(
            sum(len(t) for t in needles) + sum(len(t) for qa in questions for t in qa)
            for needles, questions in (self._needles(kind, random.Random(0)) for kind in self.kinds)
        )

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False, verbose=False)

    def _words(self, rng: random.Random, count: int) -> str:
        return " ".join(rng.choice(NATO) for _ in range(count))

    def _needles(self, kind: str, rng: random.Random):
        """(needles, questions): needle token lists (one list for the kvlookup block) and a
        (question, answer, tail) token-list triple per question; answers are supervised."""
        n, words = self.recipe.num_passkeys, self.recipe.passkey_words
        if kind == "passkey":
            needles, questions = [], []
            for index in range(n):
                passkey, name = self._words(rng, words), f"{index + 1}"
                needles.append(self._encode(f"\nThe passkey number {name} is: {passkey}. Remember it.\n"))
                questions.append((
                    self._encode(f"\nWhat is the passkey number {name}? The passkey number {name} is:"),
                    self._encode(f" {passkey}"),
                    self._encode("."),
                ))
            return needles, questions
        if kind == "kvlookup":
            pairs = [(uuid(rng), uuid(rng)) for _ in range(2 * n)]
            block = "\nJSON data: {" + ", ".join(f'"{k}": "{v}"' for k, v in pairs) + "}\n"
            asked = rng.sample(pairs, n)
            questions = [(self._encode(f'\nThe value of key "{k}" in the JSON data above is: "'), self._encode(v),
                          self._encode('"')) for k, v in asked]
            return [self._encode(block)], questions
        if kind == "multivalue":
            key, size = rng.choice(NATO), max(2, words // 8)
            values = [self._words(rng, size) for _ in range(n)]
            needles = [self._encode(f"\nOne of the codes for {key} is: {v}.\n") for v in values]
            question = self._encode(f"\nWhat are all the codes for {key}, in order? The codes for {key} are:")
            return needles, [(question, self._encode(" " + "; ".join(values)), self._encode("."))]
        raise ValueError(f"unknown calibration data kind {kind!r}; choose from {', '.join(KINDS)}")

    def sample(self, index: int) -> Sample:
        rng = random.Random(f"{self.seed}/{index}")
        lengths = self.recipe.lengths()
        length = lengths[index % len(lengths)]
        kind = self.kinds[0] if len(self.kinds) == 1 else rng.choice(self.kinds)
        needles, questions = self._needles(kind, rng)
        budget = length - len(self.prefix) - sum(map(len, needles)) - sum(len(t) for qa in questions for t in qa) - 1
        hay = self._haystack_tokens(rng, budget)
        depths = sorted(rng.uniform(self.recipe.min_depth, self.recipe.max_depth) for _ in needles)
        ids, supervised = list(self.prefix), [False] * len(self.prefix)
        cursor = 0
        for depth, needle in zip(depths, needles):
            cut = int(depth * len(hay))
            ids += hay[cursor:cut] + needle
            cursor = cut
        ids += hay[cursor:] + self._encode("\n")
        supervised += [False] * (len(ids) - len(supervised))
        for question, answer, tail in questions:
            ids += question + answer + tail
            supervised += [False] * len(question) + [True] * len(answer) + [False] * len(tail)
        ids, supervised = ids[:length], supervised[:length]
        return Sample(torch.tensor([ids]), torch.tensor(supervised))

    def _haystack_tokens(self, rng: random.Random, count: int) -> list[int]:
        text = self.haystack
        tokens: list[int] = []
        while len(tokens) < count:
            start = rng.randrange(len(text))
            tokens += self._encode(text[start : start + 8 * (count - len(tokens)) + 64])
        return tokens[:count]


def uuid(rng: random.Random) -> str:
    """A random UUID-shaped string (8-4-4-4-12 hex digits) from ``rng``."""
    digits = "".join(rng.choice("0123456789abcdef") for _ in range(32))
    return "-".join(digits[a:b] for a, b in ((0, 8), (8, 12), (12, 16), (16, 20), (20, 32)))
