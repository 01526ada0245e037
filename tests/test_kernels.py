"""Triton kernels vs their torch references (CPU: Triton interpreter, fp16/fp32; GPU: bf16, longer).

Speed is measured in benchmarks/bench_duo.py, never here.
"""

import pytest
import torch

import kvpress.kernels as kernels
from kvpress.kernels import decode as decode_mod
from kvpress.kernels import reference
from kvpress.kernels.decode import decode_attention
from kvpress.kernels.prefill import BLOCK_N, block_ranges, prefill_attention

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the "CPU" tests run compiled on a GPU machine
CPU_DTYPES = [torch.float32, torch.float16]
MODES = {  # (sink, recent, window)
    "causal": (0, None, None),
    "a_shape": (4, 16, None),
    "window": (0, None, 20),
    "a_shape_window": (3, 10, 30),
}


def ranks(lengths, total):
    """Left-padded ranks [B, total]: row b has lengths[b] real tokens at the end."""
    r = torch.full((len(lengths), total), -1, dtype=torch.int32)
    for b, n in enumerate(lengths):
        r[b, total - n:] = torch.arange(n, dtype=torch.int32)
    return r.to(DEV)


def rand(*shape, dtype, device=DEV):
    return torch.randn(*shape, dtype=torch.float32, device=device).to(dtype)


