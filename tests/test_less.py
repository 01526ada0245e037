"""LESS: the decode protocol against the teacher-forced simulation, the patched model (lossless
setting, left padding, flat memory, the Triton path on CPU), config files and calibration."""

import argparse
import json

import pytest
import torch
from scripts import load_script
from tiny_models import random_ids, tiny_model

import kvpress
from kvpress.adapters import describe
from kvpress.kernels import less_reference as R
from kvpress.methods import METHODS
from kvpress.methods.less import FeatureMaps, Less, LessConfig


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    if "less" not in METHODS:
        monkeypatch.setitem(METHODS, "less", Less)


def random_weights(hq, hs, d, n=24, r=4):
    torch.manual_seed(3)
    return R.FeatureWeights(q_w1=torch.randn(hq, d, n) / 4, q_w2=torch.randn(hq, n, r) / 4, k_w1=torch.randn(hs, d, n) / 4,
                            k_w2=torch.randn(hs, n, r) / 4, k_scale=torch.rand(hs, r), k_mix=torch.randn(hs, r, r) / 3,
                            k_mix_scale=torch.rand(hs, r))


@pytest.mark.parametrize("policy", [R.Policy(2, 0, 5), R.Policy(0, 4, 3), R.Policy(1, 3, 2)], ids=["lambda", "h2o", "both"])
@pytest.mark.parametrize("hs", [2, 4], ids=["state-per-kv-head", "state-per-query-head"])
def test_decode_protocol_equals_simulation(policy, hs):
    """Prefill then decode token by token == the whole-sequence simulation used in training; and the
    state changes the output (so the comparison is not vacuous)."""
    b, hq, hkv, d, length = 2, 4, 2, 16, 30
    w = random_weights(hq, hs, d)
    q, k, v = torch.randn(b, hq, length, d), torch.randn(b, hkv, length, d), torch.randn(b, hkv, length, d)
    scale = d ** -0.5
    evict_at = R.eviction_times(q, k, policy, scale)
    expected = R.simulate(q, k, v, evict_at, scale, w)
    cache = R.LessCache.empty(b, hkv, policy.slots, d, hs, 4, torch.float32, "cpu")
    rank = torch.arange(length)[None].expand(b, -1).int()
    p = policy.budget
    outs = [R.prefill_step(q[:, :, :p], k[:, :, :p], v[:, :, :p], rank[:, :p], cache, w, policy, scale)]
    for i in range(p, length):
        outs.append(R.decode_step(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], rank[:, i], cache, w, policy, scale))
    torch.testing.assert_close(torch.cat(outs, 2), expected, rtol=1e-5, atol=1e-5)
    assert (expected - R.simulate(q, k, v, evict_at, scale, None)).abs().max() > 0.1
    # every evicted token was folded exactly once (the last victim, evicted at the last step, is
    # pending: it leaves attention now and is folded at the start of the next forward)
    folded = R.psi(k, w) * R._expand_heads(evict_at < length, hs)[..., None]
    torch.testing.assert_close(cache.z, folded.sum(2), rtol=1e-4, atol=1e-5)
    assert cache.pending.all()


