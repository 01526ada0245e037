"""CUDA-graph decode (``kvpress.patch(..., decode="graph")``, kvpress/graph.py).

On CPU the runner runs the same static decode steps uncaptured (buffers of a fixed capacity,
counts on the device): they must give the eager path's tokens and logits exactly, through window
compactions, capacity growths, padding, sampling and beam reorders. On a GPU (tests marked ``gpu``)
the steps are captured and replayed, and must give the eager tokens too."""

import gc
import logging
import weakref

import pytest
import torch

import kvpress
import kvpress.cache
import kvpress.graph
from kvpress.cache import HeadGroup
from kvpress.kernels import grouped_attention
from kvpress.kernels.decode import decode_attention
from cases_duo import gates
from tiny_models import cache_kw, random_ids, tiny_model

SETTINGS = {
    "dense": lambda model: dict(method="dense"),
    "duo": lambda model: dict(method="duo", config=gates(model, "half")),  # sink 4 + recent 8: compacts every 16 steps
}



def make_model(family="llama", **overrides):
    if family == "mistral-sliding":
        return tiny_model("mistral", sliding_window=16, **overrides)
    return tiny_model(family, **overrides)


def generate(model, setting, decode, ids, fuse="default", **kwargs):
    """Generate with ``model`` patched; on CUDA with the fused ops ``fuse`` in both modes (graph
    decode installs them; eager decode gets them here, so the two compute the same function)."""
    setting = dict(setting)
    before, kvpress.graph.FUSE = kvpress.graph.FUSE, fuse
    try:
        kvpress.patch(model, setting.pop("method"), decode=decode, **setting)
    finally:
        kvpress.graph.FUSE = before
    if decode == "eager" and ids.is_cuda and fuse != "none":
        kvpress.graph.fuse(model._kvpress_patch.patcher, model, fuse)
    try:
        out = model.generate(ids, output_logits=True, return_dict_in_generate=True, **kwargs)
        runner = vars(model).get("_kvpress_graph")
        stats = None if runner is None else (runner.replays, runner.first_steps)
        return out.sequences, torch.stack(out.logits, 1), stats
    finally:
        kvpress.unpatch(model)


def padded(lengths, seed=3):
    prompts = [random_ids(1, n, seed=seed + n)[0] for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
    return ids, mask


# -- kernels --------------------------------------------------------------------------------------


@pytest.mark.parametrize("lengths", [(37, 20), (3, 9), (90, 28)])
@torch.no_grad()
def test_decode_kernel_with_device_lengths_equals_narrowed_buffers(lengths):
    """Buffers of a larger capacity (garbage past the lengths) with the lengths on the device give
    what the narrowed buffers give, and the new token lands at the last slot in use."""
    torch.manual_seed(0)
    B, D, group, T, C = 2, 16, 2, *lengths
    cap_t, cap_c = T + 29, C + 7
    q = torch.randn(B, 4 * group, 1, D)
    k_full, v_full = torch.randn(B, 2, cap_t, D), torch.randn(B, 2, cap_t, D)
    k_win, v_win = torch.randn(B, 2, cap_c, D), torch.randn(B, 2, cap_c, D)
    r_full = torch.randint(-1, 500, (B, cap_t), dtype=torch.int32)
    r_win = torch.randint(-1, 500, (B, cap_c), dtype=torch.int32)
    q_rank = torch.tensor([[400], [-1]], dtype=torch.int32)
    new = torch.randn(B, 4, 1, D), torch.randn(B, 4, 1, D)
    heads_f, heads_s = torch.tensor([0, 2]), torch.tensor([1, 3])
    narrow = [t.clone() for t in (k_full[:, :, :T], v_full[:, :, :T], k_win[:, :, :C], v_win[:, :, :C])]
    expected = decode_attention(q, q_rank, 0.3, group, split=(narrow[0], narrow[1], r_full[:, :T], heads_f, 0, None),
                                single=(narrow[2], narrow[3], r_win[:, :C], heads_s, 2, 5), new_kv=new)
    t_len, c_len = torch.tensor([T], dtype=torch.int32), torch.tensor([C], dtype=torch.int32)
    out = decode_attention(q, q_rank, 0.3, group, split=(k_full, v_full, r_full, heads_f, 0, None, t_len),
                           single=(k_win, v_win, r_win, heads_s, 2, 5, c_len), new_kv=new)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_full[:, :, T - 1], new[0][:, heads_f, 0])
    torch.testing.assert_close(v_win[:, :, C - 1], new[1][:, heads_s, 0])
    torch.testing.assert_close(k_full[:, :, :T - 1], narrow[0][:, :, :T - 1])  # nothing else written


