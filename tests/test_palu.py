"""Palu (arXiv 2407.21118): calibration math, the latent cache runtime against the unpatched model,
real cache bytes, and the Triton decode path inside the model against the reference path."""

import json
import os

import pytest
import torch
from scripts import ROOT, load_script
from tiny_models import FAMILIES, cache_kw, random_ids, tiny_model

import kvpress
from kvpress import kernels
from kvpress.calibration import palu as calib
from kvpress.methods import METHODS
from kvpress.methods import palu as palu_method
from kvpress.methods.palu import Palu, PaluConfig

METHODS.setdefault("palu", Palu)  # until kvpress.methods registers it


def padded_batch(length=12):
    ids = random_ids(2, length)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    return ids, mask


def dense_bytes(model, batch, tokens):
    c = model.config
    return 2 * c.num_hidden_layers * batch * tokens * c.num_key_value_heads * c.head_dim * 4


# -- the math of the calibration ----------------------------------------------------------------


def test_whitened_factors_are_exact_at_full_rank_and_better_on_the_data():
    torch.manual_seed(0)
    weight = torch.randn(32, 24, dtype=torch.float64)
    x = torch.randn(500, 24, dtype=torch.float64) * torch.logspace(0, -2, 24, dtype=torch.float64)  # skewed inputs
    s = calib.whitening(x.T @ x)
    up, down = calib.factorize(weight, groups=2, rank=16, s=s)
    rebuilt = torch.cat([up[g] @ down[g * 16:(g + 1) * 16] for g in range(2)]).double()
    torch.testing.assert_close(rebuilt, weight, atol=1e-4, rtol=1e-4)
    err = {}
    for name, factor in (("whiten", s), ("svd", None)):
        up, down = calib.factorize(weight, groups=2, rank=4, s=factor)
        rebuilt = torch.cat([up[g] @ down[g * 4:(g + 1) * 4] for g in range(2)]).double()
        err[name] = (x @ (rebuilt - weight).T).norm()
    assert err["whiten"] < 0.8 * err["svd"]


def test_whitening_shifts_a_singular_gram_matrix():
    x = torch.randn(3, 8)  # rank 3 < 8: not positive definite
    s = calib.whitening(x.T @ x)
    assert torch.isfinite(s).all() and (s.diagonal() > 0).all()