def check(out, ref, dtype):
    tol = {torch.float32: 1e-4 if out.device.type == "cpu" else 5e-3,  # tf32 dots on the GPU
           torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert torch.isfinite(out).all()
    err = (out.float() - ref.float()).abs().max().item()
    assert err < tol * max(1.0, ref.abs().max().item()), err


def ref_attention(q, k, v, q_rank, k_rank, scale, sink, recent, window):
    return reference.rank_attention(q.double(), k.double(), v.double(), q_rank, k_rank, scale,
                                    sink=sink, recent=recent, window=window)


# ----------------------------------------------------------------------------------------------
# CPU (interpreter) tests


@pytest.mark.parametrize("lengths,total", [([150], 150), ([77, 150], 150)])
@pytest.mark.parametrize("mode", list(MODES))
def test_block_ranges_cover_every_allowed_key(lengths, total, mode):
    sink, recent, window = MODES[mode]
    r = ranks(lengths, total).cpu()
    block_m = 32
    rng, _ = block_ranges(r, r, block_m, BLOCK_N, sink, recent, window)
    allowed = reference.rank_mask(r, r, sink, recent, window)[:, 0]  # [B, Lq, Lk]
    for b in range(r.shape[0]):
        for qb in range(rng.shape[1]):
            lo1, hi1, lo2, hi2, lo3, hi3 = rng[b, qb].tolist()
            covered = torch.zeros(total, dtype=torch.bool)
            for lo, hi in ((lo1, hi1), (max(lo2, hi1), hi2), (lo3, hi3)):
                covered[lo * BLOCK_N:hi * BLOCK_N] = True
            need = allowed[b, qb * block_m:(qb + 1) * block_m].any(0)
            assert not (need & ~covered).any()
            assert hi3 == 0  # sorted keys take the fast path
            if mode == "a_shape" and total - lengths[b] == 0:  # linear cost: few blocks per query block
                assert (hi1 - lo1) + max(0, hi2 - max(lo2, hi1)) <= 1 + (recent + block_m) // BLOCK_N + 2  # sinks + window span


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("hq,hkv", [(4, 2), (3, 3), (6, 2)])
def test_prefill_matches_reference(dtype, mode, hq, hkv):
    torch.manual_seed(0)
    sink, recent, window = MODES[mode]
    B, L, D = 2, 133, 32
    q, k, v = rand(B, hq, L, D, dtype=dtype), rand(B, hkv, L, D, dtype=dtype), rand(B, hkv, L, D, dtype=dtype)
    r = ranks([L, 90], L)
    out = prefill_attention(q, k, v, r, r, 0.3, sink, recent, window)
    ref = ref_attention(q, k, v, r, r, 0.3, sink, recent, window)
    check(out, ref, dtype)
    assert (out[1, :, : L - 90] == 0).all()  # padding queries


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_prefill_odd_head_dim_and_strided_inputs(dtype):
    torch.manual_seed(1)
    B, Hq, Hkv, L, D = 1, 4, 2, 70, 24
    q = rand(B, L, Hq, D, dtype=dtype).transpose(1, 2)  # [B, H, L, D] view of [B, L, H, D]
    big_k, big_v = rand(B, Hkv, 100, D, dtype=dtype), rand(B, Hkv, 100, D, dtype=dtype)
    k, v = big_k[:, :, :L], big_v[:, :, :L]  # views of a preallocated buffer
    r = ranks([L], L)
    out = prefill_attention(q, k, v, r, r, 0.25, 2, 12, None)
    check(out, ref_attention(q, k, v, r, r, 0.25, 2, 12, None), dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_prefill_keys_in_any_order(dtype):
    """Chunked prefill: stream keys = old window in ring order, then the chunk (slow path)."""
    torch.manual_seed(2)
    sink, recent, D, G = 4, 16, 32, 2
    seen = [100, 61]  # tokens already cached per row
    chunk = 40
    # old window: sinks 0..3, then ranks seen-16..seen-1 rotated (ring), then the chunk
    old = torch.stack([torch.cat([torch.arange(sink), (torch.arange(recent) + 5) % recent + s - recent])
                       for s in seen]).int()
    new = torch.stack([torch.arange(s, s + chunk) for s in seen]).int()
    k_rank = torch.cat([old, new], 1).to(DEV)
    k_rank[1, 0] = -1  # an empty slot
    q_rank = new.to(DEV)
    q_rank[1, :3] = -1  # padding queries
    C = k_rank.shape[1]
    q = rand(2, 2 * G, chunk, D, dtype=dtype)
    k, v = rand(2, 2, C, D, dtype=dtype), rand(2, 2, C, D, dtype=dtype)
    rng, _ = block_ranges(q_rank, k_rank, 64, BLOCK_N, sink, recent, None)
    assert (rng[..., 5] > 0).all()  # unsorted: the scanning path
    out = prefill_attention(q, k, v, q_rank, k_rank, 0.3, sink, recent, None)
    check(out, ref_attention(q, k, v, q_rank, k_rank, 0.3, sink, recent, None), dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("group", [1, 4])
def test_decode_matches_reference(dtype, group):
    torch.manual_seed(3)
    B, D, T, C, sink, recent = 3, 32, 333, 21, 4, 16
    hkv = 2
    q = rand(B, hkv * group, 1, D, dtype=dtype)
    full_rank = ranks([T, 200, 1], T)
    q_rank = full_rank[:, -1:].clone()
    fk, fv = rand(B, 1, T, D, dtype=dtype), rand(B, 1, T, D, dtype=dtype)
    # streaming buffer: sinks then a ring of recent keys, some slots empty (-1)
    s_rank = torch.full((B, C), -1, dtype=torch.int32)
    for b, n in enumerate([T, 200, 1]):
        keep = list(range(min(n, sink))) + list(range(max(sink, n - recent), n))
        s_rank[b, : len(keep)] = torch.tensor(keep[::-1], dtype=torch.int32)
    sk, sv = rand(B, 1, C, D, dtype=dtype), rand(B, 1, C, D, dtype=dtype)
    s_rank = s_rank.to(DEV)
    heads_f, heads_s = torch.tensor([1], device=DEV), torch.tensor([0], device=DEV)
    out = decode_attention(q, q_rank, 0.3, group, split=(fk, fv, full_rank, heads_f, 0, None),
                           single=(sk, sv, s_rank, heads_s, sink, recent))
    ref_f = ref_attention(q[:, group:], fk, fv, q_rank, full_rank, 0.3, 0, None, None)
    ref_s = ref_attention(q[:, :group], sk, sv, q_rank, s_rank, 0.3, sink, recent, None)
    check(out[:, group:], ref_f, dtype)
    check(out[:, :group], ref_s, dtype)


def decode_case(lengths, T, C, sink, recent, group, n_f, n_s, dtype):
    """Decode inputs: left-padded rows of ``lengths`` real tokens (0: a row of padding only), ``n_f``
    split (full) KV heads then ``n_s`` single (streaming: sinks + recent window, empty slots -1)."""
    B, D = len(lengths), 32
    full_rank = ranks(lengths, T)
    s_rank = torch.full((B, C), -1, dtype=torch.int32)
    for b, n in enumerate(lengths):
        keep = list(range(min(n, sink))) + list(range(max(sink, n - recent), n))
        s_rank[b, : len(keep)] = torch.tensor(keep[::-1], dtype=torch.int32)
    q = rand(B, (n_f + n_s) * group, 1, D, dtype=dtype)
    split = (rand(B, n_f, T, D, dtype=dtype), rand(B, n_f, T, D, dtype=dtype), full_rank,
             torch.arange(n_f, device=DEV), 0, None)
    single = (rand(B, n_s, C, D, dtype=dtype), rand(B, n_s, C, D, dtype=dtype), s_rank.to(DEV),
              torch.arange(n_f, n_f + n_s, device=DEV), sink, recent)
    return q, full_rank[:, -1:].clone(), split, single


def check_decode(q, q_rank, split, single, group, dtype):
    out = decode_attention(q, q_rank, 0.3, group, split=split, single=single)
    h = split[0].shape[1] * group  # query heads of the split group (the first KV heads)
    (fk, fv, fr, _, _, _), (sk, sv, sr, _, sink, recent) = split, single
    check(out[:, :h], ref_attention(q[:, :h], fk, fv, q_rank, fr, 0.3, 0, None, None), dtype)
    check(out[:, h:], ref_attention(q[:, h:], sk, sv, q_rank, sr, 0.3, sink, recent, None), dtype)
    return out


@pytest.fixture
def many_splits(monkeypatch):
    """Many splits per head even on the interpreter's 4 "SMs"."""
    monkeypatch.setattr(decode_mod, "PROGRAMS_PER_SM", 64)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_decode_twice_with_different_lengths(dtype, many_splits):
    """The cached workspace is reused across calls with other numbers of splits."""
    torch.manual_seed(9)
    group, n_f, n_s = 2, 2, 1
    for T in (333, 700, 333, 20):  # 11, then 22 splits per head, then a single split (no merge)
        q, q_rank, split, single = decode_case([T, T - 10], T, 21, 4, 16, group, n_f, n_s, dtype)
        check_decode(q, q_rank, split, single, group, dtype)
    assert decode_mod._WORKSPACES


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("splits", ["default", "many"])
def test_decode_batch_with_padded_rows(dtype, splits, request):
    """Rows of different lengths, one of one token and one of padding only (zero output)."""
    if splits == "many":
        request.getfixturevalue("many_splits")
    torch.manual_seed(10)
    group, T = 4, 300
    q, q_rank, split, single = decode_case([T, 123, 1, 0], T, 21, 4, 16, group, 2, 2, dtype)
    assert q_rank[-1].item() == -1
    out = check_decode(q, q_rank, split, single, group, dtype)
    assert (out[-1] == 0).all()


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("lq", [1, 37])
@pytest.mark.parametrize("retrieval", [[0, 3], [], [0, 1, 2, 3], [2]])
@pytest.mark.parametrize("new", [False, True])
def test_split_cache_attention_triton_path(dtype, lq, retrieval, new, monkeypatch):
    """The dispatcher's Triton path (forced on CPU) vs the reference, prefill and decode; with
    ``new``, the new tokens' slots hold NaN and are written by the call (the decode kernel itself)."""
    monkeypatch.setattr(kernels, "BACKEND", "triton")
    torch.manual_seed(4)
    B, hkv, G, D, sink, recent = 2, 4, 2, 32, 4, 16
    T = 90 if lq > 1 else 150
    retrieval_heads = torch.tensor(retrieval, dtype=torch.long, device=DEV)
    streaming_heads = torch.tensor([h for h in range(hkv) if h not in retrieval], dtype=torch.long, device=DEV)
    R, S = len(retrieval_heads), len(streaming_heads)
    full_rank = ranks([T, T - 13], T)
    q_rank = full_rank[:, T - lq:].clone()
    buf_k, buf_v = rand(B, R, T + 20, D, dtype=dtype), rand(B, R, T + 20, D, dtype=dtype)
    full_k, full_v = buf_k[:, :, :T], buf_v[:, :, :T]
    if lq > 1:  # first prefill: the stream keys are the prompt itself
        stream_rank = full_rank
    else:  # decode: sink + recent (+1) slots
        stream_rank = torch.cat([torch.arange(sink), torch.arange(T - recent, T), torch.tensor([-1])])[None].repeat(B, 1).int().to(DEV)
        stream_rank[1] -= 13
        stream_rank[1, -1] = -1
    C = stream_rank.shape[1]
    stream_k, stream_v = rand(B, S, C, D, dtype=dtype), rand(B, S, C, D, dtype=dtype)
    q = rand(B, hkv * G, lq, D, dtype=dtype)
    buffers = (full_k, full_v, stream_k, stream_v)
    new_kv = None
    if new:
        new_kv = (rand(B, hkv, lq, D, dtype=dtype), rand(B, hkv, lq, D, dtype=dtype))
        reference.write_new_tokens(new_kv, *buffers, retrieval_heads, streaming_heads)
        expected = [t.clone() for t in buffers]
        for t in buffers:
            t[:, :, -lq:] = float("nan")
    args = (q, full_k, full_v, full_rank, stream_k, stream_v, stream_rank, q_rank,
            retrieval_heads, streaming_heads, 0.3, sink, recent)
    out = kernels.split_cache_attention(*args, new_kv=new_kv)
    if new:
        assert all(torch.equal(t, e) for t, e in zip(buffers, expected))
    ref = reference.split_cache_attention(*[a.double() if torch.is_tensor(a) and a.is_floating_point() else a
                                            for a in args])
    check(out, ref, dtype)


def test_rank_attention_dispatch(monkeypatch):
    torch.manual_seed(5)
    q, k, v = rand(1, 4, 1, 32, dtype=torch.float32), rand(1, 2, 50, 32, dtype=torch.float32), rand(1, 2, 50, 32, dtype=torch.float32)
    r = ranks([50], 50)
    ref = kernels.rank_attention(q, k, v, r[:, -1:], r, 0.3, 2, 8)  # CPU: the reference
    monkeypatch.setattr(kernels, "BACKEND", "triton")
    check(kernels.rank_attention(q, k, v, r[:, -1:], r, 0.3, 2, 8), ref, torch.float32)


# ----------------------------------------------------------------------------------------------
# GPU tests (bf16, longer shapes); skipped without CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("L,lengths", [(4099, [4099]), (2047, [2047, 1500, 3])])
def test_gpu_prefill(mode, L, lengths):
    torch.manual_seed(6)
    sink, recent, window = {"a_shape": (64, 256, None), "a_shape_window": (64, 256, 1000)}.get(mode, MODES[mode])
    B, Hq, Hkv, D = len(lengths), 8, 2, 128
    q, k, v = (rand(B, h, L, D, dtype=torch.bfloat16, device="cuda") for h in (Hq, Hkv, Hkv))
    r = ranks(lengths, L).cuda()
    out = kernels.rank_attention(q, k, v, r, r, D ** -0.5, sink, recent, window)
    check(out, ref_attention(q, k, v, r, r, D ** -0.5, sink, recent, window), torch.bfloat16)


@pytest.mark.gpu
def test_gpu_prefill_offsets_past_two_to_the_31():
    """A chunk's queries over a cache whose last KV head starts past 2**31 elements (8 heads x 2.6M
    keys of 128: 5.4 GB each for K and V; a device_map run at ~2.9M tokens faulted on 32-bit offsets)."""
    torch.manual_seed(8)
    T, Lq, n, D, G = 5 * 2**19, 16, 8, 128, 4
    assert (n - 1) * T * D > 2**31
    k = torch.empty(1, n, T, D, dtype=torch.bfloat16, device="cuda").normal_()
    v = torch.empty_like(k).normal_()
    q = rand(1, n * G, Lq, D, dtype=torch.bfloat16, device="cuda")
    k_rank = torch.arange(T, dtype=torch.int32, device="cuda")[None]
    q_rank = k_rank[:, -Lq:].contiguous()
    out = prefill_attention(q, k, v, q_rank, k_rank, D ** -0.5)
    for slot in (0, n - 1):  # the first head, and the one past 2**31: causal over every key
        heads = slice(slot * G, (slot + 1) * G)
        scores = (q[0, heads].float() @ k[0, slot].float().T) * D ** -0.5  # [G, Lq, T]
        scores.masked_fill_(k_rank[0][None, None, :] > q_rank[0][None, :, None], float("-inf"))
        ref = torch.softmax(scores, dim=-1) @ v[0, slot].float()
        check(out[0, heads], ref, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("lq", [1, 1537])
@pytest.mark.parametrize("num_retrieval", [0, 2, 8])
@pytest.mark.parametrize("group", [4, 1])
def test_gpu_split_cache_attention(lq, num_retrieval, group):
    torch.manual_seed(7)
    B, hkv, D, sink, recent = 2, 8, 128, 64, 256
    T = 1537 if lq > 1 else 20001
    dev = "cuda"
    perm = torch.randperm(hkv)
    retrieval_heads = perm[:num_retrieval].sort().values.to(dev)
    streaming_heads = perm[num_retrieval:].sort().values.to(dev)
    R, S = num_retrieval, hkv - num_retrieval
    full_rank = ranks([T, T - 501], T).to(dev)
    q_rank = full_rank[:, T - lq:].contiguous()
    buf = rand(2, B, R, T + 100, D, dtype=torch.bfloat16, device=dev)
    full_k, full_v = buf[0, :, :, :T], buf[1, :, :, :T]
    if lq > 1:
        stream_rank = full_rank
    else:
        stream_rank = torch.cat([torch.arange(sink), torch.arange(T - recent, T), torch.tensor([-1])])[None].repeat(B, 1).int().to(dev)
        stream_rank[1] -= 501
        stream_rank[1, -1] = -1
    C = stream_rank.shape[1]
    stream_k, stream_v = rand(B, S, C, D, dtype=torch.bfloat16, device=dev), rand(B, S, C, D, dtype=torch.bfloat16, device=dev)
    q = rand(B, hkv * group, lq, D, dtype=torch.bfloat16, device=dev)
    args = (q, full_k, full_v, full_rank, stream_k, stream_v, stream_rank, q_rank,
            retrieval_heads, streaming_heads, D ** -0.5, sink, recent)
    out = kernels.split_cache_attention(*args)
    ref = reference.split_cache_attention(*[a.float() if torch.is_tensor(a) and a.is_floating_point() else a
                                            for a in args])
    check(out, ref, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_decode_in_cuda_graph():
    """Decode (split launch + merge launch) captured in a CUDA graph: every replay (new queries) is exact."""
    torch.manual_seed(9)
    B, hkv, group, D, T = 2, 8, 4, 128, 20001
    dev = "cuda"
    split = (rand(B, 2, T, D, dtype=torch.bfloat16, device=dev), rand(B, 2, T, D, dtype=torch.bfloat16, device=dev),
             ranks([T, T - 501], T).to(dev), torch.tensor([1, 5], device=dev), 0, None)
    q_rank = split[2][:, -1:].contiguous()
    q = rand(B, hkv * group, 1, D, dtype=torch.bfloat16, device=dev)
    heads = (split[3][:, None] * group + torch.arange(group, device=dev)).flatten()
    run = lambda: decode_attention(q, q_rank, D ** -0.5, group, split=split)  # noqa: E731
    run()  # compiles and makes the workspace outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for _ in range(3):
        q.copy_(rand(*q.shape, dtype=torch.bfloat16, device=dev))
        graph.replay()
        ref = ref_attention(q[:, heads], split[0], split[1], q_rank, split[2], D ** -0.5, 0, None, None)
        check(out[:, heads], ref, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_decode_repeated_launches_with_new_tokens():
    """Repeated decodes go through the direct launcher (one compiled kernel for every length and
    stride): each step appends a token through the kernel and matches the reference, in buffers
    that grow (full) and are compacted (window), rows of different lengths."""
    torch.manual_seed(11)
    B, hkv, group, D, sink, recent = 3, 8, 4, 128, 64, 256
    dev, dtype = "cuda", torch.bfloat16
    rh, sh = torch.tensor([0, 5], device=dev), torch.tensor([1, 2, 3, 4, 6, 7], device=dev)
    from kvpress.cache import AppendBuffer, LedgerSpec, TokenLedger, Window

    window = Window(sink, recent)
    ledger = TokenLedger(LedgerSpec(all_ranks=True, windows=(window,)))
    bufs = [AppendBuffer(dim=2) for _ in range(4)]
    lengths = [5000, 4321, 17]
    mask = torch.zeros(B, 5000, dtype=torch.long, device=dev)
    for b, n in enumerate(lengths):
        mask[b, 5000 - n:] = 1
    ledger.begin(mask, B, 5000, dev)
    k, v = rand(B, hkv, 5000, D, dtype=dtype, device=dev), rand(B, hkv, 5000, D, dtype=dtype, device=dev)
    for buf, x, heads in zip(bufs, (k, v, k, v), (rh, rh, sh, sh)):
        buf.append(x.index_select(1, heads))

    def end():
        ledger.end()
        kept = ledger.compaction(window, dev)
        if kept is not None:  # what GroupedLayer.after_forward does
            for buf in bufs[2:]:
                buf.keep(kept, room=ledger.slack[window])

    end()
    compiled_before = set(decode_mod._launch_decode.compiled)
    for step in range(40):
        mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long, device=dev)], dim=1)
        ledger.begin(mask, B, 1, dev)
        new_kv = (rand(B, hkv, 1, D, dtype=dtype, device=dev), rand(B, hkv, 1, D, dtype=dtype, device=dev))
        fk, fv, sk, sv = (buf.reserve(x, heads) for buf, x, heads in zip(bufs, new_kv * 2, (rh, rh, sh, sh)))
        q = rand(B, hkv * group, 1, D, dtype=dtype, device=dev)
        st = ledger.step
        out = kernels.split_cache_attention(q, fk, fv, st.all_rank, sk, sv, st.window_rank[window], st.new_rank, rh, sh,
                                            D ** -0.5, sink, recent, new_kv=new_kv)
        ref = reference.split_cache_attention(q.float(), fk.float(), fv.float(), st.all_rank, sk.float(), sv.float(),
                                              st.window_rank[window], st.new_rank, rh, sh, D ** -0.5, sink, recent)
        check(out, ref, dtype)
        assert torch.equal(fk[:, :, -1], new_kv[0][:, rh, 0]) and torch.equal(sv[:, :, -1], new_kv[1][:, sh, 0])
        end()
    assert len(set(decode_mod._launch_decode.compiled) - compiled_before) <= 1, "one compiled kernel for every step"


@pytest.mark.gpu
def test_gpu_plain_causal_prefill_uses_exact_sdpa():
    """No padding, queries = cache: the SDPA fast path for retrieval heads."""
    torch.manual_seed(8)
    B, hkv, G, L, D = 1, 4, 4, 3001, 128
    dev = "cuda"
    q = rand(B, hkv * G, L, D, dtype=torch.bfloat16, device=dev)
    k, v = rand(B, 2, L, D, dtype=torch.bfloat16, device=dev), rand(B, 2, L, D, dtype=torch.bfloat16, device=dev)
    sk, sv = rand(B, 2, L, D, dtype=torch.bfloat16, device=dev), rand(B, 2, L, D, dtype=torch.bfloat16, device=dev)
    r = ranks([L], L).to(dev)
    args = (q, k, v, r, sk, sv, r, r, torch.tensor([1, 3], device=dev), torch.tensor([0, 2], device=dev),
            D ** -0.5, 64, 256)
    out = kernels.split_cache_attention(*args)
    ref = reference.split_cache_attention(*[a.float() if torch.is_tensor(a) and a.is_floating_point() else a
                                            for a in args])
    check(out, ref, torch.bfloat16)
