"""DuoAttention runtime on tiny random models of every family, against the unpatched model and an
independent dense oracle that masks a full-size cache per head."""

import pytest
import torch
from transformers import AttentionInterface, DynamicCache

import kvpress
from tiny_models import FAMILIES, cache_kw, random_ids, tiny_model

NUM_LAYERS, NUM_KV_HEADS = 2, 4


def half_streaming(**fields) -> kvpress.DuoConfig:
    """KV heads 0 and 2 of layer 0, 1 and 3 of layer 1 are retrieval heads; the rest stream."""
    mask = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    return kvpress.DuoConfig.from_retrieval_mask(mask, **fields)


def all_heads(retrieval: bool, **fields) -> kvpress.DuoConfig:
    return kvpress.DuoConfig.from_retrieval_mask(torch.full((NUM_LAYERS, NUM_KV_HEADS), retrieval), **fields)


def greedy(model, ids, new_tokens=12, **kwargs):
    out = model.generate(
        ids, max_new_tokens=new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True, **kwargs
    )
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, dim=1)


# -- the independent oracle: full K/V, per-head sink + window mask by absolute position --------------


def register_oracle(retrieval: torch.Tensor, sink: int, recent: int) -> str:
    def oracle(module, query, key, value, attention_mask, scaling, **kwargs):
        group = module.num_key_value_groups
        key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
        length_q, length_k = query.shape[2], key.shape[2]
        i = torch.arange(length_k - length_q, length_k)[:, None]
        j = torch.arange(length_k)[None, :]
        causal = j <= i
        a_shape = causal & ((j < sink) | (i - j < recent))
        streaming = ~retrieval[module.layer_idx].repeat_interleave(group)  # per query head
        allowed = torch.where(streaming[:, None, None], a_shape, causal)  # [H, Lq, Lk]
        scores = (query.float() @ key.float().transpose(-1, -2)) * scaling
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        return (probs @ value.float()).to(query.dtype).transpose(1, 2), None

    AttentionInterface.register("duo_oracle", oracle)
    return "duo_oracle"


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_all_retrieval_heads_match_unpatched(family):
    model = tiny_model(family)
    ids = random_ids(2, 37)
    logits = model(ids).logits
    tokens, _ = greedy(model, ids)
    kvpress.patch(model, "duo", config=all_heads(True, sink=4, recent=8))
    torch.testing.assert_close(model(ids).logits, logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(greedy(model, ids)[0], tokens)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_window_covering_the_sequence_matches_unpatched(family):
    model = tiny_model(family)
    ids = random_ids(1, 30)
    tokens, logits = greedy(model, ids)
    kvpress.patch(model, "duo", config=all_heads(False, sink=10, recent=32))  # 42 >= 30 + 12 tokens
    patched_tokens, patched_logits = greedy(model, ids)
    assert torch.equal(patched_tokens, tokens)
    torch.testing.assert_close(patched_logits, logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("slack", [None, 3])
@torch.no_grad()
def test_streaming_heads_match_dense_oracle(family, slack, monkeypatch):
    """Prefill and 24 decode steps with half the heads streaming (sink 4, recent 8) equal an oracle
    that recomputes the whole sequence with per-head masks over the full cache; with a window slack
    of 3 the window buffer is compacted after the prefill and every 3 decode steps."""
    if slack is not None:
        monkeypatch.setattr(kvpress.cache, "window_slack", lambda sink, recent: slack)
    model = tiny_model(family)
    ids = random_ids(1, 33)
    config = half_streaming(sink=4, recent=8)
    kvpress.patch(model, "duo", config=config)
    prefill_logits = model(ids).logits
    tokens, step_logits = greedy(model, ids, new_tokens=24)
    kvpress.unpatch(model)

    model.config._attn_implementation_internal = register_oracle(config.retrieval_heads(), 4, 8)
    full = torch.cat([ids, tokens], dim=1)
    oracle_logits = model(full, use_cache=False).logits
    torch.testing.assert_close(prefill_logits, oracle_logits[:, : ids.shape[1]], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(step_logits, oracle_logits[:, ids.shape[1] - 1 : -1], rtol=1e-4, atol=1e-4)
    # The window really matters here: all-retrieval logits differ from the oracle's.
    model.config._attn_implementation_internal = "sdpa"
    assert (model(full).logits - oracle_logits).abs().max() > 1e-2


@torch.no_grad()
def test_cache_bytes_are_really_smaller():
    model = tiny_model("llama")
    ids = random_ids(1, 512)
    dense = kvpress.kv_cache_bytes(model(ids).past_key_values)
    kvpress.patch(model, "duo", config=half_streaming(sink=16, recent=64))
    cache = model(ids).past_key_values
    fp32, head_dim, retrieval, streaming = 4, 16, 2, 2
    window = 16 + 64 + kvpress.cache.window_slack(16, 64)  # the window, compacted after the prefill, + slack
    kv_per_layer = 2 * fp32 * head_dim * (retrieval * 512 + streaming * window)
    ledger = 4 * 512 + 4 + 4 * window  # int32 ranks of every token, real-token count, window ranks
    assert dense == NUM_LAYERS * 2 * fp32 * head_dim * NUM_KV_HEADS * 512
    assert kvpress.kv_cache_bytes(cache) == NUM_LAYERS * kv_per_layer + ledger
    assert kvpress.kv_cache_bytes(cache) < 0.65 * dense
    layer = cache.layers[0]
    (full_k, _), (stream_k, _) = layer.buffers  # retrieval group first, then streaming
    assert stream_k.tensor.shape == (1, 2, 80, head_dim) and full_k.tensor.shape == (1, 2, 512, head_dim)
    assert cache.get_seq_length() == 512


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("slack", [None, 2])
@torch.no_grad()
def test_left_padded_batch_matches_each_prompt_alone(family, slack, monkeypatch):
    if slack is not None:  # rows of different lengths compacted together
        monkeypatch.setattr(kvpress.cache, "window_slack", lambda sink, recent: slack)
    model = tiny_model(family)
    kvpress.patch(model, "duo", config=half_streaming(sink=4, recent=8))
    prompts = [random_ids(1, n, seed=n)[0] for n in (21, 34, 27)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    batch_tokens, batch_logits = greedy(model, ids, attention_mask=mask, new_tokens=16)
    for row, prompt in enumerate(prompts):
        tokens, logits = greedy(model, prompt[None], new_tokens=16)
        assert torch.equal(batch_tokens[row], tokens[0])
        torch.testing.assert_close(batch_logits[row], logits[0], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_a_forward_that_failed_half_way_leaves_the_cache_usable(monkeypatch):
    """The second layer raises during a decode step (after the first layer appended its K/V); the
    next step on the same cache computes what it computes on a cache that never saw the failure."""
    model = tiny_model("llama")
    kvpress.patch(model, "duo", config=half_streaming(sink=4, recent=8))
    ids, steps = random_ids(2, 30), random_ids(2, 6, seed=1)

    def run(fail_at=None):
        cache = model(ids).past_key_values
        for t in range(steps.shape[1]):
            if t == fail_at:
                layer = model.model.layers[1].self_attn
                with monkeypatch.context() as m:
                    m.setattr(layer, "_kvpress_method", None)  # the "kvpress" attention function raises
                    with pytest.raises(RuntimeError):
                        model(random_ids(2, 1, seed=9), **{cache_kw(model): cache})
            logits = model(steps[:, t : t + 1], **{cache_kw(model): cache}).logits
        return logits, cache

    clean_logits, clean_cache = run()
    logits, cache = run(fail_at=3)
    torch.testing.assert_close(logits, clean_logits)
    assert kvpress.kv_cache_bytes(cache) == kvpress.kv_cache_bytes(clean_cache)


@torch.no_grad()
def test_chunked_prefill_equals_unchunked():
    model = tiny_model("qwen2")
    ids = random_ids(2, 45)
    kvpress.patch(model, "duo", config=half_streaming(sink=4, recent=8))
    tokens, logits = greedy(model, ids)
    whole = model(ids).logits[:, -1]
    kvpress.unpatch(model)

    kvpress.patch(model, "duo", config=half_streaming(sink=4, recent=8), prefill_chunk_size=7)
    chunked_tokens, chunked_logits = greedy(model, ids)
    assert torch.equal(chunked_tokens, tokens)
    torch.testing.assert_close(chunked_logits, logits, rtol=1e-4, atol=1e-4)
    cache = None  # by hand, through the model's forward
    for start in range(0, ids.shape[1], 10):
        out = model(ids[:, start : start + 10], **{cache_kw(model): cache})
        cache = out.past_key_values
    torch.testing.assert_close(out.logits[:, -1], whole, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_sampling_beams_and_user_cache_follow_generate():
    model = tiny_model("llama")
    ids = random_ids(2, 20)
    runs = {}
    for patched in (False, True):
        if patched:
            kvpress.patch(model, "duo", config=all_heads(True, sink=4, recent=8))
        torch.manual_seed(3)
        sampled = model.generate(ids, do_sample=True, num_return_sequences=3, max_new_tokens=8)
        beams = model.generate(ids, num_beams=3, do_sample=False, max_new_tokens=8)
        own_cache = model.generate(ids, **{cache_kw(model): DynamicCache()}, do_sample=False, max_new_tokens=8)
        made_cache = kvpress.make_cache(model) if patched else DynamicCache()
        runs[patched] = (sampled, beams, own_cache, model.generate(ids, **{cache_kw(model): made_cache}, max_new_tokens=8))
    for before, after in zip(runs[False], runs[True]):
        assert before.shape == after.shape and torch.equal(before, after)
    assert made_cache.get_seq_length() == 27 and kvpress.kv_cache_bytes(made_cache) > 0
    assert runs[True][0].shape == (6, 28)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@torch.no_grad()
def test_half_precision(dtype):
    model = tiny_model("llama", dtype=dtype)
    ids = random_ids(2, 40)
    logits = model(ids).logits.float()
    kvpress.patch(model, "duo", config=all_heads(True))
    torch.testing.assert_close(model(ids).logits.float(), logits, rtol=2e-2, atol=2e-2)
    kvpress.unpatch(model)
    kvpress.patch(model, "duo", config=half_streaming(sink=4, recent=8))
    out = model(ids)
    assert out.logits.dtype == dtype and torch.isfinite(out.logits).all()
    assert all(pair[0].tensor.dtype == dtype for pair in out.past_key_values.layers[0].buffers)


@torch.no_grad()
def test_model_sliding_window_is_respected():
    model = tiny_model("mistral", sliding_window=9)
    ids = random_ids(1, 30)
    tokens, logits = greedy(model, ids)
    kvpress.patch(model, "duo", config=all_heads(True))
    patched_tokens, patched_logits = greedy(model, ids)
    assert torch.equal(patched_tokens, tokens)
    torch.testing.assert_close(patched_logits, logits, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_unpatch_restores_bit_identical_logits():
    model = tiny_model("qwen3")
    ids = random_ids(2, 25)
    before = model(ids).logits
    implementation = model.config._attn_implementation
    kvpress.patch(model, "duo", config=half_streaming(sink=2, recent=4))
    assert not torch.allclose(model(ids).logits, before)
    kvpress.unpatch(model)
    assert torch.equal(model(ids).logits, before)
    assert_unpatched(model, implementation)


def assert_unpatched(model, implementation):
    assert model.config._attn_implementation == implementation
    assert "_kvpress_patch" not in vars(model)
    assert not model.model._forward_pre_hooks and not model.model._forward_hooks
    assert not any(hasattr(layer.self_attn, "_kvpress_method") for layer in model.model.layers)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(method="nope", config=None), ValueError, "available: .*duo"),
        (dict(method="duo", config=None), ValueError, "kvpress-calibrate duo"),
        (dict(method="duo", config=kvpress.DuoConfig(gates=torch.ones(3, 4))), ValueError, "3 layers x 4 KV heads"),
        (dict(method="duo", config=half_streaming(), window=3), TypeError, "unknown option"),
        (dict(method="duo", config=half_streaming(), sparsity=1.5), ValueError, "sparsity must be in"),
        (dict(method="duo", config=half_streaming(), prefill_chunk_size=0), ValueError, "prefill_chunk_size"),
        (dict(method="duo", config="/nonexistent/duo.safetensors"), FileNotFoundError, "kvpress-calibrate duo"),
        (
            dict(method="duo", config=kvpress.DuoConfig(
                gates=torch.ones(2, 4), model_shape=kvpress.ModelShape("llama", 2, 8, 4, 32))),
            ValueError,
            "head_dim: this DuoConfig has 32, the model has 16",
        ),
    ],
)
def test_bad_input_fails_clearly_and_leaves_model_unpatched(kwargs, error, message):
    model = tiny_model("llama")
    implementation = model.config._attn_implementation
    kwargs = dict(kwargs)
    with pytest.raises(error, match=message):
        kvpress.patch(model, kwargs.pop("method"), **kwargs)
    assert_unpatched(model, implementation)


def test_unsupported_family_and_double_patch_fail_clearly():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64))
    with pytest.raises(ValueError, match="supported families: llama, mistral, qwen2, qwen3"):
        kvpress.patch(gpt2, "duo", config=half_streaming())
    model = kvpress.patch(tiny_model("llama"), "duo", config=half_streaming())
    with pytest.raises(ValueError, match="already patched"):
        kvpress.patch(model, "duo", config=half_streaming())
    kvpress.unpatch(model)
    with pytest.raises(ValueError, match="not patched"):
        kvpress.unpatch(model)


@torch.no_grad()
def test_foreign_non_empty_cache_is_refused():
    model = tiny_model("llama")
    ids = random_ids(1, 10)
    dense_cache = model(ids).past_key_values
    kvpress.patch(model, "duo", config=half_streaming())
    with pytest.raises(ValueError, match="DynamicCache that is not empty"):
        model(ids[:, :1], **{cache_kw(model): dense_cache})
