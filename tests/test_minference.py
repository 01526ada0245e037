"""MInference runtime: configs, the per-head sparse prefill, composition with Duo, chunked prefill,
padding, and the pattern search (CPU; tiny models)."""

import json
from pathlib import Path

import pytest
import torch
from tiny_models import cache_kw, random_ids, tiny_model

import kvpress
from kvpress.api import attention_override
from kvpress.calibration.minference import parse_candidates, search_patterns
from kvpress.kernels import minference_reference as R
from kvpress.kernels.reference import rank_attention, rank_mask
from kvpress.methods import METHODS
from kvpress.methods.duo import DuoConfig
from kvpress.methods.minference import (
    A_SHAPE, BLOCK_SPARSE, VS, MInference, MInferenceConfig, plan_heads, sparse_prefill,
)

LOSSY = dict(min_length=0, min_queries=0, vertical_size=30, slash_size=50, scale_length=None, max_density=1.0)


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    if "minference" not in METHODS:
        monkeypatch.setitem(METHODS, "minference", MInference)
    with torch.no_grad():
        yield


def ranks(lengths, total):
    r = torch.full((len(lengths), total), -1, dtype=torch.int32)
    for b, n in enumerate(lengths):
        r[b, total - n:] = torch.arange(n, dtype=torch.int32)
    return r


# ----------------------------------------------------------------------------------------------
# Configs


def test_reference_json_loads_with_default_for_missing_heads(tmp_path):
    path = tmp_path / "ref.json"
    path.write_text(json.dumps([{"0": ["vertical_and_slash", 100, 750, 0.9], "3": ["stream_llm", 100, 800, 0.5]},
                                {"1": ["block_sparse", 12, 0, 0.7]}]))
    config = MInferenceConfig.load(path)
    assert config.head_pattern(0, 0, 50000) == (VS, 100, 750)
    assert config.head_pattern(0, 3, 50000) == (A_SHAPE, 100, 800)
    assert config.head_pattern(1, 1, 50000) == (BLOCK_SPARSE, 12, 0)
    assert config.head_pattern(1, 2, 50000) == (VS, 1000, 6096)  # no entry: the reference's default
    assert config.scores[0, 3] == pytest.approx(0.5)
    back = tmp_path / "back.json"
    config.save_reference_json(back)
    assert MInferenceConfig.load(back).patterns == config.patterns
    path.write_text(json.dumps([{"0": ["sliding", 1, 2, 0.0]}]))
    with pytest.raises(ValueError, match="vertical_and_slash"):
        MInferenceConfig.load(path)


def test_config_file_roundtrip_and_fingerprint(tmp_path):
    model = tiny_model("llama")
    shape = kvpress.adapters.describe(model).shape
    patterns = [{h: ("vertical_and_slash", 30 + h, 50) for h in range(8)}, {0: ("stream_llm", 4, 16)}]
    config = MInferenceConfig(patterns=patterns, scores=torch.rand(2, 8), min_length=123, model_shape=shape)
    config.save(tmp_path / "mi.safetensors")
    loaded = MInferenceConfig.load(tmp_path / "mi.safetensors")
    assert loaded.patterns == config.patterns and loaded.min_length == 123 and loaded.model_shape == shape
    torch.testing.assert_close(loaded.scores, config.scores)
    other = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="num_heads"):
        kvpress.patch(other, "minference", config=str(tmp_path / "mi.safetensors"))


def test_default_budget_scales_down_for_short_inputs():
    config = MInferenceConfig()
    assert config.head_pattern(0, 0, 131072) == (VS, 1000, 6096)
    assert config.head_pattern(0, 0, 1 << 20) == (VS, 1000, 6096)
    assert config.head_pattern(0, 0, 32768) == (VS, 250, 1524)
    assert config.head_pattern(0, 0, 1000) == (VS, 30, 50)  # the minimums


# ----------------------------------------------------------------------------------------------
# The sparse prefill of one layer


