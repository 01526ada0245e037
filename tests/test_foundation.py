"""The shared mechanism under every method: patching undo, token bookkeeping, sliding windows,
cache bytes, config files."""

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import kvpress
from kvpress.api import Patcher
from kvpress.cache import LedgerSpec, TokenLedger, Window
from tiny_models import cache_kw, random_ids, tiny_model


def test_patcher_restores_submodules_parameters_and_forwards_exactly():
    model = tiny_model("llama")
    attention = model.model.layers[0].self_attn
    k_proj, weight, forward = attention.k_proj, attention.q_proj.weight, attention.forward
    patcher = Patcher()
    patcher.set(attention, "k_proj", torch.nn.Linear(64, 64))
    patcher.set(attention.q_proj, "weight", torch.nn.Parameter(torch.zeros_like(weight)))
    patcher.swap_forward(attention, lambda module, *args, **kwargs: None)
    patcher.set(attention, "new_child", torch.nn.Linear(2, 2))
    assert attention.k_proj is not k_proj and attention.forward(1) is None
    patcher.undo()
    assert attention.k_proj is k_proj and attention.q_proj.weight is weight
    assert "forward" not in vars(attention) and attention.forward == forward
    assert "new_child" not in attention._modules and not hasattr(attention, "new_child")


@torch.no_grad()
def test_model_sliding_window_layers_keep_only_their_window():
    """A Mistral with its own sliding window of 16: transformers' layers hold 15 tokens; kvpress's dense
    and all-retrieval Duo layers hold the window and its slack, and no rank of every token."""
    model = tiny_model("mistral", sliding_window=16)
    ids = random_ids(1, 257)
    unpatched = model(ids).past_key_values
    per_token = 2 * 4 * 16 * 4  # layers-worth of K+V: 2 tensors x 4 KV heads x head dim 16 x fp32
    assert kvpress.kv_cache_bytes(unpatched) == 2 * per_token * 15  # the window, not the prefill it is a view of
    slots = 16 + Window(0, 16).slack
    for method, config in (("dense", None), ("duo", kvpress.DuoConfig.from_retrieval_mask(torch.ones(2, 4, dtype=torch.bool)))):
        kvpress.patch(model, method, config=config)
        cache = model(ids).past_key_values
        cache = model(random_ids(1, 1, seed=3), **{cache_kw(model): cache}, attention_mask=torch.ones(1, 258)).past_key_values
        assert kvpress.kv_cache_bytes(cache) == 2 * per_token * slots + 4 * slots + 4  # window ranks + real count
        kvpress.unpatch(model)


def test_ledger_keeps_only_what_its_spec_asks_for():
    ledger = TokenLedger(LedgerSpec(windows=(Window(2, 4),), positions=True))
    for step in range(50):
        ledger.begin(None, 2, 3 if step == 0 else 1, "cpu")
        if step == 0:
            assert torch.equal(ledger.current().positions, torch.arange(3).expand(2, 3))
        ledger.end()
    assert ledger.rank is None and ledger.seen == 52
    assert sum(t.numel() for t in ledger.tensors()) == 2 * (6 + Window(2, 4).slack) + 2  # flat: window ranks + counts
    full = TokenLedger(LedgerSpec(all_ranks=True))
    full.begin(torch.tensor([[0, 1, 1], [1, 1, 1]]), 2, 3, "cpu")
    assert torch.equal(full.current().all_rank, torch.tensor([[-1, 0, 1], [0, 1, 2]], dtype=torch.int32))


def test_config_file_format_version_is_checked(tmp_path):
    path = kvpress.DuoConfig(gates=torch.ones(2, 4)).save(tmp_path / "duo.safetensors")
    mask = os.umask(0)
    os.umask(mask)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~mask  # the user's default permissions
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = {**f.metadata(), "kvpress_format": "99"}
    save_file(load_file(str(path)), str(path), metadata=metadata)
    with pytest.raises(ValueError, match="format version 99"):
        kvpress.DuoConfig.load(path)


def test_direct_launcher_is_used_only_on_tested_triton_versions():
    """The direct launcher relies on Triton-internal API (kvpress.kernels.launch): on other versions
    every launch goes through the public ``kernel[grid](...)``."""
    import triton

    from kvpress.kernels import decode, launch

    tested = triton.__version__.startswith(launch.TESTED_TRITON) and os.environ.get("TRITON_INTERPRET") != "1"
    assert (decode._launch_decode.params is not None) == tested


@pytest.mark.gpu
def test_direct_launcher_signature_still_matches_on_the_tested_triton():
    """Fails loudly if the private launcher signature changed: on a tested Triton version, a second
    decode (a new length) must go through the kept compiled launcher and still match the reference."""
    import triton

    from kvpress.kernels import decode, launch, reference

    if not triton.__version__.startswith(launch.TESTED_TRITON):
        pytest.skip(f"triton {triton.__version__}: plain launches (direct launcher tested on {launch.TESTED_TRITON})")
    torch.manual_seed(0)
    for length in (3000, 3100):
        q = torch.randn(2, 8, 1, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(2, 2, length, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        rank = torch.arange(length, device="cuda", dtype=torch.int32).expand(2, length).contiguous()
        heads = torch.arange(2, device="cuda")
        out = decode.decode_attention(q, rank[:, -1:], 0.1, 4, split=(k, v, rank, heads, 0, None))
        ref = reference.rank_attention(q.float(), k.float(), v.float(), rank[:, -1:], rank, 0.1)
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    assert decode._launch_decode.compiled, "the compiled decode kernel was not kept for direct launches"
