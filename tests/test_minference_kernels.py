"""MInference indices and kernels: the torch references against naive loops, the Triton kernels
against the references (CPU: interpreter, fp16/fp32, tiny shapes; GPU: bf16, longer)."""

import math

import pytest
import torch

from kvpress.kernels import minference as M
from kvpress.kernels import minference_reference as R

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def ranks(lengths, total):
    """Left-padded ranks [B, total]: row b has lengths[b] real tokens at the end."""
    r = torch.full((len(lengths), total), -1, dtype=torch.int32)
    for b, n in enumerate(lengths):
        r[b, total - n:] = torch.arange(n, dtype=torch.int32)
    return r.to(DEV)


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEV).to(dtype)


def check(out, ref, dtype):
    tol = {torch.float32: 1e-4 if out.device.type == "cpu" else 5e-3, torch.float16: 2e-3,
           torch.bfloat16: 1.6e-2}[dtype]
    assert torch.isfinite(out).all()
    err = (out.double() - ref.double()).abs().max().item()
    assert err < tol * max(1.0, ref.abs().max().item()), err


def case(lengths, T, Lq, hq=4, hkv=2, D=32, dtype=torch.float32, seed=0):
    """Chunked, left-padded inputs: rows of ``lengths`` real tokens, the last ``Lq`` are queries."""
    torch.manual_seed(seed)
    k_rank = ranks(lengths, T)
    q_rank = k_rank[:, -Lq:].contiguous()
    B = len(lengths)
    return (rand(B, hq, Lq, D, dtype=dtype), rand(B, hkv, T, D, dtype=dtype), rand(B, hkv, T, D, dtype=dtype),
            q_rank, k_rank)


# ----------------------------------------------------------------------------------------------
# References against naive loops


