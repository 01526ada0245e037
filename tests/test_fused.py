"""Fused decode ops (kvpress/kernels/fused.py) and their installation (``kvpress.graph.fuse``).

The kernels run under the Triton interpreter on CPU (``BACKEND = "triton"``) at tiny shapes and
must give what transformers' own modules give; ``fuse`` must change only how the model computes
(logits as before, within rounding), and unpatching must put back the same parameters, values and
forwards. On a GPU (tests marked ``gpu``) graph decode with the fused ops gives the tokens of eager
decode with the same ops, and stays close to transformers' own ops."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, apply_rotary_pos_emb

import kvpress
import kvpress.kernels
from kvpress import graph
from kvpress.kernels import fused
from tiny_models import FAMILIES, random_ids, tiny_model


@pytest.fixture
def on_triton(monkeypatch):
    monkeypatch.setattr(kvpress.kernels, "BACKEND", "triton")


def close(a, b, dtype):
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# -- kernels against transformers' modules ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True])
@torch.no_grad()
def test_rms_norm_kernel_equals_transformers(on_triton, dtype, residual):
    torch.manual_seed(0)
    norm = LlamaRMSNorm(48, eps=1e-5).to(dtype)
    norm.weight.normal_()
    x = torch.randn(3, 5, 48, dtype=dtype) * 3
    r = torch.randn(3, 5, 48, dtype=dtype) if residual else None
    expected_h = x + r if residual else x
    expected = norm(expected_h)
    out = fused.rms_norm(x, norm.weight, norm.variance_epsilon, residual=r)
    if residual:
        out, h = out
        close(h, expected_h, dtype)  # bf16: the interpreter truncates where the GPU rounds (test_gpu_*: equal)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    close(out, expected, dtype)
    if dtype == torch.bfloat16:  # a few bf16 steps apart at most (interpreter truncation, variance sum order)
        assert ((out.float() - expected.float()).abs() <= expected.float().abs() * 2 ** -5 + 1e-6).all()


@torch.no_grad()
def test_rms_norm_kernel_on_strided_rows_and_fp32_weight(on_triton):
    torch.manual_seed(1)
    x = torch.randn(4, 2 * 40, dtype=torch.bfloat16)[:, :40]  # rows 80 apart
    w = torch.randn(40)  # fp32 weight times bf16 input: fp32 out, as torch promotes
    out = fused.rms_norm(x, w, 1e-6)
    expected = fused.rms_norm_reference(x, w, 1e-6)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_silu_mul_kernel_equals_transformers_mlp(on_triton, dtype):
    from transformers import LlamaConfig

    torch.manual_seed(2)
    mlp = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=1100)).to(dtype)  # > one 1024 block
    x = torch.randn(2, 3, 32, dtype=dtype)
    gate_up = torch.cat([mlp.gate_proj(x), mlp.up_proj(x)], dim=-1)
    gate, up = gate_up.chunk(2, dim=-1)
    out = mlp.down_proj(fused.silu_mul(gate, up))
    close(out, mlp(x), dtype)
    close(fused.silu_mul(gate, up), mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x), dtype)


def rotary_case(batch, tokens, cos_batch, dtype, device="cpu"):
    """q and k as views of one fused projection output (the layout the attention forward uses)."""
    D, Hq, Hk = 16, 4, 2
    qkv = torch.randn(batch, tokens, (Hq + 2 * Hk) * D, dtype=dtype, device=device)
    q, k, _ = qkv.split([Hq * D, Hk * D, Hk * D], dim=-1)
    q, k = q.view(batch, tokens, Hq, D), k.view(batch, tokens, Hk, D)
    angles = torch.rand(cos_batch, tokens, D // 2, device=device) * 6
    angles = torch.cat([angles, angles], dim=-1)
    return qkv, q, k, angles.cos().to(dtype), angles.sin().to(dtype)


@pytest.mark.parametrize("inplace", [False, True])
@torch.no_grad()
def test_rotary_of_q_alone(on_triton, inplace):
    """``k=None``: the queries only, as with k (Palu rotates its queries alone: its keys are latents)."""
    torch.manual_seed(4)
    _, q, k, cos, sin = rotary_case(2, 3, 2, torch.float32)
    want, _ = fused.rotary_reference(q, k, cos, sin)
    got, none = fused.rotary(q, None, cos, sin, inplace=inplace)
    assert none is None and (got.data_ptr() == q.data_ptr()) == inplace
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("batch, tokens, cos_batch", [(1, 1, 1), (3, 1, 3), (2, 5, 2), (2, 4, 1)])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_rotary_kernel_equals_transformers(on_triton, batch, tokens, cos_batch, inplace, dtype):
    torch.manual_seed(3)
    qkv, q, k, cos, sin = rotary_case(batch, tokens, cos_batch, dtype)
    Hq, Hk, D = q.shape[2], k.shape[2], q.shape[3]
    eq, ek = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # transformers' [B, H, T, D]
    before = qkv.clone()
    oq, ok = fused.rotary(q, k, cos, sin, inplace=inplace)
    tol = dict(rtol=0, atol=0) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)  # bf16: interpreter truncation
    torch.testing.assert_close(oq.transpose(1, 2), eq, **tol)  # the same operations: equal in fp32
    torch.testing.assert_close(ok.transpose(1, 2), ek, **tol)
    if inplace:
        assert oq.data_ptr() == q.data_ptr() and ok.data_ptr() == k.data_ptr()
        torch.testing.assert_close(qkv[..., (Hq + Hk) * D:], before[..., (Hq + Hk) * D:], rtol=0, atol=0)  # v untouched
    else:
        torch.testing.assert_close(qkv, before, rtol=0, atol=0)


@pytest.mark.parametrize("rows, n, k, silu_mul, residual, bias", [
    (1, 40, 64, False, False, False), (3, 33, 300, True, True, True), (2, 16, 512, False, True, False),
    (16, 20, 256, True, False, False), (1, 24, 300, True, True, True)])
@torch.no_grad()
def test_gemv_kernel_equals_linear(on_triton, monkeypatch, rows, n, k, silu_mul, residual, bias):
    """The decode GEMV (float32: the interpreter's bf16 dot is wrong) against F.linear, with the
    SiLU * up prologue and the residual epilogue; more than 16 rows run F.linear."""
    torch.manual_seed(5)
    w, b = torch.randn(n, k), torch.randn(n) if bias else None
    x = torch.randn(rows, 1, 2 * k if silu_mul else k)
    r = torch.randn(rows, 1, n) if residual else None
    expected = fused.linear_reference(x, w, b, r, silu_mul)
    if silu_mul:
        gate, up = x.chunk(2, dim=-1)
        torch.testing.assert_close(expected, torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, w, b)
                                   + (0 if r is None else r))
    torch.testing.assert_close(fused.linear(x, w, b, r, silu_mul), expected, rtol=1e-5, atol=1e-4)
    if not silu_mul:  # RMSNorm in the loads
        nw = torch.randn(k)
        expected = fused.linear_reference(x, w, b, r, norm=(nw, 1e-5))
        torch.testing.assert_close(expected, torch.nn.functional.linear(fused.rms_norm_reference(x, nw, 1e-5), w, b)
                                   + (0 if r is None else r))
        torch.testing.assert_close(fused.linear(x, w, b, r, norm=(nw, 1e-5)), expected, rtol=1e-5, atol=1e-4)
        expected = fused.linear_reference(x, w, b, r, silu_mul)
    if rows == 1:  # the multiply-and-sum path of one row
        monkeypatch.setattr(fused, "GEMV_DOT_ONE_ROW", False)
        torch.testing.assert_close(fused.linear(x, w, b, r, silu_mul), expected, rtol=1e-5, atol=1e-4)
    many = torch.randn(17, k)
    torch.testing.assert_close(fused.linear(many, w), torch.nn.functional.linear(many, w))


@torch.no_grad()
def test_every_launch_asks_for_fma_contraction(on_triton, monkeypatch):
    """Launches pass ``kernels.launch.OPTIONS`` (FMA contraction, on which the kernels were tuned: Triton 3.10 turns it
    off by default), directly and through the decode kernels' ``Launcher``."""
    import triton
    import triton.language as tl

    from kvpress.kernels import launch

    @triton.jit
    def double(X, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(X + i, tl.load(X + i) * 2)

    seen = []
    run = type(double).run

    def recording_run(self, *args, **kwargs):
        seen.append(kwargs.get("enable_fp_fusion"))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(type(double), "run", recording_run)
    torch.manual_seed(7)
    x = torch.randn(3, 32)
    fused.rms_norm(x, torch.randn(32), 1e-6)
    fused.silu_mul(x, x)
    _, q, k, cos, sin = rotary_case(1, 1, 1, torch.float32)
    fused.rotary(q, k, cos, sin)
    fused.linear(x[:1, None], torch.randn(8, 32))
    y = torch.ones(16)
    launch.Launcher(double)("key", (1,), (y,), {"N": 16})
    assert torch.equal(y, torch.full((16,), 2.0)) and seen == [True] * 5


@torch.no_grad()
def test_gemv_per_shape_settings(on_triton, monkeypatch):
    torch.manual_seed(6)
    w, x, r = torch.randn(24, 96), torch.randn(2, 1, 192), torch.randn(2, 1, 24)
    expected = fused.linear_reference(x, w, residual=r, silu_mul=True)
    for tiles in ({None: "cublas"}, {(24, 96): (32, 64, 4, 2, False)}, {(24, 96): "cublas", None: (16, 32, 4, 2, True)}):
        monkeypatch.setattr(fused, "GEMV_TILES", tiles)
        torch.testing.assert_close(fused.linear(x, w, residual=r, silu_mul=True), expected, rtol=1e-5, atol=1e-4)


def test_kernels_leave_autograd_to_the_reference(on_triton):
    w = torch.randn(8, requires_grad=True)
    x = torch.randn(2, 8)
    out = fused.rms_norm(x, w, 1e-6)
    out.sum().backward()  # the reference ran (the kernel has no backward)
    assert w.grad is not None


# -- fuse: installation and exact undo --------------------------------------------------------------


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


WITH_NEXT_NORM = "norm,rotary,mlp,residual,next_norm,qkv,gate_up"


@pytest.mark.parametrize("family, spec", [*((f, "default") for f in FAMILIES), ("llama", WITH_NEXT_NORM),
                                          ("llama", "all"), ("qwen3", "all")])
def test_fuse_keeps_the_logits_and_unpatch_restores_everything(on_triton, family, spec):
    model = tiny_model(family)
    ids = random_ids(2, 7)
    kvpress.patch(model, "dense")
    expected = logits(model, ids)
    state = {name: (p, p.detach().clone(), p.data_ptr()) for name, p in model.named_parameters()}
    keys = list(model.state_dict())
    done = graph.fuse(model._kvpress_patch.patcher, model, spec)
    assert list(model.state_dict()) == keys  # no module registered anywhere new
    norms = 5 + (4 if family == "qwen3" else 0)
    common = {"norm": norms, "rotary": 2, "mlp": 2, "residual": 2, "qkv": 2, "gate_up": 2}
    if spec == "default":
        assert done == common
    elif spec == WITH_NEXT_NORM:  # the layers' last adds fused with the norms after them (the next layer's, the final)
        assert done == {**common, "next_norm": 2}
    else:  # the GEMV and the norms in its loads (then no next_norm: those norms are not called)
        assert done == {**common, "next_norm": 0, "gemv": 2, "gemv_norm": 2}
    attention = model.model.layers[0].self_attn
    joined = attention._kvpress_qkv
    storage = joined.weight.untyped_storage().data_ptr()
    assert attention.q_proj.weight.untyped_storage().data_ptr() == storage  # views, no copy
    calls = []
    rms_norm = fused.rms_norm

    def counted(*args, **kwargs):
        calls.append(kwargs.get("residual") is not None)
        return rms_norm(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(graph.ops, "rms_norm", counted)
        torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)
    if spec == "default":  # per layer: the post-attention norm with the attention's residual add
        assert sum(calls) == 2 and len(calls) == 5 + (4 if family == "qwen3" else 0)
    elif spec == WITH_NEXT_NORM:  # and the next norm with the layer's last add
        assert sum(calls) == 4 and len(calls) == 5 + (4 if family == "qwen3" else 0)
    assert not any(vars(m).get("_kvpress_stash") for m in model.modules())  # each handed over, none left
    kvpress.unpatch(model)
    for name, p in model.named_parameters():
        same, value, ptr = state[name]
        assert p is same and torch.equal(p, value)
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(storages) == len(list(model.parameters())) - model.config.tie_word_embeddings  # each its own again
    for module in model.modules():
        assert not [k for k in vars(module) if k == "forward" or k.startswith("_kvpress")]


@torch.no_grad()
def test_fused_decode_equals_eager_decode_on_cpu(on_triton):
    """Eager decode of a patched model, with and without the fused ops (interpreter kernels): the
    same greedy tokens and logits within float32 rounding, through a padded batch and Duo windows."""
    from cases_duo import gates

    model = tiny_model("llama")
    ids = random_ids(2, 12)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    runs = []
    for fuse in (None, "default", "all"):
        kvpress.patch(model, "duo", config=gates(model, "half"))
        if fuse:
            graph.fuse(model._kvpress_patch.patcher, model, fuse)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        kvpress.unpatch(model)
        runs.append((out.sequences, torch.stack(out.logits, 1)))
    for tokens, logits_ in runs[1:]:
        assert torch.equal(tokens, runs[0][0])
        torch.testing.assert_close(logits_, runs[0][1], rtol=1e-4, atol=1e-4)


def test_a_replaced_weight_is_used_not_the_stale_concatenation(on_triton):
    model = tiny_model("llama")
    ids = random_ids(1, 5)
    kvpress.patch(model, "dense")
    graph.fuse(model._kvpress_patch.patcher, model, "qkv,gate_up")
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    attention.k_proj.weight = torch.nn.Parameter(attention.k_proj.weight.detach() * 2)
    mlp.up_proj.weight.data = mlp.up_proj.weight.detach() * 3
    assert not attention._kvpress_qkv.intact() and not mlp._kvpress_gate_up.intact()
    fused_logits = logits(model, ids)
    kvpress.unpatch(model)
    kvpress.patch(model, "dense")
    torch.testing.assert_close(fused_logits, logits(model, ids), rtol=1e-5, atol=1e-5)
    kvpress.unpatch(model)


def test_fuse_on_a_model_made_under_inference_mode(on_triton):
    """Parameters that are inference tensors (a model built under ``torch.inference_mode``) stay
    inference tensors through the concatenated projections and their undo; before, unpatching left
    normal tensors behind, and the next patched model failed in a projection ("Inference tensors do
    not track version counter")."""
    ids = random_ids(1, 6)
    with torch.inference_mode():
        model = tiny_model("llama")
        kvpress.patch(model, "dense")
        expected = model(ids).logits
        graph.fuse(model._kvpress_patch.patcher, model, "qkv,gate_up")
        attention = model.model.layers[0].self_attn
        assert attention._kvpress_qkv.weight.is_inference()
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
        kvpress.unpatch(model)
        assert all(p.is_inference() for p in model.parameters())
        kvpress.patch(model, "palu", rank_ratio=1.0, group_size=1)  # full rank: the same logits
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-4)
        kvpress.unpatch(model)


def test_fuse_parts_are_checked():
    assert graph.fuse_parts("all") == graph.FUSE_PARTS and graph.fuse_parts("none") == ()
    assert graph.fuse_parts("default") == graph.DEFAULT_PARTS and "gemv" not in graph.DEFAULT_PARTS
    assert graph.fuse_parts("norm,qkv") == ("norm", "qkv")
    with pytest.raises(ValueError, match="unknown fused parts"):
        graph.fuse_parts("norm,layernorm")


def test_graph_decode_fuses_only_on_cuda():
    model = tiny_model("llama")
    kvpress.patch(model, "dense", decode="graph")
    assert "forward" not in vars(model.model.norm)  # CPU: transformers' ops (the static steps equal eager exactly)
    kvpress.unpatch(model)


# -- GPU ------------------------------------------------------------------------------------------


def gpu_model(layers=4):
    from test_graph import gpu_model as build

    return build(layers)


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_fused_ops_stay_close_to_transformers():
    model = gpu_model()
    ids = random_ids(2, 300).cuda()
    kvpress.patch(model, "dense")
    expected = model(ids).logits.float()
    graph.fuse(model._kvpress_patch.patcher, model)
    out = model(ids).logits.float()
    kvpress.unpatch(model)
    assert (out - expected).norm() / expected.norm() < 2e-2
    assert (out.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_kernels_round_as_torch():
    """bf16 on the GPU: rotary within one bf16 step of torch's (round 2 on the H200 found one-step
    differences, not bit equality), the residual add and the norms within a step."""
    torch.manual_seed(4)
    for batch, tokens, cos_batch in [(1, 1, 1), (4, 1, 4), (2, 33, 1)]:
        qkv, q, k, cos, sin = rotary_case(batch, tokens, cos_batch, torch.bfloat16, "cuda")
        eq, ek = fused.rotary_reference(q, k, cos, sin)
        step = 2 ** -7 * max(q.abs().max().item(), k.abs().max().item())  # one bf16 step at the largest value
        oq, ok = fused.rotary(q, k, cos, sin, inplace=True)
        assert (oq.float() - eq.float()).abs().max() <= step and (ok.float() - ek.float()).abs().max() <= step
    norm = LlamaRMSNorm(4096, eps=1e-5).to("cuda", torch.bfloat16)
    norm.weight.normal_()
    x, r = torch.randn(2, 2, 3, 4096, device="cuda", dtype=torch.bfloat16).unbind(0)
    out, h = fused.rms_norm(x, norm.weight, norm.variance_epsilon, residual=r)
    assert ((h.float() - (r + x).float()).abs() <= (r + x).float().abs() * 2 ** -7 + 1e-6).all()
    expected = norm(r + x).float()
    assert ((out.float() - expected).abs() <= expected.abs() * 2 ** -6 + 1e-6).all()
    gate, up = torch.randn(2, 3, 14336, device="cuda", dtype=torch.bfloat16).unbind(0)
    torch.testing.assert_close(fused.silu_mul(gate, up), torch.nn.functional.silu(gate) * up, rtol=1e-2, atol=1e-2)
