"""The shipped test model (models/needle-llama) loads offline and retrieves at short lengths on CPU;
as a test bed it must break when its KV heads lose the long context."""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import kvpress
from kvpress.eval import evaluate_task, load_corpus, perplexity

MODEL_DIR = os.path.join(os.path.dirname(__file__), "..", "models", "needle-llama")


@pytest.fixture(scope="module")
def needle():
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, local_files_only=True, dtype=torch.float32).eval()
    return model, tokenizer


def test_folder_is_small_and_model_is_gqa_llama(needle):
    model, _ = needle
    size = sum(os.path.getsize(os.path.join(MODEL_DIR, f)) for f in os.listdir(MODEL_DIR))
    assert size < 21e6
    c = model.config
    assert c.model_type == "llama" and c.num_key_value_heads < c.num_attention_heads
    assert c.max_position_embeddings >= 8192


def test_byte_tokenizer_round_trips(needle):
    _, tokenizer = needle
    text = "The pass key is 0123.\n\tcaf\u00e9 \u2603 <not special>"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert ids[1:] == list(text.encode("utf-8"))  # one token per byte, id = byte value
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("task,floor", [("passkey", 0.95), ("multikey", 0.9)])
def test_retrieves_at_short_lengths(needle, task, floor):
    model, tokenizer = needle
    r = evaluate_task(model, tokenizer, task, load_corpus("heldout"), [1024, 2048], [0.0, 0.25, 0.5, 0.75, 1.0], 2, seed=11, progress=False)
    assert r.accuracy >= floor, r.examples
    assert r.cache_bytes == r.dense_cache_bytes  # unpatched: a dense cache


def test_perplexity_on_heldout_text(needle):
    model, tokenizer = needle
    r = perplexity(model, tokenizer, load_corpus("heldout"), context=1024, max_tokens=8192, progress=False)
    assert 1.0 < r["perplexity"] < 4.0  # 2.95 measured at context 2048 on 65536 tokens (model card)


def test_all_streaming_heads_lose_the_needle(needle):
    """With every KV head a streaming head (sink 64 + recent 256), a needle in the middle of 2K
    tokens is out of reach: the model must fail, or it would be no test of KV-cache methods."""
    model, tokenizer = needle
    shape = kvpress.adapters.describe(model).shape
    config = kvpress.DuoConfig.from_retrieval_mask(torch.zeros(shape.num_layers, shape.num_kv_heads, dtype=torch.bool))
    kvpress.patch(model, "duo", config=config)
    try:
        r = evaluate_task(model, tokenizer, "passkey", load_corpus("heldout"), [2048], [0.3, 0.5, 0.7], 1, seed=11, progress=False)
    finally:
        kvpress.unpatch(model)
    assert r.accuracy <= 0.2
    assert r.cache_bytes[2048] < 0.25 * r.dense_cache_bytes[2048]