@pytest.mark.parametrize("dtype,union", [(torch.float32, 1), (torch.float16, 1), (torch.float32, 2)])
def test_mixed_patterns_triton_matches_reference(dtype, union):
    """Every pattern in one layer, padding, chunked prefill (T > Lq), GQA: Triton (interpreter) vs
    torch; ``union``: VS heads 3 and 4 (default budget) share a union program."""
    torch.manual_seed(0)
    config = MInferenceConfig(patterns=[{0: ("vertical_and_slash", 30, 50), 1: ("stream_llm", 4, 32),
                                         2: ("block_sparse", 2, 0), 4: ("dense", 0, 0), 5: ("stream_llm", 8, 20)}])
    plan = plan_heads(config, 0, list(range(6)), 200)
    assert plan.a_shape[(0, None)] == [4]
    B, Hq, Hkv, T, Lq, D = 2, 6, 2, 200, 140, 32
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter on CPU, compiled on a GPU
    k_rank = ranks([200, 100], T).to(dev)  # row 1: its first 40 queries are padding
    q_rank = k_rank[:, -Lq:]
    q, k, v = (torch.randn(B, h, n, D, device=dev).to(dtype) for h, n in ((Hq, Lq), (Hkv, T), (Hkv, T)))
    ref = sparse_prefill(plan, q.double(), k.double(), v.double(), q_rank, k_rank, 0.3, use_triton=False)
    out = sparse_prefill(plan, q, k, v, q_rank, k_rank, 0.3, use_triton=True, union_heads=union)
    assert (out[1, :, :40] == 0).all()  # padding query rows are 0, not left unwritten
    tol = (1e-4 if dev == "cpu" else 5e-3) if dtype == torch.float32 else 2e-3  # tf32 dots on a GPU
    assert (out.double() - ref).abs().max() < tol
    dense = rank_attention(q[:, 4:5].double(), k[:, 1:2].double(), v[:, 1:2].double(), q_rank, k_rank, 0.3)
    assert (out[:, 4:5].double() - dense).abs().max() < tol  # the dense head: plain causal attention


def test_a_shape_heads_whole_groups_and_alone():
    """A-shape (and dense) heads covering every query head of a KV head run as its group, the others
    alone beside their KV head: both at once, Triton (interpreter on CPU) against torch."""
    torch.manual_seed(1)
    config = MInferenceConfig(patterns=[{1: ("stream_llm", 4, 32), 3: ("stream_llm", 4, 32), 4: ("stream_llm", 4, 32),
                                         5: ("stream_llm", 4, 32), 0: ("dense", 0, 0), 2: ("dense", 0, 0)}])
    plan = plan_heads(config, 0, list(range(6)), 200)
    assert plan.a_shape == {(4, 32): [1, 3, 4, 5], (0, None): [0, 2]}
    B, Hq, Hkv, T, Lq, D = 2, 6, 2, 200, 140, 32
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    k_rank = ranks([200, 100], T).to(dev)
    q_rank = k_rank[:, -Lq:]
    q, k, v = (torch.randn(B, h, n, D, device=dev) for h, n in ((Hq, Lq), (Hkv, T), (Hkv, T)))
    ref = sparse_prefill(plan, q.double(), k.double(), v.double(), q_rank, k_rank, 0.3, use_triton=False)
    out = sparse_prefill(plan, q, k, v, q_rank, k_rank, 0.3, use_triton=True)
    assert (out[1, :, :40] == 0).all()
    assert (out.double() - ref).abs().max() < (1e-4 if dev == "cpu" else 5e-3)


# ----------------------------------------------------------------------------------------------
# Through kvpress.patch