@torch.no_grad()
def test_grouped_attention_reference_path_narrows_to_the_device_length():
    torch.manual_seed(1)
    B, D, T, cap = 2, 16, 11, 20
    q = torch.randn(B, 4, 1, D)
    k, v = torch.randn(B, 2, cap, D), torch.randn(B, 2, cap, D)
    rank = torch.arange(cap, dtype=torch.int32).expand(B, cap).contiguous()
    rank[1, :3] = -1
    new = torch.randn(B, 2, 1, D), torch.randn(B, 2, 1, D)
    heads = torch.arange(2)
    q_rank = rank[:, T - 1:T]
    expected_k = k[:, :, :T].clone()
    expected_v = v[:, :, :T].clone()
    expected = grouped_attention(q, [HeadGroup(heads, expected_k, expected_v, rank[:, :T])], q_rank, 0.25, new_kv=new)
    group = HeadGroup(heads, k, v, rank, length=torch.tensor([T], dtype=torch.int32))
    out = grouped_attention(q, [group], q_rank, 0.25, new_kv=new)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(k[:, :, :T], expected_k)


# -- the static path on CPU (uncaptured) ----------------------------------------------------------


@pytest.mark.parametrize("method, family", [("dense", "qwen3"), ("duo", "llama"), ("duo", "mistral-sliding")])
def test_static_steps_equal_eager_on_a_padded_batch(method, family):
    model = make_model(family)
    ids, mask = padded((30, 19, 24))
    kwargs = dict(attention_mask=mask, max_new_tokens=20, do_sample=False)
    tokens, logits, _ = generate(model, SETTINGS[method](model), "eager", ids, **kwargs)
    g_tokens, g_logits, (replays, first) = generate(model, SETTINGS[method](model), "graph", ids, **kwargs)
    assert torch.equal(g_tokens, tokens)
    torch.testing.assert_close(g_logits, logits, rtol=0, atol=0)
    assert replays == 19 and first == 1  # every decode step ran static, from one entry


@torch.no_grad()
def test_static_steps_across_capacity_growths(monkeypatch):
    """Full buffers grow by whole buckets between steps (forced small here): each growth makes a
    new entry (a new capture on a GPU), and the tokens stay the eager ones."""
    model = make_model()
    ids = random_ids(2, 21)
    setting = SETTINGS["duo"](model)
    tokens, logits, _ = generate(model, setting, "eager", ids, max_new_tokens=20, do_sample=False)
    monkeypatch.setattr(kvpress.cache, "static_bucket", lambda slots: slots + 5)
    g_tokens, g_logits, (replays, first) = generate(model, setting, "graph", ids, max_new_tokens=20, do_sample=False)
    assert torch.equal(g_tokens, tokens)
    torch.testing.assert_close(g_logits, logits, rtol=0, atol=0)
    assert first == 4  # growths after the prefill (capacity 21 -> 27), then at 27, 33 and 39 tokens


def test_sampling_with_a_seed_and_beam_search_equal_eager():
    model = make_model()
    ids = random_ids(2, 20)
    setting = SETTINGS["duo"](model)
    runs = {}
    for decode in ("eager", "graph"):
        torch.manual_seed(0)
        sampled, _, _ = generate(model, setting, decode, ids, do_sample=True, num_return_sequences=2, max_new_tokens=18)
        beams, _, stats = generate(model, setting, decode, ids, num_beams=3, do_sample=False, max_new_tokens=18)
        runs[decode] = sampled, beams
        if decode == "graph":
            assert stats[1] == 1  # beam reorders keep the buffers in place: one entry throughout
    assert torch.equal(runs["graph"][0], runs["eager"][0])
    assert torch.equal(runs["graph"][1], runs["eager"][1])


