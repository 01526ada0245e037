"""LESS Triton kernels (kvpress/kernels/less.py) against the torch reference (kvpress/kernels/less_reference.py).

On CPU the kernels run under the Triton interpreter (tiny shapes, fp32/fp16); the GPU tests (bf16,
Llama-3-8B-like heads) run where CUDA is available."""

import copy
import os

import pytest
import torch
from scripts import load_script

from kvpress.kernels import less as K
from kvpress.kernels import less_reference as R


def run_both(policy, state_heads, dtype, device="cpu", b=2, hq=4, hkv=2, d=16, n=32, r=8, length=11, prompt=7,
             state=True, splits=2, padded=True, resync=False):
    """Prefill ``prompt`` tokens (reference), then decode the rest with the reference and the kernels.
    ``resync``: the kernels start every step from the reference's cache (a copy), so that each step is
    compared from the same state (in bf16/fp16 two near-equal heavy-hitter scores may otherwise pick
    different victims, and the caches part ways); ``run_both.victims`` then lists each step's
    ``(reference victim score, kernels' victim score)`` per (row, KV head) where their choices differ.

    Both get the maps in ``dtype`` (the runtime gives the kernels the model's dtype): feature maps
    from bf16-rounded weights differ from fp32 ones by ~1% (6% of a bf16 state's entries by more
    than 2e-2 after 100 folds, measured with the reference alone), which is the weights' rounding,
    not the kernels' arithmetic (fp32 features and state in both)."""
    torch.manual_seed(1)
    hs = hkv if state_heads == "kv" else hq
    w = R.FeatureWeights.random(hq, hs, d, n, r).to(dtype).to(device)
    q = torch.randn(b, hq, length, d, device=device).to(dtype)
    k = torch.randn(b, hkv, length, d, device=device).to(dtype)
    v = torch.randn(b, hkv, length, d, device=device).to(dtype)
    rank = torch.arange(length, device=device)[None].repeat(b, 1).int()
    if padded:  # row 1 is left-padded by 3 tokens
        rank[1, :3] = -1
        rank[1, 3:] -= 3
    scale = d ** -0.5
    ref = R.LessCache.empty(b, hkv, policy.slots, d, hs, r, dtype, device)
    R.prefill_step(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], rank[:, :prompt], ref, w, policy, scale, state=state)
    tri = copy.deepcopy(ref)
    worst = 0.0
    outs, victims = [], []
    for i in range(prompt, length):
        if resync:
            tri = copy.deepcopy(ref)
        args = (q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], rank[:, i])
        a = R.decode_step(*args, ref, w, policy, scale, state=state)
        out = K.decode_step(*args, tri, w, policy, scale, state=state, splits=splits)
        worst = max(worst, (a.float() - out.float()).abs().max().item())
        outs.append(out.float())
        if resync:
            differ = ref.spare != tri.spare
            score_at = lambda slot: ref.score.gather(2, slot.long()[..., None])[..., 0]  # noqa: E731
            victims += list(zip(score_at(ref.spare)[differ].tolist(), score_at(tri.spare)[differ].tolist()))
    run_both.outputs = torch.cat(outs, 2)  # the kernels' outputs of the decode steps
    run_both.victims = victims
    return ref, tri, worst


@pytest.mark.parametrize("policy", [R.Policy(sink=2, heavy=0, recent=3), R.Policy(sink=0, heavy=3, recent=2)], ids=["lambda", "h2o"])
@pytest.mark.parametrize("state_heads", ["kv", "query"])
def test_decode_step_matches_reference_fp32(policy, state_heads):
    ref, tri, worst = run_both(policy, state_heads, torch.float32)
    assert worst < 1e-5
    assert torch.equal(ref.rank, tri.rank) and torch.equal(ref.spare, tri.spare) and torch.equal(ref.pending, tri.pending)
    torch.testing.assert_close(tri.hs, ref.hs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tri.z, ref.z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tri.score, ref.score, rtol=1e-5, atol=1e-5)
    kept = ref.rank >= 0
    torch.testing.assert_close(tri.k[kept], ref.k[kept])


def test_decode_step_fp16_and_no_state():
    _, _, worst = run_both(R.Policy(sink=0, heavy=3, recent=2), "kv", torch.float16)
    assert worst < 5e-3
    ref, tri, worst = run_both(R.Policy(sink=2, heavy=0, recent=3), "kv", torch.float32, state=False)
    assert worst < 1e-5 and not tri.z.any() and not tri.pending.any()


