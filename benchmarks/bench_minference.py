"""MInference sparse prefill on the GPU: one layer shaped like Llama-3-8B, and time to first token.

    python benchmarks/bench_minference.py                          # layer: 32K .. 1M, crossover
    python benchmarks/bench_minference.py --parts layer --lengths 131072 --sweep   # tile sweep
    python benchmarks/bench_minference.py --parts ttft --ttft 131072x32,524288x4   # tokens x layers
    python benchmarks/bench_minference.py --plot benchmarks/results/minference_layer_NVIDIA_H200.json
    python benchmarks/bench_minference.py --smoke                  # CPU: tiny, checks the script runs

Layer part: 32 query heads, 8 KV heads, D 128, bf16, batch 1. Dense = torch SDPA causal prefill
(fused kernels) in the same run. MInference = ``sparse_prefill`` exactly as the runtime calls it,
index building included (and timed alone beside). Variants (``--variants``):

* ``default``: every head VS (1000, 6096), the reference's pattern of a head without an entry;
* ``published``: the reference's published Llama-3-8B config
  (``Llama_3_8B_Instruct_262k_kv_out_v32_fit_o_best_pattern.json`` of microsoft/MInference: every
  head VS, 473 of its 1024 heads (1000, 6096), 278 (30, 800), 153 (100, 800), 31 (500, 700), 89
  (3500, 100)) as one 32-head layer with the same proportions (15, 8, 5, 1, 3 heads);
  ``PUBLISHED`` below holds its per-layer table, which the TTFT part and ``million.py`` use whole;
* ``mix``: the reference's search candidates in turn over the heads (A-shape (100, 800), VS
  (30, 800), (100, 750), (500, 700), (3500, 100)), the mix measured in earlier sessions;
* ``local``: ``default`` with its diagonals replaced by the 6096 nearest the main one (one run:
  the budget's least work, what a head whose attention decays with distance selects).

Inputs: random q/k/v with RoPE and a shared component (attention decays with distance, as in
trained models, so diagonals cluster near the main one) and a few heavy key columns (attention
sinks); ``--inputs random``: plain random tensors (diagonals spread: the worst case for slash
ranges). Speed-ups and the crossover length (shortest measured length from which sparse is faster
at every longer length) go into ``benchmarks/results/minference_layer_<device>.json``. For the VS
heads of each variant the VS kernel is also timed alone (index prepared) beside the work it runs
(``kernels.minference.vs_work``: 64-key tiles per query block, that work over dense causal
attention's, TFLOP/s on it). Lengths from 256K on are timed once (dense SDPA takes ~1.1 s per
layer at 256K, 4.7 s at 512K, 19 s at 1M) after one warm-up call of each sparse path (a new length
can need a new Triton specialisation, seconds of compiling), dense without one; ``--dense-from``
reuses dense times of an earlier run on the same device.

Union index per KV group (on the all-VS variants, up to ``--union-max`` tokens): the G = 4 query
heads of a KV head can share one program walking the *union* of their indices (K/V read once per
unit, taller tiles, but every head pays the union's keys: ``kernels.minference.vs_union_attention``,
``MInferenceConfig.union_heads``). Measured: the union's work over the per-head work (64-key
tiles) for the 4 heads of a KV head and for units of 2 and 4 heads, the union kernel's time for
units of 2 and 4 beside the per-head kernel's, and the best case of a union kernel (the 4-head
union's FLOPs at dense SDPA's throughput in the same run).

TTFT part (``--ttft TOKENSxLAYERS,...``): the 8B-shaped model (random weights; ``--attention
local``, the default: q/k projections carry a bias shared by each KV head's query heads, so that
attention decays with distance under RoPE as in trained models, without which the dynamic index
has no structure to find; ``random``: no bias), chunked prefill: ``unpatched`` (the model's SDPA,
one chunk: its chunked path would build a [chunk, T] mask), ``minference`` (the published config,
every layer its own row) and ``minference+duo`` (the same, 50% retrieval KV heads chosen by random
gates; streaming heads with the A-shape kernel), the kvpress variants in ``--chunk`` chunks;
``--patterns``: the published table (default), the candidates in turn, or no config. How much
the bias clusters the chosen diagonals decides the sparse work: at 128K, on layer-0-like inputs of
this model (embeddings only; CPU estimate), the published mix's index runs 56% of dense attention's
tiles with ``--locality 0.6`` (43% at 1.0, 32% at 2.0), against 23.5% on the layer part's ``rope``
inputs; above ``MInferenceConfig.max_work`` (45%) the runtime prefills that layer dense.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as c  # noqa: E402

from kvpress.kernels import minference as M  # noqa: E402
from kvpress.kernels import minference_reference as R  # noqa: E402
from kvpress.methods.duo import DuoConfig  # noqa: E402
from kvpress.methods.minference import MInferenceConfig, plan_heads, sparse_prefill  # noqa: E402

K = 1024
HQ, HKV, D = 32, 8, 128
MIX = [("stream_llm", 100, 800), ("vertical_and_slash", 30, 800), ("vertical_and_slash", 100, 750),
       ("vertical_and_slash", 500, 700), ("vertical_and_slash", 3500, 100)]

# The reference's published Llama-3-8B pattern table (microsoft/MInference,
# minference/configs/Llama_3_8B_Instruct_262k_kv_out_v32_fit_o_best_pattern.json): one string per
# layer, one letter per query head; every head is vertical-and-slash with these budgets.
CODES = {"A": (1000, 6096), "B": (30, 800), "C": (100, 800), "D": (500, 700), "E": (3500, 100)}
PUBLISHED = [
    "AAAAAAAAAAAAAAAABBBAAAAAAAAAEEEE", "BBABBBBBCACBABAABBBBBBAABBBBAABA", "BABACAABBBCBCBCABBBAAAABBBBBBBBB",
    "AAAABBBBBBBBAACABBBBAAAAAABABBBC", "CCCBBBABAAAABBBCABAACABABBBBACCB", "BABBBAAAAAAABBBBCAABAAAAADBABBBB",
    "BCCCCBABBBBBBBBBBCBBAABBAAAACACA", "BBBCBBAABBABBACCAAAACEACCAABBBAA", "AAAABBBAAACAABAAAAAABBBBAAAAAAAA",
    "AAAAAAAABBBBAACAAAAAAAAACACEAABA", "AAAAAAAACBABAAACBAAAAAAAADACACCA", "AAAACAAAAABAAAAABDBBAAAAAAAAEEEB",
    "BADBAAAACBACBBADBDBBBBBDBBDBBBBD", "AAAAAAACAAAAAAAAAAAAAACABCCAABAA", "AAAAAAAABBBBAAAAAAAAACAAAABACEAE",
    "BAAABABBDBBCBAAAAAACAAAAAAAAAAAB", "EACCDADCAACEBDDBCCAAAABAAECABBBB", "AAACEAECCCABBDAACBCEDECAEEACAACA",
    "CAAAACCBAABADBDCAAAACAAABBBCACAA", "ACAAACACBACACCAABABACACCABAAAAAC", "AAAABAACAAAAAECAAAAAACDAACAACBAA",
    "AAAABCBBEBBAECEECEACAAAAADAAAAAA", "EEAAAAAEACCCAAAABBBBAAAABBBCAACE", "DCBCAAAAACEAAAEEBDADACECAECABBBB",
    "ACCECCAABBBBEDCCEEEAAAEAAAAADBBE", "EEAAEEEECBCCEAEECCECBBBBBCCBBBBB", "ACAAABAACBACEAEAEDAECCCEAACAAECE",
    "CDBBEAEABBBBAABCACAAAAEEABDDABAA", "EBCBBBBBCBEBAEAAECECEDBEAABADCCC", "CCBBCCCBECACBBBBEACEAAAABBBBAAEE",
    "AECECCEBAEBAAAAAAAACAECBEACECEAA", "BBBBBBBCBBBABBABEEBCEECBBBBBCEEA"]


def published_patterns(layers: int = 32) -> list[dict]:
    """Per-layer patterns of the published table for a model of ``layers`` layers (32: the table
    itself; fewer: evenly spaced rows of it)."""
    rows = [PUBLISHED[i * len(PUBLISHED) // layers] for i in range(layers)]
    return [{h: ("vertical_and_slash", *CODES[code]) for h, code in enumerate(row)} for row in rows]


def published_layer(hq: int = HQ) -> dict:
    """One layer of ``hq`` heads with the published table's pattern proportions (largest remainder),
    the kinds spread over the KV groups (head ``h`` takes kind ``(13 h) mod hq`` of the sorted list)."""
    table = "".join(PUBLISHED)
    share = {code: table.count(code) * hq / len(table) for code in CODES}
    count = {code: int(s) for code, s in share.items()}
    for code in sorted(share, key=lambda x: count[x] - share[x])[:hq - sum(count.values())]:
        count[code] += 1
    kinds = [code for code in CODES for _ in range(count[code])]
    return {h: ("vertical_and_slash", *CODES[kinds[(13 * h) % hq]]) for h in range(hq)}


def rope(x, theta=500000.0):
    L, d = x.shape[2], x.shape[3]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    ang = torch.arange(L, device=x.device, dtype=torch.float32)[:, None] * inv[None]
    cos, sin = ang.cos().repeat(1, 2).to(x.dtype), ang.sin().repeat(1, 2).to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def inputs(L, dev, dtype, kind, hq=HQ, hkv=HKV, d=D):
    torch.manual_seed(0)
    q = torch.randn(1, hq, L, d, device=dev, dtype=dtype)
    k = torch.randn(1, hkv, L, d, device=dev, dtype=dtype)
    v = torch.randn(1, hkv, L, d, device=dev, dtype=dtype)
    if kind == "rope":
        u = torch.randn(d, device=dev, dtype=dtype) * 0.6
        q.add_(u)
        k.add_(u)
        k[:, :, :: max(1, L // 64)] += 2 * u  # heavy columns: sinks
        q, k = rope(q), rope(k)
    return q.contiguous(), k.contiguous(), v


def elapsed(fn, dev, reps, warmup=True):
    """Median seconds of ``fn`` (CUDA events) over ``reps`` calls, after one warm-up call."""
    if warmup:
        fn()
    if not c._is_cuda(dev):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    times = []
    for _ in range(max(1, reps)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def dense(q, k, v, scale):
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    with c.sdpa_kernel([c.SDPBackend.CUDNN_ATTENTION, c.SDPBackend.FLASH_ATTENTION], set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)


def configs(hq):
    return {"default": MInferenceConfig(patterns=[{}]),  # every head: the reference's VS (1000, 6096)
            "local": MInferenceConfig(patterns=[{}]),  # the same, diagonals replaced by the nearest 6096
            "mix": MInferenceConfig(patterns=[{h: MIX[h % len(MIX)] for h in range(hq)}]),
            "published": MInferenceConfig(patterns=[published_layer(hq)])}


def vs_index(plan, q, k, rank, scale, local):
    """The VS index that ``sparse_prefill`` builds for ``plan``'s VS heads; ``local``: its diagonals
    replaced by the nearest ones (offsets 0, 1, ...: one run, the budget's least work)."""
    heads = torch.tensor(plan.vs, device=q.device)
    sizes = [torch.ones(q.shape[1], dtype=torch.long, device=q.device) for _ in range(2)]
    for size, values in zip(sizes, plan.vs_sizes):
        size[heads] = torch.tensor(values, device=q.device)
    vertical, slash = R.vs_index(q, k, rank, rank, scale, sizes[0], sizes[1], heads=heads)
    if local:
        n = torch.arange(slash.shape[-1], device=q.device, dtype=slash.dtype)
        slash = torch.where(slash < R.SENTINEL, n, slash)
    return heads, vertical, slash


def head_tiles(prep: M.VSPlan) -> torch.Tensor:
    """``[B, n]`` 64-key tiles each head's programs run (diagonal tiles + column tiles), over all query blocks."""
    return prep.n_tile.long().sum(-1) + ((prep.n_vert.long() + M.BLOCK_N - 1) // M.BLOCK_N).sum(-1)


def vs_kernel_stats(name, plan, q, k, v, rank, scale, dev, reps, local=False, warmup=True):
    """Time of the VS kernel alone (index prepared) and the work it really does: 64-key tiles run
    per query block (diagonal ranges cut into tiles + gathered columns) and TFLOP/s on those tiles."""
    heads, vertical, slash = vs_index(plan, q, k, rank, scale, local)
    prep = M.vs_prepare(rank, rank, vertical, slash)
    work = M.vs_work(prep)
    out = torch.empty_like(q)
    t_prep = elapsed(lambda: M.vs_prepare(rank, rank, vertical, slash), dev, reps, warmup)
    t_kernel = elapsed(lambda: M.vs_attention(q, k, v, rank, rank, vertical, slash, scale, heads=heads, out=out,
                                              plan=prep), dev, reps, warmup)
    tiles = work["diagonal_tiles"] + work["column_tiles"]
    blocks = max(1, work["query_blocks"])
    d, L = q.shape[-1], q.shape[2]
    causal = len(plan.vs) * L * (L + 1) / 2  # (query, key) pairs of dense causal attention
    stats = {"kernel_ms": t_kernel * 1e3, "prepare_ms": t_prep * 1e3,
             "keys_per_qblock": M.BLOCK_N * tiles / blocks,
             "useful_keys_per_qblock": (work["diagonal_keys"] + M.BLOCK_N * work["column_tiles"]) / blocks,
             "budget_keys": sum(a + b for a, b in zip(*plan.vs_sizes)) / len(plan.vs),
             "work_vs_dense": 64 * M.BLOCK_N * tiles / causal,
             "kernel_tflops": 4 * d * 64 * M.BLOCK_N * tiles / t_kernel / 1e12}
    if not local:
        runs = M.slash_runs(slash)[0]
        stats["slash_runs_mean"] = float((runs < R.SENTINEL).sum(-1).float().mean())
    return {f"{name}_vs_{key}" if key not in ("slash_runs_mean",) else f"{name}_{key}": value
            for key, value in stats.items()}


def union_index(index: torch.Tensor, heads: torch.Tensor, group: int):
    """The union of ``index [B, n, N]`` (ascending, ``SENTINEL``-padded, for query heads ``heads``)
    over the query heads of each KV head: ``[B, g, N']`` for the ``g`` KV heads present, and each
    head's row in it ``[n]``."""
    kv = heads.long() // group
    present = kv.unique()
    parts = []
    for g in present.tolist():
        x = index[:, (kv == g).nonzero().flatten()].flatten(1).long().sort(-1).values
        dup = torch.zeros_like(x, dtype=torch.bool)
        dup[:, 1:] = x[:, 1:] == x[:, :-1]
        parts.append(x.masked_fill(dup, R.SENTINEL).sort(-1).values)
    width = max(1, max(int((p < R.SENTINEL).sum(-1).max()) for p in parts))
    union = torch.stack([F.pad(p, (0, max(0, width - p.shape[-1])), value=R.SENTINEL)[..., :width] for p in parts], 1)
    return union.int().contiguous(), torch.searchsorted(present, kv)


def union_stats(name, plan, q, k, v, rank, scale, dev, reps, dense_s, warmup=True):
    """Per-KV-group union index vs per-query-head programs (module docstring): the union's work over
    the per-head work (64-key tiles) for all G heads of a KV head and for units of 2 / 4 heads, the
    union kernel (``vs_union_attention``) timed for units of 2 and 4, and a union kernel's best case
    (the G-head union's FLOPs at dense SDPA's throughput in the same run)."""
    heads, vertical, slash = vs_index(plan, q, k, rank, scale, False)
    group = q.shape[1] // k.shape[1]
    per_head = head_tiles(M.vs_prepare(rank, rank, vertical, slash)).sum()
    union_v, row = union_index(vertical, heads, group)
    union_s, _ = union_index(slash, heads, group)
    union_tiles = head_tiles(M.vs_prepare(rank, rank, union_v, union_s))  # [B, g]: per group
    union_work = union_tiles[:, row].sum()  # every head of a group runs its group's union
    out = torch.empty_like(q)
    L, d = q.shape[2], q.shape[3]
    dense_flops = 4 * d * q.shape[1] * L * (L + 1) / 2
    union_flops = 4 * d * 64 * M.BLOCK_N * float(union_work)
    kernel = {}
    for per in (2, 4):  # the union kernel over units of `per` heads of a KV head (index given, tables included)
        units = torch.tensor([u + [-1] * (per - len(u)) for u in M.union_units(heads.tolist(), group, per)],
                             device=q.device)
        work = head_tiles(M.vs_prepare(rank, rank, M.union_of(vertical, units), M.union_of(slash, units),
                                       counts=False)).sum() * per
        t = elapsed(lambda: M.vs_union_attention(q, k, v, rank, rank, vertical, slash, scale, heads=heads, out=out,
                                                 per=per), dev, reps, warmup)
        kernel.update({f"{name}_union{per}_kernel_ms": t * 1e3,
                       f"{name}_union{per}_work_vs_per_head": float(work) / max(1.0, float(per_head)),
                       f"{name}_union{per}_tflops": 4 * d * 64 * M.BLOCK_N * float(work) / t / 1e12})
    return {**kernel, f"{name}_union_work_vs_per_head": float(union_work) / max(1.0, float(per_head)),
            f"{name}_union_slash_per_group": float((union_s < R.SENTINEL).sum(-1).float().mean()),
            f"{name}_union_vertical_per_group": float((union_v < R.SENTINEL).sum(-1).float().mean()),
            f"{name}_union_best_case_ms": union_flops / (dense_flops / dense_s) * 1e3 if dense_s > 0 else None}


def layer_rows(lengths, dev, dtype, kind, variants, reps, shape=(HQ, HKV, D), union=1 << 30, on_row=None,
               union_heads=1, dense_ms=None, kernel_stats=True):
    """One row per length (``on_row(rows)`` after each: the caller saves partial results);
    ``dense_ms``: {tokens: ms} of dense SDPA from an earlier run on the same device, not re-timed."""
    hq, hkv, d = shape
    scale = d ** -0.5
    use_triton = c._is_cuda(dev)
    rows = []
    for L in lengths:
        q, k, v = inputs(L, dev, dtype, kind, hq, hkv, d)
        rank = torch.arange(L, device=dev, dtype=torch.int32)[None]
        # From 256K: one timed call; dense without a warm-up call (nothing to compile; ~18 s at 1M), the
        # Triton paths with one (a new length can need a new specialisation: seconds of compiling).
        long = L >= 256 * K and len(lengths) > 1
        reps_L, warm = (1, True) if long else (reps, True)
        if dense_ms and L in dense_ms:  # dense time of an earlier run (--dense-from)
            t_dense = dense_ms[L] / 1e3
        else:
            t_dense = elapsed(lambda: dense(q, k, v, scale), dev, reps_L, not long)
        row = {"tokens": L, "inputs": kind, "dense_ms": t_dense * 1e3, "reps": reps_L,
               "dense_tflops": 2 * 2 * hq * d * L * (L + 1) / 2 / t_dense / 1e12,
               "dense_from_earlier_run": bool(dense_ms and L in dense_ms)}
        for name in variants:
            plan = plan_heads(configs(hq)[name], 0, list(range(hq)), L)
            local = name == "local"
            if local:  # index built as at run time, then the kernel under the local diagonals
                out = torch.empty_like(q)

                def run():
                    heads, vertical, slash = vs_index(plan, q, k, rank, scale, True)
                    if use_triton:
                        return M.vs_attention(q, k, v, rank, rank, vertical, slash, scale, heads=heads, out=out)
                    return R.vs_attention(q, k, v, rank, rank, vertical, slash, scale)
            else:
                def run():
                    return sparse_prefill(plan, q, k, v, rank, rank, scale, use_triton=use_triton,
                                          union_heads=union_heads)
            t = elapsed(run, dev, reps_L, warm)
            t_index = elapsed(lambda: vs_index(plan, q, k, rank, scale, False), dev, reps_L, warm) if plan.vs else 0.0
            row.update({f"{name}_ms": t * 1e3, f"{name}_index_ms": t_index * 1e3, f"{name}_speedup": t_dense / t})
            if plan.vs and use_triton and kernel_stats:
                row.update(vs_kernel_stats(name, plan, q, k, v, rank, scale, dev, reps_L, local, warm))
            if L <= union and plan.vs and not local and len(plan.vs) == hq:
                if use_triton:
                    row.update(union_stats(name, plan, q, k, v, rank, scale, dev, reps_L, t_dense, warm))
                else:  # CPU: the work ratio only
                    heads, vertical, slash = vs_index(plan, q, k, rank, scale, False)
                    uv, r = union_index(vertical, heads, hq // hkv)
                    us, _ = union_index(slash, heads, hq // hkv)
                    per_head = head_tiles(M.vs_prepare(rank, rank, vertical, slash)).sum()
                    row[f"{name}_union_work_vs_per_head"] = float(
                        head_tiles(M.vs_prepare(rank, rank, uv, us))[:, r].sum()) / float(per_head)
        rows.append(row)
        if on_row is not None:
            on_row(rows)
        print("layer " + ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                                   for key, value in row.items()), flush=True)
        del q, k, v
        c._empty_cache(dev)
    return rows


def crossover(rows, name):
    """Shortest measured length from which ``name`` is faster than dense at every longer length."""
    best = None
    for row in sorted(rows, key=lambda r: -r["tokens"]):
        if row[f"{name}_speedup"] <= 1.0:
            break
        best = row["tokens"]
    return best


def sweep_rows(L, dev, dtype, kind):
    rows = []
    defaults = M.NUM_WARPS, M.NUM_STAGES
    for warps in (4, 8):
        for stages in (1, 2, 3, 4):
            M.NUM_WARPS, M.NUM_STAGES = warps, stages
            try:
                row = layer_rows([L], dev, dtype, kind, ["default"], 5)[0]
            except Exception as error:  # noqa: BLE001 (a tile setting the GPU refuses: out of shared memory)
                print(f"sweep warps {warps} stages {stages}: {error}")
                continue
            rows.append({"num_warps": warps, "num_stages": stages, **row})
    M.NUM_WARPS, M.NUM_STAGES = defaults
    return rows


def build_model(dev, layers=32, attention="local", smoke=False, seed=0, locality=0.6):
    """The 8B-shaped Llama (``common.llama8b_config``: Llama-3-8B dimensions, rope theta 500000,
    ``max_position_embeddings`` 4M) with random bf16 weights. ``attention="local"``: the q and k
    projections get a bias, the same random vector ``u`` (per KV head; entries of ``locality`` times
    the size of a projection's output entries) for the KV head and its query heads, so that scores carry
    ``u . R(i - j) u`` (RoPE), which is largest near the diagonal: attention decays with distance
    as in trained models (the layer part's ``rope`` inputs, in a model). ``"random"``: no bias
    (every score is noise, so the chosen diagonals scatter: the worst case for VS)."""
    from transformers import LlamaForCausalLM

    if attention not in ("local", "random"):
        raise ValueError(f"attention is 'local' or 'random', got {attention!r}")
    config = c.llama8b_config(smoke=smoke, layers=layers)
    config.attention_bias = attention == "local"
    torch.manual_seed(seed)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(dev):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.config.use_cache = True
    model = model.eval().requires_grad_(False)
    if attention == "local":
        hq, hkv = config.num_attention_heads, config.num_key_value_heads
        d = config.hidden_size // hq
        size = locality * config.initializer_range * config.hidden_size ** 0.5  # x the std of W x (x RMS-normed)
        for layer in model.model.layers:
            attn = layer.self_attn
            u = torch.randn(hkv, d, device=dev) * size
            attn.q_proj.bias.copy_(u.repeat_interleave(hq // hkv, 0).flatten())
            attn.k_proj.bias.copy_(u.flatten())
            attn.v_proj.bias.zero_()
            attn.o_proj.bias.zero_()
    return model


def model_patterns(kind: str, layers: int, heads: int = HQ):
    """Per-layer patterns of a whole model: ``published`` (the reference's Llama-3-8B table),
    ``candidates`` (the reference's search candidates in turn over the heads, ``MIX``) or
    ``default`` (None: every head VS (1000, 6096))."""
    if kind == "published":
        return published_patterns(layers)
    if kind == "candidates":
        return [{h: MIX[h % len(MIX)] for h in range(heads)} for _ in range(layers)]
    if kind == "default":
        return None
    raise ValueError(f"patterns is published, candidates or default, got {kind!r}")


def random_duo(layers, kv_heads, retrieval=0.5, seed=0):
    """DuoAttention config with ``retrieval`` of the KV heads, chosen by random gates (an ablation split)."""
    gates = torch.rand(layers, kv_heads, generator=torch.Generator().manual_seed(seed))
    return DuoConfig(gates=gates, sparsity=1.0 - retrieval)


def model_variant(model, name, layers, patterns="published", union_heads=1, retrieval=0.5):
    """``unpatched`` (the model's SDPA), ``minference`` or ``minference+duo`` with ``patterns``
    (``model_patterns``) on every layer and ``random_duo(retrieval)``: a ``common`` variant context."""
    if name not in ("minference", "minference+duo"):
        return c.baseline_variant(model, name)
    config = MInferenceConfig(patterns=model_patterns(patterns, layers, HQ), union_heads=union_heads)
    if name == "minference":
        return c.kvpress_variant(model, "minference", config=config)
    duo = random_duo(layers, model.config.num_key_value_heads, retrieval)
    return c.kvpress_variant(model, "minference+duo", config={"minference": config, "duo": duo})


def ttft_rows(dev, plan, chunk, smoke, attention="local", retrieval=0.5, union_heads=1, locality=0.6,
              patterns="published"):
    """Time to first token per (tokens, layers) of ``plan``: unpatched (one chunk), minference and
    minference+duo (``chunk``-token chunks), the published config on every layer."""
    rows = []
    for L, layers in plan:
        model = build_model(dev, layers, attention, smoke, locality=locality)
        variant = functools.partial(model_variant, layers=layers, patterns=patterns, union_heads=union_heads,
                                    retrieval=retrieval)

        for name in ("unpatched", "minference", "minference+duo"):
            # kvpress variants warm up on a sparse prefill (Triton kernels compiled outside the timing)
            warm = min(4 * K, L) if name == "unpatched" or smoke else min(L, chunk, 128 * K)
            part = c.e2e_rows(model, dev, [L], [name], variant, L if name == "unpatched" else min(chunk, L),
                              new_tokens=3, warmup_tokens=warm)
            for row in part:
                row.update(layers=layers, attention=attention, chunk=L if name == "unpatched" else min(chunk, L))
            rows += part
        base = next(r["prefill_s"] for r in rows if r["variant"] == "unpatched" and r["tokens"] == L and r["layers"] == layers)
        for r in rows:
            if r["tokens"] == L and r["layers"] == layers:
                r["ttft_speedup"] = base / r["prefill_s"]
        del model
        c._empty_cache(dev)
    return rows


def first_call_in_timing(row, name) -> bool:
    """Whether ``name``'s time at this length is far above its parts timed warm (index, tables, VS
    kernel): a first call that compiled a new Triton specialisation (runs before the warm-up fix)."""
    parts = [row.get(f"{name}_{x}") for x in ("index_ms", "vs_prepare_ms", "vs_kernel_ms")]
    return None not in parts and row[f"{name}_ms"] > 1.5 * sum(parts)


def plot(paths, out):
    """Speed-up over dense SDPA vs length per variant, from layer JSONs (comma-separated; a later
    file's point replaces an earlier one's), with the done-when targets. Points whose time includes
    a first call's compiling (:func:`first_call_in_timing`) are left out."""
    import json

    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points, env, dropped = {}, {}, []
    for path in paths.split(","):
        result = json.loads(Path(path).read_text())
        env = result.get("env", env)
        for row in result["layer"]:
            for key in row:
                if key.endswith("_speedup"):
                    name = key[:-len("_speedup")]
                    if first_call_in_timing(row, name):
                        dropped.append(f"{name}@{row['tokens'] // K}K")
                    else:
                        points.setdefault(name, {})[row["tokens"]] = row[key]
    if dropped:
        print("left out (first call compiled in the timing):", ", ".join(dropped))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    labels = {"default": "VS (1000, 6096) on every head", "published": "reference's published Llama-3-8B mix",
              "mix": "reference's candidates in turn", "local": "VS (1000, 6096), nearest diagonals"}
    for name, by_length in points.items():
        pts = sorted(by_length.items())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=labels.get(name, name))
    ax.scatter([128 * K, 512 * K, 1024 * K], [4, 10, 20], marker="*", s=120, color="black", zorder=5,
               label="targets (4x, 10x, 20x)")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}x"))
    ticks = sorted({t for by_length in points.values() for t in by_length})
    ax.set_xticks(ticks, [f"{t // K}K" if t < K * K else f"{t // (K * K)}M" for t in ticks])
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("speed-up over dense SDPA (one layer)")
    ax.set_title(f"MInference prefill, one Llama-3-8B-shaped layer, index included, {env.get('device', '')}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print("wrote", out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="layer", help="comma-separated: layer, ttft")
    p.add_argument("--lengths", default="32768,65536,131072,262144,524288,1048576")
    p.add_argument("--variants", default="default,published,mix")
    p.add_argument("--inputs", default="rope", choices=["rope", "random"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--union-max", type=int, default=524288, help="longest length of the union measurement (0: none)")
    p.add_argument("--union-heads", type=int, default=1, help="MInferenceConfig.union_heads of the timed sparse prefill")
    p.add_argument("--dense-from", default=None, metavar="JSON",
                   help="take dense SDPA's times from an earlier layer JSON of the same device (not re-timed)")
    p.add_argument("--no-kernel-stats", action="store_true", help="skip timing the VS kernel alone")
    p.add_argument("--sweep", action="store_true", help="also sweep the VS kernel's warps / stages at the first length")
    p.add_argument("--ttft", default="131072x32", help="TTFT runs: TOKENSxLAYERS, comma-separated")
    p.add_argument("--attention", default="local", choices=["local", "random"], help="the TTFT model's attention")
    p.add_argument("--locality", type=float, default=0.6, help="size of the TTFT model's shared q/k bias (build_model)")
    p.add_argument("--patterns", default="published", choices=["published", "candidates", "default"],
                   help="the TTFT model's MInference patterns (model_patterns)")
    p.add_argument("--chunk", type=int, default=131072, help="prefill chunk of the kvpress variants (tokens)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (checks the script, times mean nothing)")
    p.add_argument("--plot", default=None, metavar="JSON[,JSON]", help="only plot layer JSONs (to --plot-out)")
    p.add_argument("--plot-out", default=str(Path(__file__).resolve().parent.parent / "docs" / "minference_speed.png"))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.plot:
        plot(args.plot, args.plot_out)
        return 0
    dev = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    parts = args.parts.split(",")
    env = c.environment()
    result = {"env": env, "shape": {"q_heads": HQ, "kv_heads": HKV, "head_dim": D, "dtype": str(dtype)},
              "tiles": {"num_warps": M.NUM_WARPS, "num_stages": M.NUM_STAGES}, "union_heads": args.union_heads}
    out = args.out or Path(__file__).resolve().parent / "results" / f"minference_{'_'.join(parts)}_{c.device_tag(env)}.json"
    save = not args.smoke or args.out

    def partial(rows):  # a run cut short (timeout) still leaves its rows
        if save:
            c.write_json(out, {**result, "layer": rows, "partial": True})

    if "layer" in parts:
        lengths = [256, 512] if args.smoke else [int(x) for x in args.lengths.split(",")]
        shape = (8, 2, 32) if args.smoke else (HQ, HKV, D)
        variants = args.variants.split(",")
        dense_ms = None
        if args.dense_from:
            import json

            earlier = json.loads(Path(args.dense_from).read_text())
            dense_ms = {r["tokens"]: r["dense_ms"] for r in earlier["layer"]}
            result["dense_from"] = {"file": str(args.dense_from), "env": earlier.get("env")}
        rows = layer_rows(lengths, dev, dtype, args.inputs, variants, args.reps, shape, union=args.union_max,
                          on_row=partial, union_heads=args.union_heads, dense_ms=dense_ms,
                          kernel_stats=not args.no_kernel_stats)
        result["layer"] = rows
        result["crossover_tokens"] = {name: crossover(rows, name) for name in variants}
        c.table("one layer: dense SDPA vs MInference (index building included)", rows,
                [("tokens", "{:d}"), ("dense_ms", "{:.2f}")] + [(f"{n}_{x}", "{:.2f}") for n in variants
                                                                  for x in ("ms", "index_ms", "speedup")])
        c.table("VS kernel alone: the work it runs (64-key tiles) and its throughput", rows,
                [("tokens", "{:d}"), ("dense_tflops", "{:.0f}")] + [
                    (f"{n}_vs_{x}", f) for n in variants for x, f in (
                        ("kernel_ms", "{:.2f}"), ("keys_per_qblock", "{:.0f}"), ("work_vs_dense", "{:.3f}"),
                        ("kernel_tflops", "{:.0f}"))])
        c.table("union index per KV group (4 heads): its work over the per-head work; a union kernel's best case (ms)", rows,
                [("tokens", "{:d}")] + [(f"{n}_union_{x}", f) for n in variants for x, f in (
                    ("work_vs_per_head", "{:.2f}"), ("best_case_ms", "{:.1f}"))])
        c.table("union kernel (units of 2 / 4 heads of a KV head) vs the per-head VS kernel (ms)", rows,
                [("tokens", "{:d}")] + [(f"{n}_{x}", f) for n in variants for x, f in (
                    ("vs_kernel_ms", "{:.1f}"), ("union2_kernel_ms", "{:.1f}"), ("union2_work_vs_per_head", "{:.2f}"),
                    ("union4_kernel_ms", "{:.1f}"), ("union4_work_vs_per_head", "{:.2f}"), ("union4_tflops", "{:.0f}"))])
        print("crossover (tokens):", result["crossover_tokens"])
        if args.sweep and not args.smoke:
            result["sweep"] = sweep_rows(lengths[0], dev, dtype, args.inputs)
    if "ttft" in parts:
        plan = [(512, 2)] if args.smoke else [tuple(int(x) for x in item.split("x")) for item in args.ttft.split(",")]
        result["ttft"] = ttft_rows(dev, plan, 256 if args.smoke else args.chunk, args.smoke, args.attention,
                                   union_heads=args.union_heads, locality=args.locality, patterns=args.patterns)
        result["ttft_model"] = {"attention": args.attention, "locality": args.locality, "patterns": args.patterns}
        c.table("time to first token (s) on the 8B shape", result["ttft"],
                [("variant", "{}"), ("tokens", "{:d}"), ("layers", "{:d}"), ("prefill_s", "{:.2f}"),
                 ("ttft_speedup", "{:.2f}"), ("peak_prefill_GiB", "{:.1f}"), ("kv_GiB", "{:.2f}")])
    if save:
        c.write_json(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
