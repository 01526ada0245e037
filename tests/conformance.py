"""The conformance case every kvpress method provides (``tests/cases_<method>.py`` defines ``CASE``).

``tests/test_conformance.py`` runs the same checks on every case and every family of
``tests/tiny_models.py`` (plus a Mistral with its own sliding window): exact unpatch, a lossless
setting equal to the unpatched model, left padding, chunking, exact cache bytes, flat memory,
generation modes, failed forwards, foreign caches, bad input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class ConformanceCase:
    """How to patch a model with one method for the conformance checks.

    Each setting is a function ``(model) -> dict`` of keyword arguments for ``kvpress.patch`` besides
    the model (``method`` included).

    lossless: a setting where the method computes what the unpatched model computes.
    lossy: a compressing setting (its output differs from the unpatched model's); None if the
        method has none (the dense baseline). The behaviour checks (padding, chunking, generation,
        failures) use it, or ``lossless`` when it is None.
    chunk_invariant: whether prefill in chunks gives what one prefill gives (in the lossy setting).
    flat: a setting whose cache bytes stay constant over decoding (None: not promised).
    expected_bytes: ``(model, prompt_length) -> int``, the exact bytes of the cache after a one-row
        prefill of ``prompt_length`` tokens in the lossy (else lossless) setting; None: not checked.
    bad_input: ``(patch kwargs, exception type, message regex)`` triples that must fail at patch time.
    families: the tiny model families the case runs on.
    """

    lossless: Callable[[torch.nn.Module], dict]
    lossy: Callable[[torch.nn.Module], dict] | None = None
    chunk_invariant: bool = True
    flat: Callable[[torch.nn.Module], dict] | None = None
    expected_bytes: Callable[[torch.nn.Module, int], int] | None = None
    bad_input: list = field(default_factory=list)
    families: tuple = ("llama", "mistral", "qwen2", "qwen3", "mistral-sliding")

    def setting(self, model) -> dict:
        return (self.lossy or self.lossless)(model)