def test_decode_step_one_split():
    _, _, worst = run_both(R.Policy(sink=1, heavy=2, recent=2), "kv", torch.float32, splits=1)
    assert worst < 1e-5


@pytest.mark.parametrize("policy", [R.Policy(sink=2, heavy=0, recent=90), R.Policy(sink=1, heavy=80, recent=20)],
                         ids=["lambda", "h2o"])
@pytest.mark.parametrize("launch_one", [{}, dict(BLOCK_H=16)], ids=["one-chunk", "two-chunks"])
def test_decode_step_several_splits(policy, launch_one, monkeypatch):
    """More slots than one attention block: several splits per KV head beside the merge program, the
    next spare picked by the last to finish (atomic counter); scratch left zeroed for the next step.
    The 32 hidden units in one feature program or two (``BLOCK_H``)."""
    for setting, value in launch_one.items():
        monkeypatch.setattr(K, setting, value)
    ref, tri, worst = run_both(policy, "query", torch.float32, length=110, prompt=104, splits=3)
    assert worst < 1e-5
    assert torch.equal(ref.rank, tri.rank) and torch.equal(ref.spare, tri.spare) and torch.equal(ref.pending, tri.pending)
    torch.testing.assert_close(tri.hs, ref.hs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tri.score, ref.score, rtol=1e-5, atol=1e-5)
    for ws in K._WORKSPACES.values():
        assert not ws["phi"].any() and not ws["psi"].any() and not ws["count"].any()


def test_decode_step_is_two_launches(monkeypatch):
    """A step is two kernel launches and allocates only its output."""
    launched = []
    for name in ("_step_kernel", "_finish_kernel"):
        kernel = getattr(K, name)
        monkeypatch.setattr(K, name, _Recorder(kernel, name, launched))
    run_both(R.Policy(sink=0, heavy=3, recent=2), "kv", torch.float32, length=9)
    assert launched == ["_step_kernel", "_finish_kernel"] * 2


class _Recorder:
    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        self.log.append(self.name)
        return self.kernel[grid]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("state_heads", ["kv", "query"])
@pytest.mark.parametrize("launch_one", [{}, dict(BLOCK_H=64), dict(MAX_SPLITS=32)],
                         ids=["module-settings", "64-hidden", "32-splits"])
