"""MInference quality tools: the attention-recall probe measures the index the runtime really uses,
the searched needle-llama config ships in the model folder and is picked up, and the budget scaling
rule of the quality runs (CPU; tiny shapes)."""

from pathlib import Path

import pytest
import torch
from tiny_models import random_ids, tiny_model

import kvpress
from kvpress.calibration.minference import (
    PatternProbe, attention_recall, block_rows_mask, default_budget, plan_index, plan_mask, vs_block_mask,
)
from kvpress.kernels import minference_reference as R
from kvpress.methods.minference import CONFIG_FILE_NAME, MInferenceConfig, plan_heads, sparse_prefill

ROOT = Path(__file__).resolve().parents[1]
NEEDLE = ROOT / "models" / "needle-llama"


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def mixed_config(layers=2, heads=8):
    """Every pattern kind, with budgets far below the test lengths (so the index really drops keys)."""
    kinds = [("vertical_and_slash", 30, 50), ("stream_llm", 4, 40), ("block_sparse", 1, 0), ("vertical_and_slash", 35, 60)]
    return MInferenceConfig(patterns=[{h: kinds[h % 4] for h in range(heads)} for _ in range(layers)],
                            min_length=0, min_queries=0, max_density=10.0)


def test_plan_mask_is_the_runtime_index():
    """Attention under the probe's mask equals the runtime's sparse prefill (odd length, GQA)."""
    torch.manual_seed(0)
    B, Hq, Hkv, T, D = 1, 8, 4, 333, 16
    q, k, v = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    rank = torch.arange(T, dtype=torch.int32)[None]
    plan = plan_heads(mixed_config(), 0, list(range(Hq)), T)
    index = plan_index(plan, q, k, rank, rank, D ** -0.5)
    mask = plan_mask(plan, Hq, rank, rank, index)
    expected = sparse_prefill(plan, q, k, v, rank, rank, D ** -0.5, use_triton=False)
    torch.testing.assert_close(R.masked_attention(q, k, v, mask, D ** -0.5), expected, atol=1e-5, rtol=1e-5)
    assert 0.05 < mask.float().sum() / R._rank_mask(rank, rank).float().sum() / Hq < 0.9  # lossy, not empty


def test_per_block_masks_equal_the_reference_masks():
    """The per-query-block VS and block-sparse masks of the probes equal the reference's per-query
    ones (left padding, a later chunk of queries, a sliding window)."""
    torch.manual_seed(1)
    rank = torch.full((2, 300), -1, dtype=torch.int32)
    rank[0, 50:], rank[1] = torch.arange(250), torch.arange(300)
    q, k = torch.randn(2, 6, 300, 16), torch.randn(2, 3, 300, 16)
    vertical, slash = R.vs_index(q, k, rank, rank, 0.25, 40, 60)
    for qr, window in [(rank, None), (rank[:, 100:], None), (rank, 70)]:
        assert torch.equal(vs_block_mask(qr, rank, vertical, slash, window), R.vs_mask(qr, rank, vertical, slash, window))
    one = rank[1:]
    assert torch.equal(vs_block_mask(one[:, 130:], one, vertical[1:], slash[1:]), R.vs_mask(one[:, 130:], one, vertical[1:], slash[1:]))
    blocks = R.block_index(q, k, rank, rank, torch.tensor([1, 2, 3, 1, 2, 3]))
    first = R.first_query_block(rank)
    for qr, window in [(rank, None), (rank[:, 100:], None), (rank, 70)]:
        assert torch.equal(block_rows_mask(qr, rank, blocks, window, first), R.block_mask(qr, rank, blocks, window, first))
    assert torch.equal(block_rows_mask(one[:, 130:], one, blocks[1:], None, first[1:]),
                       R.block_mask(one[:, 130:], one, blocks[1:], None, first[1:]))


def test_recall_matches_the_search_scores_and_dense_is_one():
    """The recall of a one-pattern config equals the search probe's mass for that candidate (two
    separate aggregations), the dense fallback counts as recall 1, and smaller budgets keep less."""
    model = tiny_model("llama").eval()
    ids = random_ids(1, 320, seed=1)
    start = 64
    candidates = [("stream_llm", 4, 40), ("vertical_and_slash", 30, 50)]
    probe = PatternProbe(2, 8, candidates, start)
    with kvpress.api.attention_override(model, probe):
        model.base_model(input_ids=ids, use_cache=False)
    searched = probe.mass / (320 - start)  # [layers, heads, candidates]
    for c, pattern in enumerate(candidates):
        config = MInferenceConfig(patterns=[{h: pattern for h in range(8)}] * 2, min_length=0, min_queries=0,
                                  max_density=10.0)
        got = attention_recall(model, [ids], config, start=start)
        torch.testing.assert_close(torch.tensor(got["recall_per_head"]), searched[:, :, c].float(), atol=1e-5, rtol=0)
        assert 0.0 < got["recall"] < 1.0 and 0.0 < got["density"] < 1.0 and not got["dense_layers"]
    dense = attention_recall(model, [ids], MInferenceConfig(min_length=10_000), start=start)
    assert dense["recall"] == pytest.approx(1.0) and dense["density"] == pytest.approx(1.0) and dense["dense_layers"] == [0, 1]
    small = attention_recall(model, [ids], mixed_config(), start=start)
    large = attention_recall(model, [ids], MInferenceConfig(patterns=[{h: ("vertical_and_slash", 200, 200)
                                                                      for h in range(8)}] * 2, min_length=0, max_density=10.0),
                             start=start)
    assert small["recall"] < large["recall"] <= 1.0 + 1e-6 and small["density"] < large["density"]


def test_budget_rule_scales_the_reference_budgets():
    """The quality runs' rule: the reference budgets times T / 128K, floors 30 / 50 (the runtime's
    no-config default), so the kept share is about the same at every length."""
    assert default_budget(131072) == (1000, 6096)
    assert default_budget(8192) == (63, 381)
    assert default_budget(1024) == (30, 50)
    config = MInferenceConfig(min_length=0)
    assert config.head_pattern(0, 0, 8192)[1:] == default_budget(8192)


@pytest.mark.skipif(not (NEEDLE / CONFIG_FILE_NAME).exists(), reason="the searched needle-llama config is not shipped")
def test_shipped_needle_llama_config_loads_and_is_the_default():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = MInferenceConfig.load(NEEDLE / CONFIG_FILE_NAME)
    shape = AutoConfig.from_pretrained(NEEDLE)
    assert len(config.patterns) == shape.num_hidden_layers
    assert all(len(layer) == shape.num_attention_heads for layer in config.patterns)
    assert config.scores.shape == (shape.num_hidden_layers, shape.num_attention_heads)
    assert ((config.scores > 0) & (config.scores <= 1 + 1e-5)).all()  # mass its best candidate kept at the search
    for layer, entries in enumerate(config.patterns):  # searched with --min-recall 0.9
        for h, (name, _, _) in entries.items():
            assert (name == "dense") == bool(config.scores[layer, h] < 0.9), (layer, h, name)
    model = AutoModelForCausalLM.from_pretrained(NEEDLE).eval()
    kvpress.patch(model, "minference", min_length=0)
    assert model._kvpress_patch.method.config.patterns == config.patterns
    assert model._kvpress_patch.method.config.min_length == 0
