"""Palu latent-cache kernels: the Triton decode kernel against the plain-torch reference, and the
reference's own pieces (packing, quantisation, rotation, RoPE) against direct computations."""

import pytest
import torch

from kvpress.kernels import palu_reference as ref
from kvpress.kernels.reference import rank_attention

palu = pytest.importorskip("kvpress.kernels.palu")

# The CPU kernel tests use tiles smaller than the GPU's tl.dot minimum (16): they run under the
# interpreter only; on a GPU machine test_decode_kernel_gpu covers the kernel at real shapes.
interpreter_only = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter shapes; see test_decode_kernel_gpu")


def rope_tables(length: int, dim: int, dtype=torch.float32, theta: float = 10000.0):
    inv = 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim)
    angles = torch.arange(length)[:, None].float() * inv
    return angles.cos().to(dtype), angles.sin().to(dtype)


def make_case(batch=2, hq=8, hkv=4, gs=2, dim=16, rk=12, rv=8, tokens=70, dtype=torch.float32, bits=None,
              quant_group=4, bias=True, norm=True, pad=5, device="cpu", seed=0, stride=1, rope_scale=1.0):
    """Random latents of a left-padded batch (row 1 has ``pad`` padding tokens) and what attention needs.
    Token ``i`` of a row sits at position ``stride * i`` (1: in order, as a cache fills; more: custom
    positions with gaps); the rope tables are scaled by ``rope_scale`` (an attention factor, as YaRN's)."""
    gen = torch.Generator().manual_seed(seed)
    groups = hkv // gs
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    hk, hv = rand(batch, groups, tokens, rk), rand(batch, groups, tokens, rv)
    padding = torch.zeros(batch, tokens, dtype=torch.bool)
    padding[1 % batch, :pad] = True
    k_rank = torch.where(padding, -1, (~padding).int().cumsum(1) - 1).int()
    positions = torch.where(padding, 1, stride * k_rank).long()
    cos, sin = (t * rope_scale for t in rope_tables(stride * tokens + 8, dim, dtype))
    spec = ref.QuantSpec(bits, quant_group) if bits else None

    def latents(h):
        h = h.to(dtype)
        if spec is None:
            return ref.Latents(h.to(device), h.shape[-1])
        words, scale_min = ref.quantize(h, spec)
        return ref.Latents(words.to(device), h.shape[-1], spec, scale_min.to(device))

    on = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    args = dict(
        q=on(rand(batch, hq, 1, dim)), k=latents(hk), v=latents(hv),
        k_up=on(rand(groups, gs * dim, rk) / rk**0.5), v_up=on(rand(groups, gs * dim, rv) / rv**0.5),
        positions=positions.to(device), cos=on(cos), sin=on(sin),
        q_rank=k_rank[:, -1:].clone().to(device), k_rank=k_rank.to(device), scale=dim**-0.5,
        k_bias=on(rand(hkv * dim) * 0.1) if bias else None, v_bias=on(rand(hkv * dim) * 0.1) if bias else None,
        k_norm=(on(rand(dim).abs() + 0.5), 1e-6) if norm else None,
    )
    return args


def settings(monkeypatch, **values):
    """Run the kernel with the module's settings (``TUNED`` emptied) changed to ``values``."""
    monkeypatch.setattr(palu, "TUNED", {})
    for name, value in values.items():
        monkeypatch.setattr(palu, name, value)


# -- reference pieces ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_roundtrip(bits):
    spec = ref.QuantSpec(bits, 4)
    codes = torch.randint(0, 1 << bits, (3, 5, 37), dtype=torch.int32)
    words = ref.pack(codes, spec)
    assert words.dtype == torch.int32 and words.shape[-1] == {2: 3, 3: 3 + 2, 4: 5}[bits]  # 3 bits: 2-bit, 1-bit planes
    assert torch.equal(ref.unpack(words, spec, 37), codes)