def test_decode_step_gpu(dtype, state_heads, launch_one, monkeypatch):
    """8B-like heads, 100 decode steps after a 300-token prompt, 256-token budget: every step evicts
    and folds. Each step starts from the reference's cache (``resync``): the output and the cache
    after the step agree to the dtype's rounding, and where the two pick different victims the
    scores of both are a near-tie. Both sides get the maps in ``dtype`` (the runtime's); the state
    must matter (the outputs move by more than the tolerance without it). Feature programs of the
    module's size and of 64 hidden units (the size the GPU tests passed with first)."""
    for setting, value in launch_one.items():
        monkeypatch.setattr(K, setting, value)
    shape = dict(device="cuda", b=3, hq=32, hkv=8, d=128, n=512, length=400, prompt=300, splits=None)
    policy = R.Policy(sink=0, heavy=200, recent=56)
    ref, tri, worst = run_both(policy, state_heads, dtype, resync=True, **shape)
    with_state = run_both.outputs
    assert worst < 3e-2
    ties = run_both.victims
    assert len(ties) <= 0.02 * 100 * 3 * 8, ties  # at most 2% of the (step, row, KV head) choices
    for ref_score, tri_score in ties:
        assert abs(ref_score - tri_score) <= 1e-2 * max(1.0, abs(ref_score)), ties
    assert ref.z.min() > 0  # every state head has folded tokens (the prompt's 44 evicted ones, then one per step)
    same = ref.spare == tri.spare  # the last step's cache, where the victims agree
    assert torch.equal(ref.rank[same], tri.rank[same]) and torch.equal(ref.pending[same], tri.pending[same])
    torch.testing.assert_close(tri.hs, ref.hs, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(tri.z, ref.z, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(tri.score, ref.score, rtol=2e-3, atol=2e-3)
    run_both(policy, state_heads, dtype, state=False, resync=True, **shape)
    assert (with_state - run_both.outputs).abs().max() > 10 * 3e-2


@pytest.mark.gpu
@pytest.mark.parametrize("policy", [R.Policy(sink=0, heavy=1024, recent=1024), R.Policy(sink=4, heavy=0, recent=2044)],
                         ids=["h2o", "lambda"])
@pytest.mark.parametrize("launch_one", [{}, dict(MAX_SPLITS=32)], ids=["module-settings", "32-splits"])
def test_decode_step_gpu_several_blocks_per_split(policy, launch_one, monkeypatch):
    """The benchmark's budget (2049 slots on 8B-like heads, bf16): each attention program walks two or
    three 64-slot blocks, so the software pipeline of launch 1's loop runs in its steady state (with the
    257 slots of the tests above every program has one block)."""
    for setting, value in launch_one.items():
        monkeypatch.setattr(K, setting, value)
    shape = dict(device="cuda", b=2, hq=32, hkv=8, d=128, n=512, length=2112, prompt=2100, splits=None)
    ref, tri, worst = run_both(policy, "kv", torch.bfloat16, resync=True, **shape)
    assert worst < 3e-2, worst
    assert len(run_both.victims) <= 0.02 * 12 * 2 * 8, run_both.victims
    same = ref.spare == tri.spare
    assert torch.equal(ref.rank[same], tri.rank[same])
    torch.testing.assert_close(tri.hs, ref.hs, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(tri.score, ref.score, rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["lambda", "h2o", "h2o-no-state", "h2o-one-split"])
def test_decode_step_gpu_parts(dtype, variant, monkeypatch):
    """The step's parts one at a time on the GPU, each step from the reference's cache (fp32: tf32
    dots on the GPU, 1e-5 under the interpreter; bf16: the dtype's rounding): which part, if any,
    differs on the GPU only."""
    policy = R.Policy(sink=4, heavy=0, recent=252) if variant == "lambda" else R.Policy(sink=0, heavy=200, recent=56)
    shape = dict(device="cuda", b=3, hq=32, hkv=8, d=128, n=512, length=340, prompt=300,
                 splits=1 if variant == "h2o-one-split" else None, state=variant != "h2o-no-state")
    _, _, worst = run_both(policy, "kv", dtype, resync=True, **shape)
    assert worst < (5e-3 if dtype == torch.float32 else 3e-2), worst


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("state_heads", ["kv", "query"])
def test_step_kernel_feature_accumulators(device, state_heads, monkeypatch):
    """Launch 1 alone (launch 2 skipped): the feature accumulators hold the second layer's
    pre-activation of phi(q) for every query head and of psi(k) for every pending state head, as
    the reference's ``GELU(x W1) W2`` (fp32), and nothing where no token is pending."""
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the CPU case runs under the interpreter")
    b, hq, hkv, d, n, r = (2, 32, 8, 128, 512, 16) if device == "cuda" else (2, 4, 2, 16, 96, 8)
    hs = hkv if state_heads == "kv" else hq
    torch.manual_seed(0)
    w = R.FeatureWeights.random(hq, hs, d, n, r).to(device)
    policy = R.Policy(sink=0, heavy=6, recent=2)
    cache = R.LessCache.empty(b, hkv, policy.slots, d, hs, r, torch.float32, device)
    cache.k.normal_()
    cache.v.normal_()
    cache.rank.copy_(torch.arange(policy.slots, device=device).int())
    cache.spare.copy_(torch.randint(0, policy.slots, cache.spare.shape, device=device).int())
    cache.pending.copy_((torch.arange(b * hkv, device=device) % 3 != 0).int().view_as(cache.pending))
    q = torch.randn(b, hq, 1, d, device=device)
    kv = torch.randn(b, hkv, 1, d, device=device)
    monkeypatch.setattr(K, "_finish_kernel", _Skip())
    K._WORKSPACES.clear()
    K.decode_step(q, kv, kv, torch.full((b,), policy.slots, device=device), cache, w, policy, d ** -0.5)
    (ws,) = K._WORKSPACES.values()
    K._WORKSPACES.clear()  # launch 2 did not zero them
    pre = lambda x, w1, w2: torch.einsum("bhln,hnr->bhlr", torch.nn.functional.gelu(  # noqa: E731
        torch.einsum("bhld,hdn->bhln", x.float(), w1.float())), w2.float())[:, :, 0]
    torch.testing.assert_close(ws["phi"].view(b, hq, r), pre(q, w.q_w1, w.q_w2), rtol=1e-4, atol=1e-4)
    slot = cache.spare.view(b, hkv).long()
    evicted = cache.k.gather(2, slot[:, :, None, None].expand(b, hkv, 1, d))  # [B, Hkv, 1, D]
    expected = pre(evicted.repeat_interleave(hs // hkv, 1), w.k_w1, w.k_w2)
    pending = cache.pending.view(b, hkv).bool().repeat_interleave(hs // hkv, 1)
    torch.testing.assert_close(ws["psi"].view(b, hs, r), expected * pending[..., None], rtol=1e-4, atol=1e-4)


class _Skip:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def test_bench_launch_one_leaves_the_next_step_right():
    """benchmarks/bench_less.py times launch 1 alone (launch 2 skipped). Launch 1 adds into the feature
    accumulators that launch 2 zeroes, so the bench must zero them after, or the next whole step reads
    the sums of every timed run (its first settings row was off by 0.06-0.13 on the H200 until
    2026-12-01)."""
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("the kernels need a GPU or the interpreter")
    bench = load_script("benchmarks/bench_less.py")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    hq, hkv, d, r, policy = 4, 2, 16, 8, R.Policy(sink=0, heavy=8, recent=8)
    torch.manual_seed(0)
    w = R.FeatureWeights.random(hq, hkv, d, 32, r).to(dev)
    pristine = bench.filled_cache(policy, hq, hkv, d, hkv, r, 64, dev, torch.float32)
    q, k_new, v_new = (torch.randn(1, h, 1, d, device=dev) for h in (hq, hkv, hkv))
    q_rank = torch.full((1,), 64, dtype=torch.int32, device=dev)
    expected = R.decode_step(q, k_new, v_new, q_rank, copy.deepcopy(pristine), w, policy, d ** -0.5)
    cache = copy.deepcopy(pristine)
    bench.launch_one(lambda: K.decode_step(q, k_new, v_new, q_rank, cache, w, policy, d ** -0.5))
    got = K.decode_step(q, k_new, v_new, q_rank, copy.deepcopy(pristine), w, policy, d ** -0.5)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_a_refused_launch_2_leaves_the_next_step_right(monkeypatch):
    """Launch 1 adds into the feature accumulators that launch 2 zeroes, and the accumulators are kept
    per shape: when launch 2 fails (on the H200, a setting that needs more shared memory than there is),
    the next step of that shape, in any dtype, must not read launch 1's sums."""
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("the kernels need a GPU or the interpreter")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    hq, hkv, d, r, policy = 4, 2, 16, 8, R.Policy(sink=0, heavy=8, recent=8)
    torch.manual_seed(0)
    w = R.FeatureWeights.random(hq, hkv, d, 32, r).to(dev)
    cache = load_script("benchmarks/bench_less.py").filled_cache(policy, hq, hkv, d, hkv, r, 64, dev, torch.float32)
    cache.pending.fill_(1)  # launch 1 computes psi of a pending token too
    q, k_new, v_new = (torch.randn(1, h, 1, d, device=dev) for h in (hq, hkv, hkv))
    q_rank = torch.full((1,), 64, dtype=torch.int32, device=dev)
    expected = R.decode_step(q, k_new, v_new, q_rank, copy.deepcopy(cache), w, policy, d ** -0.5)

    class Refused:
        def __getitem__(self, grid):
            raise RuntimeError("out of resource: shared memory")

    with monkeypatch.context() as patch:
        patch.setattr(K, "_finish_kernel", Refused())
        with pytest.raises(RuntimeError, match="out of resource"):
            K.decode_step(q, k_new, v_new, q_rank, copy.deepcopy(cache), w, policy, d ** -0.5)
    got = K.decode_step(q, k_new, v_new, q_rank, copy.deepcopy(cache), w, policy, d ** -0.5)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_bench_settings_rows_name_the_kernels_settings():
    """Every settings row of the LESS benchmarks sets attributes ``kernels.less`` has (the module's own
    row included: ``mock.patch.multiple`` refuses an empty one, and a probe once lost that row on the
    H200), and puts them back."""
    before = dict(vars(K))
    bench, probe = load_script("benchmarks/bench_less.py"), load_script("benchmarks/less_budget_probe.py")
    for settings in [*bench.SETTINGS.values(), *probe.SETTINGS.values()]:
        with bench.kernel_settings(settings):
            assert all(getattr(K, key) == value for key, value in settings.items())
    assert all(vars(K)[key] is value for key, value in before.items())


def prefill_inputs(device, dtype, b=2, hq=4, hkv=2, d=16, slots=9, n=37, seed=0):
    """A prefill chunk after earlier ones: each KV head's kept slots in its own order (ranks below the
    chunk's, some slots empty), ``n`` new tokens, row 1 left-padded by 5."""
    torch.manual_seed(seed)
    q = torch.randn(b, hq, n, d, device=device).to(dtype)
    keys = torch.randn(b, hkv, slots + n, d, device=device).to(dtype)
    values = torch.randn(b, hkv, slots + n, d, device=device).to(dtype)
    kept = torch.stack([torch.randperm(3 * slots)[:slots] for _ in range(b * hkv)]).view(b, hkv, slots).to(device)
    kept[:, :, :2] = -1  # empty slots
    q_rank = (3 * slots + torch.arange(n, device=device))[None].repeat(b, 1)
    q_rank[1, :5] = -1
    ranks = torch.cat([kept, q_rank[:, None, :].expand(b, hkv, n)], dim=2).int()
    return q, keys, values, ranks, q_rank


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float32),
                                          pytest.param("cuda", torch.float32, marks=pytest.mark.gpu),
                                          pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("heads", [(4, 2), (3, 3)], ids=["gqa", "mha"])
def test_prefill_kept_attention(device, dtype, heads):
    """The prefill's attention over kept slots (per-KV-head order, empty slots) and new tokens (causal,
    left padding) and its heavy-hitter mass, against the reference; the mass sums to the number of
    real queries per KV head's query heads (every query's probabilities sum to one). On the GPU at
    the 8B shape's heads (GQA) with 2049 slots and 1500 new tokens."""
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the CPU case runs under the interpreter")
    hq, hkv = heads
    shape = dict(b=2, hq=hq, hkv=hkv, d=16, slots=9, n=37) if device == "cpu" else \
        dict(b=2, hq=8 * hq, hkv=8 * hkv, d=128, slots=2049, n=1500)
    q, keys, values, ranks, q_rank = prefill_inputs(device, dtype, **shape)
    ref = R.kept_attention(q, keys, values, ranks, q_rank, 0.3, heavy=True)
    got = K.kept_attention(q, keys, values, ranks, q_rank, 0.3, heavy=True)
    # the GPU's fp32 dots round to tf32; bf16 rounds the probabilities before the value product
    tol = dict(rtol=1e-4, atol=1e-4) if device == "cpu" else dict(rtol=2e-2, atol=2e-2)
    real = torch.isfinite(ref[1])
    torch.testing.assert_close(got[1], ref[1], **tol)  # -inf where the same
    torch.testing.assert_close(got[0][real], ref[0][real], **tol)
    torch.testing.assert_close(got[2], ref[2], **tol)
    hq, hkv = q.shape[1], keys.shape[1]
    queries = (q_rank >= 0).sum(1).float() * (hq // hkv)
    torch.testing.assert_close(got[2].sum(-1), queries[:, None].expand(-1, hkv), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("policy", [R.Policy(sink=2, heavy=0, recent=5), R.Policy(sink=0, heavy=4, recent=3)],
                         ids=["lambda", "h2o"])
def test_prefill_step_matches_reference(policy, monkeypatch):
    """Two prefill chunks through the kernels' prefill_step (under the interpreter) and the
    reference's: outputs, kept sets, scores and state agree."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs under the interpreter")
    monkeypatch.setenv("KVPRESS_KERNELS", "triton")
    device = "cpu"
    b, hq, hkv, d, n, r, length = 2, 4, 2, 16, 32, 8, 30
    torch.manual_seed(3)
    w = R.FeatureWeights.random(hq, hkv, d, n, r).to(device)
    q, k, v = (torch.randn(b, h, length, d, device=device) for h in (hq, hkv, hkv))
    rank = torch.arange(length, device=device)[None].repeat(b, 1).int()
    rank[1, :3] = -1
    rank[1, 3:] -= 3
    ref = R.LessCache.empty(b, hkv, policy.slots, d, hkv, r, torch.float32, device)
    tri = copy.deepcopy(ref)
    for chunk in (slice(0, 17), slice(17, 26)):
        args = (q[:, :, chunk], k[:, :, chunk], v[:, :, chunk], rank[:, chunk])
        expected = R.prefill_step(*args, ref, w, policy, d ** -0.5)
        out = K.prefill_step(*args, tri, w, policy, d ** -0.5)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
        assert torch.equal(tri.rank, ref.rank) and torch.equal(tri.spare, ref.spare)
        torch.testing.assert_close(tri.score, ref.score, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(tri.hs, ref.hs, rtol=1e-4, atol=1e-4)