def test_budgets_covering_everything_are_lossless():
    model = tiny_model("llama")
    ids = random_ids(2, 150)
    dense = model(ids).logits
    kvpress.patch(model, "minference", min_length=0, vertical_size=1000, slash_size=1000, max_density=1.0)
    torch.testing.assert_close(model(ids).logits, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("queries,keys,sparse", [(100, 32768, False), (100, 30000, True), (4096, 32768, True),
                                                 (40, 1000, False)])
def test_dense_when_the_index_would_cost_more(monkeypatch, queries, keys, sparse):
    """A short chunk over a long cache (fewer than ``index_queries`` queries, at least 8x as many
    keys) and a forward under ``min_queries`` go dense; otherwise sparse."""
    import kvpress.methods.minference as module

    calls = []
    monkeypatch.setattr(module, "sparse_prefill", lambda *a, **k: calls.append(1) or torch.zeros_like(a[1]))
    model = tiny_model("llama")
    kvpress.patch(model, "minference", min_length=0, vertical_size=30, slash_size=50, max_density=1.0)
    method = model._kvpress_patch.method
    q, k, v = torch.randn(1, 8, queries, 16), torch.randn(1, 4, keys, 16), torch.randn(1, 4, keys, 16)
    k_rank = torch.arange(keys, dtype=torch.int32)[None]
    method.full_prefill(0, q, k, v, k_rank[:, -queries:], k_rank, list(range(8)), 0.25, None)
    assert bool(calls) == sparse

@pytest.mark.parametrize("budget,max_work,dense", [((1000, 6096), 0.45, True), ((30, 50), 0.45, False),
                                                    ((30, 50), 0.01, True), ((30, 50), None, False)])
def test_dense_when_the_index_would_run_most_of_dense_work(monkeypatch, budget, max_work, dense):
    """From WORK_CHECK_KEYS keys (here 4096) the built index's work is checked: random scores scatter
    6096 diagonals, each a 64-key range per query block, so the VS kernel would run most of dense
    attention's tiles."""
    import kvpress.methods.minference as module

    monkeypatch.setattr(module, "WORK_CHECK_KEYS", 4096)
    model = tiny_model("llama")
    config = MInferenceConfig(patterns=[{h: ("vertical_and_slash", *budget) for h in range(8)}] * 2, min_length=0,
                              min_queries=0, index_queries=0, max_density=1e9, max_work=max_work)
    kvpress.patch(model, "minference", config=config)
    method = model._kvpress_patch.method
    torch.manual_seed(0)
    T, Lq = 8192, 128
    q, k, v = torch.randn(1, 8, Lq, 16), torch.randn(1, 4, T, 16), torch.randn(1, 4, T, 16)
    k_rank = torch.arange(T, dtype=torch.int32)[None]
    q_rank = k_rank[:, -Lq:]
    out = method.full_prefill(0, q, k, v, q_rank, k_rank, list(range(8)), 0.25, None)
    causal = k_rank[:, None, None, :] <= q_rank[:, None, :, None]
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=0.25, enable_gqa=True)
    assert torch.allclose(out, full, atol=1e-5) == dense

class Oracle:
    """Per-head rules from the torch references, on the whole unpadded sequence (no kvpress cache):
    Duo's streaming heads A-shape, the other heads VS (30, 50) with the index of each prefill chunk
    built from that chunk's last 64 queries against every key before it."""

    def __init__(self, streaming, sink, recent, chunks):
        self.streaming, self.sink, self.recent, self.chunks = streaming, sink, recent, chunks

    def attention(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        B, H, L, _ = query.shape
        group = H // key.shape[1]
        stream_q = self.streaming[module.layer_idx].repeat_interleave(group)  # [H] query heads of streaming KV heads
        out = torch.empty_like(query)
        for s, e in self.chunks:
            qr = torch.arange(s, e, dtype=torch.int32)[None].expand(B, -1)
            kr = torch.arange(e, dtype=torch.int32)[None].expand(B, -1)
            q = query[:, :, s:e]
            vertical, slash = R.vs_index(q, key[:, :, :e], qr, kr, scaling, 30, 50)
            mask = R.vs_mask(qr, kr, vertical, slash)
            mask[:, stream_q] = rank_mask(qr, kr, self.sink, self.recent)
            out[:, :, s:e] = R.masked_attention(q, key[:, :, :e], value[:, :, :e], mask, scaling)
        return out.transpose(1, 2), None


def test_minference_duo_equals_each_methods_rule_per_head():
    model = tiny_model("llama")
    ids = random_ids(1, 300)
    streaming = torch.tensor([[0, 1, 0, 1], [1, 1, 0, 0]], dtype=torch.bool)
    with attention_override(model, Oracle(streaming, 4, 16, [(0, 300)])):
        want = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    dense = model.base_model(input_ids=ids).last_hidden_state
    duo = DuoConfig.from_retrieval_mask(~streaming, sink=4, recent=16)
    kvpress.patch(model, "minference+duo", config={"duo": duo}, **LOSSY)
    got = model.base_model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - dense).abs().max() > 1e-2  # the sparse prefill did drop keys


def test_chunked_prefill_builds_indices_against_previous_keys():
    model = tiny_model("llama")
    ids = random_ids(1, 330)
    none = torch.zeros(2, 4, dtype=torch.bool)
    with attention_override(model, Oracle(none, 0, 1, [(0, 200), (200, 330)])):
        want = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    kvpress.patch(model, "minference", **LOSSY)
    cache = kvpress.make_cache(model)
    model.base_model(input_ids=ids[:, :200], **{cache_kw(model.base_model): cache})
    got = model.base_model(input_ids=ids[:, 200:], **{cache_kw(model.base_model): cache}).last_hidden_state
    torch.testing.assert_close(got, want[:, 200:], atol=1e-4, rtol=1e-4)