@torch.no_grad()
def test_static_steps_with_triton_kernels_equal_eager(monkeypatch):
    """The decode kernel reading the lengths on the device (Triton interpreter), through a compaction."""
    monkeypatch.setattr(kvpress.kernels, "BACKEND", "triton")
    model = make_model()
    ids = random_ids(1, 20)
    setting = SETTINGS["duo"](model)
    tokens, logits, _ = generate(model, setting, "eager", ids, max_new_tokens=12, do_sample=False)
    g_tokens, g_logits, (replays, _) = generate(model, setting, "graph", ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(g_tokens, tokens) and replays == 11
    torch.testing.assert_close(g_logits, logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_unusual_calls_run_eagerly_and_say_so_once(caplog, monkeypatch):
    model = make_model()
    kvpress.patch(model, "duo", config=gates(model, "half"), decode="graph")
    runner, kw = model._kvpress_graph, cache_kw(model)
    cache = model(random_ids(1, 12)).past_key_values
    with caplog.at_level(logging.WARNING, logger="kvpress"):
        for _ in range(2):
            out = model(random_ids(1, 1), **{kw: cache}, output_hidden_states=True)
    assert out.hidden_states is not None and runner.replays == 0
    assert sum("output_attentions or output_hidden_states" in r.message for r in caplog.records) == 1
    model(random_ids(1, 1), **{kw: cache})
    assert runner.replays == 1
    model(random_ids(1, 3), **{kw: cache})  # a chunk: eager
    assert runner.replays == 1
    monkeypatch.setattr(kvpress.cache.GroupedLayer, "static_decode", False)  # a method without static steps
    other = model(random_ids(1, 5)).past_key_values
    with caplog.at_level(logging.WARNING, logger="kvpress"):
        model(random_ids(1, 1), **{kw: other})
    assert any("do not run static decode steps" in r.message for r in caplog.records) and runner.replays == 1
    kvpress.unpatch(model)


@torch.no_grad()
def test_entries_die_with_their_cache_and_at_unpatch():
    model = make_model()
    kvpress.patch(model, "dense", decode="graph")
    runner, kw = model._kvpress_graph, cache_kw(model)
    cache = model(random_ids(2, 9)).past_key_values
    model(random_ids(2, 1), **{kw: cache})
    model(random_ids(2, 1), **{kw: cache})
    assert len(runner.graphs) == 1
    del cache
    gc.collect()
    assert not runner.graphs  # freed with the cache's ledger
    cache = model(random_ids(2, 9)).past_key_values
    model(random_ids(2, 1), **{kw: cache})
    kvpress.unpatch(model)
    assert not runner.graphs and "forward" not in vars(model) and "_kvpress_graph" not in vars(model)
    with pytest.raises(ValueError, match="decode must be"):
        kvpress.patch(model, "dense", decode="cuda-graph")
    assert "forward" not in vars(model)


# -- GPU: captured graphs -------------------------------------------------------------------------


def gpu_model(layers=4):
    """A small bf16 Llama on the GPU with the 8B model's head layout (head dim 128, 4 query heads per KV head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1024, hidden_size=1024, intermediate_size=2048, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=128, pad_token_id=0,
                         eos_token_id=None, bos_token_id=None, max_position_embeddings=1 << 16)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device="cuda", dtype=torch.bfloat16).eval()
    model.generation_config.pad_token_id = 0
    return model


def gpu_setting(model, method):
    if method == "dense":
        return dict(method="dense")
    mask = torch.zeros(model.config.num_hidden_layers, model.config.num_key_value_heads, dtype=torch.bool)
    mask[:, 0] = True  # one retrieval head, one streaming head per layer
    return dict(method="duo", config=kvpress.DuoConfig.from_retrieval_mask(mask, sink=16, recent=64))


@pytest.mark.gpu
@pytest.mark.parametrize("method, fuse", [("dense", "default"), ("duo", "default"), ("duo", "none")])
@torch.no_grad()
def test_gpu_graph_equals_eager_greedy_padded_and_sampled(method, fuse):
    model = gpu_model()
    ids, mask = padded((700, 433, 1000))
    ids, mask = ids.cuda(), mask.cuda()
    runs = {}
    for decode in ("eager", "graph"):
        greedy = generate(model, gpu_setting(model, method), decode, ids, fuse=fuse, attention_mask=mask,
                          max_new_tokens=200, do_sample=False)
        torch.manual_seed(0)
        sampled = generate(model, gpu_setting(model, method), decode, ids[:1, -700:], fuse=fuse, max_new_tokens=100,
                           do_sample=True, top_k=50)
        runs[decode] = greedy, sampled
    (g_tokens, g_logits, stats), (s_tokens, _, _) = runs["graph"]
    (tokens, logits, _), (e_sampled, _, _) = runs["eager"]
    assert stats[0] == 199 and stats[1] == 1
    assert torch.equal(g_tokens, tokens)
    torch.testing.assert_close(g_logits, logits, rtol=1e-2, atol=1e-2)  # same kernels and splits: equal in practice
    assert torch.equal(s_tokens, e_sampled)


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_graph_across_capacity_growths_and_release(monkeypatch):
    model = gpu_model()
    ids = random_ids(2, 300).cuda()
    setting = gpu_setting(model, "duo")
    tokens, logits, _ = generate(model, setting, "eager", ids, max_new_tokens=120, do_sample=False)  # fused ops
    monkeypatch.setattr(kvpress.cache, "static_bucket", lambda slots: slots + 40)
    torch.cuda.synchronize()
    params = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    kvpress.patch(model, setting["method"], config=setting["config"], decode="graph")
    runner = model._kvpress_graph
    assert model.model.layers[0].self_attn._kvpress_qkv.intact()  # fused (graph decode on CUDA)
    out = model.generate(ids, max_new_tokens=120, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, tokens)
    torch.testing.assert_close(torch.stack(out.logits, 1), logits, rtol=1e-2, atol=1e-2)
    assert runner.captures == 3 and len(runner.graphs) <= 1  # one graph per bucket, the old ones freed
    graph = weakref.ref(next(iter(runner.graphs.values())).graph) if runner.graphs else None
    before = torch.cuda.memory_allocated()
    del out
    gc.collect()
    assert not runner.graphs and (graph is None or graph() is None)
    assert torch.cuda.memory_allocated() < before  # the cache (and the graph's outputs) are gone
    cache = model(ids).past_key_values
    model(ids[:, :1], **{cache_kw(model): cache})
    model(ids[:, :1], **{cache_kw(model): cache})
    graph = weakref.ref(next(iter(runner.graphs.values())).graph)
    kvpress.unpatch(model)
    assert not runner.graphs and graph() is None
    for name, p in model.named_parameters():  # the same parameters and values, each its own storage again
        assert p is params[name][0] and torch.equal(p, params[name][1])
    assert len({p.untyped_storage().data_ptr() for p in model.parameters()}) == len(params)
    assert not any("forward" in vars(m) for m in model.modules())