def test_vs_scores_match_naive_loops():
    q, k, _, q_rank, k_rank = case([150, 120], 150, 100)
    vertical, slash = R.vs_scores(q, k, q_rank, k_rank, 0.3)
    for b in range(2):
        qr, kr = q_rank[b, -64:].tolist(), k_rank[b].tolist()
        for h in range(4):
            p = torch.zeros(64, 150)
            for r in range(64):
                s = torch.tensor([(q[b, h, 36 + r] @ k[b, h // 2, n]).item() * 0.3
                                  if 0 <= kr[n] <= qr[r] else -math.inf for n in range(150)])
                p[r] = torch.softmax(s, 0)
            diag = torch.zeros(150)
            for r in range(64):
                for n in range(150):
                    if 0 <= kr[n] <= qr[r]:
                        diag[qr[r] - kr[n]] += p[r, n]
            cols = [n for n in range(150) if kr[n] >= R.FORCED_COLUMNS]
            torch.testing.assert_close(vertical[b, h, cols], p.sum(0)[cols], atol=1e-5, rtol=1e-5)
            top = max(qr)
            torch.testing.assert_close(slash[b, h, 100:top + 1], diag[100:top + 1], atol=1e-5, rtol=1e-5)
            assert (slash[b, h, :100] >= R.FORCED).all() and (slash[b, h, top + 1:] == -math.inf).all()
            forced = (k_rank[b] >= 0) & (k_rank[b] < R.FORCED_COLUMNS)
            assert (vertical[b, h, forced] >= R.FORCED).all() and (vertical[b, h, k_rank[b] < 0] == -math.inf).all()


def test_vs_index_sizes_forced_entries_and_padding_invariance():
    q, k, _, q_rank, k_rank = case([140, 70], 140, 90)
    sizes_v, sizes_s = torch.tensor([10, 35, 40, 200]), torch.tensor([60, 50, 120, 70])
    vertical, slash = R.vs_index(q, k, q_rank, k_rank, 0.3, sizes_v, sizes_s)
    for h, (nv, ns) in enumerate(zip(sizes_v.tolist(), sizes_s.tolist())):
        nv, ns = max(nv, 30), max(ns, 50)
        got_v = vertical[0, h][vertical[0, h] < R.SENTINEL]
        assert len(got_v) == min(nv, 140) and (got_v[:30] == torch.arange(30)).all()  # forced first columns
        got_s = slash[0, h][slash[0, h] < R.SENTINEL]
        assert len(got_s) == min(ns, 140) and (got_s[:50] == torch.arange(50)).all()  # nearest diagonals first
        assert (got_v.diff() > 0).all() and (got_s.diff() > 0).all()
        assert (vertical[1, h][vertical[1, h] < R.SENTINEL] < 70).all()  # real ranks of the padded row only
    # The padded row alone gives the same index.
    alone = R.vs_index(q[1:, :, -70:], k[1:, :, -70:], q_rank[1:, -70:], k_rank[1:, -70:], 0.3, sizes_v, sizes_s)
    n_v, n_s = alone[0].shape[-1], alone[1].shape[-1]
    assert torch.equal(alone[0][0], vertical[1, :, :n_v]) and (vertical[1, :, n_v:] == R.SENTINEL).all()
    assert torch.equal(alone[1][0], slash[1, :, :n_s]) and (slash[1, :, n_s:] == R.SENTINEL).all()


def test_vs_mask_matches_definition():
    q, k, _, q_rank, k_rank = case([150, 120], 150, 100)
    vertical, slash = R.vs_index(q, k, q_rank, k_rank, 0.3, 40, torch.tensor([50, 60, 70, 80]))
    slash = torch.where(slash < 60, slash * 2, slash).sort(-1).values  # spread: gaps and overlaps
    mask = R.vs_mask(q_rank, k_rank, vertical, slash)
    for b in range(2):
        for h in range(4):
            cols, offs = set(vertical[b, h].tolist()), set(slash[b, h].tolist())
            for t in range(0, 100, 7):
                i = int(q_rank[b, t])
                base = i // 64 * 64
                for n in range(150):
                    j = int(k_rank[b, n])
                    want = 0 <= j <= i and (j in cols or any(base - o <= j <= base - o + 63 for o in offs))
                    assert bool(mask[b, h, t, n]) == want, (b, h, t, n)


def test_block_index_matches_pooled_scores():
    q, k, _, q_rank, k_rank = case([200, 150], 200, 200)
    blocks = R.block_index(q, k, q_rank, k_rank, torch.tensor([1, 2, 3, 2]))
    for b, n_real in enumerate([200, 150]):
        first = 200 - n_real
        for h in range(4):
            top_k = [1, 2, 3, 2][h]
            for m in range(R.query_blocks(200)):
                rb = m  # rank blocks from 0: the first query is rank 0
                rows = [t for t in range(200) if q_rank[b, t] >= 0 and q_rank[b, t] // 64 == rb]
                got = blocks[b, h, m][blocks[b, h, m] >= 0].tolist()
                if not rows:
                    assert got == []
                    continue
                qp = q[b, h, rows].mean(0)
                scores = []
                for kb in range(rb + 1):
                    cols = [first + j for j in range(kb * 64, min(n_real, kb * 64 + 64))]
                    scores.append((qp @ k[b, h // 2, cols].mean(0)).item())
                scores[rb] = math.inf  # the diagonal block is always kept
                want = sorted(sorted(range(rb + 1), key=lambda x: -scores[x])[:top_k])
                assert got == want, (b, h, m, got, want)


def test_block_mask_and_reference_attention():
    q, k, v, q_rank, k_rank = case([150, 80], 150, 130)
    blocks = R.block_index(q, k, q_rank, k_rank, 2)
    mask = R.block_mask(q_rank, k_rank, blocks)
    assert mask.any(-1)[q_rank[:, None, :].expand(-1, 4, -1) >= 0].all()  # every real query keeps itself
    out = R.block_sparse_attention(q, k, v, q_rank, k_rank, blocks, 0.3, query_chunk=33)
    torch.testing.assert_close(out, R.masked_attention(q, k, v, mask, 0.3))
    # a full index is dense causal attention
    full = R.block_index(q, k, q_rank, k_rank, 100)
    dense = R.masked_attention(q, k, v, R._rank_mask(q_rank, k_rank).expand(-1, 4, -1, -1), 0.3)
    torch.testing.assert_close(R.block_sparse_attention(q, k, v, q_rank, k_rank, full, 0.3), dense)


# ----------------------------------------------------------------------------------------------
# Triton kernels against the references (interpreter on CPU)


def test_slash_tiles_cover_exactly_the_diagonal_ranges():
    """Tiles are <= 64 distances wide, disjoint, ascending, and their union is the union over chosen
    offsets ``o`` of the distances ``[o - 63, o]`` (a query block's diagonal ranges, shifted)."""
    slash = torch.tensor([[[0, 1, 2, 70, 200, 263, 264, 400, 401, 402, 600] + [R.SENTINEL] * 3,
                           [5, 500, 1000] + [R.SENTINEL] * 11]], dtype=torch.int32)
    lo, hi = M.slash_tiles(slash)
    for h in range(2):
        offs = [o for o in slash[0, h].tolist() if o < R.SENTINEL]
        want = sorted({d for o in offs for d in range(o - 63, o + 1)})
        tiles = [(a, b) for a, b in zip(lo[0, h].tolist(), hi[0, h].tolist()) if a < R.SENTINEL]
        assert all(0 <= b - a < M.BLOCK_N for a, b in tiles)
        assert all(b1 < a2 for (_, b1), (a2, _) in zip(tiles, tiles[1:]))
        assert sorted(d for a, b in tiles for d in range(a, b + 1)) == want
    # head 0: runs [0, 2], [70, 70], [200, 264], [400, 402], [600, 600], 64 + last - first distances
    # wide -> 2 + 1 + 2 + 2 + 1 tiles
    assert (lo[0, 0] < R.SENTINEL).sum() == 8 and (lo[0, 1] < R.SENTINEL).sum() == 3


def test_vs_prepare_counts_tiles_and_columns_per_query_block():
    q, k, _, q_rank, k_rank = case([203, 130], 203, 150)
    vertical, slash = R.vs_index(q, k, q_rank, k_rank, 0.3, 40, 60)
    plan = M.vs_prepare(q_rank, k_rank, vertical, slash)
    first = R.first_query_block(q_rank)
    for b in range(2):
        for h in range(4):
            for m in range(plan.n_tile.shape[-1]):
                base = (int(first[b]) + m) * 64
                has_query = any(base <= int(r) < base + 64 for r in q_rank[b].tolist() if r >= 0)
                tiles = sum(1 for d in plan.tile_lo[b, h].tolist() if d <= base) if has_query else 0
                cols = sum(1 for j in vertical[b, h].tolist() if j <= base + 63) if has_query else 0
                assert int(plan.n_tile[b, h, m]) == tiles and int(plan.n_vert[b, h, m]) == cols
    work = M.vs_work(plan)
    assert work["diagonal_tiles"] == int(plan.n_tile.sum()) and work["query_blocks"] > 0
    assert work["diagonal_keys"] <= work["diagonal_tiles"] * M.BLOCK_N


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window", [None, 70])
def test_vs_kernel_matches_reference(dtype, window):
    """Odd lengths, left padding, chunked prefill (T > Lq), a row whose chunk is half padding,
    diagonals spread so that runs, gaps and columns inside diagonal ranges all occur."""
    q, k, v, q_rank, k_rank = case([203, 130], 203, 150, dtype=dtype)
    vertical, slash = R.vs_index(q, k, q_rank, k_rank, 0.3, torch.tensor([30, 35, 40, 45]), 50, window)
    slash = torch.where(slash < 30, slash * 3, slash).sort(-1).values
    ref = R.vs_attention(q.double(), k.double(), v.double(), q_rank, k_rank, vertical, slash, 0.3, window)
    out = M.vs_attention(q, k, v, q_rank, k_rank, vertical, slash, 0.3, window)
    check(out, ref, dtype)
    assert (out[1, :, :20] == 0).all()  # padding queries


@pytest.mark.parametrize("window,near", [(None, True), (90, True), (None, False)])
def test_vs_kernel_many_columns(window, near):
    """More than 128 chosen columns below a query block: the kernel's unmasked chunks (columns that
    precede the whole block) and the causal ones (the block's own), with left padding. ``near=False``:
    no diagonal below 70 is chosen, so the block's own columns are not covered by a diagonal range."""
    q, k, v, q_rank, k_rank = case([700, 250], 700, 300, seed=2)  # row 1: its first 50 queries are padding
    vertical, slash = R.vs_index(q, k, q_rank, k_rank, 0.3, torch.tensor([150, 200, 130, 260]), 60, window)
    slash = torch.where(slash < 40, slash * 5, slash).sort(-1).values
    if not near:
        slash = torch.where(slash < R.SENTINEL, slash + 70, slash)
    ref = R.vs_attention(q.double(), k.double(), v.double(), q_rank, k_rank, vertical, slash, 0.3, window)
    plan = M.vs_prepare(q_rank, k_rank, vertical, slash)
    assert int(plan.n_vert.max()) > 2 * M.BLOCK_N  # some block runs unmasked column chunks
    out = M.vs_attention(q, k, v, q_rank, k_rank, vertical, slash, 0.3, window, plan=plan)
    check(out, ref, torch.float32)
    assert (out[1, :, :50] == 0).all() and (out[1, :, 50:] != 0).any(-1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_vs_kernel_subset_of_heads_and_odd_head_dim(dtype):
    q, k, v, q_rank, k_rank = case([99], 99, 99, hq=6, hkv=2, D=24, dtype=dtype, seed=3)
    vertical, slash = R.vs_index(q, k, q_rank, k_rank, 0.25, 30, 50)
    heads = torch.tensor([1, 4, 5])
    out = torch.full_like(q, 7.0)
    M.vs_attention(q, k, v, q_rank, k_rank, vertical[:, heads], slash[:, heads], 0.25, heads=heads, out=out)
    ref = R.vs_attention(q.double(), k.double(), v.double(), q_rank, k_rank, vertical, slash, 0.25)
    check(out[:, heads], ref[:, heads], dtype)
    assert (out[:, [0, 2, 3]] == 7.0).all()  # other heads untouched


@pytest.mark.parametrize("dtype,window,per", [(torch.float32, None, 2), (torch.float16, 70, 2), (torch.float32, 70, 4)])
def test_vs_union_kernel_matches_reference(dtype, window, per):
    """Units of ``per`` heads of a KV head walking the union of their indices, each head masked to
    its own: the same inputs as the per-head kernel's test, so every head has its own budget."""
    q, k, v, q_rank, k_rank = case([203, 130], 203, 150, dtype=dtype)
    vertical, slash = R.vs_index(q, k, q_rank, k_rank, 0.3, torch.tensor([30, 35, 40, 45]), 50, window)
    slash = torch.where(slash < 30, slash * 3, slash).sort(-1).values
    ref = R.vs_attention(q.double(), k.double(), v.double(), q_rank, k_rank, vertical, slash, 0.3, window)
    out = M.vs_union_attention(q, k, v, q_rank, k_rank, vertical, slash, 0.3, window, per=per)
    check(out, ref, dtype)
    assert (out[1, :, :20] == 0).all()  # padding queries


def test_vs_union_kernel_subset_of_heads_and_partial_units():
    """Heads 1 | 4, 5 of 6 (3 per KV head): a unit with one head and one with two."""
    q, k, v, q_rank, k_rank = case([99], 99, 99, hq=6, hkv=2, D=24, seed=3)
    vertical, slash = R.vs_index(q, k, q_rank, k_rank, 0.25, 30, 50)
    heads = torch.tensor([1, 4, 5])
    assert M.union_units(heads.tolist(), 3, 2) == [[0], [1, 2]]
    out = torch.full_like(q, 7.0)
    M.vs_union_attention(q, k, v, q_rank, k_rank, vertical[:, heads], slash[:, heads], 0.25, heads=heads, out=out)
    ref = R.vs_attention(q.double(), k.double(), v.double(), q_rank, k_rank, vertical, slash, 0.25)
    check(out[:, heads], ref[:, heads], torch.float32)
    assert (out[:, [0, 2, 3]] == 7.0).all()  # other heads untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_block_sparse_kernel_matches_reference(dtype):
    q, k, v, q_rank, k_rank = case([190, 100, 3], 190, 131, dtype=dtype, seed=1)
    blocks = R.block_index(q, k, q_rank, k_rank, torch.tensor([1, 2, 2, 3]))
    ref = R.block_sparse_attention(q.double(), k.double(), v.double(), q_rank, k_rank, blocks, 0.3)
    out = M.block_sparse_attention(q, k, v, q_rank, k_rank, blocks, 0.3)
    check(out, ref, dtype)


# ----------------------------------------------------------------------------------------------
# GPU (bf16, longer)


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", ["vs", "block", "union2", "union4"])
def test_kernels_bf16_gpu(pattern):
    q, k, v, q_rank, k_rank = case([4099, 3000], 4099, 2500, hq=8, hkv=2, D=128, dtype=torch.bfloat16, seed=5)
    if pattern == "vs":
        vertical, slash = R.vs_index(q, k, q_rank, k_rank, 0.088, torch.tensor([30, 100, 300, 1000] * 2),
                                     torch.tensor([50, 500, 700, 2000] * 2))
        out = M.vs_attention(q, k, v, q_rank, k_rank, vertical, slash, 0.088)
        ref = R.vs_attention(q.float(), k.float(), v.float(), q_rank, k_rank, vertical, slash, 0.088)
    elif pattern.startswith("union"):
        vertical, slash = R.vs_index(q, k, q_rank, k_rank, 0.088, torch.tensor([30, 100, 300, 1000] * 2),
                                     torch.tensor([50, 500, 700, 2000] * 2))
        out = M.vs_union_attention(q, k, v, q_rank, k_rank, vertical, slash, 0.088, per=int(pattern[-1]))
        ref = R.vs_attention(q.float(), k.float(), v.float(), q_rank, k_rank, vertical, slash, 0.088)
    else:
        blocks = R.block_index(q, k, q_rank, k_rank, 8)
        out = M.block_sparse_attention(q, k, v, q_rank, k_rank, blocks, 0.088)
        ref = R.block_sparse_attention(q.float(), k.float(), v.float(), q_rank, k_rank, blocks, 0.088)
    check(out, ref, torch.bfloat16)
