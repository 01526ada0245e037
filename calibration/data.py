"""Synthetic calibration data: passkeys of random words hidden in haystack text (DuoAttention,
arXiv 2410.10819, section 3.2). Every question and answer comes at the end; the answers are the
supervised span.

Samples are built in token space, so any tokenizer works and lengths are exact: the haystack, each
passkey sentence, each question and each answer are tokenized separately and concatenated.
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


@dataclass(frozen=True)
class PasskeyRecipe:
    """How calibration samples look. Defaults are the reference's."""

    min_length: int = 1024  # tokens
    max_length: int = 32768  # tokens
    num_lengths: int = 50  # evenly spaced lengths between min and max
    num_passkeys: int = 10
    passkey_words: int = 32  # NATO-alphabet words per passkey
    min_depth: float = 0.05
    max_depth: float = 0.95

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

    def __init__(self, tokenizer, recipe: PasskeyRecipe, haystack: str, seed: int = 0):
        self.tokenizer, self.recipe, self.haystack, self.seed = tokenizer, recipe, haystack, seed
        self.prefix = leading_special_tokens(tokenizer)
        fixed = self._fixed_tokens(random.Random(0))
        if fixed >= recipe.min_length:
            raise ValueError(
                f"{recipe.num_passkeys} passkeys of {recipe.passkey_words} words need about {fixed} tokens, more "
                f"than the shortest length ({recipe.min_length}); lower --num-passkeys / --passkey-words or "
                "raise --min-length"
            )

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False, verbose=False)

    def _passkeys(self, rng: random.Random):
        """(needle, question, answer, tail) token lists of each passkey."""
        parts = []
        for index in range(self.recipe.num_passkeys):
            words = " ".join(rng.choice(NATO) for _ in range(self.recipe.passkey_words))
            name = f"{index + 1}"
            parts.append((
                self._encode(f"\nThe passkey number {name} is: {words}. Remember it.\n"),
                self._encode(f"\nWhat is the passkey number {name}? The passkey number {name} is:"),
                self._encode(f" {words}"),
                self._encode("."),
            ))
        return parts

    def _fixed_tokens(self, rng: random.Random) -> int:
        return len(self.prefix) + sum(len(t) for part in self._passkeys(rng) for t in part) + 2

    def sample(self, index: int) -> Sample:
        rng = random.Random(f"{self.seed}/{index}")
        lengths = self.recipe.lengths()
        length = lengths[index % len(lengths)]
        passkeys = self._passkeys(rng)
        budget = length - len(self.prefix) - sum(len(t) for part in passkeys for t in part) - 1
        hay = self._haystack_tokens(rng, budget)
        depths = sorted(rng.uniform(self.recipe.min_depth, self.recipe.max_depth) for _ in passkeys)
        ids, supervised = list(self.prefix), [False] * len(self.prefix)
        cursor = 0
        for depth, (needle, _, _, _) in zip(depths, passkeys):
            cut = int(depth * len(hay))
            ids += hay[cursor:cut] + needle
            cursor = cut
        ids += hay[cursor:] + self._encode("\n")
        supervised += [False] * (len(ids) - len(supervised))
        for _, question, answer, tail in passkeys:
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