def test_log_space_combine_matches_formula():
    """out = (sum_kept e^s v + phi H) / (sum_kept e^s + phi.z), computed naively."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    phi_q, hs, z = torch.rand(1, 2, 1, 3), torch.randn(1, 2, 3, 8), torch.rand(1, 2, 3)
    o, lse, _ = R.masked_attention(q, k, v, torch.ones(5, dtype=torch.bool), 0.3)
    got = R.combine(o, lse, phi_q, hs, z)
    e = (torch.einsum("bhqd,bhkd->bhqk", q, k) * 0.3).exp()
    num = torch.einsum("bhqk,bhkd->bhqd", e, v) + torch.einsum("bhqr,bhrd->bhqd", phi_q, hs)
    den = e.sum(-1, keepdim=True) + torch.einsum("bhqr,bhr->bhq", phi_q, z)[..., None]
    torch.testing.assert_close(got, num / den)


def config_for(model, **kwargs):
    return LessConfig.random(describe(model).shape, rank=4, hidden=16, **kwargs)


def test_patched_model_lossless_when_budget_covers_everything():
    model = tiny_model("llama")
    ids = random_ids(2, 24)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    expected = model(ids, attention_mask=mask).logits
    kvpress.patch(model, "less", config=config_for(model, policy="lambda", sink=2, recent=64))
    got = model(ids, attention_mask=mask).logits
    kvpress.unpatch(model)
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_left_padding_and_flat_memory(family):
    """A left-padded row generates what it generates alone; the cache bytes do not grow with decoding."""
    model = tiny_model(family)
    config = config_for(model, policy="h2o", sink=1, heavy=3, recent=4)
    ids = random_ids(2, 16)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    kvpress.patch(model, "less", config=config)
    both = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    alone = model.generate(ids[1:, 6:], max_new_tokens=8, do_sample=False)
    assert torch.equal(both[1, 16:], alone[0, 10:])
    cache = kvpress.make_cache(model)
    out = model(ids, attention_mask=mask, cache=cache)
    sizes = []
    for _ in range(12):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        out = model(out.logits[:, -1:].argmax(-1), attention_mask=mask, cache=cache)
        sizes.append(kvpress.kv_cache_bytes(cache))
    kvpress.unpatch(model)
    assert len(set(sizes)) == 1
    shape = describe(model).shape
    slots = config.budget.slots
    per_layer = 2 * 2 * shape.num_kv_heads * slots * shape.head_dim * 4 + 2 * shape.num_kv_heads * slots * 4 * 2
    assert sizes[0] < shape.num_layers * (per_layer + 4096)  # K/V of the slots + ranks/scores + small state


def test_state_off_is_the_plain_policy_and_untrained_maps_barely_matter():
    model = tiny_model("llama")
    ids = random_ids(1, 40)
    logits = {}
    for name, state in (("plain", False), ("random", True)):
        kvpress.patch(model, "less", config=config_for(model, policy="lambda", sink=2, recent=6, state=state))
        cache = kvpress.make_cache(model)
        out = [model(ids[:, :8], cache=cache).logits[:, -1]]
        for i in range(8, 39):
            out.append(model(ids[:, i : i + 1], cache=cache).logits[:, -1])
        kvpress.unpatch(model)
        logits[name] = torch.stack(out)
    dense = model(ids).logits[0, 7:39]
    assert (logits["plain"][:, 0] - dense).abs().max() > 1e-3  # the policy does evict
    torch.testing.assert_close(logits["random"], logits["plain"], rtol=0, atol=1e-3)  # k_scale 1e-4: ~no state


def test_triton_path_on_cpu_matches_reference(monkeypatch):
    model = tiny_model("llama")
    config = config_for(model, policy="h2o", sink=0, heavy=3, recent=3)
    ids = random_ids(1, 8)
    results = []
    for backend in ("reference", "triton"):
        monkeypatch.setenv("KVPRESS_KERNELS", backend)
        kvpress.patch(model, "less", config=config)
        results.append(model.generate(ids, max_new_tokens=3, do_sample=False, output_scores=True,
                                      return_dict_in_generate=True).scores)
        kvpress.unpatch(model)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_graph_decode_static_steps_equal_eager(monkeypatch):
    """``decode="graph"``: LESS runs static decode steps (uncaptured on CPU) that give the eager
    tokens and logits on a left-padded batch; with the kernels (the interpreter here) nothing is
    reallocated between steps, so one entry (one capture on a GPU) serves every step."""
    model = tiny_model("llama")
    config = config_for(model, policy="h2o", sink=1, heavy=3, recent=3)
    for w in config.layers:
        w.k_scale.fill_(0.5)
    ids = random_ids(2, 12)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    runs = {}
    for backend, decode, steps in (("reference", "eager", 5), ("reference", "graph", 5), ("triton", "graph", 3)):
        monkeypatch.setenv("KVPRESS_KERNELS", backend)
        kvpress.patch(model, "less", config=config, decode=decode)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        runner = vars(model).get("_kvpress_graph")
        runs[backend, decode] = (out.sequences, torch.stack(out.logits, 1), runner and (runner.replays, runner.first_steps))
        kvpress.unpatch(model)
    tokens, logits, _ = runs["reference", "eager"]
    for key, atol in ((("reference", "graph"), 1e-6), (("triton", "graph"), 1e-4)):
        g_tokens, g_logits, (replays, first) = runs[key]
        assert torch.equal(g_tokens, tokens[:, : g_tokens.shape[1]])
        torch.testing.assert_close(g_logits, logits[:, : g_logits.shape[1]], rtol=0, atol=atol)
        assert replays == g_logits.shape[1] - 1
    assert runs["triton", "graph"][2][1] == 1


@pytest.mark.gpu
def test_graph_decode_on_gpu_equals_eager():
    """Captured and replayed on the GPU: the tokens of eager decode, with one capture."""
    from test_graph import generate

    model = tiny_model("llama").cuda()
    config = config_for(model, policy="h2o", sink=1, heavy=6, recent=6)
    for w in config.layers:
        w.k_scale.fill_(0.5)
    ids = random_ids(2, 40).cuda()
    tokens, logits, _ = generate(model, dict(method="less", config=config), "eager", ids, max_new_tokens=24, do_sample=False)
    g_tokens, g_logits, (replays, first) = generate(model, dict(method="less", config=config), "graph", ids,
                                                    max_new_tokens=24, do_sample=False)
    assert torch.equal(g_tokens, tokens)
    torch.testing.assert_close(g_logits, logits, rtol=1e-3, atol=1e-3)
    assert replays == 23 and first == 1


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("policy", [dict(policy="lambda", sink=2, recent=6), dict(policy="h2o", sink=0, heavy=4, recent=4)],
                         ids=["lambda", "h2o"])
def test_kernels_equal_reference_with_chunked_prefill(device, policy, monkeypatch):
    """The kernels (prefill and decode; the interpreter on CPU) give the torch path's tokens and
    logits: a left-padded batch whose 40-token prompt is prefilled in chunks of 16 (eviction and
    folding between them), then decoded; fp32 (on the GPU the kernels' dots round to tf32)."""
    model = tiny_model("llama").to(device)
    config = config_for(model, **policy)
    for w in config.layers:
        w.k_scale.fill_(0.5)
    ids = random_ids(2, 40).to(device)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    results = []
    for backend in ("reference", "triton" if device == "cpu" else "auto"):
        monkeypatch.setenv("KVPRESS_KERNELS", backend)
        kvpress.patch(model, "less", config=config, prefill_chunk_size=16)
        results.append(model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, output_scores=True,
                                      return_dict_in_generate=True))
        kvpress.unpatch(model)
    reference, kernels = results
    assert torch.equal(kernels.sequences, reference.sequences)
    for a, b in zip(reference.scores, kernels.scores):
        torch.testing.assert_close(b, a, rtol=2e-3, atol=2e-3)