def test_allocate_ranks_follows_scores_caps_and_rounds():
    scores = torch.tensor([[10.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    ranks = calib.allocate_ranks(scores, full=64, groups=2, ratio=0.5, multiple=8)
    assert ranks[0, 0] == 64  # capped at full rank, the excess shared by the others
    assert (ranks % 8 == 0).all() and (ranks >= 8).all()
    assert abs(ranks.sum().item() - 0.5 * 64 * 6) <= 8 * 6
    uniform = calib.allocate_ranks(torch.ones(3, 2), full=64, groups=2, ratio=0.5, multiple=8)
    assert (uniform == 32).all()


def test_head_groups_use_all_heads_when_fewer():
    assert calib.head_groups(2, 4) == (2, 1)
    assert calib.head_groups(8, 4) == (4, 2)
    with pytest.raises(ValueError, match="divide"):
        calib.head_groups(6, 4)


class ByteTokenizer:
    def encode(self, text, add_special_tokens=False):
        return [1 + b % 127 for b in text.encode()]


def test_calibration_writes_a_folder_resumes_and_patches(tmp_path):
    model = tiny_model("qwen2")
    out = tmp_path / "palu"
    options = calib.PaluCalibration(ratio=0.5, group_size=2, samples=2, seq_len=32, multiple=8)
    config = calib.calibrate_palu(model, ByteTokenizer(), out=out, options=options, progress=False)
    meta = json.loads((out / "palu.json").read_text())
    assert meta["model_shape"]["num_kv_heads"] == 4 and meta["kvpress_format"] == kvpress.configfile.FORMAT_VERSION
    assert meta["calibration"]["allocation"] == "fisher" and len(meta["calibration"]["fisher"]) == 2
    assert not (tmp_path / "palu.partial").exists()
    assert 0.3 < config.kept_ratio() < 0.7
    loaded = PaluConfig.load(out)
    assert loaded.ranks() == config.ranks() and loaded.group_size == 2

    ids, mask = padded_batch()
    kvpress.patch(model, "palu", config=out)
    try:
        logits = model(ids, attention_mask=mask).logits
        assert torch.isfinite(logits).all()
    finally:
        kvpress.unpatch(model)


def test_statistics_snapshots_equal_shorter_passes():
    model = tiny_model("llama")
    batches = [random_ids(1, 16) for _ in range(3)]
    taken = calib.collect_statistics(model, batches, fisher=True, progress=False, snapshots=[1, 3])
    assert sorted(taken) == [1, 3]
    for n in (1, 3):
        alone = calib.collect_statistics(model, batches[:n], fisher=True, progress=False)
        torch.testing.assert_close(taken[n]["xtx"], alone["xtx"])
        torch.testing.assert_close(taken[n]["fisher"], alone["fisher"])
    assert not torch.equal(taken[1]["xtx"], taken[3]["xtx"])
    with pytest.raises(ValueError, match="give more samples"):
        calib.collect_statistics(model, batches, fisher=False, progress=False, snapshots=[4])


def test_calibration_resumes_from_partial_layers(tmp_path):
    model = tiny_model("llama")
    options = calib.PaluCalibration(ratio=0.5, group_size=4, samples=1, seq_len=16, multiple=8,
                                    allocation="uniform", decomposition="svd")
    out = tmp_path / "palu"
    full = calib.calibrate_palu(model, ByteTokenizer(), options=options, progress=False)
    partial = tmp_path / "palu.partial"
    partial.mkdir()
    record = {**__import__("dataclasses").asdict(options), "model_shape": kvpress.adapters.describe(model).shape.to_dict(),
              "haystack": []}
    (partial / "options.json").write_text(json.dumps(record))
    planted = {name: torch.zeros_like(t) for name, t in full.factors.items() if name.startswith("0.")}
    from safetensors.torch import save_file

    save_file(planted, str(partial / "layer_0.safetensors"))
    resumed = calib.calibrate_palu(model, ByteTokenizer(), out=out, options=options, progress=False)
    assert resumed.factors["0.k.up"].abs().sum() == 0  # layer 0 came from the partial folder
    torch.testing.assert_close(resumed.factors["1.k.up"], full.factors["1.k.up"])


# -- the runtime ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_matches_the_unpatched_model(family):
    model = tiny_model(family)
    ids, mask = padded_batch()
    want = model(ids, attention_mask=mask).logits
    want_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    kvpress.patch(model, "palu")  # no config: exact factors from the weights
    try:
        got = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-5, rtol=1e-5)
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False), want_tokens)
        assert model.model.layers[0].self_attn.forward.__func__.__name__ == "palu_forward"
    finally:
        kvpress.unpatch(model)
    assert "forward" not in vars(model.model.layers[0].self_attn)
    assert torch.equal(model(ids, attention_mask=mask).logits, want)


@torch.no_grad()
def test_query_and_latents_share_one_gemm_and_unpatch_separates_them():
    model = tiny_model("qwen2")  # q_proj with a bias
    ids, mask = padded_batch()
    attention = model.model.layers[0].self_attn
    q_weight, q_values = attention.q_proj.weight, attention.q_proj.weight.detach().clone()
    kvpress.patch(model, "palu", rank_ratio=0.5, group_size=1)
    try:
        joined = attention._kvpress_q_latents
        plan = attention._kvpress_method.plans[0]
        # q_proj's weight and the plan's down projections are row blocks of one tensor, values unchanged
        assert attention.q_proj.weight is q_weight and torch.equal(q_weight, q_values)
        assert q_weight.data_ptr() == joined.weight.data_ptr()
        assert plan.down.data_ptr() == joined.weight[q_weight.shape[0]:].data_ptr()
        logits = model(ids, attention_mask=mask).logits
        attention.q_proj.weight = torch.nn.Parameter(q_values.clone())  # a weight replaced: separate GEMMs again
        assert not joined.intact()
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, logits, atol=1e-5, rtol=1e-5)
        attention.q_proj.weight = q_weight
    finally:
        kvpress.unpatch(model)
    assert attention.q_proj.weight is q_weight and torch.equal(q_weight, q_values)
    assert q_weight.untyped_storage().size() == q_weight.numel() * q_weight.element_size()  # its own storage again


def test_chunked_prefill_matches_one_prefill():
    model = tiny_model("qwen3")
    ids, mask = padded_batch(20)
    kvpress.patch(model, "palu", rank_ratio=0.5, group_size=2)
    try:
        whole = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        model.generation_config.prefill_chunk_size = 7
        chunked = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    finally:
        model.generation_config.prefill_chunk_size = None
        kvpress.unpatch(model)
    assert torch.equal(whole, chunked)


