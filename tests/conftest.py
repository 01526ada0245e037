"""Test set-up: Triton's CPU interpreter where there is no GPU, and the `gpu` marker."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit decorator runs (kvpress.kernels imports them).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
