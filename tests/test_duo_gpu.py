"""The patched model on CUDA: Triton kernels against the torch reference path, end to end."""

import pytest
import torch

import kvpress
import kvpress.kernels
from tiny_models import cache_kw, random_ids, tiny_model

pytestmark = pytest.mark.gpu


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def padded_batch(lengths, seed=0):
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = random_ids(1, n, seed=seed + n)[0]
        mask[row, width - n:] = 1
    return ids.cuda(), mask.cuda()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_kernels_match_reference_in_a_patched_model(dtype, monkeypatch):
    model = tiny_model("qwen3", dtype=dtype, hidden_size=256, num_attention_heads=8, num_key_value_heads=4, head_dim=64).cuda()
    mask = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    kvpress.patch(model, "duo", config=kvpress.DuoConfig.from_retrieval_mask(mask, sink=16, recent=64))
    ids, attention_mask = padded_batch([301, 517, 450])
    steps = random_ids(3, 20, seed=7).cuda()

    def run():
        out = model(ids, attention_mask=attention_mask)
        logits, cache = [out.logits[:, -1]], out.past_key_values
        for t in range(steps.shape[1]):  # teacher-forced decode: both paths see the same tokens
            attention_mask_t = torch.cat([attention_mask, torch.ones(3, t + 1, dtype=attention_mask.dtype, device="cuda")], 1)
            out = model(steps[:, t : t + 1], attention_mask=attention_mask_t, **{cache_kw(model): cache})
            logits.append(out.logits[:, -1])
            cache = out.past_key_values
        return torch.stack(logits, 1), cache

    triton_logits, cache = run()
    kvpress.unpatch(model)
    dense_logits, _ = run()  # the window leaves out tokens: Duo must differ from dense attention
    kvpress.patch(model, "duo", config=kvpress.DuoConfig.from_retrieval_mask(mask, sink=16, recent=64))
    monkeypatch.setattr(kvpress.kernels, "BACKEND", "reference")
    reference_logits, _ = run()
    assert relative_error(triton_logits, reference_logits) < 2e-2
    assert relative_error(triton_logits, dense_logits) > 5e-2
    dense = 2 * 2 * 4 * 64 * (517 + 20) * 3 * dtype.itemsize  # layers, K+V, heads, dim, tokens, rows
    assert kvpress.kv_cache_bytes(cache) < 0.65 * dense


@torch.no_grad()
def test_window_covering_the_sequence_matches_unpatched_on_cuda():
    """Half the heads streaming with a window longer than the sequence: the patched model (kernels,
    in-place cache appends, window compaction) computes what the unpatched one does."""
    model = tiny_model("llama", dtype=torch.float16, hidden_size=256, num_attention_heads=8, num_key_value_heads=4,
                       head_dim=64).cuda()
    ids, attention_mask = padded_batch([301, 517, 450])
    steps = random_ids(3, 40, seed=3).cuda()

    def run():
        out = model(ids, attention_mask=attention_mask)
        logits, cache = [out.logits[:, -1]], out.past_key_values
        for t in range(steps.shape[1]):
            mask_t = torch.cat([attention_mask, torch.ones(3, t + 1, dtype=attention_mask.dtype, device="cuda")], 1)
            out = model(steps[:, t : t + 1], attention_mask=mask_t, **{cache_kw(model): cache})
            logits.append(out.logits[:, -1])
            cache = out.past_key_values
        return torch.stack(logits, 1)

    dense = run()
    mask = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    kvpress.patch(model, "duo", config=kvpress.DuoConfig.from_retrieval_mask(mask, sink=4, recent=600))
    assert relative_error(run(), dense) < 1e-2