def test_cache_holds_latents_only():
    model = tiny_model("llama")
    ids, mask = padded_batch(16)
    dense = dense_bytes(model, 2, 16)
    sizes = {}
    for name, options in (("full", {}), ("half", dict(rank_ratio=0.5, group_size=1)),
                          ("4bit", dict(rank_ratio=0.5, group_size=1, bits=4, quant_group=8))):
        kvpress.patch(model, "palu", **options)
        try:
            cache = kvpress.make_cache(model)
            model(ids, attention_mask=mask, **{cache_kw(model): cache})
            sizes[name] = kvpress.kv_cache_bytes(cache)
        finally:
            kvpress.unpatch(model)
    rope_rows = 2 * 2 * 16 * model.config.head_dim // 2 * model.dtype.itemsize  # cos and sin [2, 16, D / 2], the model's dtype
    bookkeeping = 2 * 16 * 4 + 2 * 4 + rope_rows  # ranks [2, 16] int32, num_real
    assert sizes["full"] == dense + bookkeeping
    assert sizes["half"] == dense // 2 + bookkeeping
    # 8 latents of 4 bits = one int32 word per token and group, plus a scale and a minimum (fp32)
    assert sizes["4bit"] == 2 * 2 * 2 * 16 * 4 * (4 + 8) + bookkeeping


@pytest.mark.skipif(torch.cuda.is_available(), reason="tiny head dim: interpreter only (tests/test_palu_kernels.py covers the GPU)")
@pytest.mark.parametrize("family,options", [
    ("qwen3", dict(rank_ratio=0.5, group_size=1, bits=3, quant_group=4)),  # k_norm, 3-bit latents
    ("qwen2", dict(rank_ratio=0.5, group_size=2)),  # k/v bias, groups of two KV heads
])
def test_decode_kernel_in_the_model_matches_the_reference(family, options, monkeypatch):
    model = tiny_model(family)
    ids, mask = padded_batch()
    kvpress.patch(model, "palu", **options)
    try:
        runs = []
        for backend in ("reference", "triton"):
            monkeypatch.setattr(kernels, "BACKEND", backend)
            runs.append(model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                       output_logits=True, return_dict_in_generate=True))
    finally:
        kvpress.unpatch(model)
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    for a, b in zip(runs[0].logits, runs[1].logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_decode_outside_the_kernel_warns_once_and_uses_the_torch_path(monkeypatch, caplog):
    """A shape the decode kernel does not serve (here groups of 3 KV heads: not a power of two) decodes
    with the torch path, the same tokens, and says so once, with the fix."""
    monkeypatch.setattr(palu_method, "_WARNED", set())  # once per process: start this test with none said
    model = tiny_model("llama", num_key_value_heads=3, num_attention_heads=6, hidden_size=96)
    ids, mask = padded_batch()
    kvpress.patch(model, "palu", rank_ratio=0.5, group_size=3)
    try:
        runs = []
        for backend in ("reference", "triton"):
            monkeypatch.setattr(kernels, "BACKEND", backend)
            with caplog.at_level("WARNING", logger="kvpress"):
                runs.append(model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False))
    finally:
        kvpress.unpatch(model)
    assert torch.equal(runs[0], runs[1])
    warnings = [r.getMessage() for r in caplog.records if "does not serve" in r.getMessage()]
    assert len(warnings) == 1 and "group of 3 KV heads" in warnings[0] and "--multiple 16" in warnings[0]


def test_quantised_latents_stay_close():
    model = tiny_model("llama")
    ids, mask = padded_batch(16)
    kvpress.patch(model, "palu", rank_ratio=0.5, group_size=1)
    want = model(ids, attention_mask=mask).logits
    kvpress.unpatch(model)
    errors = {}
    for bits in (4, 2):
        kvpress.patch(model, "palu", rank_ratio=0.5, group_size=1, bits=bits, quant_group=8)
        errors[bits] = (model(ids, attention_mask=mask).logits - want)[mask.bool()].abs().mean().item()
        kvpress.unpatch(model)
    assert 0 < errors[4] < errors[2] and errors[4] < 0.1 * want.abs().mean().item()