def test_pack_puts_neighbouring_channels_sixteen_bits_apart():
    """The words' exact bits: channel 2m at bit m * bits, channel 2m + 1 at bit 16 + m * bits; 3-bit codes as a
    plane of their low 2 bits (16 per word) then one of their high bits (32 per word)."""
    def words(codes, bits):
        packed = ref.pack(torch.tensor(codes, dtype=torch.int32), ref.QuantSpec(bits, len(codes)))
        return [w & 0xFFFFFFFF for w in packed.tolist()]

    assert words(range(1, 9), 4) == [0x86427531]  # channels 0..7 hold 1..8
    assert words([3, 2, 1, 0] * 4, 2) == [0x22227777]  # even channels 3, 1, 3, 1, ..; odd ones 2, 0, ..
    # low bits: channels 0, 1, 3 hold 3, 1, 1 (bits 0, 16, 18), channel 17 holds 2 (the second word's bit 16); the
    # high bits of channels 0, 3, 9 and 17 at bits 0, 16 + 1, 16 + 4 and 16 + 8 of the third word
    assert words([7, 1, 0, 5, 0, 0, 0, 0, 0, 4] + [0] * 7 + [6] + [0] * 14, 3) == [0x00050003, 0x00020000, 0x01120001]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_quantize_error_within_half_step(bits):
    h = torch.randn(2, 3, 50, 16)
    words, scale_min = ref.quantize(h, ref.QuantSpec(bits, 8))
    back = ref.dequantize(words, scale_min, ref.QuantSpec(bits, 8), 16)
    step = scale_min[..., :2].repeat_interleave(8, -1)
    assert ((back - h).abs() <= step / 2 + 1e-5).all()
    assert scale_min.shape[-1] == 4  # two groups: two scales, two minima


def test_hadamard_is_orthonormal():
    for n in (8, 16, 24, 96):
        h = ref.hadamard(n, dtype=torch.float64)
        torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64))


def test_rope_matches_transformers():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cos, sin = rope_tables(40, 16)
    x = torch.randn(2, 3, 7, 16)
    positions = torch.randint(0, 40, (2, 7))
    full_cos = torch.cat([cos[positions]] * 2, -1)
    full_sin = torch.cat([sin[positions]] * 2, -1)
    want, _ = apply_rotary_pos_emb(x, x, full_cos, full_sin)
    torch.testing.assert_close(ref.apply_rope(x, positions, cos, sin), want)


def test_latent_attention_is_attention_over_rebuilt_states():
    """The reference equals dense attention over keys/values computed from the latents directly."""
    a = make_case(bits=None)
    hk, hv = a["k"].data, a["v"].data
    keys = torch.einsum("bgtr,gor->bgto", hk, a["k_up"]).unflatten(-1, (2, 16)).permute(0, 1, 3, 2, 4).flatten(1, 2)
    keys = keys + a["k_bias"].view(1, 4, 1, 16)
    keys = ref.rms_norm(keys, a["k_norm"][0], 1e-6)
    keys = ref.apply_rope(keys, a["positions"], a["cos"], a["sin"])
    values = torch.einsum("bgtr,gor->bgto", hv, a["v_up"]).unflatten(-1, (2, 16)).permute(0, 1, 3, 2, 4).flatten(1, 2)
    values = values + a["v_bias"].view(1, 4, 1, 16)
    want = rank_attention(a["q"], keys, values, a["q_rank"], a["k_rank"], a["scale"])
    torch.testing.assert_close(ref.latent_attention(**a), want)