def test_left_padded_rows_match_rows_alone():
    model = tiny_model("qwen2")
    kvpress.patch(model, "minference", **LOSSY)
    ids = random_ids(2, 290)
    mask = torch.ones_like(ids)
    mask[1, :90] = 0
    batch = model(ids, attention_mask=mask).logits
    alone = model(ids[1:, 90:]).logits
    torch.testing.assert_close(batch[1, 90:], alone[0], atol=1e-4, rtol=1e-4)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 293)


# ----------------------------------------------------------------------------------------------
# Pattern search


def test_parse_candidates():
    assert parse_candidates("vs:30:800,ashape:100:800,block:1/8,block:5") == [
        ("vertical_and_slash", 30.0, 800.0), ("stream_llm", 100.0, 800.0), ("block_sparse", -0.125, 0.0),
        ("block_sparse", 5.0, 0.0)]
    with pytest.raises(ValueError, match="vs:COLUMNS"):
        parse_candidates("vs:30")


def test_pattern_search_tiny_and_load(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(Path(__file__).resolve().parent.parent / "models" / "needle-llama")
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = search_patterns(model, tokenizer, length=384, start=128, num_passkeys=1, passkey_words=4,
                             candidates="ashape:8:32,vs:30:50,block:2", progress=False)
    assert len(config.patterns) == 8 and all(len(layer) == 8 for layer in config.patterns)
    assert ((config.scores > 0) & (config.scores <= 1 + 1e-5)).all()
    config.save(tmp_path / "mi.safetensors")
    kvpress.patch(model, "minference", config=str(tmp_path / "mi.safetensors"), min_length=0)
    ids = tokenizer("hello world " * 40, return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()
    kvpress.unpatch(model)
    # --min-recall: heads whose best candidate keeps less than that of their attention go dense
    threshold = float(config.scores.median())
    guarded = search_patterns(model, tokenizer, length=384, start=128, num_passkeys=1, passkey_words=4,
                              candidates="ashape:8:32,vs:30:50,block:2", min_recall=threshold, progress=False)
    torch.testing.assert_close(guarded.scores, config.scores)
    for layer, (plain, kept) in enumerate(zip(config.patterns, guarded.patterns)):
        for h in range(8):
            want = ("dense", 0, 0) if config.scores[layer, h] < threshold else plain[h]
            assert kept[h] == want, (layer, h)
    guarded.save(tmp_path / "guarded.safetensors")
    assert MInferenceConfig.load(tmp_path / "guarded.safetensors").patterns == guarded.patterns
    with pytest.raises(ValueError, match="min-recall"):
        search_patterns(model, tokenizer, length=384, min_recall=1.5, progress=False)
    # --score question: each candidate by the smaller of its mass for every scored query and for the
    # last 64 (the sample's closing questions)
    question = search_patterns(model, tokenizer, length=384, start=128, num_passkeys=1, passkey_words=4,
                               candidates="ashape:8:32,vs:30:50,block:2", score="question", progress=False)
    assert (question.scores <= config.scores + 1e-6).all() and (question.scores < config.scores - 1e-3).any()
    with pytest.raises(ValueError, match="score"):
        search_patterns(model, tokenizer, length=384, score="last", progress=False)


@pytest.mark.gpu
@pytest.mark.parametrize("union", [1, 2, 4])
def test_mixed_patterns_bf16_gpu(union):
    """bf16 on the GPU at a few thousand tokens: every pattern, the published budgets' sizes, left
    padding and a chunk (T > Lq); per-head or union VS programs against the torch path (SDPA under
    the index's mask)."""
    torch.manual_seed(0)
    layer = {h: ("vertical_and_slash", *[(1000, 6096), (30, 800), (100, 800), (3500, 100)][h % 4]) for h in range(8)}
    layer.update({8: ("stream_llm", 100, 800), 9: ("block_sparse", 8, 0)})
    plan = plan_heads(MInferenceConfig(patterns=[layer]), 0, list(range(12)), 6000)
    B, Hq, Hkv, T, Lq, D = 2, 12, 3, 6000, 4500, 128
    k_rank = ranks([6000, 4321], T).cuda()
    q_rank = k_rank[:, -Lq:]
    q, k, v = (torch.randn(B, h, n, D, device="cuda", dtype=torch.bfloat16) for h, n in ((Hq, Lq), (Hkv, T), (Hkv, T)))
    out = sparse_prefill(plan, q, k, v, q_rank, k_rank, D ** -0.5, use_triton=True, union_heads=union)
    ref = sparse_prefill(plan, q, k, v, q_rank, k_rank, D ** -0.5, use_triton=False)  # the same index (bf16 inputs)
    assert torch.isfinite(out).all()
    assert (out.float() - ref.float()).abs().max() < 2e-2