def test_config_for_another_model_is_refused(tmp_path):
    small = tiny_model("llama")
    config = PaluConfig(factors=calib.factors_from_weights(small, 4), group_size=4,
                        model_shape=kvpress.adapters.describe(small).shape)
    config.save(tmp_path / "palu")
    other = tiny_model("llama", num_key_value_heads=2)
    with pytest.raises(ValueError, match="num_kv_heads"):
        kvpress.patch(other, "palu", config=tmp_path / "palu")
    with pytest.raises(ValueError, match="bits"):
        kvpress.patch(small, "palu", bits=5)
    with pytest.raises(FileNotFoundError, match="kvpress-calibrate palu"):
        kvpress.patch(small, "palu", config=tmp_path / "missing")


# -- static decode steps (decode="graph"; uncaptured on CPU) --------------------------------------


def _generate(model, decode, ids, mask, steps, **options):
    kvpress.patch(model, "palu", decode=decode, **options)
    try:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        runner = vars(model).get("_kvpress_graph")
        return out.sequences, torch.stack(out.logits, 1), None if runner is None else (runner.replays, runner.first_steps)
    finally:
        kvpress.unpatch(model)


@pytest.mark.parametrize("family,options", [
    ("llama", dict(rank_ratio=0.5, group_size=2)),
    ("qwen3", dict(rank_ratio=0.5, group_size=1, bits=4, quant_group=4)),  # k_norm, packed latents and scales
    ("mistral-sliding", dict(rank_ratio=0.5, group_size=2)),
])
def test_static_decode_steps_equal_eager(family, options, monkeypatch):
    """decode="graph": the latents are written at the device count and the attention stops there (the
    static path runs uncaptured on CPU), through capacity growths (forced small here): same tokens and
    logits as eager decode on a left-padded batch."""
    import kvpress.cache

    model = tiny_model("mistral", sliding_window=16) if family == "mistral-sliding" else tiny_model(family)
    ids, mask = padded_batch(14)
    tokens, logits, _ = _generate(model, "eager", ids, mask, 14, **options)
    monkeypatch.setattr(kvpress.cache, "static_bucket", lambda slots: slots + 6)
    g_tokens, g_logits, (replays, first) = _generate(model, "graph", ids, mask, 14, **options)
    assert torch.equal(g_tokens, tokens)
    torch.testing.assert_close(g_logits, logits, rtol=1e-5, atol=1e-5)
    assert replays == 13 and first >= 2  # every decode step ran static; the buffers grew on the way


@pytest.mark.skipif(torch.cuda.is_available(), reason="tiny head dim: interpreter only")
@pytest.mark.parametrize("options", [dict(rank_ratio=0.5, group_size=1),
                                     dict(rank_ratio=0.5, group_size=1, bits=3, quant_group=4)])
def test_static_decode_steps_with_the_kernel_equal_eager(options, monkeypatch):
    """The decode kernel reading the token count on the device, and (quantised) the new token's codes written
    at its slot by the quantisation launch (Triton interpreter)."""
    monkeypatch.setattr(kernels, "BACKEND", "triton")
    model = tiny_model("llama")
    ids, mask = padded_batch(12)
    tokens, logits, _ = _generate(model, "eager", ids, mask, 5, **options)
    g_tokens, g_logits, (replays, _) = _generate(model, "graph", ids, mask, 5, **options)
    assert torch.equal(g_tokens, tokens) and replays == 4
    torch.testing.assert_close(g_logits, logits, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [None, 4])
@torch.no_grad()
def test_gpu_graph_decode_equals_eager(bits):
    """Captured and replayed on the GPU (the fused decode kernel, the model's fused small ops): the
    greedy tokens and logits of eager decode on a left-padded batch, one capture. The static steps
    read whole buffers (the reference and the kernel alike), so bf16 roundings differ by a few ulps
    from the second step on (benchmarks/palu_graph_probe.py: ~0.02, the torch reference too): the
    tokens agree until a step where eager's best two logits are that close, and the logits until
    then agree to the rounding."""
    from test_graph import generate, gpu_model, padded

    model = gpu_model()
    ids, mask = padded((300, 170, 420))
    ids, mask = ids.cuda(), mask.cuda()
    setting = dict(method="palu", rank_ratio=0.5, group_size=1, bits=bits)
    tokens, logits, _ = generate(model, setting, "eager", ids, attention_mask=mask, max_new_tokens=40, do_sample=False)
    g_tokens, g_logits, (replays, first) = generate(model, setting, "graph", ids, attention_mask=mask,
                                                    max_new_tokens=40, do_sample=False)
    assert replays == 39 and first == 1
    width, tol = ids.shape[1], 0.05
    differ = (g_tokens[:, width:] != tokens[:, width:]).any(0).nonzero()
    until = int(differ[0]) if len(differ) else logits.shape[1]
    assert until >= 2, "the first decode step (eager in both) or the first replay already differs"
    torch.testing.assert_close(g_logits[:, :until], logits[:, :until], rtol=0, atol=tol)
    if until < logits.shape[1]:  # where the tokens part, eager's best two logits are a near-tie
        rows = (g_tokens[:, width + until] != tokens[:, width + until]).nonzero()[:, 0]
        top2 = logits[rows, until].float().topk(2, -1).values
        assert ((top2[:, 0] - top2[:, 1]) <= tol).all(), top2