def test_value_output_folds_the_up_projection():
    a = make_case(bits=None, hq=8, hkv=4, gs=2, rv=8)
    o_lat = torch.randn(2, 8, 1, 8)
    values = ref.value_output(o_lat, a["v_up"], a["v_bias"], num_kv_heads=4)
    per_kv = a["v_up"].reshape(4, 16, 8)
    for h in range(8):
        want = per_kv[h // 2] @ o_lat[:, h, 0].T + a["v_bias"].view(4, 16)[h // 2, :, None]
        torch.testing.assert_close(values[:, h, 0], want.T)


# -- the Triton decode kernel (interpreter on CPU) ----------------------------------------------


@interpreter_only
@pytest.mark.parametrize(
    "shape",
    [
        dict(),  # GQA, 2 groups of 2 KV heads, rank 12 (three 4-wide chunks), bias, k_norm
        dict(gs=1, rk=16, bias=False, norm=False),  # per-head groups, no bias / norm (Llama)
        dict(hq=4, hkv=4, gs=4, rk=8, rv=16, tokens=33),  # MHA, one group of all heads
        dict(batch=1, tokens=1, pad=0),  # a single cached token
    ],
)
@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("query_tile", [16, 8])
def test_decode_kernel_matches_reference(shape, prefetch, query_tile, monkeypatch):
    # with and without the prefetch, query heads padded to 16 or 8
    settings(monkeypatch, PREFETCH=prefetch, QUERY_TILE=query_tile)
    a = make_case(**shape)
    want = ref.latent_attention(**a)
    got = palu.palu_decode(**a, splits=2)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@interpreter_only
@pytest.mark.parametrize("shape", [dict(), dict(hq=4, hkv=4, gs=4, rk=8, rv=16, tokens=33), dict(bits=4, quant_group=4),
                                   dict(pad=40, tokens=70)])
@pytest.mark.parametrize("q_scale,fixed_max", [(1.0, True), (2000.0, True), (1.0, False), (2000.0, False)])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the first pass of a redone split overflows
def test_decode_kernel_fixed_max(shape, q_scale, fixed_max, monkeypatch):
    """One softmax reference per program, the first block's maximum (``FIXED_MAX``), or a running maximum:
    the same output. A row whose first blocks are all padding (``pad=40``) takes 0 as the reference; queries
    scaled by 2000 put later scores far above the first block's (2^64 and more: the split runs again against
    its maximum)."""
    settings(monkeypatch, FIXED_MAX=fixed_max, QUERY_TILE=8, BLOCK_N=16)
    a = make_case(**shape)
    a["q"] = a["q"] * q_scale
    want = ref.latent_attention(**a, window=50)
    got = palu.palu_decode(**a, splits=2, window=50)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@interpreter_only
@pytest.mark.parametrize(
    "shape,extra",
    [
        (dict(), {}),  # GQA: 2 groups of 2 KV heads, bias, k_norm, rank in chunks
        (dict(gs=1, rk=16, bias=False, norm=False), dict(PREFETCH=True)),  # one group per head, hand prefetch
        (dict(hq=4, hkv=4, gs=4, rk=8, rv=16, tokens=33), {}),  # MHA, the program's heads in one group
        (dict(hq=8, hkv=8, gs=1, rk=16, bits=4, quant_group=4), dict(PREFETCH=True)),  # 4-bit words a block ahead
        (dict(hq=8, hkv=8, gs=1, rk=16, bits=3, quant_group=4), dict(PREFETCH=True, PREFETCH_ROWS=False)),  # only words
        (dict(hq=8, hkv=8, gs=1, rk=16, bits=2, quant_group=8), dict(PREFETCH=False)),
        (dict(pad=40, tokens=70), dict(FIXED_MAX=False)),  # a running maximum per head
        (dict(hq=6, hkv=6, gs=1, rk=16), {}),  # 6 KV heads: 4 per program does not divide, so 1
    ],
)
@pytest.mark.parametrize("heads", [2, 4])
@pytest.mark.parametrize("rows", ["tables", "per slot"])
def test_decode_kernel_heads_per_program(shape, extra, heads, rows, monkeypatch):
    """Several KV heads per program (``HEADS_PER_PROGRAM``: one load of each block's rope rows, ranks and
    masks, a softmax state per head): the reference's output, with the window, a padded row and two splits."""
    settings(monkeypatch, HEADS_PER_PROGRAM=heads, QUERY_TILE=8, BLOCK_N=16, **extra)
    a = make_case(**shape)
    want = ref.latent_attention(**a, window=40)
    if rows == "per slot":
        a["cos"], a["sin"] = rows_with_room(a["positions"], a["cos"], a["sin"])
    torch.testing.assert_close(palu.palu_decode(**a, splits=2, window=40), want, atol=2e-5, rtol=1e-4)


@interpreter_only
@pytest.mark.parametrize(
    "shape,extra",
    [
        (dict(), {}),  # groups of two KV heads, key bias
        (dict(bias=False), dict(HEADS_PER_PROGRAM=2)),
        (dict(dtype=torch.float16), dict(ROPE_IN_DTYPE=True)),  # the weighted sum in the model's dtype
        (dict(dtype=torch.float16, gs=1), dict(ROPE_IN_DTYPE=False)),
        (dict(gs=1, bits=4, quant_group=4), dict(PREFETCH=True, PREFETCH_ROWS=False)),
        (dict(gs=1, bits=3, quant_group=4, pad=40), dict(FIXED_MAX=False)),
        (dict(rk=12), {}),  # a rank of three chunks: keys rotated as with more query heads
    ],
)
@pytest.mark.parametrize("rows", ["tables", "per slot"])
def test_decode_kernel_folds_the_query(shape, extra, rows, monkeypatch):
    """One query head per KV head and no ``k_norm`` (``FOLD_QUERY``): the query folded into the up rows, the
    score as the rope rows' weighted sum of its products with the keys; the reference's output (a window, a
    padded row, two splits)."""
    settings(monkeypatch, FOLD_QUERY=True, QUERY_TILE=8, BLOCK_N=16, **extra)
    a = make_case(**{**dict(hq=4, hkv=4, gs=2, rk=16, norm=False), **shape})
    want = ref.latent_attention(**a, window=50)
    if rows == "per slot":
        a["cos"], a["sin"] = rows_with_room(a["positions"], a["cos"], a["sin"])
    tol = dict(atol=2e-5, rtol=1e-4) if a["q"].dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(palu.palu_decode(**a, splits=2, window=50), want, **tol)


@interpreter_only
@pytest.mark.parametrize("window", [None, 3, 0])
def test_decode_kernel_padding_row_attends_to_nothing(window):
    """A row of padding only (its query of rank -1) attends to no key: zeros plus the value bias, as the reference;
    the other row is unchanged (with a window of 0 tokens no row attends to any key)."""
    a = make_case(pad=70, tokens=70)
    a["q_rank"] = a["k_rank"][:, -1:].clone()
    assert a["q_rank"][1].item() == -1
    want = ref.latent_attention(**a, window=window)
    torch.testing.assert_close(palu.palu_decode(**a, splits=2, window=window), want, atol=2e-5, rtol=1e-4)


@interpreter_only
@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the first pass of a redone split overflows
def test_decode_kernel_redoes_a_split_for_one_head(heads, monkeypatch):
    """With one softmax reference per program (``FIXED_MAX``) a split runs again when any of its heads'
    maxima lies far from the reference: here only the first KV head's queries are scaled (2^64 and more above
    the first block), so with two heads per program the other head's split is redone too, with the same result."""
    settings(monkeypatch, HEADS_PER_PROGRAM=heads, FIXED_MAX=True, QUERY_TILE=8, BLOCK_N=16)
    a = make_case(hq=4, hkv=4, gs=1, rk=16)
    a["q"][:, :1] *= 2000.0
    torch.testing.assert_close(palu.palu_decode(**a, splits=2), ref.latent_attention(**a), atol=2e-5, rtol=1e-4)


@interpreter_only
@pytest.mark.parametrize("bits,quant_group,rk,rv", [(4, 4, 16, 8), (3, 4, 12, 12), (2, 8, 16, 8), (4, 8, 16, 16),
                                                    (2, 16, 32, 16), (4, 4, 24, 16), (3, 8, 32, 16), (3, 4, 48, 16)])
@pytest.mark.parametrize("prefetch", ["all", "words", False])
def test_decode_kernel_dequantises_in_the_pass(bits, quant_group, rk, rv, prefetch, monkeypatch):
    """Word-by-word dequantisation (whole words per tile: (4, 8, 16, 16), (2, 16, 32, 16), keys of (4, 4, 16, 8);
    3 bits: both planes, (3, 8, 32, 16), and keys in chunks of 16 channels, half a word of high bits each,
    (3, 4, 48, 16)), per-channel gathers otherwise (ragged ranks); words, scales, ranks and rope rows loaded a
    block ahead by hand (``PREFETCH``; ``"words"``: only the words and scales, ``PREFETCH_ROWS=False``) or in the
    step that uses them."""
    settings(monkeypatch, PREFETCH=bool(prefetch), PREFETCH_ROWS=prefetch == "all")
    a = make_case(bits=bits, quant_group=quant_group, rk=rk, rv=rv)
    if (rk, rv) in ((16, 16), (32, 16), (48, 16)):
        assert palu._fast_dequant(a["k"], palu._chunk(rk)) and palu._fast_dequant(a["v"], 16)
    torch.testing.assert_close(palu.palu_decode(**a), ref.latent_attention(**a), atol=2e-5, rtol=1e-4)


@interpreter_only
@pytest.mark.parametrize("rope_in_dtype", [False, True])
def test_decode_kernel_fp16_window_and_padding_query(rope_in_dtype, monkeypatch):
    settings(monkeypatch, ROPE_IN_DTYPE=rope_in_dtype)
    a = make_case(dtype=torch.float16, tokens=45)
    a["q_rank"][1] = -1  # a padding query: zero output
    want = ref.latent_attention(**a, window=9)
    got = palu.palu_decode(**a, window=9, splits=3)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    assert got[1].abs().max() == 0


@interpreter_only
@pytest.mark.parametrize("case", [dict(stride=3), dict(rope_scale=1.25), dict(pad=40, tokens=70)])
def test_decode_kernel_positions_and_scaled_tables(case):
    """Each token rotated at its own position: positions with gaps, tables scaled by an attention
    factor, a row that is mostly padding."""
    a = make_case(**case)
    torch.testing.assert_close(palu.palu_decode(**a, splits=2), ref.latent_attention(**a), atol=2e-5, rtol=1e-4)


def rows_with_room(positions, cos, sin, room=5):
    """``ref.rope_rows`` as views of ``[B, T + room, D / 2]`` buffers (rows per slot with room to grow)."""
    views = []
    for rows in ref.rope_rows(positions, cos, sin):
        buffer = torch.full((rows.shape[0], rows.shape[1] + room, rows.shape[2]), 7.0, dtype=rows.dtype,
                            device=rows.device)
        views.append(buffer[:, : rows.shape[1]].copy_(rows))
    return views


def test_rope_rows_per_slot_are_the_tables_at_the_positions():
    a = make_case(stride=3)
    keys = torch.randn(2, 4, 70, 16)
    cos, sin = ref.rope_rows(a["positions"], a["cos"], a["sin"])
    assert cos.shape == (2, 70, 8)
    torch.testing.assert_close(ref.apply_rope(keys, a["positions"], cos, sin),
                               ref.apply_rope(keys, a["positions"], a["cos"], a["sin"]))


def test_rope_inputs_that_do_not_fit_are_refused():
    a = make_case()
    with pytest.raises(ValueError, match="need the positions"):
        ref.latent_attention(**{**a, "positions": None})
    with pytest.raises(ValueError, match="need the positions"):
        palu.palu_decode(**{**a, "positions": None})
    cos, sin = ref.rope_rows(a["positions"], a["cos"], a["sin"])
    with pytest.raises(ValueError, match="rope rows per slot must be"):
        palu.palu_decode(**{**a, "cos": cos[:, :-1], "sin": sin[:, :-1]})  # a slot short


@interpreter_only
@pytest.mark.parametrize("shape", [dict(stride=3), dict(bits=4, quant_group=4, rk=16, rv=8), dict(hq=4, hkv=4, gs=4)])
@pytest.mark.parametrize("prefetch", [False, True])
def test_decode_kernel_rope_rows_per_slot(shape, prefetch, monkeypatch):
    """The rope rows given per slot (``[B, T, D / 2]`` views with room, ``ROPE_BY_SLOT``) instead of
    tables gathered by position: the same result as the reference with the tables."""
    settings(monkeypatch, PREFETCH=prefetch, QUERY_TILE=8)
    a = make_case(**shape)
    want = ref.latent_attention(**a)
    a["cos"], a["sin"] = rows_with_room(a["positions"], a["cos"], a["sin"])
    torch.testing.assert_close(palu.palu_decode(**a, splits=2), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("bits,group,rank", [(4, 32, 64), (4, 4, 24), (3, 4, 48), (3, 8, 40), (2, 8, 64), (2, 16, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("device", [pytest.param("cpu", marks=interpreter_only), pytest.param("cuda", marks=pytest.mark.gpu)])
def test_quantize_kernel_is_the_reference_bit_for_bit(bits, group, rank, dtype, device):
    """The one-launch quantisation of new latents: the reference's codes, scales and minima exactly (a
    flat group with scale 0, values that round half-way, a row of zeros)."""
    gen = torch.Generator().manual_seed(bits * 100 + group)
    h = torch.randn(2, 3, 7, rank, generator=gen) * torch.rand(2, 3, 7, 1, generator=gen) * 4
    h[0, 0, 0, :group] = 1.5
    h[0, 0, 1] = 0.0
    h[1, 2, 3, :group] = torch.arange(group) * 0.5  # codes on the half steps
    h = h.to(dtype).to(device)
    spec = ref.QuantSpec(bits, group)
    words, scale_min = palu.quantize(h, spec)
    want_words, want_scale_min = ref.quantize(h, spec)
    assert torch.equal(scale_min, want_scale_min)
    assert torch.equal(words, want_words)


@pytest.mark.parametrize("bits,group,rank", [(4, 32, 64), (3, 4, 48), (2, 8, 40)])
@pytest.mark.parametrize("device", [pytest.param("cpu", marks=interpreter_only), pytest.param("cuda", marks=pytest.mark.gpu)])
def test_quantize_at_writes_the_slot_of_the_storages(bits, group, rank, device):
    """A static decode step's write: the new token's codes, scales and minima land at the slot the device
    holds, bit for bit the reference's, and nothing else in the storages changes."""
    gen = torch.Generator().manual_seed(bits)
    h = (torch.randn(2, 3, 1, rank, generator=gen) * 3).to(torch.bfloat16).to(device)
    spec = ref.QuantSpec(bits, group)
    words = torch.randint(-2**31, 2**31 - 1, (2, 3, 9, spec.words(rank)), generator=gen, dtype=torch.int32).to(device)
    scale_min = torch.randn(2, 3, 9, 2 * rank // group, generator=gen).to(torch.bfloat16).to(device)
    want_words, want_scale_min = words.clone(), scale_min.clone()
    slot = torch.tensor([5], device=device)
    codes, scales = ref.quantize(h, spec)
    want_words.index_copy_(2, slot, codes)
    want_scale_min.index_copy_(2, slot, scales)
    palu.quantize_at(h, spec, words, scale_min, slot)
    assert torch.equal(words, want_words) and torch.equal(scale_min, want_scale_min)


def test_quantize_at_refuses_several_tokens_and_strided_storages():
    spec = ref.QuantSpec(4, 8)
    words, scale_min = torch.zeros(1, 1, 4, 2, dtype=torch.int32), torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="one new token"):
        palu.quantize_at(torch.randn(1, 1, 2, 16), spec, words, scale_min, torch.tensor([0]))
    with pytest.raises(ValueError, match="contiguous"):
        palu.quantize_at(torch.randn(1, 1, 1, 16), spec, words[:, :, ::2], scale_min, torch.tensor([0]))


def test_quantize_refuses_a_group_that_does_not_divide_the_rank():
    h = torch.randn(2, 24)
    for quantize in (ref.quantize, palu.quantize):
        with pytest.raises(ValueError, match="does not divide the latent rank 24"):
            quantize(h, ref.QuantSpec(4, 16))


@interpreter_only
@pytest.mark.parametrize("used", [10, 50, 70])
@pytest.mark.parametrize("bits", [None, 4])
def test_decode_kernel_static_length(used, bits, monkeypatch):
    """A static decode step: buffers of 70 slots of which ``length`` (on the device) are in use and the rest
    zeros, as the runtime leaves them. Whole blocks of 16 tokens are read (``WHOLE_BLOCKS``): a last block
    short of 16 reads the whole block ending at the length, and fewer than 16 tokens read zeros past it."""
    settings(monkeypatch, BLOCK_N=16, QUERY_TILE=8)
    a = make_case(bits=bits, quant_group=4, rk=16, rv=8, tokens=70)
    a["cos"], a["sin"] = ref.rope_rows(a["positions"], a["cos"], a["sin"])
    cut = dict(a, positions=a["positions"][:, :used], k_rank=a["k_rank"][:, :used], q_rank=a["k_rank"][:, used - 1:used],
               cos=a["cos"][:, :used], sin=a["sin"][:, :used])
    for side in ("k", "v"):
        x = a[side]
        cut[side] = ref.Latents(x.data[:, :, :used], x.rank, x.quant,
                                None if x.scale_min is None else x.scale_min[:, :, :used])
        x.data[:, :, used:] = 0
        if x.scale_min is not None:
            x.scale_min[:, :, used:] = 0
    a["q_rank"] = cut["q_rank"].clone()
    got = palu.palu_decode(**a, splits=3, length=torch.tensor([used], dtype=torch.int32))
    torch.testing.assert_close(got, ref.latent_attention(**cut), atol=2e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype,bits,gs,qpk,rk,rv,variant",
    [
        (torch.bfloat16, None, 1, 4, 64, 64, "tuned"),  # Llama-3-8B at 50%, groups of one KV head
        (torch.bfloat16, None, 1, 4, 64, 64, "prefetch"),
        (torch.bfloat16, 4, 1, 4, 64, 64, "tuned"),  # 4-bit, word-by-word dequantisation
        (torch.bfloat16, 4, 1, 4, 64, 64, "no-prefetch"),
        (torch.bfloat16, 4, 1, 4, 64, 64, "rope-in-dtype"),
        (torch.bfloat16, 4, 1, 1, 64, 64, "tuned"),  # MHA
        (torch.float16, 4, 1, 4, 64, 64, "tuned"),  # fp16 codes from their bits
        (torch.bfloat16, 2, 1, 4, 64, 64, "tuned"),  # 2-bit pairs
        (torch.float16, 2, 1, 1, 64, 64, "tuned"),
        (torch.bfloat16, None, 1, 1, 96, 96, "tuned"),  # ragged rank: three chunks, padded value tile
        (torch.float16, 3, 4, 4, 224, 256, "tuned"),  # 3-bit, wide groups (rank 224: chunks of 32)
        (torch.bfloat16, 3, 1, 4, 64, 64, "tuned"),  # 3-bit planes, word by word
        (torch.bfloat16, 3, 1, 1, 64, 64, "tuned"),
        (torch.float16, 3, 1, 4, 64, 64, "tuned"),
        (torch.float16, None, 2, 4, 128, 128, "tuned"),
        (torch.bfloat16, 2, 4, 4, 256, 256, "prefetch"),  # rank chunks of 2-bit words
        (torch.bfloat16, None, 1, 4, 64, 64, "rope-in-fp32"),
        (torch.bfloat16, None, 1, 4, 64, 64, "query-tile-16"),  # wgmma for the score and value dots
        (torch.bfloat16, 4, 1, 4, 64, 64, "query-tile-16"),
        (torch.bfloat16, None, 1, 4, 64, 64, "uncapped"),  # no register cap, two programs per SM
        (torch.float16, None, 1, 1, 64, 64, "tuned"),
        (torch.bfloat16, None, 1, 4, 64, 64, "rope-by-slot"),  # rope rows per slot, loaded a block ahead
        (torch.bfloat16, 4, 1, 4, 64, 64, "rope-by-slot"),
        (torch.bfloat16, None, 1, 1, 64, 64, "rope-by-slot"),
        (torch.bfloat16, None, 1, 4, 64, 64, "running-max"),  # a running maximum, not one reference per program
        (torch.bfloat16, 4, 1, 4, 64, 64, "running-max"),
        (torch.bfloat16, None, 1, 1, 64, 64, "running-max"),
        (torch.bfloat16, None, 1, 4, 64, 64, "heads-2"),  # two KV heads per program, at 3 and 2 stages
        (torch.bfloat16, None, 1, 1, 64, 64, "heads-2"),
        (torch.bfloat16, None, 1, 1, 64, 64, "heads-2-stages-2"),
        (torch.float16, None, 2, 1, 64, 64, "heads-2"),
        (torch.bfloat16, 4, 1, 1, 64, 64, "heads-2"),
        (torch.bfloat16, None, 1, 4, 96, 96, "heads-2"),  # ragged rank: chunks
        (torch.bfloat16, 4, 1, 4, 64, 64, "words-ahead"),  # only the quantised words a block ahead by hand
        (torch.bfloat16, 3, 1, 1, 64, 64, "words-ahead"),
        (torch.float16, 2, 1, 4, 64, 64, "words-ahead"),
        (torch.bfloat16, 4, 1, 1, 64, 64, "words-ahead-heads-2"),
        (torch.bfloat16, None, 1, 1, 64, 64, "fold"),  # MHA without k_norm: the query folded into the up rows
        (torch.bfloat16, None, 1, 1, 64, 64, "fold-rope-by-slot"),
        (torch.bfloat16, None, 1, 1, 64, 64, "fold-rope-in-fp32"),
        (torch.bfloat16, None, 1, 1, 64, 64, "fold-three-per-sm"),
        (torch.float16, None, 2, 1, 64, 64, "fold"),
        (torch.bfloat16, 4, 1, 1, 64, 64, "fold"),
        (torch.bfloat16, 3, 1, 1, 64, 64, "fold"),
        (torch.float16, 2, 1, 1, 64, 64, "fold"),
        (torch.bfloat16, None, 1, 1, 64, 64, "no-fold"),
    ],
)
def test_decode_kernel_gpu(dtype, bits, gs, qpk, rk, rv, variant, monkeypatch):
    """The measured settings (``TUNED``), and each optional path changed on its own."""
    changed = {"prefetch": dict(PREFETCH=True), "no-prefetch": dict(PREFETCH=False),
               "rope-in-dtype": dict(ROPE_IN_DTYPE=True), "rope-in-fp32": dict(ROPE_IN_DTYPE=False),
               "query-tile-16": dict(QUERY_TILE=16), "uncapped": dict(MAX_REGISTERS=0, PROGRAMS_PER_SM=2),
               "running-max": dict(FIXED_MAX=False), "heads-2": dict(HEADS_PER_PROGRAM=2),
               "heads-2-stages-2": dict(HEADS_PER_PROGRAM=2, NUM_STAGES=2),
               "words-ahead": dict(PREFETCH=True, PREFETCH_ROWS=False),
               "words-ahead-heads-2": dict(PREFETCH=True, PREFETCH_ROWS=False, HEADS_PER_PROGRAM=2, NUM_STAGES=2),
               "fold": dict(FOLD_QUERY=True), "fold-rope-by-slot": dict(FOLD_QUERY=True),
               "fold-rope-in-fp32": dict(FOLD_QUERY=True, ROPE_IN_DTYPE=False),
               "fold-three-per-sm": dict(FOLD_QUERY=True, NUM_STAGES=2, PROGRAMS_PER_SM=3, MAX_REGISTERS=168),
               "no-fold": dict(FOLD_QUERY=False),
               }.get(variant, {})
    settings(monkeypatch, **{**palu.settings(bits or 0, qpk), **changed})
    hkv = 8
    a = make_case(batch=3, hq=hkv * qpk, hkv=hkv, gs=gs, dim=128, rk=rk, rv=rv, tokens=3000, dtype=dtype,
                  bits=bits, quant_group=32, pad=700, device="cuda", norm="fold" not in variant)
    want = ref.latent_attention(**a)
    if variant.endswith("rope-by-slot"):
        a["cos"], a["sin"] = rows_with_room(a["positions"], a["cos"], a["sin"])
    got = palu.palu_decode(**a)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_decode_kernel_launches_directly_after_the_first_call():
    """A second decode with the same key (kernels/launch.py) and more tokens goes through the kept compiled
    launcher on a tested Triton version and still matches the reference; other versions launch plainly."""
    import triton

    from kvpress.kernels import launch

    palu._launch_palu_decode.compiled.clear()
    for tokens in (3000, 3100):
        a = make_case(batch=2, hq=32, hkv=8, gs=1, dim=128, rk=64, rv=64, tokens=tokens, dtype=torch.bfloat16, bits=4,
                      quant_group=32, pad=300, device="cuda", norm=False)
        torch.testing.assert_close(palu.palu_decode(**a).float(), ref.latent_attention(**a).float(), atol=2e-2, rtol=2e-2)
    assert bool(palu._launch_palu_decode.compiled) == triton.__version__.startswith(launch.TESTED_TRITON)


@interpreter_only
def test_decode_kernel_reads_buffers_with_room():
    """Latents, scales, positions and ranks as views of larger buffers (append buffers with room to
    grow along the tokens): read in place, same result."""
    a = make_case(bits=4, quant_group=4, rk=16, rv=8, tokens=40)
    want = ref.latent_attention(**a)

    def roomy(x, dim):
        size = list(x.shape)
        size[dim] += 13
        buffer = torch.full(size, 7, dtype=x.dtype)
        view = buffer.narrow(dim, 0, x.shape[dim])
        view.copy_(x)
        return view

    for side in ("k", "v"):
        a[side] = ref.Latents(roomy(a[side].data, 2), a[side].rank, a[side].quant, roomy(a[side].scale_min, 2))
    a["positions"], a["k_rank"] = roomy(a["positions"], 1), roomy(a["k_rank"], 1)
    assert not a["k"].data.is_contiguous()
    assert palu._rows(a["k"].data) is a["k"].data  # no copy
    torch.testing.assert_close(palu.palu_decode(**a, splits=2), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("elt", [2, 4])
@pytest.mark.parametrize("bits", [0, 4, 3, 2])
def test_plans_fit_shared_memory(bits, elt):
    """Every rank the runtime meets (head dim 128, groups of 1-4 KV heads, up to 512 per group) has a
    plan whose estimate fits the budget, and the budget leaves room under the H200's 227 KB."""
    assert palu.SMEM_BUDGET <= 200 * 1024
    for rk in (32, 64, 96, 128, 192, 224, 256, 384, 512):
        for rv in (32, 64, 128, 256, 512):
            if elt == 4 and bits and rk + rv > 512:
                continue  # fp32 models with quantised wide groups fall back to the reference
            found = palu.plans(128, rk, rv, bits, bits, elt)
            assert found, (rk, rv, bits, elt)
            assert all(palu.smem_estimate(n, s, 128, rk, rv, bits, bits, elt) <= palu.SMEM_BUDGET for n, s in found)
    # Llama-3-8B at 50% rank with groups of one KV head, bf16: the largest tile, the deepest pipeline
    assert palu.plans(128, 64, 64, 0, 0, 2)[0] == (64, 3)


@interpreter_only
def test_decode_retries_a_smaller_plan_when_out_of_shared_memory(monkeypatch):
    import triton

    a = make_case(gs=1, rk=16, bias=False, norm=False)
    want = ref.latent_attention(**a)
    tried = []
    launch = palu._launch_decode

    def flaky(*args):
        tried.append(args[14:16])  # (block_n, stages)
        if len(tried) == 1:
            raise triton.runtime.OutOfResources(300000, 232448, "shared memory")
        return launch(*args)

    monkeypatch.setattr(palu, "_launch_decode", flaky)
    monkeypatch.setattr(palu, "_CHOSEN", {})
    torch.testing.assert_close(palu.palu_decode(**a, splits=2), want, atol=2e-5, rtol=1e-4)
    assert len(tried) == 2 and tried[1] != tried[0]
    assert list(palu._CHOSEN.values()) == [(*tried[1], 1)]  # (block_n, stages, KV heads per program)