def test_config_files(tmp_path):
    model = tiny_model("llama")
    config = config_for(model, policy="lambda", sink=2, recent=8)
    config.save(tmp_path / "cfg")
    loaded = LessConfig.load(tmp_path / "cfg", recent=9)
    assert loaded.recent == 9 and loaded.model_shape == config.model_shape
    torch.testing.assert_close(loaded.layers[1].k_mix, config.layers[1].k_mix)
    kvpress.patch(model, "less", config=str(tmp_path / "cfg"), heavy=0)
    kvpress.unpatch(model)
    other = tiny_model("llama", num_key_value_heads=2)
    with pytest.raises(ValueError, match="num_kv_heads"):
        kvpress.patch(other, "less", config=str(tmp_path / "cfg"))
    with pytest.raises(ValueError, match="heavy"):
        LessConfig(policy="h2o", heavy=0)
    (tmp_path / "cfg" / "less.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="does not match"):
        LessConfig.load(tmp_path / "cfg")
    with pytest.raises(FileNotFoundError, match="kvpress-calibrate less"):
        LessConfig.load(tmp_path / "nothing")


class Bytes:  # a byte tokenizer for the tiny vocabulary
    def encode(self, text, add_special_tokens=True, verbose=False):
        return [1 + b % 100 for b in text.encode()]


def test_calibration_end_to_end(tmp_path, monkeypatch):
    """`kvpress-calibrate less` on a tiny model: trains, resumes per layer, writes a config that patches."""
    from kvpress.calibration import less as calib

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "model")

    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: Bytes())
    parser = argparse.ArgumentParser()
    calib.add_arguments(parser)
    out = tmp_path / "less"
    argv = ["--model", str(tmp_path / "model"), "--out", str(out), "--recent", "6", "--sink", "2", "--rank", "4",
            "--hidden", "16", "--samples", "2", "--length", "40", "--epochs", "3", "--halve-every", "1", "--no-progress",
            "--device", "cpu"]
    calls = []
    original = calib.train_layer

    def interrupted(module, *args, **kwargs):
        calls.append(module.layer_idx)
        if module.layer_idx == 1 and len(calls) == 2:
            raise KeyboardInterrupt  # the first run stops after layer 0
        return original(module, *args, **kwargs)

    monkeypatch.setattr(calib, "train_layer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        calib.main(parser.parse_args(argv))
    assert (tmp_path / "less.partial" / "layer000.safetensors").is_file() and not out.exists()
    assert calib.main(parser.parse_args(argv)) == 0
    assert calls == [0, 1, 1]  # the second run trained only layer 1
    config = LessConfig.load(out)
    assert config.recent == 6 and len(config.layers) == 2 and not (tmp_path / "less.partial").exists()
    losses = json.loads((out / "training.json").read_text())["losses"]
    assert all(v["mse_less"] < v["mse_sparse"] for v in losses.values())  # the state helps on what it saw
    kvpress.patch(model, "less", config=str(out))
    model.generate(random_ids(1, 12), max_new_tokens=3, do_sample=False)
    kvpress.unpatch(model)


def test_calibration_refuses_a_spill_the_disk_cannot_hold(tmp_path, monkeypatch):
    """The activations are grouped to fit 90% of the free disk where they spill (and --spill-gb); when
    not even one layer fits, a clear error before anything is captured (not a full disk half-way)."""
    import shutil

    from kvpress.calibration import less as calib

    model = tiny_model("llama")
    training = calib.LessTraining(samples=2, length=40, epochs=1)
    per_layer = 2 * calib.bytes_per_layer_sample(describe(model).shape, 40, 4)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(calib.shutil, "disk_usage", lambda path: usage._replace(free=int(per_layer * 1.5)))
    assert calib.spill_budget(tmp_path / "spill" / "deeper", 20.0, in_memory=False) == 0.9 * int(per_layer * 1.5)
    assert calib.spill_budget(tmp_path, 20.0, in_memory=True) == 20e9
    monkeypatch.setattr(calib.shutil, "disk_usage", lambda path: usage._replace(free=per_layer // 2))
    config = LessConfig(sink=2, recent=6, rank=4, hidden=16)
    with pytest.raises(ValueError, match="GB free under"):
        calib.calibrate_less(model, Bytes(), tmp_path / "out", config, training, text="some text " * 40, progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.spill").exists()


def test_feature_maps_module_matches_reference():
    maps = FeatureMaps(16, 4, 2, rank=4, hidden=8).eval()
    with torch.no_grad():
        maps.k_scale.fill_(0.5)
        maps.k_mix_scale.fill_(-0.3)
    q, k = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16)
    w = maps.weights()
    torch.testing.assert_close(maps.phi(q), R.phi(q, w))
    torch.testing.assert_close(maps.psi(k), R.psi(k, w))


def test_quality_benchmark_scores_every_variant_on_the_same_positions():
    """benchmarks/less_quality.py: with a budget that evicts nothing the policy's perplexity is the
    unpatched model's (the full row used to be scored from position 0, the others from the budget on),
    and the gap's share and its standard error follow their definitions."""
    bench = load_script("benchmarks/less_quality.py")
    model = tiny_model("llama")
    windows = [random_ids(1, 24), random_ids(1, 24)]
    config = config_for(model, policy="lambda", sink=2, recent=30, state=False)
    full, policy = bench.window_nll(model, windows, None, 8), bench.window_nll(model, windows, config, 8)
    torch.testing.assert_close(policy, full, rtol=0, atol=1e-5)
    assert bench.window_nll(model, windows, None, 0).mean() != full.mean()
    only, less = torch.tensor([2.0, 2.2, 1.9]), torch.tensor([1.9, 2.1, 1.85])
    share, se = bench.gap_recovered(less, only, torch.tensor([1.5, 1.6, 1.55]))
    e = lambda x: x.mean().exp().item()  # noqa: E731
    assert share == pytest.approx((e(only) - e(less)) / (e(only) - e(torch.tensor([1.5, 1.6, 1.55]))))
    assert 0 < se < 1


def test_state_term_by_folding_equals_its_definition():
    """with_state (bucketed folds + cumulative sum) == query i reading sum over tokens s with
    evict_at[s] <= i of psi(k_s) v_s / psi(k_s), written out with an explicit mask; gradients too."""
    torch.manual_seed(0)
    b, hq, hkv, hs, length, d, r = 2, 4, 2, 4, 50, 8, 3
    q, k, v = torch.randn(b, hq, length, d), torch.randn(b, hkv, length, d), torch.randn(b, hkv, length, d)
    evict_at = R.eviction_times(q, k, R.Policy(1, 4, 3), 0.3)
    o_kept, lse_kept = R.sparse_part(q, k, v, evict_at, 0.3)
    phi_q = torch.rand(b, hq, length, r, requires_grad=True)
    psi_k = torch.rand(b, hs, length, r, requires_grad=True)
    out = R.with_state(o_kept, lse_kept, phi_q, psi_k, v, evict_at)
    evicted = (evict_at[:, :, None, :] <= torch.arange(length)[:, None]).repeat_interleave(hs // hkv, dim=1)
    a = torch.einsum("bhgqr,bhkr->bhgqk", phi_q.view(b, hs, hq // hs, length, r), psi_k) * evicted[:, :, None]
    num = torch.einsum("bhgqk,bhkd->bhgqd", a, v.repeat_interleave(hs // hkv, dim=1)).reshape(b, hq, length, d)
    den = a.sum(-1).reshape(b, hq, length)
    has = evicted.any(-1).repeat_interleave(hq // hs, dim=1)
    lse = torch.logaddexp(lse_kept, torch.where(has, den.clamp_min(R.STATE_FLOOR).log(), float("-inf")))
    expected = o_kept * (lse_kept - lse).exp()[..., None] + torch.where(has[..., None], num * (-lse).exp()[..., None], 0.0)
    assert has.any() and not has.all()
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.pow(2).sum(), [phi_q, psi_k])
    for g, e in zip(grads, torch.autograd.grad(expected.pow(2).sum(), [phi_q, psi_k])):
        torch.testing.assert_close(g, e)


def test_spilled_activations_hold_only_their_window(tmp_path):
    """Activations.add of one window's slice of a captured batch writes that window's bytes, not the
    batch's whole storage (which made disk use and load time grow with --capture-batch)."""
    from kvpress.calibration.less import Activations

    store = Activations(tmp_path, in_memory=False, device="cpu")
    batch = torch.randn(8, 4, 256, 32).transpose(1, 2)  # a strided view, as captured q/k/v are
    store.add(0, 0, {"q": batch[3:4]})
    size = (tmp_path / "layer0" / "0.pt").stat().st_size
    assert size < 1.2 * batch[3:4].numel() * 4
    torch.testing.assert_close(store.load(store.items[0])["q"], batch[3:4])