# -- the quality benchmark's scoring --------------------------------------------------------------


def _quality_module(monkeypatch):
    monkeypatch.setenv("KVPRESS_KERNELS", os.environ.get("KVPRESS_KERNELS", "auto"))  # the module's setdefault stays local
    return load_script("benchmarks/palu_quality.py")


def test_quality_scores_retrieval_per_cell(monkeypatch):
    """``where_unpatched`` compares the same (length, depth, sample) cells (it once compared the
    positions of the few examples a task result keeps, which differ between variants)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvpress.eval import evaluate_task, load_corpus
    from kvpress.eval.cli import EvalConfig

    quality = _quality_module(monkeypatch)
    reference = {(256, 0.0, 0): 1.0, (256, 0.0, 1): 0.0, (256, 1.0, 0): 1.0, (256, 1.0, 1): 1.0}
    scores = {(256, 0.0, 0): 0.0, (256, 0.0, 1): 1.0, (256, 1.0, 0): 1.0, (256, 1.0, 1): 1.0}
    assert quality.accuracy_where(reference, scores) == pytest.approx(2 / 3)
    assert quality.accuracy_where({(256, 0.0, 0): 0.0}, {(256, 0.0, 0): 1.0}) is None

    folder = ROOT / "models" / "needle-llama"
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    haystack = load_corpus("heldout")
    cfg = EvalConfig(tasks=["passkey"], lengths=[128, 256], depths=[0.0, 1.0], samples=2, seed=3, progress=False)
    mine = quality.retrieval(model, tokenizer, "passkey", cfg, haystack)
    theirs = evaluate_task(model, tokenizer, "passkey", haystack, cfg.lengths, cfg.depths, cfg.samples, seed=3, progress=False)
    assert sorted(mine["scores"]) == [(n, d, i) for n in (128, 256) for d in (0.0, 1.0) for i in range(2)]
    for (n, d, _), _value in mine["scores"].items():
        cell = [mine["scores"][n, d, i] for i in range(2)]
        assert sum(cell) / 2 == pytest.approx(theirs.grid[n][d])
    assert mine["accuracy"] == pytest.approx(theirs.accuracy)
    assert mine["cache_bytes"] == pytest.approx(theirs.cache_bytes)


def test_rope_commuting_factorisation_measure():
    """benchmarks/palu_rope_commuting.py (why decode rebuilds keys): a projection built complex-linear
    per rotary frequency, of complex rank 1 per frequency, loses nothing at that many latents under
    either factorisation; a random one loses more under the RoPE-commuting one."""
    script = load_script("benchmarks/palu_rope_commuting.py")
    torch.manual_seed(0)
    heads, head_dim, hidden = 2, 8, 12
    x = torch.randn(200, hidden, dtype=torch.float64)
    u = torch.randn(head_dim // 2, heads, 1, dtype=torch.complex128)
    v = torch.randn(head_dim // 2, 1, hidden, dtype=torch.complex128)
    m = (u @ v).permute(1, 0, 2)  # [heads, frequency, hidden]
    commuting = torch.cat([m.real, m.imag], dim=1).reshape(heads * head_dim, hidden)  # rotate_half layout
    real, rope = script.lost_energy(commuting, x.T @ x, heads, head_dim, ratio=0.5)  # 8 real latents: 4 complex
    assert real < 1e-9 and rope < 1e-9
    real, rope = script.lost_energy(torch.randn(heads * head_dim, hidden, dtype=torch.float64), x.T @ x, heads, head_dim,
                                    0.5)
    assert 0 < real < rope
